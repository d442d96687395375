"""Supervised fine-tuning: chapter "supervised fine-tuning" (a pretrained GPT learns to answer in turns).

The pretrained model from train.py continues text. Here it learns the shape of a conversation: a user's
turn, then the assistant's answer, then a token that says "my turn is over". One file, top to bottom:

    config      SFTConfig; argparse is built from its fields
    template    the chat template: messages -> (ids, mask), the tokens that are trained
    data        conversations from tasks.py and JSONL files -> examples -> padded or packed batches
    LoRA        low-rank adapters on chosen matrices, merged back into the weights at the end
    evaluation  greedy exact match per task kind and difficulty on held-out prompts (tasks.score)
    main        setup, data, model, optimizer, the short loop, save, summary.json
    chat        an interactive chat with a checkpoint, tokens streamed as they are sampled

Run it:

    python train.py && python sft.py                 # pretrain, then fine-tune out/pretrain into out/sft
    python sft.py --lora-rank 8                      # LoRA instead of full fine-tuning
    python sft.py --data my_chats.jsonl --no-tasks   # your own conversations (chat, Alpaca or ShareGPT JSONL)
    python sft.py --show 3                           # print 3 rendered examples, trained tokens highlighted
    python sft.py --chat out/sft                     # talk to the fine-tuned model
    python sft.py --resume auto                      # continue exactly from the newest checkpoint in --out-dir
    torchrun --standalone --nproc_per_node=8 sft.py --init out/pretrain

Tests: python -m pytest -q tests/test_sft.py

## The objective

A conversation is rendered into one token sequence x_1..x_n. Pretraining minimises -sum_t log p(x_t | x_<t)
over every token. SFT minimises the same sum over the assistant's tokens only:

    L = -(1/N) sum_{t in A} log p(x_t | x_<t),    A = the assistant's content tokens and each of its <|end|>

The prompt is context, not something to imitate: training on the user's words would teach the model to
write questions. The <|end|> after each answer is in A, or the model never learns to stop (a bug users
of several trainers have hit when the end token doubled as padding and was masked out with it). N is the
count of trained tokens over the whole global batch, all micro-batches and all ranks (train.train_step
divides by it), so a long answer weighs what its tokens weigh.

Following the project's convention, an example is (x, y) with y = -1 wherever no loss is wanted: the
prompt, padding, and (when packing) nothing of one conversation ever sees another.

## The teacher

The embedded tasks' answers are a teacher's demonstrations (--teacher flawed, the default): right on most
problems, and wrong in a systematic, documented way on a weak spot of three kinds (tasks.py: sort writes a
repeated letter once, upper misreads "in capital letters", safety judges a request by its verb), each mistake
made on a share of its weak spot set by --teacher-sort, --teacher-upper, --teacher-safety. SFT learns the
teacher, mistakes included: that is the gap the later chapters (dpo.py, rlhf.py) close with a judge that checks
answers instead of writing them. --teacher perfect gives the solver's answers everywhere. Held-out accuracy is
reported on the weak spot and elsewhere (half of each weak-spot kind's held-out prompts are from its weak spot),
on the same prompts that dpo.py, rlhf.py and eval.py's report use.

## Packing

Conversations are short (tens of tokens) and the context is long (hundreds): padding each one to the row
length would spend most of the compute on padding. Packing puts several whole conversations into one row.
Each token then gets its position within its own conversation (positions restart) and a document id,
and attention is confined to the earlier tokens of the same document. The model computes for every
conversation exactly what it would compute for that conversation alone (a test checks it to 1e-5).

## Replay

Fine-tuned on conversations alone, the model forgets what it learned in pretraining: measured on the default
run (mini preset, 1000 steps, eval.py on the whole validation split), its loss on the pretraining text rose from
4.21 to 10.81 nats/token, worse than a uniform guess over the 4096 tokens (8.32). So a few rows of each batch are
plain pretraining text from the base model's own data folder (--replay, the share of rows; 2 of 16 by default),
trained on every token as in train.py. With them the text loss ended at 4.58 and the mean held-out accuracy
over all kinds and difficulties at 0.606 instead of 0.628 (one seed each). Both are logged (val_lm_loss, acc),
so the trade is visible.

## LoRA (Hu et al. 2021)

Full fine-tuning updates every weight. LoRA freezes a weight W (out x in) and learns a low-rank change:

    W' = W + (alpha / r) B A,    A (r x in), B (out x r), r much smaller than in and out

B starts at zero, so the fine-tuned model starts exactly as the pretrained one. Only A and B train: r x
(in + out) numbers per matrix instead of in x out. alpha / r scales the update so that changing r does not
change how far a step moves the output (alpha = r gives scale 1). After training, merge_lora folds
(alpha / r) B A into W, and the model is an ordinary GPT again, with no extra cost at inference.
The default alpha is 2r (scale 2 whatever the rank); PEFT's is a fixed 8, so its scale falls as r grows and a
PEFT alpha is not portable: pass --lora-alpha 8 for its. --lora-rslora scales by alpha / sqrt(r) instead
(rsLoRA, Kalajdzievski 2023; PEFT's use_rslora), which keeps large ranks learning as fast as small ones.

A base whose tokenizer lacked the chat tokens (GPT-2's) gets new rows for them (GPT.resize_vocab). LoRA freezes
the embedding, which is also the output layer, so those rows would keep their starting values and the model could
never learn what <|end|> means, nor stop. Their rows train with the adapters (PEFT's trainable_token_indices), are
saved in adapter.pt with them, and are copied into the embedding at the merge.
"""
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field, fields, replace

import numpy as np
import tiktoken
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import tasks
import train
from model import GPT, GPTConfig


# --- config ---

TEACHER_ERRORS = tasks.TEACHER_ERRORS  # the config's `tasks` field hides the module inside the class body


@dataclass
class SFTConfig:
    # model and data
    init: str | None = None             # checkpoint (file or run folder) to fine-tune; None = newest in out/pretrain
    data_dir: str | None = None         # folder whose tokenizer to use; None = the one the checkpoint was trained on
    data: list[str] = field(default_factory=list)  # JSONL files of conversations (chat, Alpaca or ShareGPT)
    tasks: bool | None = None           # add the embedded tasks (tasks.py); None = on when no --data is given
    kinds: list[str] = field(default_factory=lambda: list(tasks.KINDS))  # task kinds to train and evaluate on
    difficulties: list[int] = field(default_factory=lambda: [1, 2])  # task difficulties to train on
    examples_per_task: int = 2000       # training conversations per kind and difficulty (fewer if the kind has fewer)
    teacher: str = "flawed"             # who wrote the task answers: flawed (tasks.py's teacher) or perfect (solver)
    teacher_sort: float = TEACHER_ERRORS["sort"]      # flawed teacher: share of its weak-spot answers that
    teacher_upper: float = TEACHER_ERRORS["upper"]    #   are wrong, per kind (tasks.py: repeated letters,
    teacher_safety: float = TEACHER_ERRORS["safety"]  #   "capital letters", requests judged by their verb)
    pack: bool = True                   # pack several conversations per row (else one per row, padded)
    replay: float = 0.125               # share of each batch's rows that are the base model's pretraining text
    #                                     (all tokens trained): keeps it a language model; 0 = conversations only
    overlong: str = "drop"              # a conversation longer than seq_len+1 tokens: drop it, or truncate it
    batch_size: int = 16                # rows per micro-batch per device
    seq_len: int | None = None          # tokens per row; None = the model's block_size
    grad_accum: int = 1                 # micro-batches per optimizer step
    # LoRA
    lora_rank: int = 0                  # rank r of the adapters; 0 = full fine-tuning
    lora_alpha: float | None = None     # scale numerator alpha (the update is alpha/r * B A); None = 2 * rank
    lora_rslora: bool = False           # scale by alpha/sqrt(r) (rsLoRA, PEFT's use_rslora) instead of alpha/r
    lora_dropout: float = 0.0           # dropout on the adapters' input
    lora_targets: list[str] = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"])  # Linear names to adapt
    # optimization
    max_steps: int = 1000               # optimizer steps
    lr: float | None = None             # peak learning rate; None = 2e-3 for full fine-tuning, 5e-3 with LoRA
    min_lr_frac: float = 0.1            # final learning rate as a fraction of --lr
    warmup_steps: int | None = None     # linear warmup steps; None = 5% of max_steps
    schedule: str = "cosine"            # cosine, wsd or constant (train.lr_at)
    cooldown_frac: float = 0.2          # wsd only: fraction of max_steps spent decaying
    weight_decay: float = 0.0           # AdamW weight decay on matrices (the pretrained weights are the prior)
    beta1: float = 0.9                  # AdamW first-moment decay
    beta2: float = 0.95                 # AdamW second-moment decay
    grad_clip: float = 1.0              # clip the global gradient norm; 0 = no clipping
    # runtime
    device: str | None = None           # cpu or cuda; None = cuda when available
    dtype: str | None = None            # float32 or bfloat16; None = bfloat16 on CUDA, float32 on CPU
    compile: bool = False               # torch.compile the model
    threads: int | None = None          # torch CPU threads; None = torch's default
    seed: int = 1337                    # data order, LoRA init, dropout
    # evaluation, logging, checkpoints
    eval_every: int = 250               # steps between held-out evaluations (task accuracy and val loss)
    eval_examples: int = 100            # held-out prompts per kind and difficulty
    eval_difficulties: list[int] = field(default_factory=lambda: [1, 2])  # difficulties evaluated
    max_new_tokens: int = 32            # answer length limit in evaluation
    log_every: int = 20                 # steps between progress lines and metrics.jsonl records
    save_every: int = 250               # steps between checkpoints (one is always saved at the end)
    keep_last: int = 2                  # checkpoints kept in out_dir
    out_dir: str = "out/sft"            # run folder: checkpoints, metrics.jsonl, summary.json, adapter.pt
    resume: str | None = None           # checkpoint path, or "auto" = newest in out_dir


CHOICES = {"overlong": ("drop", "truncate"), "schedule": ("cosine", "wsd", "constant"), "device": ("cpu", "cuda"),
           "dtype": ("float32", "bfloat16")}
ROLES = ("system", "user", "assistant")


class SFTError(train.TrainError):
    """Bad input for SFT: one line, exit status 2 (train.TrainError's status)."""


# --- template ---
# <|endoftext|> <|user|> content <|end|> <|assistant|> content <|end|> ... : one document per conversation.
# The special tokens are those data.py reserves at the end of every vocabulary it trains. Content is encoded
# as ordinary text, so a user typing "<|assistant|>" gets those characters, never the token that opens a turn.

def with_chat_tokens(tokenizer):
    """The tokenizer itself when it has every chat token; else a copy with the missing ones appended as new ids
    after its vocabulary (tiktoken's gpt2 has only <|endoftext|>). The model then needs GPT.resize_vocab."""
    missing = [s for s in data.SPECIAL_TOKENS if s not in tokenizer.special_ids]
    if not missing:
        return tokenizer
    enc = tokenizer.enc
    specials = {**enc._special_tokens, **{s: enc.n_vocab + i for i, s in enumerate(missing)}}
    chat = tiktoken.Encoding(name=f"{enc.name}-chat", pat_str=enc._pat_str, mergeable_ranks=enc._mergeable_ranks,
                             special_tokens=specials)
    return data.Tokenizer(chat, f"{tokenizer.hash}+chat")


def render(messages, tokenizer):
    """A conversation -> (ids, mask): mask[i] is 1 where token i is trained (assistant content and its <|end|>)."""
    special = tokenizer.special_ids
    ids, mask = [special["<|endoftext|>"]], [0]
    for m in messages:
        if m["role"] not in ROLES:
            raise ValueError(f"unknown role {m['role']!r}: use one of {', '.join(ROLES)}")
        content = tokenizer.encode(m["content"])  # ordinary text: special-token strings stay plain characters
        trained = int(m["role"] == "assistant")
        ids += [special[f"<|{m['role']}|>"], *content, special["<|end|>"]]
        mask += [0] + [trained] * (len(content) + 1)
    return ids, mask


def render_prompt(messages, tokenizer):
    """The ids that ask the model for the next assistant turn: the conversation so far, then <|assistant|>."""
    ids, _ = render(messages, tokenizer)
    return ids + [tokenizer.special_ids["<|assistant|>"]]


def to_example(ids, mask):
    """(ids, mask) -> (x, y): y[t] is the token after x[t] where that token is trained, else -1.

    The shift is here and only here: the mask belongs to the token being predicted, y[t] = ids[t+1]."""
    x = ids[:-1]
    y = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
    return x, y


def show(conversations, tokenizer, n, file=None):
    """Print n rendered conversations with the trained tokens in green (a terminal) or [[brackets]] (a file)."""
    file = file or sys.stdout
    tty = file.isatty()
    for messages in conversations[:n]:
        ids, mask = render(messages, tokenizer)
        out, i = [], 0
        while i < len(ids):  # runs of equal mask, decoded together so multi-byte characters stay whole
            j = i
            while j < len(ids) and mask[j] == mask[i]:
                j += 1
            text = tokenizer.decode(ids[i:j])
            out.append((f"\033[32m{text}\033[0m" if tty else f"[[{text}]]") if mask[i] else text)
            i = j
        print("".join(out), file=file)
        print(f"({len(ids)} tokens, {sum(mask)} trained)\n", file=file)


# --- data ---

def load_conversations(cfg, seed):
    """The training conversations and a report: the --data files through tasks.py's quality filters, and the
    embedded tasks' train split, each (kind, difficulty) repeated up to examples_per_task conversations.

    The small problem spaces (1-digit addition has under a hundred problems) would otherwise be a fraction of
    a percent of the mixture and barely learned; repeating them is nanochat's way of weighting its mixture.
    The generated tasks skip the filters: they are distinct and well-formed by construction."""
    convs, report = [], {}
    for path in cfg.data:
        try:
            convs += tasks.read_conversations(path)
        except tasks.TaskError as e:
            raise SFTError(str(e)) from None
    if convs:
        convs, filtered = tasks.filter_conversations(convs)
        report["files"] = {"in": filtered["in"], "kept": filtered["kept"], "dropped": filtered["dropped"]}
    if cfg.tasks or (cfg.tasks is None and not cfg.data):
        errors, rng = teacher_errors(cfg), random.Random(f"teacher:{seed}")
        wrong = 0
        for kind in cfg.kinds:
            for d in cfg.difficulties:
                found = tasks.generate(kind, cfg.examples_per_task, seed, "train", d)
                repeat = math.ceil(cfg.examples_per_task / max(1, len(found)))
                for ex in (found * repeat)[:cfg.examples_per_task]:  # a repeated problem draws its answer again
                    answer = tasks.teacher_answer(ex, errors, rng)
                    wrong += answer != ex["answer"]
                    convs.append([{"role": "user", "content": ex["prompt"]}, {"role": "assistant", "content": answer}])
                report[f"{kind}/{d}"] = len(found)
        report["teacher"] = {"errors": errors, "wrong_answers": wrong}
    if not convs:
        raise SFTError("no training conversations: give --data FILE or leave --tasks on")
    return convs, report


def teacher_errors(cfg):
    """{kind: share of the teacher's weak-spot answers that are wrong}; {} for the perfect teacher."""
    if cfg.teacher not in ("flawed", "perfect"):
        raise SFTError(f"--teacher {cfg.teacher!r}: choose flawed or perfect")
    errors = {k: getattr(cfg, f"teacher_{k}") for k in tasks.TEACHER_ERRORS} if cfg.teacher == "flawed" else {}
    for k, e in errors.items():
        if not 0 <= e <= 1:
            raise SFTError(f"--teacher-{k} {e}: a share of answers, between 0 and 1")
    return errors


def build_examples(conversations, tokenizer, seq_len, overlong):
    """Rendered (x, y) examples of at most seq_len tokens, and how many conversations were dropped or cut."""
    examples, counts = [], {"dropped_overlong": 0, "truncated_overlong": 0, "dropped_untrained": 0}
    for messages in conversations:
        ids, mask = render(messages, tokenizer)
        if len(ids) > seq_len + 1:
            if overlong == "drop":
                counts["dropped_overlong"] += 1
                continue
            ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
            counts["truncated_overlong"] += 1
        x, y = to_example(ids, mask)
        if all(t == -1 for t in y):  # no assistant token left (or none at all): nothing to learn from it
            counts["dropped_untrained"] += 1
            continue
        examples.append((x, y))
    return examples, counts


def pack_rows(lengths, seq_len, open_rows=64):
    """Best-fit packing: each example goes into the open row it fills most tightly. -> list of rows (index lists).

    At most `open_rows` rows are open at once (the fullest one is closed when another must open), which keeps
    this linear in the number of examples. Examples are never split: a conversation cut in two would have
    its answer trained without its question."""
    rows, room = [], []  # room[i]: free positions in open row i
    closed = []
    for i, n in enumerate(lengths):
        fits = [r for r in range(len(rows)) if room[r] >= n]
        if fits:
            r = min(fits, key=lambda r: room[r])
        else:
            if len(rows) == open_rows:
                r = min(range(len(rows)), key=lambda r: room[r])
                closed.append(rows.pop(r))
                room.pop(r)
            rows.append([])
            room.append(seq_len)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= n
    return closed + rows


class SFTLoader:
    """Batches of examples, reshuffled (and repacked) every epoch from the seed, resumable like data.TokenLoader.

    Packed: each batch is (x, y, pos, doc), rows of exactly seq_len tokens. Padded: (x, y), one example per row,
    padded to the longest in the batch. Step k of an epoch takes rows [k*B*W, (k+1)*B*W) and rank r its own B,
    so ranks are disjoint and the state (epoch, position) is the same on every rank."""

    def __init__(self, examples, batch_size, seq_len, pack, pad_id, rank=0, world_size=1, seed=0):
        self.examples, self.B, self.T, self.pack, self.pad_id = examples, batch_size, seq_len, pack, pad_id
        self.rank, self.world, self.seed = rank, world_size, seed
        self.epoch, self.position, self._rows = 0, 0, None

    def check(self):
        """SFTError when an epoch does not fill one global batch (next_batch would return short batches)."""
        if len(self._epoch_rows()) < self.B * self.world:
            raise SFTError(f"{len(self.examples)} examples make {len(self._epoch_rows())} rows, fewer than batch "
                           f"{self.B} x world {self.world}; give more data or a smaller --batch-size")
        return self

    def _epoch_rows(self):
        if self._rows is None or self._rows[0] != self.epoch:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))
            if self.pack:
                rows = [[int(order[i]) for i in row]
                        for row in pack_rows([len(self.examples[i][0]) for i in order], self.T)]
                rows = [rows[i] for i in np.random.default_rng([self.seed, self.epoch, 1]).permutation(len(rows))]
            else:
                rows = [[int(i)] for i in order]
            self._rows = (self.epoch, rows)
        return self._rows[1]

    def next_batch(self):
        rows = self._epoch_rows()
        if self.position + self.B * self.world > len(rows):  # drop the ragged end, start the next epoch
            self.epoch, self.position = self.epoch + 1, 0
            rows = self._epoch_rows()
        start = self.position + self.rank * self.B
        batch = self.collate(rows[start:start + self.B])
        self.position += self.B * self.world
        return batch

    def collate(self, rows):
        T = self.T if self.pack else max(sum(len(self.examples[i][0]) for i in row) for row in rows)
        x = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), T), -1, dtype=torch.long)
        pos = torch.zeros((len(rows), T), dtype=torch.long)
        doc = torch.full((len(rows), T), -1, dtype=torch.long)  # -1: padding, a document of its own
        for r, row in enumerate(rows):
            t = 0
            for d, i in enumerate(row):
                ex_x, ex_y = self.examples[i]
                n = len(ex_x)
                x[r, t:t + n], y[r, t:t + n] = torch.tensor(ex_x), torch.tensor(ex_y)
                pos[r, t:t + n], doc[r, t:t + n] = torch.arange(n), d
                t += n
        # One example per row needs no document mask: the causal mask already hides the padding after it.
        return (x, y, pos, doc) if self.pack else (x, y)

    def fixed_batches(self, limit):
        """Up to `limit` batches of this rank's share of the first epoch's rows: one pass, for validation."""
        rows = self._epoch_rows()[self.rank::self.world]
        return [self.collate(rows[i:i + self.B]) for i in range(0, min(len(rows), limit * self.B), self.B)]

    def padding_fraction(self, batches=50):
        """Share of positions that hold padding, over the first rows of this epoch."""
        rows = self._epoch_rows()[:batches * self.B]
        real = sum(len(self.examples[i][0]) for row in rows for i in row)
        if self.pack:
            return 1 - real / (len(rows) * self.T)
        total = sum(max(len(self.examples[row[0]][0]) for row in rows[k:k + self.B]) * len(rows[k:k + self.B])
                    for k in range(0, len(rows), self.B))
        return 1 - real / total

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "examples": len(self.examples)}

    def load_state_dict(self, state):
        if (state["seed"], state["examples"]) != (self.seed, len(self.examples)):
            raise SFTError(f"loader state is for seed {state['seed']} and {state['examples']} examples, this run "
                           f"has seed {self.seed} and {len(self.examples)}: resume with the same data flags")
        self.epoch, self.position = state["epoch"], state["position"]


def sft_loss(model, batch):
    """Summed next-token loss over the trained targets of a batch (x, y) or packed (x, y, pos, doc)."""
    x, y, *packing = batch
    pos, doc = packing or (None, None)
    _, loss = model(x, y, reduction="sum", pos=pos, doc=doc)
    return loss


def with_replay(batch, text):
    """An SFT batch with rows of pretraining text (x, y) appended, cut to the batch's length. Each text row is one
    document at positions 0..T-1, and every one of its targets is trained (the plain language-model loss)."""
    T = batch[0].size(1)
    x, y = text[0][:, :T], text[1][:, :T]
    if len(batch) == 2:
        return torch.cat([batch[0], x]), torch.cat([batch[1], y])
    pos = torch.arange(T).expand(x.size(0), T)
    return (torch.cat([batch[0], x]), torch.cat([batch[1], y]), torch.cat([batch[2], pos]),
            torch.cat([batch[3], torch.zeros_like(x)]))


# --- LoRA ---

class LoRALinear(nn.Module):
    """base(x) + (alpha / rank) * B(A(dropout(x))), with base frozen. A starts small and random, B at zero.
    rslora: alpha / sqrt(rank) instead (rsLoRA)."""

    def __init__(self, base, rank, alpha, dropout=0.0, rslora=False):
        super().__init__()
        self.base, self.rank, self.scale = base, rank, alpha / (math.sqrt(rank) if rslora else rank)
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as the LoRA paper's code
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged(self):
        """The base Linear with the update folded in: W + scale * B A."""
        with torch.no_grad():
            self.base.weight += self.scale * (self.lora_B @ self.lora_A).to(self.base.weight.dtype)
        return self.base


class TrainableTokens(nn.Module):
    """The token embedding (nn.Embedding) or output layer (nn.Linear) with the rows of ids new_tokens = [first, end)
    trainable and every other row frozen (PEFT's trainable_token_indices).

    The rows are a parameter of their own, lora_rows (end - first, C), so the optimizer holds only them (and weight
    decay reaches no frozen row) and adapter.pt saves them with the adapters. With tied embeddings the output layer
    is given the embedding's lora_rows: one tensor still. The whole weight is put together at each call, a copy
    of the table that is small next to the forward pass it feeds.
    """

    def __init__(self, base, new_tokens, rows=None):
        super().__init__()
        self.base, (self.first, self.end) = base, new_tokens
        base.weight.requires_grad_(False)
        self.lora_rows = rows if rows is not None else nn.Parameter(base.weight.detach()[self.first:self.end].clone())

    @property
    def weight(self):
        """(V, C), read by GPT as lm_head.weight (the fused loss) and wte.weight (the device and dtype)."""
        w = self.base.weight
        return torch.cat([w[:self.first], self.lora_rows, w[self.end:]])

    def forward(self, x):
        if isinstance(self.base, nn.Embedding):
            return F.embedding(x, self.weight)  # token ids (B, T) -> (B, T, C)
        return F.linear(x, self.weight)         # hidden states (B, T, C) -> logits (B, T, V)

    def merged(self):
        """The base module with the trained rows copied in."""
        with torch.no_grad():
            self.base.weight[self.first:self.end] = self.lora_rows
        return self.base


def apply_lora(model, rank, alpha, dropout=0.0, targets=("c_attn", "c_proj", "c_fc"), new_tokens=None,
               rslora=False):
    """Freeze every parameter of model, then wrap each nn.Linear named in targets with a LoRALinear. -> model.

    lm_head gets no adapter: it is the token embedding too (tied). new_tokens [first, end), when given, are ids
    whose rows resize_vocab has just made (chat tokens the base lacked): frozen, they would keep their starting
    values, so they train instead (TrainableTokens, in wte and lm_head). Names: c_attn (q, k, v), c_proj
    (attention and MLP outputs), c_fc (MLP input)."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name in targets:
                setattr(module, name, LoRALinear(child, rank, alpha, dropout, rslora))
                wrapped += 1
    if not wrapped:
        raise SFTError(f"--lora-targets {' '.join(targets)} matched no Linear layer; use c_attn, c_proj, c_fc")
    if new_tokens is not None:
        wte, tied = model.transformer.wte, model.lm_head.weight is model.transformer.wte.weight
        model.transformer.wte = TrainableTokens(wte, new_tokens)
        model.lm_head = TrainableTokens(model.lm_head, new_tokens, model.transformer.wte.lora_rows if tied else None)
    return model


def merge_lora(model):
    """Fold every adapter into its base weight and unwrap it: an ordinary GPT again. -> model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (LoRALinear, TrainableTokens)):
                setattr(module, name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_state(model):
    """Only the adapter tensors of a LoRA model (what adapter.pt holds)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


# --- checkpoints and models ---

def find_init(path, default="out/pretrain", before="python train.py"):
    """The checkpoint file to start from: path (a file, a run folder's newest checkpoint, or a Hugging Face
    folder), or default's newest when path is None; SFTError saying to run `before` first when there is none.
    dpo.py passes out/sft and `python sft.py`, so each stage names the one before it."""
    path = path or default
    hint = f"run `{before}` first, or give the checkpoint's path"
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        found = train.list_checkpoints(path)
        if not found:
            raise SFTError(f"no checkpoint in {path}: {hint}")
        return found[-1]
    if not os.path.exists(path):
        raise SFTError(f"{path} does not exist: {hint}")
    return path


def tokenizer_of(ckpt, data_dir=None):
    """The chat tokenizer of a checkpoint (from the data folder it names, or data_dir), checked against its hash."""
    data_dir = data_dir or ckpt.get("tokenizer_dir") or ckpt["config"].get("data_dir")
    try:
        tokenizer = data.load_tokenizer(data_dir)
    except data.DataError as e:
        raise SFTError(f"cannot load the checkpoint's tokenizer: {e}") from None
    expected = ckpt.get("tokenizer_hash")
    if expected is not None and tokenizer.hash != expected.removesuffix("+chat"):
        raise SFTError(f"the checkpoint was trained with tokenizer {expected}, but {data_dir} has tokenizer "
                       f"{tokenizer.hash}; give --data-dir with the data the checkpoint was trained on")
    return with_chat_tokens(tokenizer), data_dir


def load_base(path, data_dir=None):
    """(model, chat tokenizer, tokenizer folder, checkpoint dict) for a forge checkpoint or a Hugging Face GPT-2
    folder. A LoRA checkpoint comes back merged. The vocabulary grows when the tokenizer gained chat tokens, and
    the checkpoint dict's "new_tokens" is then [first, end) of the ids given new rows here (else None)."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        model = GPT.from_pretrained(path)
        tokenizer, data_dir = with_chat_tokens(data.load_tokenizer(data_dir or "gpt2")), data_dir or "gpt2"
        ckpt = {"step": 0, "stage": "hf"}
    else:
        ckpt = train.load_checkpoint(path)
        tokenizer, data_dir = tokenizer_of(ckpt, data_dir)
        model = GPT(GPTConfig(**ckpt["model_config"]))
        if "n_tokens" not in ckpt["model_config"]:  # saved before the field: rows past the tokenizer's are padding
            model.config.n_tokens = min(model.config.vocab_size, tokenizer.vocab_size)
        if ckpt.get("lora"):
            apply_lora(model, **ckpt["lora"])
        model.load_state_dict(ckpt["model"])
        if ckpt.get("lora"):
            merge_lora(model)
    new_tokens = None
    if model.config.n_tokens < tokenizer.vocab_size:
        new_tokens = [model.config.n_tokens, tokenizer.vocab_size]
        model.resize_vocab(tokenizer.vocab_size)
    return model, tokenizer, data_dir, {**ckpt, "new_tokens": new_tokens}


# --- evaluation ---

def eval_sets(kinds, difficulties, n, seed=0):
    """Held-out examples per (kind, difficulty): the test split, the same prompts before and after training and at
    every stage; where the teacher has a weak spot, half of them are from it (tasks.heldout marks each "weak")."""
    return {(k, d): tasks.heldout(k, n, d, seed) for k in kinds for d in difficulties}


@torch.no_grad()
def task_accuracy(model, tokenizer, sets, rt, max_new_tokens=32, batch=256):
    """Greedy exact match per (kind, difficulty) by tasks.score; each rank answers its share of the prompts."""
    end = tokenizer.special_ids["<|end|>"]
    items = [(key, ex) for key, exs in sets.items() for ex in exs][rt.rank::rt.world_size]
    right = {key: torch.zeros(2, device=rt.device) for key in sets}  # [correct, total]
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        prompts = [render_prompt(ex["messages"][:-1], tokenizer) for _, ex in chunk]
        with rt.autocast():
            outs = model.generate(prompts, max_new_tokens, temperature=0, stop_tokens=[end])
        for (key, ex), out in zip(chunk, outs):
            answer = tokenizer.decode([t for t in out if t != end])
            right[key] += torch.tensor([float(tasks.score(ex["kind"], ex["prompt"], answer)), 1.0], device=rt.device)
    result = {}
    for key, counts in right.items():
        if rt.ddp:
            dist.all_reduce(counts)
        result[key] = (counts[0] / counts[1].clamp(min=1)).item()
    return result


def heldout_sets(config, n=None):
    """The held-out sets every later stage reports on, read from a checkpoint's config: the SFT run's kinds,
    difficulties and prompt count (a DPO checkpoint's eval_kinds), so every stage answers the same prompts.
    n overrides the count; 0 gives none."""
    defaults = SFTConfig()
    n = n if n is not None else config.get("eval_examples") or defaults.eval_examples
    kinds = config.get("eval_kinds") or config.get("kinds") or defaults.kinds
    return eval_sets(kinds, config.get("eval_difficulties") or defaults.eval_difficulties, n) if n else {}


def heldout_accuracy(model, tokenizer, sets, rt, max_new_tokens=32):
    """task_accuracy, and the same answers split into the teacher's weak spot and elsewhere. Returns
    ({(kind, difficulty): accuracy}, split) where split = {"weak": {kind: acc}, "elsewhere": {kind: acc},
    "weak_mean", "elsewhere_mean", "n_weak": {kind: prompts}}, pooled over the difficulties. Every stage reports
    this split on the same prompts, so a gain on the weak spot cannot hide a loss elsewhere."""
    parts = {(k, d, part): [e for e in exs if e.get("weak", False) == (part == "weak")]
             for (k, d), exs in sets.items() for part in ("weak", "elsewhere")}
    parts = {key: exs for key, exs in parts.items() if exs}
    acc = task_accuracy(model, tokenizer, parts, rt, max_new_tokens)

    def pooled(match):
        keys = [key for key in parts if match(key)]
        return sum(acc[key] * len(parts[key]) for key in keys) / sum(len(parts[key]) for key in keys)

    per_difficulty = {(k, d): pooled(lambda key: key[:2] == (k, d)) for k, d in sets}
    kinds = dict.fromkeys(k for k, _ in sets)
    split = {part: {k: pooled(lambda key: key[0] == k and key[2] == part) for k in kinds
                    if any(key[0] == k and key[2] == part for key in parts)} for part in ("weak", "elsewhere")}
    split["n_weak"] = {k: sum(len(exs) for key, exs in parts.items() if key[0] == k and key[2] == "weak")
                       for k in split["weak"]}
    split["weak_mean"] = float(np.mean(list(split["weak"].values()))) if split["weak"] else None
    split["elsewhere_mean"] = float(np.mean(list(split["elsewhere"].values())))
    return per_difficulty, split


def print_split(before, after):
    """The weak-spot table: per kind, before -> after on the weak spot and elsewhere."""
    out = [f"{'kind':<10} {'weak spot':>17} {'elsewhere':>17}"]
    for k in after["elsewhere"]:
        w = (f"{before['weak'][k]:.3f} -> {after['weak'][k]:.3f}" if k in after["weak"] else "-")
        out.append(f"{k:<10} {w:>17} {before['elsewhere'][k]:.3f} -> {after['elsewhere'][k]:.3f}")
    if after["weak_mean"] is not None:
        out.append(f"{'mean':<10} {before['weak_mean']:.3f} -> {after['weak_mean']:.3f} "
                   f"{before['elsewhere_mean']:.3f} -> {after['elsewhere_mean']:.3f}")
    train.print0("\n".join(out))


def by_kind(acc, difficulty=None):
    """{kind: accuracy} at one difficulty (or averaged over all of them)."""
    kinds = dict.fromkeys(k for k, _ in acc)
    return {k: float(np.mean([a for (kk, d), a in acc.items() if kk == k and difficulty in (None, d)]))
            for k in kinds}


def print_table(before, after):
    keys = sorted(before)
    train.print0(f"{'kind':<10} {'diff':>4} {'before':>7} {'after':>7}")
    for k, d in keys:
        train.print0(f"{k:<10} {d:>4} {before[(k, d)]:>7.3f} {after[(k, d)]:>7.3f}")
    train.print0(f"{'mean':<10} {'':>4} {np.mean(list(before.values())):>7.3f} {np.mean(list(after.values())):>7.3f}")


# --- main ---

def derive(cfg, block_size):
    """Fill the fields left at None. The learning rates were measured on the default run (mini preset, embedded
    tasks): 2e-3 reached a higher held-out accuracy at 1000 steps than 1e-3; LoRA trains fewer, zero-started
    weights and takes a larger one, as is usual (Hu et al. 2021; TRL's LoRA guide suggests ~10x)."""
    lr = cfg.lr if cfg.lr is not None else (5e-3 if cfg.lora_rank else 2e-3)
    return replace(cfg, lr=lr, seq_len=cfg.seq_len or block_size,
                   warmup_steps=cfg.max_steps // 20 if cfg.warmup_steps is None else cfg.warmup_steps,
                   lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else 2.0 * cfg.lora_rank)


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def main(cfg):
    """Fine-tune cfg.init on conversations; returns the summary dict also written to out_dir/summary.json."""
    # --- setup ---
    rt = train.setup_runtime(cfg.device, cfg.dtype, cfg.threads)
    for name in ("max_steps", "eval_every", "log_every", "save_every", "keep_last", "batch_size", "grad_accum"):
        if getattr(cfg, name) < 1:
            raise SFTError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    unknown = [k for k in cfg.kinds if k not in tasks.KINDS]
    if unknown:
        raise SFTError(f"--kinds {' '.join(unknown)}: unknown; choose from {', '.join(tasks.KINDS)}")
    init = find_init(cfg.init)
    model, tokenizer, data_dir, base_ckpt = load_base(init, cfg.data_dir)
    cfg = derive(cfg, model.config.block_size)
    if cfg.seq_len > model.config.block_size:
        raise SFTError(f"--seq-len {cfg.seq_len} is longer than the model's block_size {model.config.block_size}")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise SFTError(f"--out-dir {cfg.out_dir} is a file; give a folder")
    if rt.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
    train.print0(f"device {rt.device} x {rt.world_size}; fine-tuning {init} ({model.num_params():,} parameters, "
                 f"tokenizer {tokenizer.hash} from {data_dir})")

    # --- data ---
    convs, report = load_conversations(cfg, cfg.seed)
    examples, cut = build_examples(convs, tokenizer, cfg.seq_len, cfg.overlong)
    report.update(cut)
    # Replay rows come from the pretraining data folder the tokenizer came from (none for a Hugging Face GPT-2).
    has_text = os.path.exists(os.path.join(str(data_dir), "meta.json"))
    n_replay = min(cfg.batch_size - 1, round(cfg.replay * cfg.batch_size)) if has_text else 0
    if cfg.replay and not has_text:
        train.print0(f"note: --replay {cfg.replay}: {data_dir} has no pretraining shards; conversations only")
    loader = SFTLoader(examples, cfg.batch_size - n_replay, cfg.seq_len, cfg.pack, tokenizer.eot_id, rt.rank,
                       rt.world_size, cfg.seed).check()
    replay = lm_val = None
    if n_replay:
        replay = data.TokenLoader(data_dir, "train", n_replay, cfg.seq_len, rt.rank, rt.world_size, seed=cfg.seed)
    if has_text:  # forgetting, measured: the loss on the base model's validation text, before and during SFT
        val_text = data.TokenLoader(data_dir, "val", cfg.batch_size, cfg.seq_len, rt.rank, rt.world_size,
                                    shuffle=False)
        lm_val = [train.to_device(val_text.next_batch(), rt) for _ in range(5)]
    trained = sum(sum(t != -1 for t in y) for _, y in examples)
    distinct = ", ".join(f"{k} {v}" for k, v in report.items() if "/" in k)
    train.print0(f"data: {len(examples):,} conversations ({trained:,} trained tokens); distinct task problems: "
                 f"{distinct or 'none'}; {report.get('files', 'no files')}; {cut}; "
                 f"{n_replay} of {cfg.batch_size} rows per batch are pretraining text (replay)")
    train.print0(f"{'packed' if cfg.pack else 'padded'} rows of {cfg.seq_len} tokens: padding is "
                 f"{100 * loader.padding_fraction():.1f}% of positions")
    sets = eval_sets(cfg.kinds, cfg.eval_difficulties, cfg.eval_examples)
    held_out = [ex["messages"] for exs in sets.values() for ex in exs]
    val_examples, _ = build_examples(held_out, tokenizer, cfg.seq_len, "drop")
    val_loader = SFTLoader(val_examples, cfg.batch_size, cfg.seq_len, cfg.pack, tokenizer.eot_id, rt.rank,
                           rt.world_size)
    val_batches = [train.to_device(b, rt) for b in val_loader.fixed_batches(10)]  # the same ones at every eval

    # --- model ---
    model.to(rt.device)
    lora = None
    if cfg.lora_rank:
        lora = dict(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=list(cfg.lora_targets))
        if base_ckpt["new_tokens"]:  # the chat tokens' rows are new (a GPT-2 base): they train too
            lora["new_tokens"] = base_ckpt["new_tokens"]
        if cfg.lora_rslora:  # kept in the checkpoint's and adapter.pt's lora dict, so a reload scales the same
            lora["rslora"] = True
        apply_lora(model, **lora)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train.print0(f"model: {n_train:,} of {sum(p.numel() for p in model.parameters()):,} parameters train"
                 + (f" (LoRA rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g}, on {' '.join(cfg.lora_targets)})"
                    if lora else ""))

    # --- optimizer ---
    optimizer = train.build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), rt.device)
    start_step, resume_path = 0, cfg.resume
    if resume_path == "auto":
        found = train.list_checkpoints(cfg.out_dir)
        resume_path = found[-1] if found else None
    if resume_path:
        ckpt = train.load_checkpoint(resume_path)
        if ckpt.get("stage") != "sft" or ckpt.get("lora") != lora or ckpt.get("base") != init:
            raise SFTError(f"cannot resume {resume_path}: it fine-tuned {ckpt.get('base')} with LoRA "
                           f"{ckpt.get('lora')}, this run {init} with {lora}; pass the same flags or a new --out-dir")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        loader.load_state_dict(ckpt["loader"]["sft"])
        if replay is not None:
            replay.load_state_dict(ckpt["loader"]["replay"])
        train.set_rng_states(ckpt["rng"])
        start_step = ckpt["step"]
        before = {(key.rsplit("/", 1)[0], int(key.rsplit("/", 1)[1])): v for key, v in ckpt["before"].items()}
        lm_before = ckpt["text_loss_before"]
        split_before = ckpt.get("heldout_before")
        train.print0(f"resumed from {resume_path} at step {start_step}")
    else:
        before, split_before = heldout_accuracy(model, tokenizer, sets, rt, cfg.max_new_tokens)
        lm_before = train.evaluate(model, lm_val, rt) if lm_val else None
        train.print0(f"before SFT: held-out greedy accuracy {np.mean(list(before.values())):.3f}"
                     + (f", text loss {lm_before:.4f} nats/token" if lm_val else ""))
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if rt.master:
        kept = ([r for r in train.read_metrics(cfg.out_dir) if r["step"] <= start_step]
                if resume_path and os.path.exists(metrics_path) else [])
        if not resume_path:  # a fresh run: nothing of an earlier run in this folder may pass for this one's
            for old in train.list_checkpoints(cfg.out_dir) + [os.path.join(cfg.out_dir, f)
                                                              for f in ("summary.json", "adapter.pt", "eval.json")]:
                if os.path.exists(old):
                    os.remove(old)
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
    wrapped = torch.compile(model) if cfg.compile else model
    if rt.ddp:
        wrapped = DDP(wrapped, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
    extra = dict(stage="sft", base=init, lora=lora, tokenizer_hash=tokenizer.hash, tokenizer_dir=data_dir,
                 before={f"{k}/{d}": v for (k, d), v in before.items()}, text_loss_before=lm_before,
                 heldout_before=split_before)

    # --- loop ---
    t_start, after, split, val_loss, lm_after = time.time(), None, None, None, None
    for step in range(start_step, cfg.max_steps):
        t0 = time.time()
        lr = train.lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [loader.next_batch() for _ in range(cfg.grad_accum)]
        if replay is not None:
            micro = [with_replay(b, replay.next_batch()) for b in micro]
        micro = [train.to_device(b, rt) for b in micro]
        loss, grad_norm = train.train_step(wrapped, optimizer, micro, rt, cfg.grad_clip, loss_fn=sft_loss)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise train.Diverged(f"step {step + 1}: loss {loss}, grad norm {grad_norm}; stopped without updating")
        done, dt = step + 1, time.time() - t0
        is_eval = done % cfg.eval_every == 0 or done == cfg.max_steps
        if done % cfg.log_every == 0 or is_eval or done == start_step + 1:
            rows = sum(b[0].numel() for b in micro) * rt.world_size
            tokens = sum(int((b[1] != -1).sum()) for b in micro)  # read back only when logged: a device sync
            record = {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm, "trained_tokens": tokens,
                      "tokens_per_sec": round(rows / dt)}
            line = f"step {done:>5}/{cfg.max_steps} | loss {loss:.4f} | lr {lr:.2e} | {rows / dt:,.0f} tok/s"
            if is_eval:
                val_loss = train.evaluate(wrapped, val_batches, rt, loss_fn=sft_loss)
                after, split = heldout_accuracy(model, tokenizer, sets, rt, cfg.max_new_tokens)
                record.update(val_loss=val_loss, acc=float(np.mean(list(after.values()))),
                              acc_weak=split["weak_mean"], acc_elsewhere=split["elsewhere_mean"],
                              **{f"acc/{k}/{d}": a for (k, d), a in after.items()})
                line += f" | val loss {val_loss:.4f} | held-out accuracy {record['acc']:.3f}"
                if split["weak_mean"] is not None:
                    line += f" (weak spot {split['weak_mean']:.3f}, elsewhere {split['elsewhere_mean']:.3f})"
                if lm_val:
                    record["val_lm_loss"] = lm_after = train.evaluate(wrapped, lm_val, rt)
                    line += f" | text loss {lm_after:.3f} (before {lm_before:.3f})"
            train.print0(line)
            if rt.master:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
        if (done % cfg.save_every == 0 or done == cfg.max_steps) and rt.master:
            loader_state = {"sft": loader.state_dict(), "replay": replay.state_dict() if replay else None}
            train.save_checkpoint(cfg.out_dir, done, model, optimizer, cfg, loader_state, cfg.keep_last,
                                  **extra)

    # --- save ---
    if after is None:  # resumed at max_steps: nothing ran
        after, split = heldout_accuracy(model, tokenizer, sets, rt, cfg.max_new_tokens)
    print_table(before, after)
    print_split(split_before, split)
    ckpt_path = train.list_checkpoints(cfg.out_dir)[-1] if rt.master else None
    summary = {"stage": "sft", "base": init, "checkpoint": ckpt_path, "steps": cfg.max_steps,
               "seconds": round(time.time() - t_start, 1), "val_loss": val_loss, "lora": lora,
               "text_loss_before": lm_before, "text_loss_after": lm_after, "replay_rows": n_replay,
               "trainable_params": n_train, "examples": len(examples), "data_report": report,
               "before": by_kind(before, min(cfg.eval_difficulties)),
               "after": by_kind(after, min(cfg.eval_difficulties)),
               "before_by_difficulty": {f"{k}/{d}": a for (k, d), a in before.items()},
               "after_by_difficulty": {f"{k}/{d}": a for (k, d), a in after.items()},
               "teacher": report.get("teacher"), "heldout": {"before": split_before, "after": split}}
    if rt.master:
        if lora:
            adapter = os.path.join(cfg.out_dir, "adapter.pt")
            torch.save({"lora": lora, "base": init, "state": lora_state(model)}, adapter + ".tmp")
            os.replace(adapter + ".tmp", adapter)
            summary["adapter_bytes"], summary["checkpoint_bytes"] = os.path.getsize(adapter), os.path.getsize(ckpt_path)
            train.print0(f"adapter.pt: {summary['adapter_bytes']:,} bytes; the full checkpoint "
                         f"{summary['checkpoint_bytes']:,} bytes")
        write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
        train.print0(f"wrote {ckpt_path} and {os.path.join(cfg.out_dir, 'summary.json')}")
    if rt.ddp:
        dist.barrier()
    return summary


# --- chat ---

def chat(path, data_dir=None, temperature=0.7, top_k=50, max_new_tokens=200, device=None,
         read=input, write=sys.stdout.write):
    """An interactive chat with a checkpoint: /reset, /temperature X, /exit. Tokens stream as they are sampled."""
    rt = train.setup_runtime(device)
    model, tokenizer, _, _ = load_base(find_init(path), data_dir)
    model.to(rt.device).eval()
    end, block = tokenizer.special_ids["<|end|>"], model.config.block_size
    history = []
    write("chat with the model: /reset clears the history, /temperature X sets sampling, /exit ends\n")
    while True:
        try:
            line = read("> ")
        except EOFError:
            break
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = []
            write("(history cleared)\n")
            continue
        if line.startswith("/temperature"):
            try:
                temperature = float(line.split()[1])
                write(f"(temperature {temperature})\n")
            except (IndexError, ValueError):
                write("(usage: /temperature 0.7)\n")
            continue
        history.append({"role": "user", "content": line})
        prompt = render_prompt(history, tokenizer)
        while len(prompt) > block - 16 and len(history) > 1:  # keep room for an answer: drop the oldest turns
            history = history[2:] if len(history) > 2 else history[1:]
            write("(note: the oldest turns were dropped to fit the context)\n")
            prompt = render_prompt(history, tokenizer)
        prompt = prompt[-(block - 16):]
        answer, shown = [], ""

        def stream(token_id):  # print what decodes cleanly so far; a split UTF-8 character waits for its rest
            nonlocal shown
            if token_id == end:
                return
            answer.append(token_id)
            text = tokenizer.decode(answer)
            if not text.endswith("\ufffd"):
                write(text[len(shown):])
                shown = text

        model.generate([prompt], max_new_tokens, temperature=temperature, top_k=top_k, stop_tokens=[end],
                       on_token=lambda ids: stream(ids[0]))
        write("\n")
        history.append({"role": "assistant", "content": tokenizer.decode(answer)})


def cli(argv=None):
    parser = data.config_parser(SFTConfig, __doc__, CHOICES)
    parser.add_argument("--show", type=int, metavar="N", help="print N rendered training examples and exit")
    parser.add_argument("--chat", metavar="CKPT", help="chat with a checkpoint (file or run folder) and exit")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of --chat")
    args = parser.parse_args(argv)
    cfg = SFTConfig(**{f.name: getattr(args, f.name) for f in fields(SFTConfig)})
    try:
        if args.chat:
            chat(args.chat, cfg.data_dir, args.temperature, device=cfg.device)
        elif args.show:
            _, tokenizer, _, _ = load_base(find_init(cfg.init), cfg.data_dir)
            convs, _ = load_conversations(cfg, cfg.seed)
            show(convs[::max(1, len(convs) // args.show)], tokenizer, args.show)
        else:
            main(cfg)
    except (train.TrainError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "status", 2))
    except KeyboardInterrupt:
        if args.chat:
            sys.exit(130)  # leaving a chat with Ctrl-C is no error worth a line
        train.interrupted("sft.py", argv, None if args.show else cfg.out_dir, resumable=not args.show)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    cli(sys.argv[1:])
