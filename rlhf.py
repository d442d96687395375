"""Preference alignment, online: chapter "preference alignment", second half (the model samples, a reward judges).

dpo.py learned from a fixed set of compared answers. Here the model writes its own answers during training, a
reward scores them, and reinforcement learning moves the policy toward the better ones while a KL term holds it
near the reference (the model it started from). One file, top to bottom:

    config       RLConfig; argparse is built from its fields
    the math     the reward model, PPO (InstructGPT), GRPO (DeepSeekMath), and the KL estimators, in prose
    losses       Bradley-Terry, GAE, whitening, the clipped surrogate, the clipped value loss, k3, GRPO's
                 group advantages, the adaptive KL controller: each a few lines, each pinned by a test
    models       a GPT whose head is one number (the reward model, PPO's value model)
    rollouts     batched sampling (a prompt's G answers share one prefill), scoring by tasks.score or the RM
    evaluation   held-out greedy accuracy per kind, pass@1 / pass@k, best-of-n with the reward model
    main         the reward model's run, the RL run (PPO or GRPO), the flawed-teacher experiment, the comparison

Run it (CPU: add --threads 1 on a shared 2-core machine):

    python train.py && python sft.py && python rlhf.py    # GRPO, verifiable rewards, from out/dpo/best or out/sft
    python rlhf.py --algo ppo                             # PPO with a value model, reward from tasks.score
    python rlhf.py --train-reward-model                   # a Bradley-Terry reward model into out/reward_model
    python rlhf.py --algo ppo --reward model              # PPO on the learned reward: overoptimisation.png
    python rlhf.py --flawed-teacher                       # SFT on a teacher that drops repeats, then GRPO
    python rlhf.py --compare                              # best-of-n, DPO, PPO (tasks, RM) and GRPO, one table
    python bench.py rl                                    # rollouts/s: shared prefill, KV cache, a naive loop

Outputs in --out-dir: checkpoints (the policy, loadable by every later stage), metrics.jsonl (one record per
step), rlhf.png (the metrics), summary.json ({"stage": "rlhf", ...}: held-out accuracy before and after).

Tests: python -m pytest -q tests/test_rlhf.py

## The reward model (Ouyang et al. 2022, section 3.5; the Bradley-Terry model)

A reward model r(x, y) is the SFT model with its vocabulary head swapped for one number: the hidden state at
the last token of the answer (its <|end|>) goes through a Linear(n_embd, 1). The last token has read the whole
prompt and answer, so it is where a causal model can judge them. Trained on pairs (y_c better than y_r) with
the Bradley-Terry likelihood P(y_c > y_r) = sigma(r(x, y_c) - r(x, y_r)), whose negative log is the loss

    L_BT = -log sigma( r(x, y_c) - r(x, y_r) )

It only sees differences, so a constant added to every reward changes nothing: rewards are centred later by
the RL methods (whitening, group means). Held-out pair accuracy (r_c > r_r) and mean margin say how well it
ranks. Best-of-n (sample n answers, keep the one the RM scores highest) is the baseline that needs no
training at all: an RL method must beat it, per sampled token, to be worth its machinery.

## PPO (Schulman et al. 2017; as RLHF: Ziegler et al. 2019, Ouyang et al. 2022)

An answer y = (y_1 .. y_T) is T actions; the state before y_t is the prompt and y_<t. The reward is given per
token: the score s(x, y) (the RM's, or tasks.score's 1/0) on the last token, and at every token minus beta
times the log-ratio to the frozen reference,

    r_t = -beta * (log pi_old(y_t) - log pi_ref(y_t))   +   [t = T] * s(x, y)

so the return of an answer is s - beta * (a one-sample estimate of KL(pi || pi_ref)): the RLHF objective of
dpo.py's docstring, optimised by sampling. A value model V(s_t) (the SFT model with a scalar head, trained
alongside) predicts the return from each state. Generalised advantage estimation (Schulman et al. 2016):

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)                  (V after the last token is 0)
    A_t     = delta_t + gamma * lambda * A_{t+1}                 returns R_t = A_t + V(s_t)

lambda trades bias for variance: 0 uses only V's one-step guess, 1 the whole sampled return. gamma = 1 (the
answer is one episode; TRL's default). Advantages are whitened (mean 0, std 1 over the rollout's tokens) so one
learning rate suits any reward scale; the variance is the population one (divided by n, not n - 1), which over a
rollout's thousands of tokens differs from TRL's unbiased whitening by far less than its noise. The policy then
takes several epochs of minibatch steps on this rollout; because the data came from pi_old, each token's term is
weighted by the ratio rho_t = pi(y_t) / pi_old(y_t), and the clipped surrogate refuses to move rho far from 1:

    L_pi = mean_t  max( -A_t * rho_t,  -A_t * clip(rho_t, 1 - eps, 1 + eps) )

Outside [1 - eps, 1 + eps], on the side the advantage pushes toward, the clipped branch wins and its
gradient is zero: the step cannot exploit a stale rollout further. The value loss is clipped the same way
around the rollout's values, L_V = mean_t 0.5 * max((V - R)^2, (V_clip - R)^2), and weighs vf_coef. Every mean
is over the answer tokens of the whole rollout (train.train_step divides by the global count): the prompt and
padding are outside both masks, the sampled <|end|> is inside them, so stopping is reinforced too.

The adaptive KL controller (Ziegler et al. 2019, section 2.2) moves beta toward a target KL:
beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon), n the answers of the step.

## GRPO (Shao et al. 2024, DeepSeekMath, section 4.1)

No value model: sample G answers to the same prompt and let the group be the baseline,

    A_i = (s_i - mean(s_1..s_G)) / (std(s_1..s_G) + eps)       for every token of answer i

The std is the population one (divided by G: each group's advantages then have std exactly 1), forge's default.
DeepSeekMath and TRL's scale_rewards="group" use the sample std (G - 1), sqrt(G/(G-1)) larger (1.07 at G = 8),
so their advantages are that much smaller: --adv-scale group_sample gives theirs; batch divides by the sample
std of the whole rollout's scores (TRL's "batch"); none keeps s - mean (Dr. GRPO, Liu et al. 2025: dividing by
a group's std weighs the nearly solved and nearly hopeless groups, whose std is small, the most).
A group whose answers all score the same has A = 0 everywhere: it carries no signal, and the share of such
groups is logged (near 1 the task is solved or hopeless; the difficulty knob moves it back). The loss is the
clipped surrogate above with these advantages, plus beta times a KL estimate in the loss (not the reward):

    L = mean_t [ max(-A_i rho_t, -A_i clip(rho_t, 1 - eps, 1 + eps))  +  beta * k3_t ]
    k3_t = pi_ref(y_t)/pi(y_t) - log(pi_ref(y_t)/pi(y_t)) - 1

mean_t is over every answer token of the rollout (--loss-type dapo, the default; TRL's "dapo"): each token
weighs the same, so a long answer is not diluted. TRL's "grpo" (the paper's) averages each answer's tokens first,
then the answers, which weighs a short answer's tokens more; "dr_grpo" sums the tokens and divides by a
constant, answers x --max-new-tokens (Dr. GRPO), so the step does not depend on the lengths sampled.

Why k3 (Schulman 2020, "Approximating KL divergence"): with samples from pi, k1 = log(pi / pi_ref) is
unbiased for KL(pi || pi_ref) but negative half the time and noisy; k2 = 0.5 log^2 is biased; k3 is unbiased
as well, never negative (x - 1 >= log x), and its variance is small when pi is close to pi_ref, which is
where the KL term works. It is exactly 0 where pi = pi_ref. The G answers share one prefill of the prompt:
GPT.generate(n=G) computes the prompt's KV cache once and copies it to the G rows.
"""
import copy
import json
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import dpo
import sft
import tasks
import train
from model import GPT, GPTConfig


# --- config ---

@dataclass
class RLConfig:
    # what to run
    init: str | None = None             # checkpoint to start from; None = DPO's pick (out/dpo/best), else out/sft
    data_dir: str | None = None         # folder whose tokenizer to use; None = the one the checkpoint names
    algo: str = "grpo"                  # grpo or ppo
    reward: str = "tasks"               # tasks (tasks.score: 1 right, 0 wrong) or model (the reward model)
    reward_model: str | None = None     # reward model checkpoint; None = newest in out/reward_model
    train_reward_model: bool = False    # train the reward model instead (into --out-dir, default out/reward_model)
    flawed_teacher: bool = False        # the experiment: SFT on a flawed teacher, then GRPO against more SFT
    compare: bool = False               # best-of-n, DPO, PPO (tasks), PPO (model) and GRPO from the same --init
    # tasks
    kinds: list[str] = field(default_factory=lambda: list(tasks.TEACHER_ERRORS))  # task kinds to train on: where
    #                                     the SFT teacher was flawed and the verifier knows better (BENCHMARKS.md:
    #                                     on arithmetic and counting RL sharpened guesses and gained nothing)
    difficulties: list[int] | None = None  # None = per kind, those whose greedy probe is in [probe_min, probe_max]
    probe_prompts: int = 32             # training prompts per kind and difficulty in that probe
    probe_min: float = 0.05             # below: too hard, every reward is 0 (no signal)
    probe_max: float = 0.95             # above: nearly solved, little to gain
    max_sets: int | None = None         # keep the sets where sampling beats greedy most (pass@k - greedy); None = all
    pool_size: int = 500                # training prompts per kind and difficulty to draw rollouts from
    # rollouts
    prompts_per_step: int | None = None  # prompts per rollout; None = 32
    group_size: int = 8                 # grpo: answers per prompt G (ppo samples 1)
    temperature: float = 1.0            # sampling temperature of the rollouts
    max_new_tokens: int = 24            # answer length limit (an answer cut here has no <|end|>)
    shared_prefill: bool = True         # grpo: a prompt's G answers share one prefill (GPT.generate n=G)
    # objective
    clip: float = 0.2                   # eps of the clipped surrogate
    kl_coef: float | None = None        # beta of the KL term; None = 0.05 (ppo, in the reward), 0.02 (grpo, loss)
    kl_target: float | None = None      # ppo: adaptive KL controller's target (nats per answer); None = fixed beta
    kl_horizon: int = 10000             # ppo: the controller's horizon in answers
    kl_max: float = 20.0                # stop (exit 1) when the KL to the reference passes this (nats per answer)
    gamma: float = 1.0                  # ppo: discount of GAE
    lam: float = 0.95                   # ppo: lambda of GAE
    vf_coef: float = 0.1                # ppo: weight of the value loss
    value_clip: float = 0.2             # ppo: the value loss's clip around the rollout's values
    epochs: int | None = None           # passes over each rollout; None = 4 (ppo), 1 (grpo: on-policy, ratio 1)
    minibatches: int | None = None      # optimizer steps per epoch; None = 4 (ppo), 1 (grpo)
    adv_eps: float = 1e-4               # grpo: eps in (s - mean) / (std + eps)
    adv_scale: str = "group"            # grpo: std dividing s - mean: group (population), group_sample (TRL,
    #                                     DeepSeekMath: sample std), batch (sample std of the rollout) or none
    loss_type: str = "dapo"             # grpo: loss mean over all answer tokens (dapo), per answer then over
    #                                     answers (grpo) or token sum / (answers x max_new_tokens) (dr_grpo)
    # reward model
    pairs: str | None = None            # reward model: JSONL pairs (dpo.py's forms); None = on-policy pairs
    prompts_per_task: int = 256         # reward model, on-policy: training prompts per kind and difficulty
    samples: int = 8                    # reward model, on-policy: answers sampled per prompt
    pairs_per_prompt: int = 2           # reward model, on-policy: at most this many (right, wrong) pairs per prompt
    val_fraction: float = 0.15          # reward model: share of prompts whose pairs are held out
    label_noise: float = 0.0            # reward model: share of training pairs whose label is flipped (labellers
    #                                     disagree; InstructGPT's agreed ~73%); the held-out pairs stay clean
    overlong: str = "truncate"          # reward model: a pair longer than the context: truncate or drop
    best_of_n: int = 8                  # answers per prompt of the best-of-n baseline (with a reward model)
    # optimization
    batch_size: int = 16                # reward model: pairs per step
    micro_batch: int = 64               # rows per forward in the RL updates (gradient accumulation beyond it)
    max_steps: int | None = None        # reward model steps or RL rollouts; None = 300 (RM), 60 (ppo and grpo)
    lr: float | None = None             # peak learning rate; None = 3e-4 (reward model), 5e-5 (ppo), 1e-4 (grpo)
    min_lr_frac: float = 1.0            # final learning rate as a fraction of --lr (1 = constant)
    warmup_steps: int = 0               # linear warmup steps
    schedule: str = "constant"          # cosine, wsd or constant (train.lr_at)
    cooldown_frac: float = 0.2          # wsd only: fraction of max_steps spent decaying
    beta1: float = 0.9                  # AdamW first-moment decay
    beta2: float = 0.95                 # AdamW second-moment decay
    grad_clip: float = 1.0              # clip the global gradient norm; 0 = no clipping
    # runtime
    device: str | None = None           # cpu or cuda; None = cuda when available
    dtype: str | None = None            # float32 or bfloat16; None = bfloat16 on CUDA, float32 on CPU
    threads: int | None = None          # torch CPU threads; None = torch's default
    seed: int = 1337                    # prompts, sampling
    # evaluation, logging, checkpoints
    eval_every: int = 10                # steps between held-out greedy evaluations
    eval_examples: int = 50             # held-out prompts per kind and difficulty of the sets trained on
    heldout_examples: int | None = None  # held-out prompts per kind and difficulty of every kind, the SFT run's
    #                                      (weak spot and elsewhere, before and after); None = the SFT run's; 0 = skip
    pass_k: int = 8                     # k of pass@k (before and after); 0 = skip
    pass_examples: int = 20             # held-out prompts per kind and difficulty for pass@k and best-of-n
    log_every: int = 5                  # steps between progress lines
    save_every: int = 10                # steps between checkpoints (one is always saved at the end)
    keep_last: int = 2                  # checkpoints kept in out_dir
    out_dir: str | None = None          # None = out/rlhf (out/reward_model, out/flawed_teacher, out/compare)
    resume: str | None = None           # RL run: checkpoint path, or "auto" = newest in out_dir (same flags)
    # the flawed-teacher experiment
    teacher_kind: str = "sort"          # sort (the teacher drops repeated letters) or add (it drops a carry)
    teacher_difficulty: int = 3         # difficulty of the teacher's problems (sort/3: 7 letters, 59% with a repeat)
    teacher_error: float = 0.6          # share of the problems it can get wrong that the teacher gets wrong
    teacher_steps: int = 300            # SFT steps on the teacher's answers


CHOICES = {"algo": ("grpo", "ppo"), "teacher_kind": ("sort", "add"), "reward": ("tasks", "model"),
           "adv_scale": ("group", "group_sample", "batch", "none"), "loss_type": ("dapo", "grpo", "dr_grpo"),
           "overlong": ("drop", "truncate"), "schedule": ("cosine", "wsd", "constant"), "device": ("cpu", "cuda"),
           "dtype": ("float32", "bfloat16")}


class RLError(train.TrainError):
    """Bad input for RLHF: one line, exit status 2."""


# --- losses ---
# Per-token tensors are (B, T) over the rows of a rollout; mask is 1.0 on answer tokens (targets != -1), 0 on the
# prompt and padding. Each loss returns per-token (or per-pair) terms; the caller sums them and train_step divides
# by the global count.

def bt_loss(r_chosen, r_rejected):
    """Bradley-Terry: -log sigma(r_c - r_r), per pair."""
    return -F.logsigmoid(r_chosen - r_rejected)


def gae(rewards, values, mask, gamma, lam):
    """Advantages and returns (B, T) by generalised advantage estimation; each row's answer is one episode."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    T = rewards.size(1)
    for t in reversed(range(T)):
        m_next = mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        v_next = values[:, t + 1] * m_next if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * v_next - values[:, t]
        last = (delta + gamma * lam * m_next * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def whiten(x, mask, eps=1e-8):
    """x with mean 0 and std 1 over its masked entries (0 elsewhere); the population variance (divided by n)."""
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * mask


def clipped_surrogate(logp, logp_old, adv, eps):
    """PPO's policy loss per token, max(-A rho, -A clip(rho, 1-eps, 1+eps)), and where the clip is active: where the
    clipped branch wins (rho past 1 + eps with A > 0, or below 1 - eps with A < 0) and the gradient is zero. Past
    the range on the other side the unclipped term wins and still pulls rho back: not counted (TRL's pg_clipfrac)."""
    ratio = torch.exp(logp - logp_old)
    loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps))
    return loss, (((ratio > 1 + eps) & (adv > 0)) | ((ratio < 1 - eps) & (adv < 0))).float()


def clipped_value_loss(v, v_old, returns, eps):
    """0.5 max((V - R)^2, (V_clip - R)^2) per token, V_clip = v_old + clip(V - v_old, -eps, eps)."""
    v_clip = v_old + (v - v_old).clamp(-eps, eps)
    return 0.5 * torch.max((v - returns) ** 2, (v_clip - returns) ** 2)


def k3(logp, logp_ref):
    """The k3 estimator of KL(pi || pi_ref) per token: r - log r - 1 with r = pi_ref / pi. >= 0, 0 at pi = pi_ref."""
    log_r = logp_ref - logp
    return torch.exp(log_r) - log_r - 1


def group_advantages(scores, eps, scale="group"):
    """GRPO: scores (P, G) -> (s - group mean) / (std + eps). scale: group = the population std over the G answers,
    group_sample = their sample std (TRL, DeepSeekMath), batch = the sample std of all P x G scores, none = no std."""
    mean = scores.mean(dim=1, keepdim=True)
    if scale == "none":
        return scores - mean
    if scale == "batch":
        return (scores - mean) / (scores.std() + eps)
    std = scores.std(dim=1, keepdim=True, unbiased=scale == "group_sample")
    return (scores - mean) / (std + eps)


def adapt_kl(beta, kl, target, n, horizon):
    """Ziegler et al.'s proportional controller: beta grows when KL is above target, shrinks below it."""
    return beta * (1 + max(-0.2, min(0.2, kl / target - 1)) * n / horizon)


def entropy(logits):
    """Entropy of each position's next-token distribution (B, T), nats."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


# --- models: a GPT that outputs one number ---

def scalar_head(model, std=None):
    """Swap the model's vocabulary head for Linear(n_embd, 1): model(x)[0] is then (B, T, 1). std None = zeros
    (a value model predicts 0 at first), else a normal init (TRL's reward head: std 1/sqrt(n_embd + 1))."""
    head = nn.Linear(model.config.n_embd, 1).to(model.transformer.wte.weight.device)
    nn.init.zeros_(head.bias)
    if std is None:
        nn.init.zeros_(head.weight)
    else:
        nn.init.normal_(head.weight, std=std)
    model.lm_head = head  # wte keeps the tied tensor; only the output side changes
    return model


def last_token_scores(model, ids, lengths):
    """ids (B, T) right-padded, lengths (B,) -> the scalar at each row's last real token (B,). Right padding comes
    after the read position and causal attention never lets it in, so the amount of padding changes nothing."""
    out, _ = model(ids)                                   # (B, T, 1)
    return out[..., 0].gather(1, (lengths - 1).unsqueeze(1)).squeeze(1)


def pad_right(rows, pad_id):
    """Lists of ids -> (ids (B, T), lengths (B,)), padded on the right with pad_id."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    return ids, torch.tensor([len(r) for r in rows])


def load_reward_model(path, tokenizer, init, init_ckpt, rt):
    """The reward model at path, checked to share the policy's tokenizer and base."""
    ckpt = train.load_checkpoint(path)
    if ckpt.get("stage") != "reward_model":
        raise RLError(f"{path} is a {ckpt.get('stage')} checkpoint, not a reward model: train one with "
                      f"`python rlhf.py --train-reward-model --init {init}`")
    if ckpt.get("tokenizer_hash") != tokenizer.hash:
        raise RLError(f"reward model {path} was trained with tokenizer {ckpt.get('tokenizer_hash')}, the policy "
                      f"uses {tokenizer.hash}; train one for this model with --train-reward-model --init {init}")
    lineage = {os.path.abspath(p) for p in (init, init_ckpt.get("base"), init_ckpt.get("sft")) if p}
    if os.path.abspath(ckpt.get("base") or "") not in lineage:
        raise RLError(f"reward model {path} was trained from {ckpt.get('base')}, the policy is {init} (from "
                      f"{init_ckpt.get('base')}); train one with `python rlhf.py --train-reward-model --init {init}`")
    rm = scalar_head(GPT(GPTConfig(**ckpt["model_config"])))
    rm.load_state_dict(ckpt["model"])
    return rm.to(rt.device).eval().requires_grad_(False), ckpt


@torch.no_grad()
def rm_scores(rm, rows, pad_id, rt, batch=128):
    """Reward-model scores of full sequences (prompt + answer ids), as a float list."""
    out = []
    for i in range(0, len(rows), batch):
        ids, lengths = pad_right(rows[i:i + batch], pad_id)
        with rt.autocast():
            out += last_token_scores(rm, ids.to(rt.device), lengths.to(rt.device)).float().tolist()
    return out


# --- rollouts ---

@dataclass
class Rollout:
    examples: list      # the task example of each row (a prompt repeated G times for grpo)
    prompts: list       # prompt ids per row
    answers: list       # sampled ids per row, the stop token included when it was sampled
    texts: list         # decoded answers
    correct: list       # tasks.score per row, 1.0 or 0.0
    scores: list        # the reward per row (= correct, or the reward model's score)


def sample(model, tokenizer, examples, rt, cfg, n, seed, shared):
    """n answers to each example, from one prefill per prompt (shared) or one per answer; ids per row."""
    end = tokenizer.special_ids["<|end|>"]
    prompts = [sft.render_prompt(e["messages"][:-1], tokenizer) for e in examples]
    with rt.autocast():
        if shared:
            return model.generate(prompts, cfg.max_new_tokens, temperature=cfg.temperature, stop_tokens=[end],
                                  seed=seed, n=n)
        return model.generate([p for p in prompts for _ in range(n)], cfg.max_new_tokens,
                              temperature=cfg.temperature, stop_tokens=[end], seed=seed)


def rollout(model, tokenizer, examples, rt, cfg, n, seed, rm=None):
    """Sample n answers per example, score them (tasks.score always; the reward model when given)."""
    end = tokenizer.special_ids["<|end|>"]
    answers = sample(model, tokenizer, examples, rt, cfg, n, seed, cfg.shared_prefill)
    rows = [e for e in examples for _ in range(n)]
    prompts = [sft.render_prompt(e["messages"][:-1], tokenizer) for e in rows]
    texts = [tokenizer.decode([t for t in a if t != end]).strip() for a in answers]
    correct = [float(tasks.score(e["kind"], e["prompt"], a)) for e, a in zip(rows, texts)]
    scores = correct if rm is None else rm_scores(rm, [p + a for p, a in zip(prompts, answers)],
                                                  tokenizer.eot_id, rt)
    return Rollout(rows, prompts, answers, texts, correct, scores)


def rollout_batch(ro, pad_id):
    """The rollout as the project's (x, y): y = -1 on prompt and padding, the sampled tokens (and <|end|>) as
    targets. Also the index of each row's last answer token (where PPO places the score)."""
    pairs = [dpo.example(p, a) for p, a in zip(ro.prompts, ro.answers)]
    T = max(len(x) for x, _ in pairs)
    x = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    y = torch.full((len(pairs), T), -1, dtype=torch.long)
    for i, (xs, ys) in enumerate(pairs):
        x[i, :len(xs)], y[i, :len(ys)] = torch.tensor(xs), torch.tensor(ys)
    return x, y, torch.tensor([len(xs) - 1 for xs, _ in pairs])


@torch.no_grad()
def token_stats(model, x, y, rt, micro, temperature=1.0):
    """Per-token log-probs and entropies (B, T) of the targets, in chunks of micro rows, under the distribution the
    answers were sampled from: softmax(logits / temperature). The policy (old and new), the reference and the loss
    all read that one, so the ratio is 1 and k3 is 0 at the start whatever --temperature (TRL divides alike)."""
    logps, ents = [], []
    for i in range(0, x.size(0), micro):
        with rt.autocast():
            logits, _ = model(x[i:i + micro])
        logits = logits.float() / temperature
        logps.append(dpo.token_logps(logits, y[i:i + micro]))
        ents.append(entropy(logits) * (y[i:i + micro] != -1))
    return torch.cat(logps), torch.cat(ents)


# --- evaluation ---

def pass_at_k(model, tokenizer, sets, rt, cfg, k):
    """pass@1 and pass@k at --temperature on the first pass_examples prompts of each set (k answers each)."""
    items = [e for exs in sets.values() for e in exs[:cfg.pass_examples]]
    answers = dpo.sample_answers(model, tokenizer, [e["messages"][:-1] for e in items], rt, k, cfg.temperature,
                                 cfg.max_new_tokens, 7)  # the same samples for every --seed
    right = np.array([[tasks.score(e["kind"], e["prompt"], a) for a in ans] for e, ans in zip(items, answers)])
    return {"pass@1": float(right.mean()), f"pass@{k}": float(right.any(axis=1).mean())}


def best_of_n(model, rm, tokenizer, sets, rt, cfg):
    """Accuracy of the answer the reward model ranks first among best_of_n samples, against the oracle (any right)
    and one sample; the tokens it sampled."""
    items = [e for exs in sets.values() for e in exs[:cfg.pass_examples]]
    ro = rollout(model, tokenizer, items, rt, replace(cfg, shared_prefill=True), cfg.best_of_n, 11, rm)
    n = cfg.best_of_n
    scores, right = np.array(ro.scores).reshape(-1, n), np.array(ro.correct).reshape(-1, n)
    pick = right[np.arange(len(items)), scores.argmax(axis=1)]
    return {"n": n, "accuracy": float(pick.mean()), "oracle": float(right.any(axis=1).mean()),
            "one_sample": float(right.mean()), "tokens_sampled": int(sum(map(len, ro.answers)))}


def accuracy(model, tokenizer, sets, rt, cfg):
    return sft.task_accuracy(model, tokenizer, sets, rt, cfg.max_new_tokens)


def mean(acc):
    return float(np.mean(list(acc.values())))


# --- metrics and the plot ---

PANELS = (("reward", "true_acc", "mean reward (line) / true accuracy of the rollouts (dashed)"),
          ("acc", None, "held-out greedy accuracy"), ("kl", None, "KL to the reference (nats / answer)"),
          ("entropy", None, "entropy (nats / token)"), ("clip_frac", None, "clip fraction"),
          ("value_loss", "explained_var", "value loss (line) / explained variance (dashed)"),
          ("answer_len", None, "answer length (tokens)"), ("zero_std_frac", "truncated", "zero-signal groups "
                                                                                         "(line) / truncated"))


def plot(records, path, title):
    """One panel per metric against the step; the first puts the proxy reward beside the true accuracy."""
    panels = [(name, [(a, "o-" if a == "acc" else "-", False)] + ([(b, "--", a == "reward")] if b else []))
              for a, b, name in PANELS]
    return train.plot_panels(records, panels, path, title)


def overoptimisation_plot(records, path, title):
    """Gao et al. 2022, figure 1, for one run: against the KL from the reference (nats per answer, on a square-root
    axis as theirs), the proxy reward the policy is trained on (the reward model's mean score on the rollouts)
    and the true reward (tasks.score on the same rollouts, and held-out greedy accuracy where it was measured).
    Over-optimisation is the proxy still rising while the true reward has turned down."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kl = lambda r: math.sqrt(max(r.get("kl", 0.0), 0.0))  # noqa: E731  (the start, step 0, is at KL 0)
    pts = [r for r in records if "reward" in r]
    x = [kl(r) for r in pts]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(x, [r["true_acc"] for r in pts], ".", color="C1", alpha=0.5, label="true accuracy of the rollouts")
    held = [(kl(r), r["acc"]) for r in records if "acc" in r]
    if held:
        ax.plot(*zip(*held), "o-", color="C2", label="held-out greedy accuracy (tasks.score)")
    ax.set_xlabel("sqrt(KL from the reference), sqrt(nats / answer)")
    ax.set_ylabel("true reward")
    proxy = ax.twinx()
    proxy.plot(x, [r["reward"] for r in pts], "x", color="C0", label="proxy reward of the rollouts (the reward model)")
    proxy.set_ylabel("proxy reward")
    fig.legend(loc="lower center", ncol=2, fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --- one RL step ---

class ActorCritic(nn.Module):
    """PPO's two trained models under one optimizer step: the policy and the value model (a separate copy of the
    SFT model with a scalar head, as in minimind and TRL, so the value loss does not pull on the policy)."""

    def __init__(self, policy, value):
        super().__init__()
        self.policy, self.value = policy, value


def ppo_loss_fn(cfg, stats):
    def loss_fn(model, batch):
        x, y, old, v_old, adv, ret = batch
        mask = (y != -1).float()
        logits, _ = model.policy(x)
        pg, clipped = clipped_surrogate(dpo.token_logps(logits / cfg.temperature, y), old, adv, cfg.clip)
        v, _ = model.value(x)
        vf = clipped_value_loss(v[..., 0], v_old, ret, cfg.value_clip)
        stats.append(torch.stack([(clipped * mask).sum(), (vf * mask).sum(), mask.sum()]).detach())
        return ((pg + cfg.vf_coef * vf) * mask).sum()
    return loss_fn


def grpo_loss_fn(cfg, stats):
    def loss_fn(model, batch):
        x, y, old, ref, adv = batch
        mask = (y != -1).float()
        logits, _ = model(x)
        logp = dpo.token_logps(logits / cfg.temperature, y)
        pg, clipped = clipped_surrogate(logp, old, adv, cfg.clip)
        stats.append(torch.stack([(clipped * mask).sum(), torch.zeros(()), mask.sum()]).detach())
        per_token = (pg + cfg.kl_coef * k3(logp, ref)) * mask
        if cfg.loss_type == "grpo":                        # each answer's mean; grpo_count counts answers
            return (per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum()
        return per_token.sum()
    return loss_fn


def ppo_rewards(old, ref, mask, scores, last, kl_coef):
    """PPO's per-token rewards (B, T): -beta (log pi_old - log pi_ref) on every answer token, plus the score (B,) on
    each row's last answer token (index last, (B,))."""
    rewards = -kl_coef * (old - ref) * mask
    rewards[torch.arange(old.size(0), device=old.device), last] += scores
    return rewards


def count_answer_tokens(batch):
    return (batch[1] != -1).sum()


def grpo_count(cfg):
    """count_fn for train_step: what the GRPO loss is divided by (the global count), per --loss-type."""
    if cfg.loss_type == "grpo":
        return lambda batch: batch[1].size(0)
    if cfg.loss_type == "dr_grpo":
        return lambda batch: batch[1].size(0) * cfg.max_new_tokens
    return count_answer_tokens


def update(module, optimizer, tensors, cfg, rt, loss_fn, count_fn=count_answer_tokens):
    """epochs x minibatches optimizer steps over the rollout's rows (each in micro-batches of micro_batch rows)."""
    B, losses, norms = tensors[0].size(0), [], []
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.epochs):
        order = torch.randperm(B, generator=gen) if cfg.minibatches > 1 else torch.arange(B)
        for idx in order.tensor_split(cfg.minibatches):
            micro = [tuple(t[j] for t in tensors) for j in idx.tensor_split(max(1, math.ceil(len(idx) /
                                                                                       cfg.micro_batch)))]
            loss, norm = train.train_step(module, optimizer, micro, rt, cfg.grad_clip, loss_fn, count_fn)
            if not (math.isfinite(loss) and math.isfinite(norm)):
                raise train.Diverged(f"loss {loss}, grad norm {norm}: stopped without updating")
            losses.append(loss)
            norms.append(norm)
    return float(np.mean(losses)), float(np.mean(norms))


def rl_step(cfg, ro, policy, reference, value, module, optimizer, rt, pad_id, end_id):
    """One rollout's update (PPO or GRPO) -> the step's metrics."""
    x, y, last = (t.to(rt.device) for t in rollout_batch(ro, pad_id))
    mask = (y != -1).float()
    old, ent = token_stats(policy, x, y, rt, cfg.micro_batch, cfg.temperature)
    ref, _ = token_stats(reference, x, y, rt, cfg.micro_batch, cfg.temperature)
    scores = torch.tensor(ro.scores, device=rt.device)
    stats, metrics = [], {}
    if cfg.algo == "ppo":
        with torch.no_grad(), rt.autocast():
            values = torch.cat([value(x[i:i + cfg.micro_batch])[0][..., 0] for i in range(0, x.size(0),
                                                                                      cfg.micro_batch)]).float()
        values = values * mask
        rewards = ppo_rewards(old, ref, mask, scores, last, cfg.kl_coef)
        adv, ret = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        resid, m = (ret - values)[mask.bool()], ret[mask.bool()]
        metrics["explained_var"] = float(1 - resid.var() / m.var().clamp(min=1e-8))
        tensors = (x, y, old, values, whiten(adv, mask), ret)
        loss, norm = update(module, optimizer, tensors, cfg, rt, ppo_loss_fn(cfg, stats))
    else:
        G = cfg.group_size
        grouped = scores.view(-1, G)
        adv = group_advantages(grouped, cfg.adv_eps, cfg.adv_scale).view(-1, 1) * mask
        metrics["zero_std_frac"] = float((grouped.std(dim=1, unbiased=False) == 0).float().mean())
        loss, norm = update(module, optimizer, (x, y, old, ref, adv), cfg, rt, grpo_loss_fn(cfg, stats),
                            grpo_count(cfg))
    s = torch.stack(stats).sum(0)
    n_tok = float(mask.sum())
    metrics.update(loss=loss, grad_norm=norm, reward=float(scores.mean()), true_acc=float(np.mean(ro.correct)),
                   kl=float((k3(old, ref) * mask).sum() / x.size(0)), entropy=float(ent.sum() / n_tok),
                   clip_frac=float(s[0] / s[2]), answer_len=n_tok / x.size(0),
                   truncated=float(np.mean([not a or a[-1] != end_id for a in ro.answers])),
                   tokens_sampled=int(n_tok), tokens_trained=int(n_tok * cfg.epochs))
    if cfg.algo == "ppo":
        metrics["value_loss"] = float(s[1] / s[2])
    return metrics


# --- main: setup shared by every mode ---

def find_init(path):
    """The checkpoint to start from: path, or the one DPO picked to go on from (the `checkpoint` of
    out/dpo/summary.json, in out/dpo/best; while a DPO run is unfinished, its best so far), else the newest in
    out/sft. Not DPO's last step: dpo.py keeps the best held-out accuracy apart because the last can be worse."""
    if path is None:
        named = None
        if os.path.exists("out/dpo/summary.json"):
            with open("out/dpo/summary.json") as f:
                named = json.load(f).get("checkpoint")
        if named and os.path.exists(named):
            path = named
        elif train.list_checkpoints("out/dpo/best"):
            path = "out/dpo/best"
        elif train.list_checkpoints("out/dpo"):
            path = "out/dpo"
    try:
        return sft.find_init(path, "out/sft", "python sft.py")
    except sft.SFTError as e:
        raise RLError(str(e)) from None


def derive(cfg):
    """Fill the fields left at None (see their comments)."""
    ppo, rm = cfg.algo == "ppo", cfg.train_reward_model
    mode_dir = ("out/reward_model" if rm else "out/flawed_teacher" if cfg.flawed_teacher else
                "out/compare" if cfg.compare else "out/rlhf")
    return replace(cfg, out_dir=cfg.out_dir or mode_dir,
                   max_steps=cfg.max_steps or (300 if rm else 60),
                   lr=cfg.lr if cfg.lr is not None else (3e-4 if rm else 5e-5 if ppo else 1e-4),
                   prompts_per_step=cfg.prompts_per_step or 32,
                   kl_coef=cfg.kl_coef if cfg.kl_coef is not None else (0.05 if ppo else 0.02),
                   epochs=cfg.epochs or (4 if ppo else 1), minibatches=cfg.minibatches or (4 if ppo else 1))


def check(cfg):
    for name in ("group_size", "max_sets", "eval_every", "log_every", "save_every", "keep_last", "batch_size",
                 "micro_batch", "probe_prompts", "pool_size", "eval_examples", "best_of_n", "samples",
                 "prompts_per_task", "pairs_per_prompt", "max_steps", "prompts_per_step", "epochs", "minibatches",
                 "teacher_steps", "teacher_difficulty"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise RLError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    unknown = [k for k in cfg.kinds if k not in tasks.KINDS]
    if unknown:
        raise RLError(f"--kinds {' '.join(unknown)}: unknown; choose from {', '.join(tasks.KINDS)}")
    if cfg.algo == "grpo" and cfg.group_size < 2:
        raise RLError(f"--group-size {cfg.group_size}: GRPO needs at least 2 answers per prompt to compare")
    if cfg.algo == "ppo" and (cfg.adv_scale, cfg.loss_type) != ("group", "dapo"):
        raise RLError(f"--adv-scale {cfg.adv_scale}, --loss-type {cfg.loss_type}: GRPO's; PPO whitens its "
                      f"advantages and averages over tokens, so leave them out with --algo ppo")
    if cfg.teacher_difficulty > tasks.MAX_DIFFICULTY[cfg.teacher_kind]:
        raise RLError(f"--teacher-difficulty {cfg.teacher_difficulty}: {cfg.teacher_kind} goes up to "
                      f"{tasks.MAX_DIFFICULTY[cfg.teacher_kind]}")
    if not 0 <= cfg.label_noise < 0.5:
        raise RLError(f"--label-noise {cfg.label_noise}: a share of flipped labels, 0 <= p < 0.5")
    if cfg.temperature <= 0:
        raise RLError(f"--temperature {cfg.temperature}: RL samples its answers; use a temperature above 0")
    if not (0 < cfg.clip < 1 and 0 <= cfg.lam <= 1 and 0 < cfg.gamma <= 1):
        raise RLError(f"--clip {cfg.clip}, --lam {cfg.lam}, --gamma {cfg.gamma}: use 0 < clip < 1, 0 <= lam <= 1, "
                      f"0 < gamma <= 1")
    if cfg.kl_target is not None and cfg.kl_target <= 0:
        raise RLError(f"--kl-target {cfg.kl_target}: a target KL must be above 0 (leave it out for a fixed beta)")
    modes = [m for m in ("train_reward_model", "flawed_teacher", "compare") if getattr(cfg, m)]
    if len(modes) > 1:
        raise RLError(f"{' and '.join('--' + m.replace('_', '-') for m in modes)}: choose one")


def choose_sets(model, tokenizer, cfg, base_config, rt):
    """The (kind, difficulty) pairs to train on: --difficulties, or those whose greedy probe on training prompts
    lies in [probe_min, probe_max], and of those the max_sets where sampling finds the most right answers that
    greedy decoding misses (pass@k - greedy on the probe prompts): RL turns what the model can sample into what it
    answers, so that gap is what it can win, and a few sets at a time learn faster than many. Returns the held-out
    sets (the same test prompts before and after), the training pool, and the probe."""
    probe = None
    if cfg.difficulties:
        keys = [(k, d) for k in cfg.kinds for d in cfg.difficulties if d <= tasks.MAX_DIFFICULTY[k]]
    else:
        candidates = base_config.get("difficulties") or [1, 2]
        # the probe's prompts and samples do not depend on --seed: every seed trains and is scored on the same sets
        _, greedy = dpo.choose_difficulties(model, tokenizer, replace(cfg, seed=0), candidates, rt)
        keys = [key for key, a in sorted(greedy.items()) if cfg.probe_min <= a <= cfg.probe_max]
        if not keys:
            raise RLError(f"no kind and difficulty has a greedy accuracy in [{cfg.probe_min}, {cfg.probe_max}] "
                          f"({dpo.keyed(greedy)}); give --difficulties or widen --probe-min/--probe-max")
        probe = {key: {"greedy": a} for key, a in greedy.items()}
        if cfg.max_sets and len(keys) > cfg.max_sets:
            for k, d in keys:  # the same probe prompts as the greedy probe, group_size samples each
                exs = tasks.generate(k, cfg.probe_prompts, 1, "train", d)
                answers = dpo.sample_answers(model, tokenizer, [e["messages"][:-1] for e in exs], rt,
                                             cfg.group_size, cfg.temperature, cfg.max_new_tokens, 3)
                probe[(k, d)]["pass@k"] = float(np.mean([any(tasks.score(k, e["prompt"], a) for a in ans)
                                                         for e, ans in zip(exs, answers)]))
            gap = {key: probe[key]["pass@k"] - probe[key]["greedy"] for key in keys}
            keys = sorted(sorted(keys, key=lambda key: -gap[key])[:cfg.max_sets])
    pool = [e for k, d in keys for e in tasks.generate(k, cfg.pool_size, cfg.seed, "train", d)]
    sets = {(k, d): tasks.heldout(k, cfg.eval_examples, d) for k, d in keys}
    return sets, pool, probe


def check_lengths(examples, tokenizer, block_size, max_new_tokens):
    longest = max(len(sft.render_prompt(e["messages"][:-1], tokenizer)) for e in examples)
    if longest + max_new_tokens > block_size:
        raise RLError(f"a prompt of {longest} tokens plus --max-new-tokens {max_new_tokens} does not fit the "
                      f"context of {block_size} tokens; give a smaller --max-new-tokens or shorter prompts")


def fresh_run_dir(out_dir):
    """Create out_dir and clear an earlier run's checkpoints, summary and evaluation, so nothing stale looks
    complete: pipeline.sh takes a folder with summary.json for done and would keep the old model's eval.json."""
    os.makedirs(out_dir, exist_ok=True)
    for old in train.list_checkpoints(out_dir) + [os.path.join(out_dir, f) for f in ("summary.json", "eval.json")]:
        if os.path.exists(old):
            os.remove(old)


def peak_mb(rt):
    return round((torch.cuda.max_memory_allocated() if rt.device_type == "cuda"
                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20, 1)


# --- main: the reward model ---

def rm_batch(pairs, pad_id):
    """B pairs -> (ids (2B, T), lengths (2B,)): the B chosen sequences (prompt + answer + <|end|>), then the B
    rejected ones, padded on the right."""
    return pad_right([p["prompt_ids"] + p[f"{side}_ids"] for side in ("chosen", "rejected") for p in pairs], pad_id)


def rm_loss_fn(stats):
    def loss_fn(model, batch):
        ids, lengths = batch
        r = last_token_scores(model, ids, lengths)
        B = ids.size(0) // 2
        stats.append(torch.stack([r[:B], r[B:]]).detach().float())
        return bt_loss(r[:B], r[B:]).sum()
    return loss_fn


def pair_count(batch):
    return batch[0].size(0) // 2


def rm_metrics(stats):
    rc, rr = torch.cat(stats, dim=1)
    right = (rc > rr).float() + 0.5 * (rc == rr).float()  # a tie counts half
    return {"bt_loss": float(bt_loss(rc, rr).mean()), "accuracy": float(right.mean()),
            "margin": float((rc - rr).mean()), "mean_reward": float(torch.cat([rc, rr]).mean()),
            "min_reward": float(torch.cat([rc, rr]).min()), "max_reward": float(torch.cat([rc, rr]).max())}


@torch.no_grad()
def evaluate_rm(rm, batches):
    stats = []
    for b in batches:
        rm_loss_fn(stats)(rm, b)
    return rm_metrics(stats)


def train_reward_model(cfg, rt):
    """Bradley-Terry reward model from cfg.init on pair files or on-policy pairs -> its summary."""
    # --- setup ---
    init = find_init(cfg.init)
    model, tokenizer, data_dir, base_ckpt = sft.load_base(init, cfg.data_dir)
    model.to(rt.device).eval()  # eval mode: no dropout, so a pair's two scores differ only by their answers
    torch.manual_seed(cfg.seed)
    t_start = time.time()
    # --- pairs ---
    report = {}
    if cfg.pairs:
        records, report["file"] = dpo.read_pairs(cfg.pairs)
    else:
        candidates = cfg.difficulties or base_ckpt.get("config", {}).get("difficulties") or [1, 2]
        difficulties, probe = (({k: list(cfg.difficulties) for k in cfg.kinds}, None) if cfg.difficulties
                               else dpo.choose_difficulties(model, tokenizer, cfg, candidates, rt))
        records, report["on_policy"] = dpo.on_policy_pairs(model, tokenizer, cfg, difficulties, rt)
        if not records:
            raise RLError(f"no prompt gave a pair (all answers right or all wrong: {report['on_policy']}); try "
                          f"other --difficulties, more --samples or a higher --temperature")
    # block_size - 1: tokenize_pairs fits prompt + answer - 1 tokens, the reward model reads all of them
    pairs, report["cut"] = dpo.tokenize_pairs(records, tokenizer, model.config.block_size - 1, cfg.overlong)
    if not pairs:
        raise RLError(f"every pair is longer than the context ({model.config.block_size} tokens): {report['cut']}")
    train_pairs, val_pairs = dpo.split_pairs(pairs, cfg.val_fraction, cfg.seed)
    flip = random.Random(f"label-noise:{cfg.seed}")
    train_pairs = [{**p, "chosen_ids": p["rejected_ids"], "rejected_ids": p["chosen_ids"]}
                   if flip.random() < cfg.label_noise else p for p in train_pairs]
    report["label_noise"] = cfg.label_noise
    if len(train_pairs) < cfg.batch_size:
        raise RLError(f"{len(train_pairs)} training pairs are fewer than --batch-size {cfg.batch_size}; sample "
                      f"more (--prompts-per-task, --samples) or give a smaller --batch-size")
    val = [train.to_device(rm_batch(val_pairs[i:i + 64], tokenizer.eot_id), rt) for i in range(0, len(val_pairs), 64)]
    train.print0(f"reward model from {init}: {len(train_pairs)} training pairs, {len(val_pairs)} held out; {report}")
    # --- model and optimizer ---
    rm = scalar_head(model, std=1 / math.sqrt(model.config.n_embd + 1))
    optimizer = train.build_optimizer(rm, cfg.lr, 0.0, (cfg.beta1, cfg.beta2), rt.device)
    fresh_run_dir(cfg.out_dir)
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    before = evaluate_rm(rm, val) if val else {}
    extra = dict(stage="reward_model", base=init, tokenizer_hash=tokenizer.hash, tokenizer_dir=data_dir)
    # --- loop ---
    records_out, stats, held = [], [], before
    per_epoch = len(train_pairs) // cfg.batch_size
    with open(metrics_path, "w") as f:
        for step in range(cfg.max_steps):
            epoch, i = divmod(step, per_epoch)
            order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train_pairs))
            batch = [train_pairs[j] for j in order[i * cfg.batch_size:(i + 1) * cfg.batch_size]]
            for group in optimizer.param_groups:
                group["lr"] = train.lr_at(step, cfg)
            stats = []
            loss, norm = train.train_step(rm, optimizer, [train.to_device(rm_batch(batch, tokenizer.eot_id), rt)], rt,
                                          cfg.grad_clip, rm_loss_fn(stats), pair_count)
            if not (math.isfinite(loss) and math.isfinite(norm)):
                raise train.Diverged(f"step {step + 1}: Bradley-Terry loss {loss}, grad norm {norm}; nothing saved")
            done = step + 1
            record = {"step": done, "loss": loss, "grad_norm": norm, **rm_metrics(stats)}
            if val and (done % cfg.eval_every == 0 or done == cfg.max_steps):
                held = evaluate_rm(rm, val)
                record.update({f"val_{k}": v for k, v in held.items()})
            if done % cfg.log_every == 0 or done == cfg.max_steps:
                train.print0(f"step {done:>4}/{cfg.max_steps} | loss {loss:.4f} | acc {record['accuracy']:.2f} | "
                             f"margin {record['margin']:+.2f}" + (f" | held-out acc {held['accuracy']:.3f} margin "
                                                                  f"{held['margin']:+.2f}" if held else ""))
            f.write(json.dumps(record) + "\n")
            records_out.append(record)
            if done % cfg.save_every == 0 or done == cfg.max_steps:
                path = train.save_checkpoint(cfg.out_dir, done, rm, optimizer, cfg, {}, cfg.keep_last, **extra,
                                             held_out=held)
    # --- save ---
    summary = {"stage": "reward_model", "base": init, "checkpoint": path, "steps": cfg.max_steps,
               "seconds": round(time.time() - t_start, 1), "lr": cfg.lr,
               "pairs": {"train": len(train_pairs), "held_out": len(val_pairs), **report},
               "held_out_before": before, "held_out": held, "train_metrics": records_out[-1], "peak_memory_mb":
               peak_mb(rt)}
    sft.write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    train.print0(f"held-out pair accuracy {before.get('accuracy', math.nan):.3f} -> "
                 f"{held.get('accuracy', math.nan):.3f}, margin {held.get('margin', math.nan):+.3f}; wrote {path}")
    return summary


# --- main: the RL run ---

def run_rl(cfg, rt):
    """PPO or GRPO from cfg.init -> the summary also written to out_dir/summary.json."""
    # --- setup ---
    init = find_init(cfg.init)
    policy, tokenizer, data_dir, base_ckpt = sft.load_base(init, cfg.data_dir)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    policy.to(rt.device).eval()  # eval mode throughout: dropout would make pi != pi_old at ratio 1
    end = tokenizer.special_ids["<|end|>"]
    rm = rm_path = None
    if cfg.reward == "model" or cfg.reward_model:
        try:
            rm_path = sft.find_init(cfg.reward_model, "out/reward_model", "python rlhf.py --train-reward-model")
        except sft.SFTError as e:
            raise RLError(str(e)) from None
        rm, _ = load_reward_model(rm_path, tokenizer, init, base_ckpt, rt)
    sets, pool, probe = choose_sets(policy, tokenizer, cfg, base_ckpt.get("config", {}), rt)  # from the start model
    heldout = sft.heldout_sets(base_ckpt.get("config", {}), cfg.heldout_examples)  # every kind, the SFT run's
    check_lengths(pool + [e for exs in sets.values() for e in exs], tokenizer, policy.config.block_size,
                  cfg.max_new_tokens)
    resume = cfg.resume
    if resume == "auto":
        found = train.list_checkpoints(cfg.out_dir)
        resume = found[-1] if found else None
    if not resume:
        fresh_run_dir(cfg.out_dir)
    train.print0(f"device {rt.device}; {cfg.algo} on {init} ({policy.num_params():,} parameters), reward "
                 f"{cfg.reward if cfg.reward == 'tasks' else rm_path}, sets {sorted(dpo.keyed(sets))}")
    t_start = time.time()

    # --- before: the same held-out prompts, greedy and sampled ---
    if resume:
        state = train.load_checkpoint(resume)
        if state.get("stage") != "rlhf" or state.get("base") != init or state.get("algo") != cfg.algo:
            raise RLError(f"cannot resume {resume}: it ran {state.get('algo')} on {state.get('base')}, this run "
                          f"{cfg.algo} on {init}; pass the same flags or a new --out-dir")
        greedy_before, pass_before, bon = dpo.unkeyed(state["before"]), state["pass_before"], state["best_of_n"]
        split_before = state.get("heldout_before")
    else:
        greedy_before = accuracy(policy, tokenizer, sets, rt, cfg)
        split_before = sft.heldout_accuracy(policy, tokenizer, heldout, rt, cfg.max_new_tokens)[1] if heldout else None
        pass_before = pass_at_k(policy, tokenizer, sets, rt, cfg, cfg.pass_k) if cfg.pass_k else {}
        bon = best_of_n(policy, rm, tokenizer, sets, rt, cfg) if rm is not None else None
    train.print0(f"before: held-out greedy accuracy {mean(greedy_before):.3f} {pass_before}"
                 + (f"; best-of-{cfg.best_of_n} with the reward model {bon['accuracy']:.3f}" if bon else ""))

    # --- models and optimizer ---
    reference = copy.deepcopy(policy).requires_grad_(False)
    value = scalar_head(copy.deepcopy(policy)) if cfg.algo == "ppo" else None
    module = ActorCritic(policy, value) if value is not None else policy
    optimizer = train.build_optimizer(module, cfg.lr, 0.0, (cfg.beta1, cfg.beta2), rt.device)
    extra = dict(stage="rlhf", base=init, lora=None, tokenizer_hash=tokenizer.hash, tokenizer_dir=data_dir,
                 algo=cfg.algo, sft=base_ckpt.get("base") if base_ckpt.get("stage") == "dpo" else init,
                 before=dpo.keyed(greedy_before), pass_before=pass_before, best_of_n=bon, heldout_before=split_before)

    # --- loop ---
    # Every step draws its prompts and samples from seeds made of (seed, step), so a resumed run repeats exactly
    # what an uninterrupted one would have done: the checkpoint holds the models, the optimizer, beta and the totals.
    records, last_good, start = [], None, 0
    totals = {"tokens_sampled": 0, "tokens_trained": 0, "answers": 0}
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if resume:
        policy.load_state_dict(state["model"])
        if value is not None:
            value.load_state_dict(state["value_model"])
        optimizer.load_state_dict(state["optimizer"])
        train.set_rng_states(state["rng"])
        start, totals, last_good = state["step"], state["totals"], resume
        cfg = replace(cfg, kl_coef=state["kl_coef"])
        records = [r for r in train.read_metrics(cfg.out_dir) if r["step"] <= start]
        train.print0(f"resumed from {resume} at step {start}")
    with open(metrics_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    n = cfg.group_size if cfg.algo == "grpo" else 1
    greedy_after = greedy_before
    start_point = [{"step": 0, "acc": mean(greedy_before)}]  # the plot's held-out accuracy starts before step 1
    for step in range(start, cfg.max_steps):
        t0 = time.time()
        lr = train.lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        examples = random.Random(f"{cfg.seed}/{step}").sample(pool, min(cfg.prompts_per_step, len(pool)))
        ro = rollout(policy, tokenizer, examples, rt, cfg, n, cfg.seed + 1000 * step,
                     rm if cfg.reward == "model" else None)
        t_sample = time.time() - t0
        try:
            m = rl_step(cfg, ro, policy, reference, value, module, optimizer, rt, tokenizer.eot_id, end)
        except train.Diverged as e:
            plot(start_point + records, os.path.join(cfg.out_dir, "rlhf.png"),
                 f"{cfg.algo}: stopped at step {step + 1}")
            raise train.Diverged(f"step {step + 1}: {e}; the last good checkpoint is {last_good}") from None
        if m["kl"] > cfg.kl_max:  # the curves up to here are the story of the run: keep them
            why = f"stopped at step {step + 1}, KL {m['kl']:.1f} > {cfg.kl_max}"
            plot(start_point + records, os.path.join(cfg.out_dir, "rlhf.png"),
                 f"{cfg.algo}, reward {cfg.reward}: {why}")
            if cfg.reward == "model":
                overoptimisation_plot(start_point + records, os.path.join(cfg.out_dir, "overoptimisation.png"),
                                      f"{cfg.algo} on the reward model {rm_path}: {why}")
            raise train.Diverged(f"step {step + 1}: KL to the reference {m['kl']:.2f} nats per answer passed --kl-max "
                                 f"{cfg.kl_max}; the last good checkpoint is {last_good}; lower --lr or raise "
                                 f"--kl-coef")
        if cfg.algo == "ppo" and cfg.kl_target:
            cfg = replace(cfg, kl_coef=adapt_kl(cfg.kl_coef, m["kl"], cfg.kl_target, len(ro.answers),
                                                cfg.kl_horizon))
        for k in ("tokens_sampled", "tokens_trained"):
            totals[k] += m[k]
        totals["answers"] += len(ro.answers)
        done = step + 1
        record = {"step": done, "lr": lr, "kl_coef": cfg.kl_coef, **m, **{f"total_{k}": v for k, v in totals.items()},
                  "seconds": round(time.time() - t0, 3), "sample_seconds": round(t_sample, 3)}
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            greedy_after = accuracy(policy, tokenizer, sets, rt, cfg)
            record.update(acc=mean(greedy_after), **{f"acc/{k}": a for k, a in dpo.keyed(greedy_after).items()})
        if done % cfg.log_every == 0 or "acc" in record or done == 1:
            train.print0(f"step {done:>3}/{cfg.max_steps} | reward {m['reward']:+.3f} | true acc {m['true_acc']:.3f} | "
                         f"kl {m['kl']:.3f} | entropy {m['entropy']:.3f} | clip {m['clip_frac']:.3f} | "
                         + (f"vf {m['value_loss']:.4f} ev {m['explained_var']:+.2f} | " if value is not None else
                            f"zero-std {m['zero_std_frac']:.2f} | ")
                         + f"len {m['answer_len']:.1f} trunc {m['truncated']:.2f} | {record['seconds']:.2f}s"
                         + (f"\n      held-out greedy accuracy {record['acc']:.3f}" if "acc" in record else ""))
        records.append(record)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if done % cfg.save_every == 0 or done == cfg.max_steps or done == 1:  # step 1: a run stopped early has one
            last_good = train.save_checkpoint(cfg.out_dir, done, policy, optimizer, cfg, {}, cfg.keep_last, **extra,
                                              value_model=value.state_dict() if value is not None else None,
                                              kl_coef=cfg.kl_coef, totals=totals)

    # --- after ---
    if start >= cfg.max_steps:  # resumed at the end: nothing ran here
        greedy_after = accuracy(policy, tokenizer, sets, rt, cfg)
    pass_after = pass_at_k(policy, tokenizer, sets, rt, cfg, cfg.pass_k) if cfg.pass_k else {}
    sft.print_table(greedy_before, greedy_after)
    split_after = sft.heldout_accuracy(policy, tokenizer, heldout, rt, cfg.max_new_tokens)[1] if heldout else None
    if heldout:
        sft.print_split(split_before, split_after)
    title = f"{cfg.algo}, reward {cfg.reward}" + (" (proxy: the reward model; true accuracy by tasks.score)"
                                                   if cfg.reward == "model" else "")
    png = plot(start_point + records, os.path.join(cfg.out_dir, "rlhf.png"), title)
    if cfg.reward == "model":
        overoptimisation_plot(start_point + records, os.path.join(cfg.out_dir, "overoptimisation.png"),
                              f"{cfg.algo} on the reward model {rm_path}")
    summary = {"stage": "rlhf", "algo": cfg.algo, "reward": cfg.reward, "reward_model": rm_path, "base": init,
               "checkpoint": last_good, "steps": cfg.max_steps, "seconds": round(time.time() - t_start, 1),
               "lr": cfg.lr, "kl_coef": cfg.kl_coef, "sets": sorted(dpo.keyed(sets)),
               "probe": dpo.keyed(probe) if probe else None,
               "greedy_before": mean(greedy_before), "greedy_after": mean(greedy_after),
               "before": sft.by_kind(greedy_before), "after": sft.by_kind(greedy_after),
               "before_by_difficulty": dpo.keyed(greedy_before), "after_by_difficulty": dpo.keyed(greedy_after),
               "heldout": {"before": split_before, "after": split_after},
               "pass_before": pass_before, "pass_after": pass_after, "best_of_n": bon,
               "compute": totals, "train_metrics": records[-1], "plot": png, "peak_memory_mb": peak_mb(rt)}
    sft.write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    train.print0(f"greedy {mean(greedy_before):.3f} -> {mean(greedy_after):.3f}; pass {pass_before} -> {pass_after};"
                 f" wrote {last_good}, {png} and {os.path.join(cfg.out_dir, 'summary.json')}")
    return summary


# --- main: the flawed teacher (where RL adds what imitation cannot) ---
# The teacher (tasks.flawed_answer) sorts letters with a set: where a letter repeats it writes it once, most of the
# time ("b a b" -> "a b"). On those problems the wrong answer is the teacher's mode, so SFT learns it and more SFT
# keeps it; tasks.score knows better, so GRPO, which only needs the model to sample the right answer sometimes, can
# move past the teacher. --teacher-kind add gives the carry-dropping teacher of addition instead.

def flawed_teacher(cfg, rt):
    """SFT on the flawed teacher, then GRPO with the verifier against the same time of more SFT; the table."""
    init, out, kind, d = find_init(cfg.init), derive(cfg).out_dir, cfg.teacher_kind, cfg.teacher_difficulty
    fresh_run_dir(out)  # its runs are in sub-folders; here only the experiment's summary.json and eval.json go
    rng = random.Random(cfg.seed)
    examples = tasks.generate(kind, 4000, cfg.seed, "train", d)
    answers = [tasks.flawed_answer(e, cfg.teacher_error, rng) for e in examples]
    path = os.path.join(out, "flawed_teacher.jsonl")
    tasks.write_jsonl(path, ({"messages": [e["messages"][0], {"role": "assistant", "content": a}]}
                             for e, a in zip(examples, answers)))
    wrong = float(np.mean([a != e["answer"] for e, a in zip(examples, answers)]))
    train.print0(f"flawed teacher: {len(examples)} {kind}/{d} answers in {path}, {wrong:.2f} of them wrong")
    sft_cfg = sft.SFTConfig(init=init, data_dir=cfg.data_dir, data=[path], tasks=False, kinds=[kind],
                            eval_difficulties=[d], eval_examples=cfg.eval_examples, max_steps=cfg.teacher_steps,
                            eval_every=cfg.teacher_steps, save_every=cfg.teacher_steps, log_every=50,
                            max_new_tokens=cfg.max_new_tokens, device=cfg.device, threads=cfg.threads,
                            seed=cfg.seed, out_dir=os.path.join(out, "sft"))
    taught = sft.main(sft_cfg)
    rl = run_rl(derive(replace(cfg, flawed_teacher=False, init=taught["checkpoint"], kinds=[kind], difficulties=[d],
                               algo="grpo", reward="tasks", out_dir=os.path.join(out, "grpo"),
                               lr=cfg.lr or 1e-4, max_steps=cfg.max_steps or 120)), rt)
    per_step = taught["seconds"] / cfg.teacher_steps
    more_steps = max(1, round(rl["seconds"] / per_step))
    more = sft.main(replace(sft_cfg, init=taught["checkpoint"], max_steps=more_steps, eval_every=more_steps,
                            save_every=more_steps, warmup_steps=0, out_dir=os.path.join(out, "sft_more")))
    # held-out greedy accuracy, also on the sub-population where the teacher errs (its mode is wrong there)
    test = tasks.generate(kind, 4 * cfg.eval_examples, 0, "test", d)
    spot = {"sort": "a repeated letter", "add": "a carry into the hundreds"}[kind]  # where the teacher can err
    sets = {"all": test, "weak spot": [e for e in test if tasks.teacher_mistake(kind, e["prompt"])],
            "elsewhere": [e for e in test if not tasks.teacher_mistake(kind, e["prompt"])]}
    rows = []
    for name, summary in ((f"SFT on the flawed teacher ({cfg.teacher_steps} steps)", taught),
                          (f"+ {more_steps} more SFT steps (the time GRPO took)", more),
                          (f"+ GRPO, {rl['steps']} steps, reward tasks.score", rl)):
        model, tokenizer, _, _ = sft.load_base(summary["checkpoint"], cfg.data_dir)
        acc = sft.task_accuracy(model.to(rt.device).eval(), tokenizer, sets, rt, cfg.max_new_tokens)
        rows.append({"method": name, **{k: round(a, 3) for k, a in acc.items()}, "seconds": summary["seconds"]})
    train.print0(f"\n{kind}/{d}, held-out greedy accuracy on {len(test)} problems; {len(sets['weak spot'])} of them "
                 f"have {spot}, where the teacher errs {cfg.teacher_error:.0%} of the time\n"
                 f"| method | all | with {spot} | the rest | seconds |\n| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        train.print0(f"| {r['method']} | {r['all']:.3f} | {r['weak spot']:.3f} | {r['elsewhere']:.3f} | "
                     f"{r['seconds']:.0f} |")
    result = {"stage": "rlhf", "experiment": "flawed_teacher", "base": init, "kind": kind, "difficulty": d,
              "teacher_error": cfg.teacher_error, "teacher_wrong_share": wrong, "test_problems": len(test),
              "rows": rows, "grpo_pass": {"before": rl["pass_before"], "after": rl["pass_after"]},
              "grpo_zero_std_frac_last": rl["train_metrics"].get("zero_std_frac")}
    sft.write_json(os.path.join(out, "summary.json"), result)
    return result


# --- main: one comparison on the same checkpoint and held-out prompts ---

def run_or_stopped(cfg, rt):
    """run_rl, or for a run stopped by a KL past --kl-max (PPO on a learned reward can get there: that is the
    over-optimisation the comparison shows) the same figures from its last good checkpoint, scored here."""
    try:
        return run_rl(cfg, rt)
    except train.Diverged as e:
        found = train.list_checkpoints(cfg.out_dir)
        if not found:
            raise
        state = train.load_checkpoint(found[-1])
        model, tokenizer, _, _ = sft.load_base(found[-1], cfg.data_dir)
        before = dpo.unkeyed(state["before"])
        sets = {key: tasks.heldout(key[0], cfg.eval_examples, key[1]) for key in before}
        records = [r for r in train.read_metrics(cfg.out_dir) if r["step"] <= state["step"]]
        train.print0(f"stopped early ({e}); scoring its last good checkpoint {found[-1]}")
        model.to(rt.device).eval()
        heldout = sft.heldout_sets(train.load_checkpoint(find_init(cfg.init)).get("config", {}), cfg.heldout_examples)
        split = sft.heldout_accuracy(model, tokenizer, heldout, rt, cfg.max_new_tokens)[1] if heldout else None
        return {"greedy_before": mean(before), "greedy_after": mean(accuracy(model, tokenizer, sets, rt, cfg)),
                "heldout": {"before": state.get("heldout_before"), "after": split},
                "compute": state["totals"], "seconds": round(sum(r["seconds"] for r in records), 1),
                "best_of_n": state["best_of_n"], "sets": sorted(state["before"]), "checkpoint": found[-1],
                "stopped": f"{e}".split(";")[0] + f"; scored at step {state['step']}"}


def compare(raw, rt):
    """Reward model, then best-of-n, DPO, PPO (tasks), PPO (reward model) and GRPO from raw.init; the table."""
    out, init = derive(raw).out_dir, find_init(raw.init)
    fresh_run_dir(out)  # its runs are in sub-folders; here only the experiment's summary.json and eval.json go
    arm = lambda **kw: derive(replace(raw, compare=False, init=init, **kw))  # noqa: E731
    rm = train_reward_model(arm(train_reward_model=True, out_dir=os.path.join(out, "reward_model"),
                                max_steps=None, lr=None), rt)
    runs = {"grpo": run_rl(arm(algo="grpo", reward="tasks", out_dir=os.path.join(out, "grpo")), rt),
            "ppo_tasks": run_or_stopped(arm(algo="ppo", reward="tasks", out_dir=os.path.join(out, "ppo_tasks")), rt),
            "ppo_model": run_or_stopped(arm(algo="ppo", reward="model", reward_model=rm["checkpoint"],
                                            out_dir=os.path.join(out, "ppo_model")), rt)}
    keys = [tuple(k.rsplit("/", 1)) for k in runs["grpo"]["sets"]]
    sets = {(k, int(d)): tasks.heldout(k, raw.eval_examples, int(d)) for k, d in keys}
    dpo_summary = dpo.main(dpo.DPOConfig(init=init, data_dir=raw.data_dir, kinds=sorted({k for k, _ in sets}),
                                         eval_difficulties=sorted({d for _, d in sets}), device=raw.device,
                                         threads=raw.threads, seed=raw.seed, max_new_tokens=raw.max_new_tokens,
                                         out_dir=os.path.join(out, "dpo")))
    dpo_model = sft.load_base(dpo_summary["checkpoint"], raw.data_dir)[0].to(rt.device).eval()
    dpo_acc = mean(accuracy(dpo_model, sft.load_base(init, raw.data_dir)[1], sets, rt, raw))
    bon = runs["ppo_model"]["best_of_n"]
    weak = lambda h: ((h or {}).get("weak_mean"), (h or {}).get("elsewhere_mean"))  # noqa: E731
    table = [("SFT checkpoint", runs["grpo"]["greedy_before"], *weak(runs["grpo"]["heldout"]["before"]), 0, 0, 0),
             (f"best-of-{bon['n']} (reward model)", bon["accuracy"], None, None, bon["tokens_sampled"], 0, 0),
             ("DPO (on-policy pairs)", dpo_acc, *weak(dpo_summary["heldout"]["best"]), None,
              dpo_summary["steps"] * dpo.DPOConfig.batch_size * 2, dpo_summary["seconds"])]
    for name, r in (("PPO, reward tasks.score", runs["ppo_tasks"]), ("PPO, reward model", runs["ppo_model"]),
                    ("GRPO, reward tasks.score", runs["grpo"])):
        name += f" ({r['stopped']})" if r.get("stopped") else ""
        table.append((name, r["greedy_after"], *weak(r.get("heldout", {}).get("after")),
                      r["compute"]["tokens_sampled"], r["compute"]["tokens_trained"], r["seconds"]))
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    train.print0("\n| method | trained sets, held-out greedy | weak spots (every kind's held-out prompts) | "
                 "elsewhere | tokens sampled | tokens (or answers) trained | seconds |\n"
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, acc, w, e, ts, tt, sec in table:
        train.print0(f"| {name} | {acc:.3f} | {fmt(w)} | {fmt(e)} | {ts if ts is not None else '-'} | {tt} | "
                     f"{sec:.0f} |")
    result = {"stage": "rlhf", "experiment": "compare", "base": init, "sets": runs["grpo"]["sets"], "seed": raw.seed,
              "reward_model": {k: rm[k] for k in ("checkpoint", "held_out", "seconds")},
              "rows": [dict(zip(("method", "accuracy", "weak_spots", "elsewhere", "tokens_sampled", "trained",
                                 "seconds"), r)) for r in table]}
    sft.write_json(os.path.join(out, "summary.json"), result)
    return result


def main(cfg):
    """Run the mode cfg names; returns its summary."""
    rt = train.setup_runtime(cfg.device, cfg.dtype, cfg.threads)
    check(cfg)
    if cfg.compare:
        return compare(cfg, rt)
    if cfg.flawed_teacher:  # before derive: its GRPO has its own defaults (lr 1e-4, 120 steps)
        return flawed_teacher(cfg, rt)
    cfg = derive(cfg)
    check(cfg)
    if cfg.train_reward_model:
        return train_reward_model(cfg, rt)
    return run_rl(cfg, rt)


def cli(argv=None):
    args = data.config_parser(RLConfig, __doc__, CHOICES).parse_args(argv)
    cfg = RLConfig(**{f.name: getattr(args, f.name) for f in fields(RLConfig)})
    try:
        main(cfg)
    except (train.TrainError, data.DataError, tasks.TaskError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "status", 2))
    except KeyboardInterrupt:  # only a PPO or GRPO run resumes; the other modes start again
        rl_run = not (cfg.compare or cfg.flawed_teacher or cfg.train_reward_model)
        train.interrupted("rlhf.py", argv, derive(cfg).out_dir, resumable=rl_run)


if __name__ == "__main__":
    cli(sys.argv[1:])
