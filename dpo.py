"""Preference alignment, offline: chapter "preference alignment", first half (learning from pairs of answers).

SFT taught the model to imitate answers. Here it learns from comparisons: for one prompt, this answer is better
than that one. No reward model and no sampling during training (rlhf.py has those): Direct Preference
Optimization turns the comparisons into a loss on the model's own log-probabilities. One file, top to bottom:

    config      DPOConfig; argparse is built from its fields
    pairs       preference files (JSONL, three forms) and on-policy pairs sampled from the SFT model and
                labelled by tasks.score; both become tokenized pairs with the reference's log-probs stored
    losses      sequence_logps, then DPO, IPO, conservative DPO and SimPO, each a few lines, plus the SFT term
    evaluation  held-out task accuracy (greedy and sampled), refusal rates, reward accuracy on held-out pairs
    main        setup, pairs, model, optimizer, the short loop, the best checkpoint, summary.json

Run it:

    python train.py && python sft.py && python dpo.py   # align the newest out/sft checkpoint into out/dpo
    python dpo.py --loss ipo --beta 0.5                  # another loss of the family (dpo, ipo, cdpo, simpo)
    python dpo.py --pairs my_pairs.jsonl                 # your own pairs instead of on-policy ones
    python dpo.py --pairs-only                           # write out/dpo/pairs.jsonl, read it, edit it, then --pairs
    python dpo.py --lora-rank 8                          # LoRA: the reference is the model with adapters off
    python dpo.py --rounds 3 --max-steps 50              # iterative DPO: new pairs from each round's model
    python dpo.py --resume auto                          # continue exactly from the newest checkpoint in --out-dir
    torchrun --standalone --nproc_per_node=4 dpo.py

Tests: python -m pytest -q tests/test_dpo.py

## From a reward to a loss (Rafailov et al. 2023, section 4)

RLHF asks for the policy pi that earns a high reward r(x, y) without drifting far from the reference model
pi_ref (the SFT model) it started from:

    max_pi  E_x E_{y ~ pi(.|x)} [ r(x, y) ]  -  beta * KL( pi(.|x) || pi_ref(.|x) )

This objective has a closed-form maximiser, pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x), with Z(x) the
normaliser over all answers. Read backwards, every policy defines the reward it is optimal for:

    r(x, y) = beta * log( pi(y|x) / pi_ref(y|x) )  +  beta * log Z(x)

People compare answers rather than score them. The Bradley-Terry model says a chosen answer y_c beats a
rejected one y_r with probability sigma(r(x, y_c) - r(x, y_r)). In that difference log Z(x) cancels, so the
likelihood of the observed preferences needs only the policy and the reference. Its negative log is DPO:

    h    = [log pi(y_c|x) - log pi_ref(y_c|x)] - [log pi(y_r|x) - log pi_ref(y_r|x)]    (the log-ratio margin)
    L    = -log sigma(beta * h)

log pi(y|x) is a sum over the answer's tokens (prompt and padding excluded; the project's convention:
targets -1 where nothing is counted). The gradient is -beta * sigma(-beta h) * (grad log pi(y_c|x) -
grad log pi(y_r|x)): raise the chosen, lower the rejected, weighted by how wrongly the implicit reward
beta * log(pi / pi_ref) ranks the pair. At the start pi = pi_ref, so h = 0 and L = ln 2 exactly.

beta is the weight of the KL term. A larger beta makes a small log-ratio already a large reward difference, so
the sigmoid saturates sooner and the policy stays closer to the reference; a smaller beta lets it move further.

The family, each a different answer to "how hard should h be pushed":

    IPO  (Azar et al. 2023)      L = (h - 1/(2 beta))^2. With deterministic preferences DPO's optimum is h -> inf
                                 (the KL term stops mattering); IPO regresses h to a finite target instead.
                                 h is on summed log-probs here, as in the paper and the rest of the family; TRL
                                 averages them per token first, so its beta is not portable (loss 100 against
                                 22.9 at beta 0.1 on the same pairs): --ipo-per-token gives TRL's.
    cDPO (Mitchell 2023)         L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h): each label is wrong
                                 with probability eps (--label-smoothing); the optimum h is log((1-eps)/eps)/beta.
                                 This is TRL's sigmoid loss with label_smoothing, not its `robust` loss (the
                                 unbiased variant of Chowdhury et al. 2024, which divides by 1 - 2 eps).
    SimPO (Meng et al. 2024)     L = -log sigma(beta (log pi(y_c|x)/|y_c| - log pi(y_r|x)/|y_r|) - gamma): no
                                 reference at all; the reward is the mean token log-prob (what generation ranks
                                 answers by), and gamma is a target margin. Its beta is larger (default 2).

## The SFT term (RPO: Pang et al. 2024, "Iterative Reasoning Preference Optimization")

DPO only looks at the difference h. It can grow h by lowering both answers, the chosen one a little less: the
metrics improve while the model forgets its good answers (TRL #1236, minimind #395). Measured on a model of this
size (research notes, pilot 9.3 C): at lr 3e-5 plain DPO rose from 0.52 to 0.94 held-out accuracy after 50 steps,
then fell to 0.37 while its loss and reward accuracy kept improving. Adding the chosen answer's NLL per token,

    L_pair = L_dpo + alpha * ( -log pi(y_c|x) / |y_c| )            (--sft-weight alpha, 0 turns it off)

held it at 0.98. Both terms are per pair, and train.train_step divides their sum by the global count of pairs.
(TRL's rpo_alpha averages the NLL over all chosen tokens of the batch instead, so long answers weigh more there.)
On by default, with a learning rate far below SFT's (1e-5 against SFT's 2e-3: on the `mini` SFT model, 3e-5
and 1e-4 already lowered held-out accuracy while reward accuracy rose), and held-out *task* accuracy measured
during training: the DPO metrics alone cannot tell you when to stop, so the best checkpoint is kept by it.

## What the pairs can teach, and iterative rounds

Preferences over the model's own samples can only reinforce what it sometimes writes. After the default SFT
(a flawed teacher, tasks.py) the model can sample the right answer on the teacher's weak spots (the teacher
wrote it 30-40% of the time there), while greedy decoding gives the teacher's mistake: that is what the default
pairs (--kinds, the teacher's kinds) fix. On arithmetic its errors are sums it has never seen, which no
comparison of its guesses teaches.
Measured on the default path (BENCHMARKS.md): weak spots 0.16 -> 0.87, elsewhere unchanged, in 150 steps.
--rounds R repeats sample-then-align, each round's model the next round's reference (Xu et al. 2023; Pang
et al. 2024), so the pairs stay the current model's mistakes.

## The reference, once

pi_ref never changes, so its log-probs for every pair are computed once before training and stored in the pairs
file with a hash of the model and the tokenizer (a file made for another model is refused). No second model is
held in memory. --live-reference keeps one instead; with LoRA the live reference is the same model with its
adapters switched off, no copy at all.
"""
import copy
import hashlib
import json
import math
import os
import random
import re
import resource
import shutil
import sys
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import sft
import tasks
import train


# --- config ---

@dataclass
class DPOConfig:
    # model and pairs
    init: str | None = None             # SFT checkpoint (file or run folder) to align; None = newest in out/sft
    data_dir: str | None = None         # folder whose tokenizer to use; None = the one the checkpoint names
    pairs: str | None = None            # JSONL preference pairs; None = on-policy pairs from the embedded tasks
    kinds: list[str] = field(default_factory=lambda: list(tasks.TEACHER_ERRORS))  # task kinds for on-policy pairs:
    #                                     where the SFT teacher was flawed and the judge (tasks.score) knows better
    difficulties: list[int] | None = None  # pair difficulties; None = per kind, those of the SFT run where a greedy
    #                                        probe of --probe-prompts training prompts is neither all right nor wrong
    probe_prompts: int = 32             # training prompts per kind and difficulty in that probe
    prompts_per_task: int = 128         # on-policy: training prompts sampled per kind and difficulty
    samples: int = 8                    # on-policy: answers sampled per prompt (k)
    temperature: float = 1.0            # on-policy sampling temperature (and of the sampled evaluation)
    pairs_per_prompt: int = 2           # on-policy: at most this many (right, wrong) pairs per prompt
    val_fraction: float = 0.1           # share of the prompts whose pairs are held out (reward accuracy)
    rounds: int = 1                     # iterative DPO: rounds of (sample pairs from the current model, align it,
    #                                     it becomes the next reference), --max-steps each, in out_dir/round<r>
    overlong: str = "truncate"          # a pair longer than the context: truncate the prompt's left, or drop it
    # loss
    loss: str = "dpo"                   # dpo (sigmoid), ipo, cdpo (label smoothing) or simpo
    beta: float | None = None           # KL weight beta; None = 0.1, or 2.0 for simpo
    label_smoothing: float = 0.1        # cdpo: probability eps that a label is flipped
    simpo_gamma: float = 0.5            # simpo: target reward margin gamma
    ipo_per_token: bool = False         # ipo: per-token mean log-probs in h (TRL's ipo) instead of sums
    sft_weight: float = 1.0             # alpha of the NLL term on the chosen answer (RPO); 0 = off
    live_reference: bool = False        # keep the reference model live instead of precomputed log-probs
    # LoRA
    lora_rank: int = 0                  # rank r of the adapters; 0 = full fine-tuning
    lora_alpha: float | None = None     # the update is alpha/r * B A; None = 2 * rank (PEFT's default: 8)
    lora_rslora: bool = False           # scale by alpha/sqrt(r) (rsLoRA, PEFT's use_rslora) instead of alpha/r
    lora_targets: list[str] = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"])  # Linear names to adapt
    # optimization
    batch_size: int = 16                # pairs per micro-batch per device
    grad_accum: int = 1                 # micro-batches per optimizer step
    max_steps: int = 150                # optimizer steps
    lr: float | None = None             # peak learning rate; None = 1e-5 full fine-tuning, 1e-4 with LoRA (SFT: 2e-3)
    min_lr_frac: float = 0.1            # final learning rate as a fraction of --lr
    warmup_steps: int | None = None     # linear warmup steps; None = 10% of max_steps
    schedule: str = "cosine"            # cosine, wsd or constant (train.lr_at)
    cooldown_frac: float = 0.2          # wsd only: fraction of max_steps spent decaying
    weight_decay: float = 0.0           # AdamW weight decay on matrices
    beta1: float = 0.9                  # AdamW first-moment decay
    beta2: float = 0.95                 # AdamW second-moment decay
    grad_clip: float = 1.0              # clip the global gradient norm; 0 = no clipping
    # runtime
    device: str | None = None           # cpu or cuda; None = cuda when available
    dtype: str | None = None            # float32 or bfloat16; None = bfloat16 on CUDA, float32 on CPU
    compile: bool = False               # torch.compile the model
    threads: int | None = None          # torch CPU threads; None = torch's default
    seed: int = 1337                    # prompts, sampling, pair order, held-out split
    # evaluation, logging, checkpoints
    eval_every: int = 50                # steps between held-out evaluations (task accuracy, held-out pairs)
    eval_kinds: list[str] | None = None  # kinds evaluated; None = those of the SFT run (all: a gain on the weak
    #                                      spots must not be bought elsewhere)
    eval_examples: int | None = None    # held-out prompts per kind and difficulty; None = as many as the SFT run
    eval_difficulties: list[int] | None = None  # difficulties evaluated; None = those the SFT run evaluated
    max_new_tokens: int = 24            # answer length limit when sampling pairs and evaluating
    log_every: int = 10                 # steps between progress lines and metrics.jsonl records
    save_every: int = 50                # steps between checkpoints (one is always saved at the end)
    keep_last: int = 2                  # checkpoints kept in out_dir (the best one is kept apart, in out_dir/best)
    out_dir: str = "out/dpo"            # run folder: pairs.jsonl, checkpoints, best/, metrics.jsonl, summary.json
    resume: str | None = None           # checkpoint path, or "auto" = newest in out_dir


CHOICES = {"loss": ("dpo", "ipo", "cdpo", "simpo"), "overlong": ("drop", "truncate"),
           "schedule": ("cosine", "wsd", "constant"), "device": ("cpu", "cuda"), "dtype": ("float32", "bfloat16")}
LN2 = math.log(2)


class DPOError(train.TrainError):
    """Bad input for DPO: one line, exit status 2."""


# --- pairs: files ---
# A line is one of:
#   {"prompt": str | [messages], "chosen": str | message | [messages], "rejected": ...}   (explicit prompt)
#   {"chosen": [messages], "rejected": [messages]}    whole conversations sharing all but their last (assistant) turn
#   {"chosen": str, "rejected": str}                  HH-RLHF text, "\n\nHuman: ...\n\nAssistant: ..." turns
# Optional fields written by this file: kind, difficulty, and ref_chosen, ref_rejected, ref_model, ref_tokenizer
# (the reference's log-probs; delete them from a line you edit and they are computed again).

HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _messages(value, what):
    """A string (one user turn), a message, or a list of messages -> a list of messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                              and m.get("role") in sft.ROLES for m in value):
        raise ValueError(f"{what} must be a string or a list of {{'role', 'content'}} messages with roles "
                         f"{', '.join(sft.ROLES)}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _answer(value, what):
    """A string, an assistant message, or a list ending in one -> the answer text."""
    if isinstance(value, str):
        return value
    msgs = _messages(value, what)
    if msgs[-1]["role"] != "assistant":
        raise ValueError(f"{what} must end with an assistant message")
    return msgs[-1]["content"]


def _hh(text):
    turns = HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)[1:]
    return [{"role": "user" if r == "Human" else "assistant", "content": c.strip()}
            for r, c in zip(turns[::2], turns[1::2])]


def parse_pair(obj):
    """One JSON line -> (prompt messages, chosen text, rejected text); ValueError says what is wrong."""
    if not isinstance(obj, dict) or "chosen" not in obj or "rejected" not in obj:
        raise ValueError("need an object with 'chosen' and 'rejected' (and 'prompt', unless they are whole "
                         "conversations)")
    if "prompt" in obj:
        return _messages(obj["prompt"], "'prompt'"), _answer(obj["chosen"], "'chosen'"), \
            _answer(obj["rejected"], "'rejected'")
    c, r = obj["chosen"], obj["rejected"]
    if isinstance(c, str) and isinstance(r, str):
        c, r = _hh(c), _hh(r)
        if not c or not r:
            raise ValueError("no 'prompt', and 'chosen' is no HH-RLHF text ('\\n\\nHuman: ... \\n\\nAssistant: ...')")
    c, r = _messages(c, "'chosen'"), _messages(r, "'rejected'")
    if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant" or c[:-1] != r[:-1] or len(c) < 2:
        raise ValueError("'chosen' and 'rejected' conversations must share every turn but a final assistant one")
    return c[:-1], c[-1]["content"], r[-1]["content"]


def read_pairs(path):
    """Pair records from a JSONL file, checked line by line -> (records, {"in", "dropped_identical", ...}).

    A record: {"prompt": messages, "chosen": str, "rejected": str, **kept fields}. Pairs whose answers are equal
    or empty teach nothing and are dropped and counted."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DPOError(f"{path}: cannot read ({e}); give a UTF-8 JSONL file of pairs") from None
    records, report = [], {"in": 0, "dropped_identical": 0, "dropped_empty": 0}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        report["in"] += 1
        try:
            obj = json.loads(line)
            prompt, chosen, rejected = parse_pair(obj)
        except json.JSONDecodeError as e:
            raise DPOError(f"{path}:{lineno}: bad JSON ({e.msg} at column {e.colno}); one object per line") from None
        except ValueError as e:
            raise DPOError(f"{path}:{lineno}: {e}") from None
        if not chosen.strip() or not rejected.strip():
            report["dropped_empty"] += 1
        elif chosen == rejected:
            report["dropped_identical"] += 1
        else:
            extra = {k: obj[k] for k in ("kind", "difficulty", "ref_chosen", "ref_rejected", "ref_model",
                                         "ref_tokenizer") if k in obj}
            records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra})
    if not records:
        raise DPOError(f"{path}: no usable pairs ({report}); write one {{prompt, chosen, rejected}} per line")
    return records, report


# --- pairs: on-policy ---
# The SFT model answers each training prompt k times at temperature T; tasks.score says which answers are right.
# A prompt with a right and a wrong answer gives pairs (the most frequent right answer against the most frequent
# wrong one first: the model's typical mistake). A prompt answered all right or all wrong gives none, which is why
# the prompts come from difficulties where the model is neither. Safety prompts are scored like the others: the
# refusal is the right answer to a harmful request and a wrong one to its benign look-alike, so a sampled
# compliance is rejected against a refusal, and a sampled refusal of a benign request against its answer.
# (A fixed refusal as the rejected answer of every benign prompt, tried here, taught the model to stop refusing
# harmful ones too: refusal rate 1.0 -> 0.11. Pairs must come from the model's own mistakes.)

@torch.no_grad()
def sample_answers(model, tokenizer, prompts, rt, k, temperature, max_new_tokens, seed, batch=256):
    """k answers (strings) per prompt (a list of message lists) -> list of k-lists. Deterministic for a seed."""
    end = tokenizer.special_ids["<|end|>"]
    rows = [sft.render_prompt(p, tokenizer) for p in prompts for _ in range(k)]
    out = []
    for i in range(0, len(rows), batch):
        with rt.autocast():
            new = model.generate(rows[i:i + batch], max_new_tokens, temperature=temperature, stop_tokens=[end],
                                 seed=seed + i)
        out += [tokenizer.decode([t for t in ids if t != end]).strip() for ids in new]
    return [out[j * k:(j + 1) * k] for j in range(len(prompts))]


def pairs_from_samples(example, answers, limit):
    """Pair records from one task example and its sampled answers (see the banner above)."""
    right, wrong = Counter(), Counter()
    for a in answers:
        (right if tasks.score(example["kind"], example["prompt"], a) else wrong)[a] += 1
    right, wrong = [a for a, _ in right.most_common() if a], [a for a, _ in wrong.most_common() if a]
    return [{"prompt": example["messages"][:-1], "chosen": c, "rejected": r, "kind": example["kind"],
             "difficulty": example["difficulty"]} for c, r in list(zip(right, wrong))[:limit]]


def choose_difficulties(model, tokenizer, cfg, candidates, rt):
    """{kind: [difficulties]} where a greedy probe of training prompts is neither all right nor all wrong, and the
    probe's accuracies."""
    sets = {(k, d): tasks.generate(k, cfg.probe_prompts, cfg.seed + 1, "train", d)
            for k in cfg.kinds for d in candidates if d <= tasks.MAX_DIFFICULTY[k]}
    probe = sft.task_accuracy(model, tokenizer, sets, rt, cfg.max_new_tokens)
    chosen = {k: [d for (kk, d), a in sorted(probe.items()) if kk == k and 0 < a < 1]
              for k in cfg.kinds}
    return {k: ds for k, ds in chosen.items() if ds}, probe


def on_policy_pairs(model, tokenizer, cfg, difficulties, rt):
    """Pair records sampled from the model on the embedded tasks' training split, and a report per kind."""
    records, report = [], {}
    for kind, ds in difficulties.items():
        for d in ds:
            examples = tasks.generate(kind, cfg.prompts_per_task, cfg.seed, "train", d)
            answers = sample_answers(model, tokenizer, [e["messages"][:-1] for e in examples], rt, cfg.samples,
                                     cfg.temperature, cfg.max_new_tokens, cfg.seed)
            found = [pairs_from_samples(e, a, cfg.pairs_per_prompt) for e, a in zip(examples, answers)]
            right = np.mean([tasks.score(kind, e["prompt"], x) for e, a in zip(examples, answers) for x in a])
            report[f"{kind}/{d}"] = {"prompts": len(examples), "no_pair": sum(not f for f in found),
                                     "pairs": sum(map(len, found)), "sample_accuracy": round(float(right), 3)}
            records += [p for f in found for p in f]
    return records, report


def length_stats(pairs):
    """Mean answer tokens of chosen and rejected: a gap is what DPO's summed log-probs can exploit."""
    c = [len(p["chosen_ids"]) for p in pairs]
    r = [len(p["rejected_ids"]) for p in pairs]
    return {"chosen_tokens": round(float(np.mean(c)), 2), "rejected_tokens": round(float(np.mean(r)), 2),
            "gap": round(float(np.mean(np.subtract(c, r))), 2), "longer_chosen": round(float(np.mean(
                np.greater(c, r))), 3)}


# --- pairs: tokens and the reference ---

def tokenize_pairs(records, tokenizer, block_size, overlong):
    """Records -> pairs with prompt_ids and answer ids (each answer ends with <|end|>), and cut counts.

    A pair must fit the context: prompt + answer - 1 tokens <= block_size (the last token is only a target).
    Too long: the prompt loses its oldest tokens (truncate), or the pair is dropped."""
    end, out, cut = tokenizer.special_ids["<|end|>"], [], {"truncated_overlong": 0, "dropped_overlong": 0}
    for rec in records:
        prompt = sft.render_prompt(rec["prompt"], tokenizer)
        chosen, rejected = tokenizer.encode(rec["chosen"]) + [end], tokenizer.encode(rec["rejected"]) + [end]
        room = block_size + 1 - max(len(chosen), len(rejected))
        if len(prompt) > room:
            if overlong == "drop" or room < 2:
                cut["dropped_overlong"] += 1
                continue
            prompt, cut["truncated_overlong"] = prompt[-room:], cut["truncated_overlong"] + 1
        out.append({**rec, "prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return out, cut


def example(prompt_ids, answer_ids):
    """The project's (x, y): y = -1 on the prompt, the answer's tokens (and its <|end|>) as targets."""
    return sft.to_example(prompt_ids + answer_ids, [0] * len(prompt_ids) + [1] * len(answer_ids))


def collate(pairs, pad_id):
    """B pairs -> (x, y, ref): x, y (2B, T) with the B chosen rows first, then the B rejected ones, padded on the
    right (y = -1 there; causal attention never lets a real token see it); ref (2B,) the reference log-probs."""
    rows = [example(p["prompt_ids"], p[f"{side}_ids"]) for side in ("chosen", "rejected") for p in pairs]
    T = max(len(x) for x, _ in rows)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (xs, ys) in enumerate(rows):
        x[i, :len(xs)], y[i, :len(ys)] = torch.tensor(xs), torch.tensor(ys)
    ref = torch.tensor([p.get(f"ref_{side}", math.nan) for side in ("chosen", "rejected") for p in pairs])
    return x, y, ref


def model_hash(model):
    """A short hash of every weight: what a pairs file's reference log-probs were computed with."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@contextmanager
def adapters_off(model):
    """The LoRA model computes as its base: every adapter's scale is 0 inside the block (exactly base(x) + 0)."""
    lora = [m for m in model.modules() if isinstance(m, sft.LoRALinear)]
    scales = [m.scale for m in lora]
    for m in lora:
        m.scale = 0.0
    try:
        yield model
    finally:
        for m, s in zip(lora, scales):
            m.scale = s


@torch.no_grad()
def add_reference(pairs, model, tokenizer, rt, ref_id, batch=64):
    """Store the reference's log-probs in every pair that lacks them; refuse pairs made for another model."""
    for p in pairs:
        if "ref_chosen" in p and (p.get("ref_model"), p.get("ref_tokenizer")) != (ref_id, tokenizer.hash):
            raise DPOError(f"the pairs' reference log-probs came from model {p.get('ref_model')} with tokenizer "
                           f"{p.get('ref_tokenizer')}, but this run's reference is model {ref_id} with tokenizer "
                           f"{tokenizer.hash}; delete the ref_* fields to recompute them, or give the matching --init")
    todo = [p for p in pairs if "ref_chosen" not in p]
    for i in range(0, len(todo), batch):
        chunk = todo[i:i + batch]
        x, y, _ = train.to_device(collate(chunk, tokenizer.eot_id), rt)
        with rt.autocast():
            logps = sequence_logps(model, (x, y)).float().tolist()
        for j, p in enumerate(chunk):
            p.update(ref_chosen=logps[j], ref_rejected=logps[j + len(chunk)], ref_model=ref_id,
                     ref_tokenizer=tokenizer.hash)
    return len(todo)


def pair_record(p):
    """What a line of pairs.jsonl holds: the readable pair and its reference log-probs, not the token ids."""
    return {k: v for k, v in p.items() if not k.endswith("_ids")}


def split_pairs(pairs, fraction, seed):
    """(train, held-out) by prompt, so no held-out prompt has a pair in training."""
    prompts = sorted({json.dumps(p["prompt"]) for p in pairs})
    held = set(random.Random(seed).sample(prompts, int(round(fraction * len(prompts)))))
    is_held = [json.dumps(p["prompt"]) in held for p in pairs]
    return [p for p, h in zip(pairs, is_held) if not h], [p for p, h in zip(pairs, is_held) if h]


class PairLoader:
    """Batches of pairs in a fresh order each epoch; each rank takes its share. Resumable by (epoch, position)."""

    def __init__(self, pairs, batch_size, pad_id, rank=0, world_size=1, seed=0):
        self.pairs, self.B, self.pad_id, self.rank, self.world, self.seed = pairs, batch_size, pad_id, rank, \
            world_size, seed
        self.epoch, self.position = 0, 0
        if len(pairs) < batch_size * world_size:
            raise DPOError(f"{len(pairs)} training pairs are fewer than batch {batch_size} x world {world_size}; "
                           f"sample more (--prompts-per-task, --samples) or give a smaller --batch-size")

    def next_batch(self):
        if self.position + self.B * self.world > len(self.pairs):  # drop the ragged end, start the next epoch
            self.epoch, self.position = self.epoch + 1, 0
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.pairs))
        start = self.position + self.rank * self.B
        self.position += self.B * self.world
        return collate([self.pairs[i] for i in order[start:start + self.B]], self.pad_id)

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "pairs": len(self.pairs)}

    def load_state_dict(self, state):
        if (state["seed"], state["pairs"]) != (self.seed, len(self.pairs)):
            raise DPOError(f"loader state is for seed {state['seed']} and {state['pairs']} pairs, this run has seed "
                           f"{self.seed} and {len(self.pairs)}: resume with the same pairs and flags")
        self.epoch, self.position = state["epoch"], state["position"]


# --- losses ---
# Each takes per-pair tensors (B,) and returns the per-pair losses (B,); train_step divides their sum by the global
# count of pairs. pc, pr: the policy's summed log-probs of the chosen and rejected answers; rc, rr: the reference's;
# nc, nr: answer lengths in tokens. F.logsigmoid(z) = log sigma(z), computed without overflow.

def token_logps(logits, y):
    """Per-token log-probabilities of the targets y (B, T) under logits (B, T, V): (B, T), 0 where y = -1."""
    logp = F.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T); -1 targets read token 0 ...
    return picked * (y != -1)                              # ... and are zeroed here


def sequence_logps(model, batch):
    """Summed log-probabilities of each row's counted targets (y != -1): (B,). Prompt and padding add nothing."""
    x, y = batch[0], batch[1]
    logits, _ = model(x)                                   # (B, T, V)
    return token_logps(logits, y).sum(dim=1)


def dpo_loss(pc, pr, rc, rr, beta):
    h = (pc - rc) - (pr - rr)
    return -F.logsigmoid(beta * h)


def ipo_loss(pc, pr, rc, rr, beta):
    h = (pc - rc) - (pr - rr)
    return (h - 1 / (2 * beta)) ** 2


def cdpo_loss(pc, pr, rc, rr, beta, eps):
    h = (pc - rc) - (pr - rr)
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def simpo_loss(pc, pr, nc, nr, beta, gamma):
    return -F.logsigmoid(beta * (pc / nc - pr / nr) - gamma)


def preference_loss(cfg, pc, pr, rc, rr, nc, nr):
    """The loss cfg.loss names, per pair."""
    if cfg.loss == "dpo":
        return dpo_loss(pc, pr, rc, rr, cfg.beta)
    if cfg.loss == "ipo" and cfg.ipo_per_token:
        return ipo_loss(pc / nc, pr / nr, rc / nc, rr / nr, cfg.beta)
    if cfg.loss == "ipo":
        return ipo_loss(pc, pr, rc, rr, cfg.beta)
    if cfg.loss == "cdpo":
        return cdpo_loss(pc, pr, rc, rr, cfg.beta, cfg.label_smoothing)
    return simpo_loss(pc, pr, nc, nr, cfg.beta, cfg.simpo_gamma)


def implicit_rewards(cfg, pc, pr, rc, rr, nc, nr):
    """The rewards the loss implies: beta log(pi / pi_ref), or for SimPO beta times the mean token log-prob."""
    if cfg.loss == "simpo":
        return cfg.beta * pc / nc, cfg.beta * pr / nr
    return cfg.beta * (pc - rc), cfg.beta * (pr - rr)


class PairLoss:
    """loss_fn for train.train_step: a batch (x, y, ref) -> the summed per-pair loss (preference + SFT term).

    One forward over chosen and rejected rows together. The reference log-probs come from the batch (precomputed)
    or, with a live reference, from `reference` (a frozen copy, or the LoRA model with its adapters off).
    Each call also keeps the detached per-pair numbers in self.stats for the metrics."""

    def __init__(self, cfg, reference=None):
        self.cfg, self.reference, self.stats = cfg, reference, []

    def __call__(self, model, batch):
        x, y, ref = batch
        B = x.size(0) // 2
        logps = sequence_logps(model, (x, y))              # (2B,)
        if self.reference is not None:
            with torch.no_grad(), (adapters_off(self.reference) if self.cfg.lora_rank else nullcontext()):
                ref = sequence_logps(self.reference, (x, y))
        n = (y != -1).sum(dim=1).float()                   # answer tokens, <|end|> included
        pc, pr, rc, rr, nc, nr = logps[:B], logps[B:], ref[:B].float(), ref[B:].float(), n[:B], n[B:]
        pref = preference_loss(self.cfg, pc, pr, rc, rr, nc, nr)
        nll = -pc / nc                                     # the SFT term: mean NLL of the chosen answer's tokens
        self.stats.append(torch.stack([pref, nll, pc, pr, rc, rr, nc, nr]).detach().float())
        return (pref + self.cfg.sft_weight * nll).sum()


def count_pairs(batch):
    """How many terms PairLoss sums: the pairs of the batch (half its rows)."""
    return batch[0].size(0) // 2


def pair_metrics(cfg, stats, rt):
    """Means over the pairs in stats (a list of (8, B) tensors), over every rank."""
    s = torch.cat(stats, dim=1).to(rt.device)              # (8, pairs)
    pref, nll, pc, pr, rc, rr, nc, nr = s
    wc, wr = implicit_rewards(cfg, pc, pr, rc, rr, nc, nr)
    # ref_logratio: log pi_ref - log pi of the pair's answers (summed over an answer's tokens, averaged over its two
    # answers). Not a KL: the answers were not sampled from pi, so it goes negative once pi raises the chosen ones.
    cols = torch.stack([pref, nll, (wc > wr).float() + 0.5 * (wc == wr).float(), wc, wr, wc - wr, pc, pr,
                        0.5 * ((rc - pc) + (rr - pr)), 0.5 * (nc + nr)])
    sums = torch.cat([cols.sum(dim=1), torch.tensor([s.size(1)], dtype=torch.float32, device=rt.device)])
    if rt.ddp:
        dist.all_reduce(sums)
    names = ("pref_loss", "sft_loss", "reward_acc", "reward_chosen", "reward_rejected", "margin", "logp_chosen",
             "logp_rejected", "ref_logratio", "answer_len")
    return {k: (v / sums[-1]).item() for k, v in zip(names, sums[:-1])}


@torch.no_grad()
def evaluate_pairs(model, loss_fn, batches, rt):
    """The pair metrics (reward accuracy, margins, ...) on held-out pairs, without a gradient."""
    saved, loss_fn.stats = loss_fn.stats, []
    for b in batches:
        with rt.autocast():
            loss_fn(model, b)
    out = pair_metrics(loss_fn.cfg, loss_fn.stats, rt)
    loss_fn.stats = saved
    return out


# --- evaluation ---
# Greedy accuracy (sft.task_accuracy) is measured during training and picks the best checkpoint. Before and after,
# the same prompts are also answered once each by sampling at --temperature with a fixed seed, and the safety
# prompts give the refusal rate on harmful requests and the over-refusal rate on benign ones.

def sampled_report(model, tokenizer, sets, rt, cfg):
    """{"sampled": {(kind, d): accuracy}, "refusal": rate on harmful, "over_refusal": rate on benign}."""
    items = [ex for exs in sets.values() for ex in exs]
    sampled = sample_answers(model, tokenizer, [e["messages"][:-1] for e in items], rt, 1, cfg.temperature,
                             cfg.max_new_tokens, cfg.seed + 2)
    acc = {key: float(np.mean([tasks.score(e["kind"], e["prompt"], a[0]) for e, a in zip(items, sampled)
                               if (e["kind"], e["difficulty"]) == key])) for key in sets}
    safety = [e for e in items if e["kind"] == "safety"]
    report = {"sampled": acc}
    if safety:
        greedy = sample_answers(model, tokenizer, [e["messages"][:-1] for e in safety], rt, 1, 0.0,
                                cfg.max_new_tokens, 0)
        refused = [(tasks.is_harmful(e["prompt"]), a[0] == tasks.REFUSAL) for e, a in zip(safety, greedy)]
        harmful, benign = [r for h, r in refused if h], [r for h, r in refused if not h]
        report.update(refusal=float(np.mean(harmful)) if harmful else None,
                      over_refusal=float(np.mean(benign)) if benign else None)
    return report


def keyed(acc):
    return {f"{k}/{d}": v for (k, d), v in acc.items()}


def unkeyed(acc):
    return {(k.rsplit("/", 1)[0], int(k.rsplit("/", 1)[1])): v for k, v in acc.items()}


# --- main ---

def find_init(path):
    """The SFT checkpoint to align: path, or the newest in out/sft (DPOError naming `python sft.py` if none)."""
    try:
        return sft.find_init(path, "out/sft", "python sft.py")
    except sft.SFTError as e:
        raise DPOError(str(e)) from None


def derive(cfg, sft_config):
    beta = cfg.beta if cfg.beta is not None else (2.0 if cfg.loss == "simpo" else 0.1)
    return replace(cfg, beta=beta, lr=cfg.lr if cfg.lr is not None else (1e-4 if cfg.lora_rank else 1e-5),
                   warmup_steps=cfg.max_steps // 10 if cfg.warmup_steps is None else cfg.warmup_steps,
                   lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else 2.0 * cfg.lora_rank,
                   eval_difficulties=cfg.eval_difficulties or sft_config.get("eval_difficulties") or [1],
                   eval_examples=cfg.eval_examples or sft_config.get("eval_examples") or 100,
                   eval_kinds=cfg.eval_kinds or sft_config.get("eval_kinds") or sft_config.get("kinds")
                   or list(tasks.KINDS))  # from a DPO checkpoint (a later round): the SFT run's, which it kept


def check(cfg):
    for name in ("max_steps", "eval_every", "log_every", "save_every", "keep_last", "batch_size", "grad_accum",
                 "samples", "prompts_per_task", "pairs_per_prompt", "probe_prompts"):
        if getattr(cfg, name) < 1:
            raise DPOError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    unknown = [k for k in cfg.kinds + (cfg.eval_kinds or []) if k not in tasks.KINDS]
    if unknown:
        raise DPOError(f"--kinds {' '.join(unknown)}: unknown; choose from {', '.join(tasks.KINDS)}")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise DPOError(f"--label-smoothing {cfg.label_smoothing}: use 0 <= eps < 0.5 (0.5 means labels are noise)")
    if not 0 <= cfg.val_fraction < 1:
        raise DPOError(f"--val-fraction {cfg.val_fraction}: use 0 <= fraction < 1")
    if cfg.ipo_per_token and cfg.loss != "ipo":
        raise DPOError(f"--ipo-per-token applies to --loss ipo only, not {cfg.loss}; leave it out")
    if cfg.loss == "simpo" and cfg.live_reference:
        raise DPOError("--loss simpo uses no reference; leave out --live-reference")


def build_pairs(model, tokenizer, cfg, sft_config, rt, pairs_path):
    """Rank 0 makes or reads the pairs, adds the reference log-probs and writes pairs_path; every rank reads it."""
    report = {}
    if cfg.pairs:
        records, report["file"] = read_pairs(cfg.pairs)
    else:
        candidates = cfg.difficulties or sft_config.get("difficulties") or [1, 2]
        difficulties, probe = (({k: list(cfg.difficulties) for k in cfg.kinds}, None) if cfg.difficulties
                               else choose_difficulties(model, tokenizer, cfg, candidates, rt))
        if probe:
            report["probe"] = {f"{k}/{d}": round(a, 3) for (k, d), a in probe.items()}
        if rt.master:
            records, report["on_policy"] = on_policy_pairs(model, tokenizer, cfg, difficulties, rt)
            if not records:
                raise DPOError(f"no prompt gave a pair (all answers right or all wrong: {report['on_policy']}); "
                               f"try other --difficulties, more --samples or a higher --temperature")
    if rt.master:
        pairs, report["cut"] = tokenize_pairs(records, tokenizer, model.config.block_size, cfg.overlong)
        if not pairs:
            raise DPOError(f"every pair is longer than the context ({model.config.block_size} tokens): {report['cut']}")
        if cfg.loss != "simpo":
            add_reference(pairs, model, tokenizer, rt, model_hash(model))
        tasks.write_jsonl(pairs_path, map(pair_record, pairs))
    if rt.ddp:
        dist.barrier()
    pairs, _ = tokenize_pairs(read_pairs(pairs_path)[0], tokenizer, model.config.block_size, cfg.overlong)
    return pairs, report


def main(cfg):
    """Align cfg.init on preference pairs; returns the summary dict also written to out_dir/summary.json."""
    # --- setup ---
    rt = train.setup_runtime(cfg.device, cfg.dtype, cfg.threads)
    check(cfg)
    init = find_init(cfg.init)
    model, tokenizer, data_dir, base_ckpt = sft.load_base(init, cfg.data_dir)
    cfg = derive(cfg, base_ckpt.get("config", {}))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if rt.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
    model.to(rt.device).eval()  # eval mode throughout: dropout would make pi != pi_ref at pi = pi_ref (TRL #744)
    train.print0(f"device {rt.device} x {rt.world_size}; aligning {init} ({model.num_params():,} parameters) with "
                 f"{cfg.loss}, beta {cfg.beta:g}, SFT weight {cfg.sft_weight:g}, lr {cfg.lr:.1e}")
    t_start = time.time()

    # --- pairs ---
    pairs_path = os.path.join(cfg.out_dir, "pairs.jsonl")
    resume_path = cfg.resume
    if resume_path == "auto":
        found = train.list_checkpoints(cfg.out_dir)
        resume_path = found[-1] if found else None
    if not resume_path and rt.master:  # a fresh run: pipeline.sh must not take the folder for done, nor keep its eval
        for old in (os.path.join(cfg.out_dir, f) for f in ("summary.json", "eval.json")):
            if os.path.exists(old):
                os.remove(old)
    if resume_path and os.path.exists(pairs_path):  # the pairs this run was training on
        pairs, report = tokenize_pairs(read_pairs(pairs_path)[0], tokenizer, model.config.block_size, cfg.overlong)
        if cfg.loss != "simpo":
            add_reference(pairs, model, tokenizer, rt, model_hash(model))  # checks they are this model's
    else:
        pairs, report = build_pairs(model, tokenizer, cfg, base_ckpt.get("config", {}), rt, pairs_path)
    train_pairs, val_pairs = split_pairs(pairs, cfg.val_fraction, cfg.seed)
    report["lengths"] = length_stats(pairs)
    train.print0(f"pairs: {len(train_pairs)} training, {len(val_pairs)} held out, in {pairs_path}; {report}")
    loader = PairLoader(train_pairs, cfg.batch_size, tokenizer.eot_id, rt.rank, rt.world_size, cfg.seed)
    val_batches = [train.to_device(collate(val_pairs[i:i + cfg.batch_size], tokenizer.eot_id), rt)
                   for i in range(0, len(val_pairs), cfg.batch_size)][rt.rank::rt.world_size]
    sets = sft.eval_sets(cfg.eval_kinds, cfg.eval_difficulties, cfg.eval_examples)  # SFT's held-out prompts

    # --- model ---
    reference, lora = None, None
    if cfg.live_reference and not cfg.lora_rank:
        reference = copy.deepcopy(model).requires_grad_(False)
    if cfg.lora_rank:
        lora = dict(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=0.0, targets=list(cfg.lora_targets))
        if cfg.lora_rslora:
            lora["rslora"] = True
        sft.apply_lora(model, **lora).eval()
        reference = model if cfg.live_reference else None
    loss_fn = PairLoss(cfg, reference)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # --- optimizer ---
    optimizer = train.build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), rt.device)
    start_step, best_dir = 0, os.path.join(cfg.out_dir, "best")
    extra = dict(stage="dpo", base=init, lora=lora, tokenizer_hash=tokenizer.hash, tokenizer_dir=data_dir)
    if resume_path:
        ckpt = train.load_checkpoint(resume_path)
        if ckpt.get("stage") != "dpo" or ckpt.get("lora") != lora or ckpt.get("base") != init:
            raise DPOError(f"cannot resume {resume_path}: it aligned {ckpt.get('base')} with LoRA {ckpt.get('lora')}, "
                           f"this run {init} with {lora}; pass the same flags or a new --out-dir")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        loader.load_state_dict(ckpt["loader"])
        train.set_rng_states(ckpt["rng"])
        start_step, before, best = ckpt["step"], ckpt["before"], ckpt["best"]
        train.print0(f"resumed from {resume_path} at step {start_step}")
    else:
        greedy, split = sft.heldout_accuracy(model, tokenizer, sets, rt, cfg.max_new_tokens)
        before = {"greedy": keyed(greedy), "heldout": split,
                  **(sampled_report(model, tokenizer, sets, rt, cfg) if rt.master else {})}
        before["sampled"] = keyed(before.get("sampled", {}))
        best = {"step": 0, "acc": float(np.mean(list(greedy.values()))), "heldout": split}
        train.print0(f"before DPO: held-out greedy accuracy {best['acc']:.3f}")
    extra.update(before=before)
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if rt.master:
        kept = ([r for r in train.read_metrics(cfg.out_dir) if r["step"] <= start_step]
                if resume_path and os.path.exists(metrics_path) else [])
        os.makedirs(best_dir, exist_ok=True)
        if not resume_path:
            for old in train.list_checkpoints(cfg.out_dir) + train.list_checkpoints(best_dir):
                os.remove(old)
            train.save_checkpoint(best_dir, 0, model, optimizer, cfg, loader.state_dict(), 1, **extra, best=best)
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
    wrapped = torch.compile(model) if cfg.compile else model
    if rt.ddp:
        wrapped = DDP(wrapped, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)

    # --- loop ---
    after, split, at_ln2, stats = None, None, 0, {}
    for step in range(start_step, cfg.max_steps):
        t0 = time.time()
        lr = train.lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [train.to_device(loader.next_batch(), rt) for _ in range(cfg.grad_accum)]
        loss_fn.stats = []
        loss, grad_norm = train.train_step(wrapped, optimizer, micro, rt, cfg.grad_clip, loss_fn=loss_fn,
                                           count_fn=count_pairs)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise train.Diverged(f"step {step + 1}: loss {loss}, grad norm {grad_norm}; stopped without updating")
        stats = pair_metrics(cfg, loss_fn.stats, rt)
        at_ln2 = at_ln2 + 1 if cfg.loss in ("dpo", "cdpo") and abs(stats["pref_loss"] - LN2) < 1e-3 else 0
        if at_ln2 == 20:
            train.print0(f"warning: the preference loss has sat at ln 2 = {LN2:.4f} for 20 steps: the policy equals "
                         f"the reference. Usual causes: a learning rate too low to move (--lr {cfg.lr:g}), frozen "
                         f"parameters, or pairs whose answers are the same")
        done, dt = step + 1, time.time() - t0
        is_eval = done % cfg.eval_every == 0 or done == cfg.max_steps
        if done % cfg.log_every == 0 or is_eval or done == start_step + 1:
            record = {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm, **stats,
                      "pairs_per_sec": round(count_pairs(micro[0]) * len(micro) * rt.world_size / dt, 1)}
            line = (f"step {done:>4}/{cfg.max_steps} | loss {loss:.4f} | pref {stats['pref_loss']:.4f} | reward acc "
                    f"{stats['reward_acc']:.2f} | margin {stats['margin']:+.3f} | logp chosen "
                    f"{stats['logp_chosen']:.2f} rejected {stats['logp_rejected']:.2f} | ref_logratio "
                    f"{stats['ref_logratio']:+.3f}")
            if is_eval:
                after, split = sft.heldout_accuracy(model, tokenizer, sets, rt, cfg.max_new_tokens)
                acc = float(np.mean(list(after.values())))
                record.update(acc=acc, acc_weak=split["weak_mean"], acc_elsewhere=split["elsewhere_mean"],
                              **{f"acc/{k}": a for k, a in keyed(after).items()})
                if val_batches:
                    record.update({f"val_{k}": v for k, v in evaluate_pairs(wrapped, loss_fn, val_batches,
                                                                            rt).items()})
                line += f"\n      held-out accuracy {acc:.3f}"
                if split["weak_mean"] is not None:
                    line += f" (weak spot {split['weak_mean']:.3f}, elsewhere {split['elsewhere_mean']:.3f})"
                if val_batches:
                    line += f" | held-out pairs: reward acc {record['val_reward_acc']:.2f}"
                if acc > best["acc"] + 1e-9:  # strictly better: a tie keeps the earlier (closer to the reference)
                    best = {"step": done, "acc": acc, "heldout": split}
                    line += " (best so far: kept in best/)"
                    if rt.master:
                        train.save_checkpoint(best_dir, done, model, optimizer, cfg, loader.state_dict(), 1,
                                              **extra, best=best)
            train.print0(line)
            if rt.master:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
        if (done % cfg.save_every == 0 or done == cfg.max_steps) and rt.master:
            train.save_checkpoint(cfg.out_dir, done, model, optimizer, cfg, loader.state_dict(), cfg.keep_last,
                                  **extra, best=best)

    # --- save ---
    if after is None:  # resumed at max_steps: nothing ran
        after, split = sft.heldout_accuracy(model, tokenizer, sets, rt, cfg.max_new_tokens)
    end_report = sampled_report(model, tokenizer, sets, rt, cfg) if rt.master else {}
    sft.print_table(unkeyed(before["greedy"]), after)
    if before.get("heldout"):
        sft.print_split(before["heldout"], split)
    train.print0(f"best held-out greedy accuracy {best['acc']:.3f} at step {best['step']} (in {best_dir})")
    peak = (torch.cuda.max_memory_allocated() if rt.device_type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20
    summary = {"stage": "dpo", "base": init,
               "checkpoint": (train.list_checkpoints(best_dir) or train.list_checkpoints(cfg.out_dir))[-1]
               if rt.master else None,
               "last_checkpoint": train.list_checkpoints(cfg.out_dir)[-1] if rt.master else None,
               "best": best, "steps": cfg.max_steps, "seconds": round(time.time() - t_start, 1), "loss": cfg.loss,
               "beta": cfg.beta, "lr": cfg.lr, "sft_weight": cfg.sft_weight, "lora": lora,
               "trainable_params": n_train, "pairs": {"train": len(train_pairs), "held_out": len(val_pairs),
                                                      "file": pairs_path, **report},
               "before": sft.by_kind(unkeyed(before["greedy"])), "after": sft.by_kind(after),
               "before_by_difficulty": before["greedy"], "after_by_difficulty": keyed(after),
               "heldout": {"before": before.get("heldout"), "after": split, "best": best.get("heldout")},
               "before_sampled": before.get("sampled"), "after_sampled": keyed(end_report.get("sampled", {})),
               "safety": {"before": {k: before.get(k) for k in ("refusal", "over_refusal")},
                          "after": {k: end_report.get(k) for k in ("refusal", "over_refusal")}},
               "train_metrics": stats, "peak_memory_mb": round(peak, 1),
               "reference": "live" if cfg.live_reference else ("none" if cfg.loss == "simpo" else "precomputed")}
    if val_batches:
        summary["held_out_pairs"] = evaluate_pairs(wrapped, loss_fn, val_batches, rt)
    if rt.master:
        sft.write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
        train.print0(f"wrote {summary['last_checkpoint']}, {summary['checkpoint']} and "
                     f"{os.path.join(cfg.out_dir, 'summary.json')}")
    if rt.ddp:
        dist.barrier()
    return summary


def iterate(cfg):
    """Iterative DPO (Xu et al. 2023, "Some things are more CRINGE than others"; Pang et al. 2024): one round is
    a whole main() run; round r + 1 starts from round r's best checkpoint, samples its pairs from that model and
    uses it as the reference. The pairs stay on-policy as the policy moves, where one round's pairs describe only
    the SFT model's mistakes. out_dir/summary.json is the last round's, with the first round's "before" and every
    round's figures; out_dir/best is the last round's best checkpoint (what rlhf.py and pipeline.sh go on from)."""
    rounds, init, first, seconds = [], cfg.init, None, 0.0
    for old in ("summary.json", "eval.json"):  # nothing of an earlier run may pass for this one's
        if os.path.exists(os.path.join(cfg.out_dir, old)):
            os.remove(os.path.join(cfg.out_dir, old))
    for r in range(1, cfg.rounds + 1):
        s = main(replace(cfg, init=init, rounds=1, seed=cfg.seed + r - 1,
                         out_dir=os.path.join(cfg.out_dir, f"round{r}")))
        first, seconds = first or s, seconds + s["seconds"]
        rounds.append({"round": r, "init": init, "pairs": s["pairs"]["train"], "best": s["best"],
                       "heldout_after": s["heldout"]["after"]})
        init = s["checkpoint"]
    best_dir = os.path.join(cfg.out_dir, "best")
    os.makedirs(best_dir, exist_ok=True)
    for old in train.list_checkpoints(best_dir):
        os.remove(old)
    kept = os.path.join(best_dir, os.path.basename(init))
    shutil.copyfile(init, kept + ".tmp")
    os.replace(kept + ".tmp", kept)
    summary = {**s, "checkpoint": kept, "rounds": rounds, "before": first["before"],
               "before_by_difficulty": first["before_by_difficulty"],
               "heldout": {**s["heldout"], "before": first["heldout"]["before"]}, "seconds": seconds}
    sft.write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    return summary


def cli(argv=None):
    parser = data.config_parser(DPOConfig, __doc__, CHOICES)
    parser.add_argument("--pairs-only", action="store_true", help="write out_dir/pairs.jsonl and exit")
    args = parser.parse_args(argv)
    cfg = DPOConfig(**{f.name: getattr(args, f.name) for f in fields(DPOConfig)})
    try:
        if args.pairs_only:
            rt = train.setup_runtime(cfg.device, cfg.dtype, cfg.threads)
            check(cfg)
            model, tokenizer, _, ckpt = sft.load_base(find_init(cfg.init), cfg.data_dir)
            cfg = derive(cfg, ckpt.get("config", {}))
            os.makedirs(cfg.out_dir, exist_ok=True)
            pairs, report = build_pairs(model.to(rt.device).eval(), tokenizer, cfg, ckpt.get("config", {}), rt,
                                        os.path.join(cfg.out_dir, "pairs.jsonl"))
            print(f"wrote {len(pairs)} pairs to {os.path.join(cfg.out_dir, 'pairs.jsonl')}: {report}")
        elif cfg.rounds > 1:
            iterate(cfg)
        else:
            main(cfg)
    except (train.TrainError, data.DataError, tasks.TaskError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "status", 2))
    except KeyboardInterrupt:  # --rounds restarts from the first round: its rounds are separate runs
        train.interrupted("dpo.py", argv, cfg.out_dir, resumable=cfg.rounds == 1 and not args.pairs_only)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    cli(sys.argv[1:])
