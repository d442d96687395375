"""Pretraining: chapter "pre-training", part two (how the model in model.py is trained).

One file holds the whole loop, readable top to bottom:

    config       TrainConfig; argparse is built from its fields
    runtime      device, dtype and DDP or FSDP2 from torchrun's environment; print0; shard_model
    optimizer    AdamW (weight decay on matrices only), or Muon for the blocks' matrices; the learning-rate schedule
    step         train_step (gradient accumulation, gradient sync on the last micro-step), evaluate
    checkpoints  atomic save, keep the last K, exact resume (model, optimizer, loader, RNG states);
                 sharded checkpoints (one file per rank, torch.distributed.checkpoint) and their conversion
    metrics      metrics.jsonl and loss-curve PNGs
    main         pretraining: setup, data, model, optimizer, loop, save
    scaling      compute_optimal and --sweep (loss against compute with a fitted power law)

sft.py and dpo.py import setup_runtime, print0, build_optimizer, lr_at, train_step, evaluate and the
checkpoint functions from here and keep their own short loop; the loop is written once.

Run it:

    python train.py                                   # CPU: prepares the embedded data, trains in minutes
    python train.py --preset small --max-steps 2000   # a larger model (see model.PRESETS)
    python train.py --optimizer muon                  # Muon on the blocks' matrices, AdamW on the rest
    python train.py --resume auto                     # continue from the newest checkpoint in --out-dir
    python train.py --plot out/pretrain out/other     # overlay the loss curves of several runs
    python train.py --sweep 5e12                      # scaling-law exercise on one FLOPs budget
    torchrun --standalone --nproc_per_node=8 train.py --preset gpt2 --dataset fineweb-edu
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...
    torchrun --standalone --nproc_per_node=8 train.py --preset gpt2-xl --parallel fsdp   # sharded over the 8 GPUs
    python train.py --convert out/pretrain/ckpt_005000.dcp   # a sharded checkpoint -> ckpt_005000.pt (and back)

With a GPU the defaults grow (preset gpt2, bf16 autocast, torch.compile). Tests: python -m pytest -q tests/test_train.py
"""
import json
import math
import os
import random
import re
import shlex
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from model import GPT, GPTConfig, PRESETS, config_from_preset


# --- config ---

@dataclass
class TrainConfig:
    # model
    preset: str | None = None           # model size from model.PRESETS; None = "mini" on CPU, "gpt2" on CUDA
    n_layer: int | None = None          # override the preset's number of blocks; None = the preset's
    n_head: int | None = None           # override the preset's attention heads; None = the preset's
    n_embd: int | None = None           # override the preset's width; None = the preset's
    attn: str = "sdpa"                  # attention implementation: sdpa, naive or triton (kernels/)
    kernels: str = "torch"              # norms and loss: torch, or triton (kernels/)
    grad_checkpointing: bool = False    # recompute each block in backward: less memory, ~30% more compute
    dropout: float = 0.0                # dropout probability on embeddings, attention and residual branches
    # data
    dataset: str = "stdlib"             # data.py dataset, prepared into --data-dir when missing
    data_dir: str | None = None         # folder with meta.json, tokenizer and shards; None = data/<dataset>
    batch_size: int = 16                # sequences per micro-batch per device
    seq_len: int | None = None          # tokens per sequence; None = the preset's block_size
    total_batch_tokens: int | None = None  # tokens per step, all devices; None = 2^19 on CUDA, one micro-batch on CPU
    # optimization
    max_steps: int | None = None        # optimizer steps; None = 1000 on CPU, 5000 on CUDA
    lr: float | None = None             # peak learning rate; None = 3e-3 on CPU, 6e-4 on CUDA
    min_lr_frac: float = 0.1            # final learning rate as a fraction of --lr
    warmup_steps: int | None = None     # linear warmup steps; None = 5% of max_steps
    schedule: str = "cosine"            # cosine, wsd (warmup-stable-decay) or constant (after warmup)
    cooldown_frac: float = 0.2          # wsd only: fraction of max_steps spent decaying to the final lr
    weight_decay: float = 0.1           # decoupled weight decay, on matrices only (AdamW's, and Muon's too)
    beta1: float = 0.9                  # AdamW first-moment decay
    beta2: float = 0.95                 # AdamW second-moment decay
    grad_clip: float = 1.0              # clip the global gradient norm to this; 0 = no clipping
    optimizer: str = "adamw"            # adamw, or muon: Muon on the blocks' matrices, AdamW (--lr) on the rest
    muon_lr: float = 0.02               # muon: peak lr of the matrices (x sqrt(max(1, out/in))), on --lr's schedule
    muon_momentum: float = 0.95         # muon: momentum of the matrices' gradients (Nesterov)
    # runtime
    device: str | None = None           # cpu or cuda; None = cuda when available
    dtype: str | None = None            # float32 or bfloat16 (autocast); None = bfloat16 on CUDA, float32 on CPU
    compile: bool | None = None         # torch.compile the model; None = on with CUDA, off on CPU
    seed: int = 1337                    # seeds the weights, the data order, dropout and sampling
    threads: int | None = None          # CPU threads of torch's ops; None = torch's default (under torchrun: split)
    parallel: str = "ddp"               # under torchrun: ddp (a full copy per rank) or fsdp (sharded over the ranks)
    # evaluation, logging, checkpoints
    eval_every: int = 250               # steps between validation passes (and loss.png refreshes); at least 1
    eval_batches: int = 20              # micro-batches in the fixed validation subset, over all devices
    log_every: int = 10                 # steps between progress lines and metrics.jsonl records; at least 1
    save_every: int = 500               # steps between checkpoints (one is always saved at the end); at least 1
    keep_last: int = 2                  # checkpoints kept in out_dir (at least 1); older ones are deleted
    samples: int = 3                    # samples printed at the end
    sample_tokens: int = 64             # tokens per sample
    out_dir: str = "out/pretrain"       # run folder: checkpoints, metrics.jsonl, loss.png
    resume: str | None = None           # checkpoint path, or "auto" = newest in out_dir (fresh start when none)
    stop_at: int | None = None          # end this run after this step (with a checkpoint); None = max_steps


CHOICES = {"attn": ("sdpa", "naive", "triton"), "kernels": ("torch", "triton"),
           "schedule": ("cosine", "wsd", "constant"), "device": ("cpu", "cuda"), "dtype": ("float32", "bfloat16"),
           "parallel": ("ddp", "fsdp"), "optimizer": ("adamw", "muon")}


class TrainError(Exception):
    """Bad input or a state the run cannot continue from: `main` prints one line and exits with `status`."""
    status = 2


class Diverged(TrainError):
    """The loss or the gradient norm stopped being finite."""
    status = 1


def config_from_args(cls, args):
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


# --- runtime ---

@dataclass
class Runtime:
    device: str             # "cpu" or "cuda:<local_rank>"
    device_type: str        # "cpu" or "cuda"
    dtype: torch.dtype      # autocast dtype of the forward pass; float32 = no autocast
    rank: int = 0           # this process among all processes
    local_rank: int = 0     # this process among the processes of its node (its GPU index)
    world_size: int = 1     # processes in all
    fsdp: bool = False      # parameters, gradients and optimizer state sharded over the ranks (FSDP2), not copied

    @property
    def ddp(self):  # several processes, whether they copy the model (DDP) or shard it (FSDP)
        return self.world_size > 1

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def setup_runtime(device=None, dtype=None, threads=None, parallel="ddp"):
    """Device, dtype and DDP or FSDP for this process. torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and the
    rendezvous variables); a plain `python` run has none of them and is rank 0 of 1. NCCL on CUDA, gloo on the CPU.
    threads sets torch's CPU threads (on a shared 2-core machine the default can make a tiny model's step
    several times slower); None keeps torch's default, split between the processes of a node under DDP.
    parallel="fsdp" needs torchrun's environment; with one process (--nproc_per_node=1) it shards over one rank,
    which tests the sharded path and its checkpoints on a single GPU."""
    if threads is not None and threads < 1:
        raise TrainError(f"--threads {threads}: must be at least 1 (or leave it out for torch's default)")
    if parallel == "fsdp" and "WORLD_SIZE" not in os.environ:
        raise TrainError("--parallel fsdp shards the model over the processes torchrun starts: run torchrun "
                         "--nproc_per_node=N train.py ... (one plain process holds the whole model: --parallel ddp)")
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device_type = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA device is visible; use --device cpu")
    device = f"cuda:{local_rank}" if device_type == "cuda" else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast use TF32 tensor cores
        torch.backends.cudnn.allow_tf32 = True
    if threads is not None:
        torch.set_num_threads(threads)
    elif device_type == "cpu" and world_size > 1:
        # Processes of one node share its cores; oversubscribed threads slow every one of them down.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    dtype = dtype or ("bfloat16" if device_type == "cuda" else "float32")
    if (world_size > 1 or parallel == "fsdp") and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Runtime(device, device_type, getattr(torch, dtype), rank, local_rank, world_size, parallel == "fsdp")


def print0(*args, **kwargs):
    """print on rank 0 only, so N processes write one log."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# Past one GPU's memory: sharding (ZeRO, FSDP).
#
# Training with AdamW holds 16 bytes per parameter before any activation: the fp32 weight (4), its fp32 gradient
# (4) and Adam's two fp32 moments (8). DDP keeps all of it on every rank, so gpt2-xl (1.56B parameters) needs
# 25 GB per GPU however many GPUs there are. ZeRO (Rajbhandari et al. 2020) removes the copies in three stages,
# each rank keeping 1/N of what is sharded:
#   stage 1  the optimizer state: each rank updates only its slice of the weights, then all-gathers the result;
#            4 + 4 + 8/N bytes per parameter (nanochat's distributed AdamW does this, plus stage 2)
#   stage 2  the gradients too: they are reduce-scattered (each rank receives the sum of its slice only) instead
#            of all-reduced; 4 + 12/N bytes
#   stage 3  the weights too: a layer's weights are all-gathered just before it runs and freed after; 16/N bytes
# FSDP (Zhao et al. 2023) is stage 3 in PyTorch; FSDP2's fully_shard, used here, turns each parameter into a
# DTensor that holds this rank's rows (dim 0 split over the ranks). shard_model makes each block one unit, and the
# root (embeddings, final norm, lm_head) another. What travels in one step, per unit:
#   forward   all-gather its weights, run it, free them (reshard_after_forward; the root keeps its own)
#   backward  all-gather its weights again, compute its gradients, reduce-scatter them: each rank keeps the
#             average of its slice over the ranks, the same average DDP's all-reduce makes
#   optimizer each rank steps its own slices, nothing travels; the shards are the fp32 master weights
# FSDP prefetches the next unit's all-gather while the current one computes. With gradient accumulation,
# set_requires_gradient_sync(False) skips the reduce-scatter on all but the last micro-step (train_step), at the
# price of a full-size gradient on every rank until then; the all-gathers still run at every micro-step.
# On a GPU, MixedPrecisionPolicy casts the shards to bf16 before the all-gather (half the bytes to send, the dtype
# of the compute) and reduces the gradients in fp32.
#
# DDP is still the better choice while the model, its gradients and AdamW's moments fit in one GPU's memory with
# room for the activations (every preset here does on a 40 or 80 GB GPU: the README's table). It moves
# less data: an all-reduce is a reduce-scatter plus an all-gather, 2x the parameters per step, where FSDP moves
# 3x (two all-gathers and a reduce-scatter); and it sends them in a few large buckets during the backward, where
# FSDP makes three calls per block. Across nodes with a slow network the difference shows first; sharding within
# a node and copying across nodes (HSDP) is the usual middle.

def shard_model(model, rt, compile=False):
    """FSDP2 on a GPT in place, each block one unit and the root another; returns the model (now an FSDPModule).
    Call it before build_optimizer: the optimizer must hold the sharded parameters. compile compiles each block
    before it is sharded (what FSDP's own tests and torchtitan do), so FSDP's hooks stay outside the graphs."""
    policy = MixedPrecisionPolicy()  # float32: compute in the parameters' own dtype
    if rt.dtype != torch.float32:  # bf16 compute on fp32 master weights; autocast still keeps norms and softmax fp32
        policy = MixedPrecisionPolicy(param_dtype=rt.dtype, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        if compile:
            block.compile()  # in place: no _orig_mod. prefix in the parameter names
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


# --- optimizer and schedule ---
#
# Muon: steepest descent for weight matrices (Keller Jordan 2024, "Muon: an optimizer for hidden layers in neural
# networks"; Bernstein & Newhouse 2024, "Old optimizer, new norm").
#
# Take one weight matrix W (out x in) and its gradient G. A small step dW changes the loss by about <G, dW>, and
# steepest descent picks the dW that lowers it most among steps of a given size: the answer depends on how size is
# measured. Measured by the Frobenius norm (W as one long vector) it is -lr G / |G|_F, plain SGD; sign descent (Adam
# without its averages) is the answer under the max-entry norm. But W is an operator from activations to activations,
# and what a step does to the network is how much it can stretch an input: the spectral norm |dW|_2, the largest
# singular value. Write G = U S V^T (its SVD, singular values s_i >= 0). Then <G, dW> = sum_i s_i u_i^T dW v_i, and
# each u_i^T dW v_i is at least -|dW|_2, so the best step of spectral norm lr is dW = -lr U V^T: the gradient's
# singular directions, every singular value set to 1. A transformer's gradients are nearly low rank, a few directions
# dominate them and SGD or Adam move the weights mostly along those; the orthogonalised step moves along the rare
# directions as far as along the common ones. Muon applies it to the momentum of the gradient (an average over recent
# steps, with Nesterov's look-ahead), not to one noisy gradient.
#
# An SVD per matrix per step is slow on a GPU; an odd matrix polynomial is a few matmuls. For X = U S V^T,
#   p(X) = a X + b (X X^T) X + c (X X^T)^2 X = U p(S) V^T,   p(s) = a s + b s^3 + c s^5 on each singular value,
# so iterating p on X iterates the scalar map on every singular value at once, directions untouched (Newton-Schulz
# iteration). First X = G / |G|_F: the Frobenius norm is at least the spectral one, so every s lies in [0, 1]. The
# classic cubic (a, b, c) = (1.5, -0.5, 0) converges to exactly 1 but starts slowly: near 0 it only multiplies s by
# 1.5 per step. Jordan's quintic (3.4445, -4.7750, 2.0315) maximises that slope at 0 (3.4445: a singular value of
# 1e-3 reaches the order of 1 within five steps) and pays for it by not converging: the singular values end up
# oscillating in a band around 1 (0.68 to 1.14 measured in tests/test_train.py), which trains as well as U V^T
# exactly. Five steps, in bfloat16 on a GPU (the iteration tolerates its rounding); float32 on the CPU, where
# bfloat16 matmuls run about 25x slower on the development machine. A wide X (out < in) is iterated as it is and a
# tall one transposed, so that X X^T is always the smaller Gram matrix.
#
# Only the matrices inside the blocks (attention's c_attn and c_proj, the MLP's c_fc and c_proj) go to Muon: the
# argument is about maps from hidden vectors to hidden vectors. The embeddings wte and wpe are lookup tables: their
# input is one-hot, each step touches only the rows of the tokens seen, and a row is a vector, which Adam's
# per-entry scaling suits. The lm_head maps into the vocabulary's logits (and here it is wte itself, tied); it
# trains better with Adam too, which is what modded-nanogpt and nanochat do. Norm gains and biases are vectors, with
# no matrix to orthogonalise. All of these stay with AdamW, at AdamW's learning rate.
#
# The size of a step. U V^T has spectral norm 1 whatever its shape, so the learning rate sets |dW|_2 directly. A
# layer's update should change its outputs by the same relative amount at any width: that asks for |dW|_2 in
# proportion to sqrt(out / in) (Yang, Simon & Bernstein 2023, "A spectral condition for feature learning"). Jordan's
# convention, used here (and the default, adjust_lr_fn="original", of torch.optim.Muon; nanochat's too), scales the
# step by sqrt(max(1, out / in)): the tall c_fc (4C x C) gets 2x, c_attn (3C x C) sqrt(3)x, square and wide matrices
# 1x, with lr about 0.02 (--muon-lr). Moonshot's alternative ("Muon is scalable for LLM training", 2025;
# adjust_lr_fn="match_rms_adamw") scales by 0.2 sqrt(max(out, in)), which gives the step the entry RMS of a typical
# AdamW step, 0.2 (U V^T alone has 1/sqrt(max(out, in))), so AdamW's learning rate and weight decay carry over. Weight
# decay is decoupled as in AdamW: W <- W (1 - lr wd) each step.
#
# One optimizer object holds both rules, as modded-nanogpt and nanochat do: each param group says which rule it
# follows ("muon"), so one state_dict goes into the checkpoint, one step() and zero_grad() serve train_step, and the
# schedule sets every group's lr in one loop: lr_at's warmup and decay, scaled to --muon-lr for the Muon groups.
# Two optimizers would need both in every place that takes one.
#
# Cost: each Newton-Schulz step on an m x n matrix (m <= n) takes 4 m^2 n + 2 m^3 FLOPs, next to the matrix's
# 6 m n FLOPs per token of forward and backward: under 1% of a GPT-2 step of 2^19 tokens, but about 7% of a CPU step
# of 4096 tokens on the mini preset. Under DDP the gradients are all-reduced before step(), so every rank
# orthogonalises the same whole matrix (nanochat's DistMuon shares the matrices out over the ranks instead). Under
# FSDP a rank holds only some rows of each matrix and X X^T needs all of them: --optimizer muon refuses
# --parallel fsdp.

MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Jordan's quintic (a, b, c): p(s) = a s + b s^3 + c s^5


def newton_schulz(G, steps=5, coefficients=MUON_COEFFICIENTS, eps=1e-7, dtype=torch.bfloat16):
    """About U V^T for G = U S V^T (every singular value moved into a band around 1), in `dtype`; G is 2-D."""
    a, b, c = coefficients
    tall = G.size(0) > G.size(1)
    X = G.to(dtype)
    if tall:
        X = X.mT  # (in, out): the Gram matrix X X^T is then min(out, in) square
    X = X / X.norm().clamp(min=eps)  # |X|_2 <= |X|_F = 1: every singular value in [0, 1]
    for _ in range(steps):
        A = X @ X.mT
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.addmm(X, B, X, beta=a)           # a X + b (X X^T) X + c (X X^T)^2 X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """Muon for the param groups with "muon": True (2-D matrices only), AdamW for the others.

    Muon, per matrix W (out x in) with gradient g and momentum buffer m:
        m <- momentum m + (1 - momentum) g;   u = (1 - momentum) g + momentum m if nesterov else m
        W <- W (1 - lr wd) - lr sqrt(max(1, out / in)) newton_schulz(u)
    AdamW, per tensor, as torch.optim.AdamW computes it (bias-corrected moments, decoupled decay).
    ns_dtype is the precision of the Newton-Schulz matmuls (a property of the device, not saved with the state)."""

    def __init__(self, params, lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True, ns_steps=5,
                 betas=(0.9, 0.95), eps=1e-8, ns_dtype=torch.bfloat16):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        betas=betas, eps=eps)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            if "muon" not in group:
                raise ValueError("every param group of Muon says which rule it follows: 'muon': True or False")
            bad = [tuple(p.shape) for p in group["params"] if group["muon"] and p.dim() != 2]
            if bad:
                raise ValueError(f"Muon orthogonalises matrices only; these shapes need 'muon': False: {bad}")

    @torch.no_grad()
    def step(self, closure=None):
        """One update from every parameter's .grad; closure (torch.optim's signature) recomputes the loss first."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                p.mul_(1 - lr * wd)  # decoupled weight decay (Loshchilov & Hutter 2019)
                if group["muon"]:
                    if not state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    m, mu = state["momentum_buffer"], group["momentum"]
                    m.lerp_(p.grad, 1 - mu)
                    u = p.grad.lerp(m, mu) if group["nesterov"] else m
                    scale = max(1, p.size(0) / p.size(1)) ** 0.5  # sqrt(max(1, out / in)): Jordan's convention
                    p.add_(newton_schulz(u, group["ns_steps"], dtype=self.ns_dtype), alpha=-lr * scale)
                else:
                    if not state:
                        state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                    beta1, beta2 = group["betas"]
                    state["step"] += 1
                    state["exp_avg"].lerp_(p.grad, 1 - beta1)
                    state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                    bias1, bias2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
                    denom = (state["exp_avg_sq"].sqrt() / bias2 ** 0.5).add_(group["eps"])
                    p.addcdiv_(state["exp_avg"], denom, value=-lr / bias1)
        return loss


def build_optimizer(model, lr, weight_decay, betas=(0.9, 0.95), device="cpu", optimizer="adamw", muon_lr=0.02,
                    muon_momentum=0.95):
    """optimizer="adamw": AdamW with weight decay on matrices (>= 2-D: linear and embedding weights) and none on
    biases and norm gains, which have no scale to shrink (nanoGPT's choice). Fused on CUDA.
    optimizer="muon": one Muon optimizer (above) whose groups send the blocks' matrices to Muon at peak lr muon_lr
    and everything else to its AdamW rule, split as above. Frozen parameters (LoRA) are left out of both."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=torch.device(device).type == "cuda")
    if optimizer != "muon":
        raise TrainError(f"--optimizer {optimizer}: choose adamw or muon")
    hidden = {id(p) for block in model.transformer.h for p in block.parameters() if p.dim() == 2}
    # Tied embeddings are one tensor (wte = lm_head) and not in a block: AdamW updates it.
    groups = [{"params": [p for p in params if id(p) in hidden], "muon": True, "lr": muon_lr,
               "momentum": muon_momentum},
              {"params": [p for p in params if p.dim() >= 2 and id(p) not in hidden], "muon": False},
              {"params": [p for p in params if p.dim() < 2], "muon": False, "weight_decay": 0.0}]
    return Muon([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay, betas=betas,
                ns_dtype=torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)


def describe_optimizer(optimizer):
    """One line for the start of a run: how many tensors and parameters each update rule takes."""
    counts = {}
    for group in optimizer.param_groups:
        rule = "Muon" if group.get("muon") else "AdamW"
        tensors, size = counts.get(rule, (0, 0))
        counts[rule] = (tensors + len(group["params"]), size + sum(p.numel() for p in group["params"]))
    return "optimizer: " + ", ".join(f"{rule} on {n} tensors ({size:,} parameters)"
                                     for rule, (n, size) in counts.items())


def lr_at(step, cfg):
    """Learning rate of optimizer step `step` (0-based). cfg needs lr, min_lr_frac, warmup_steps, max_steps,
    schedule and cooldown_frac. Linear warmup from lr/warmup_steps to lr, then
      cosine:   half a cosine from lr down to min_lr at max_steps (Loshchilov & Hutter 2017)
      wsd:      flat at lr, then linear down to min_lr over the last cooldown_frac of the steps (Hu et al. 2024,
                MiniCPM): the flat part can be extended later without restarting the decay
      constant: flat at lr
    The warmup is lr (step + 1) / warmup_steps, so the first step already moves the weights; Hugging Face's
    get_linear_schedule_with_warmup gives lr step / warmup_steps, one step later (its step 0 has lr 0).
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    min_lr = cfg.lr * cfg.min_lr_frac
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))
    decay_start = max(cfg.warmup_steps, cfg.max_steps - int(cfg.cooldown_frac * cfg.max_steps))
    if step < decay_start:
        return cfg.lr
    progress = min(1.0, (step - decay_start) / max(1, cfg.max_steps - decay_start))
    return cfg.lr + (min_lr - cfg.lr) * progress


# --- one step ---

def lm_loss(model, batch):
    """Next-token loss summed over the targets of batch (x, y); y is -1 where no loss is wanted."""
    x, y = batch
    _, loss = model(x, y, reduction="sum")
    return loss


def count_targets(batch):
    """How many terms lm_loss sums: the targets that are not -1."""
    return (batch[1] != -1).sum()


def train_step(model, optimizer, micro_batches, rt, grad_clip=1.0, loss_fn=lm_loss, count_fn=count_targets):
    """One optimizer step over a list of micro-batches (gradient accumulation) -> (loss, grad_norm).

    The loss is the mean over every counted target of the global batch (all micro-batches, all ranks):
    each micro-batch's summed loss is divided by the global count, so a short or heavily masked
    micro-batch weighs what its tokens weigh, and N ranks equal one process with N times the
    accumulation. Averaging per-micro-batch means instead would weigh tokens unevenly (a known
    accumulation bug, see Unsloth's and Hugging Face's write-ups of October 2024).
    loss_fn(model, batch) returns a summed loss and count_fn(batch) the number of terms in it: sft.py
    and dpo.py pass their own. On a non-finite loss or gradient norm the update is skipped.
    """
    count = sum(torch.as_tensor(count_fn(b), dtype=torch.float32, device=rt.device) for b in micro_batches)
    if rt.ddp:
        dist.all_reduce(count)
    total = torch.zeros((), device=rt.device)
    for i, batch in enumerate(micro_batches):
        # DDP all-reduces gradients inside backward, FSDP reduce-scatters them; only the last micro-step needs it
        # (no_sync, or set_requires_gradient_sync(False), skips the rest: gradients accumulate locally until then).
        last = i == len(micro_batches) - 1
        if rt.fsdp:
            model.set_requires_gradient_sync(last)
        with (model.no_sync() if rt.ddp and not rt.fsdp and not last else nullcontext()):
            with rt.autocast():
                loss_sum = loss_fn(model, batch)
            # DDP and FSDP average gradients over ranks; * world_size turns that average back into a sum over ranks.
            (loss_sum * (rt.world_size / count)).backward()
        total += loss_sum.detach().float()
    if rt.ddp:
        dist.all_reduce(total)
    loss = (total / count).item()
    # Under FSDP each gradient is this rank's shard (a DTensor) and the norm comes back as the global one: the
    # shards' squared norms are summed over the ranks before the square root.
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf).item()
    if math.isfinite(loss) and math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


@torch.no_grad()
def evaluate(model, batches, rt, loss_fn=lm_loss, count_fn=count_targets):
    """Mean loss per counted target over the batches (on the device; of every rank), in eval mode (no dropout)."""
    model.eval()
    total = torch.zeros((), device=rt.device)
    count = torch.zeros((), device=rt.device)
    for batch in batches:
        with rt.autocast():
            total += loss_fn(model, batch).float()
        count += count_fn(batch)
    if rt.ddp:
        dist.all_reduce(total)
        dist.all_reduce(count)
    model.train()
    return (total / count).item()


def bits_per_byte(loss, batches, token_bytes, rt):
    """Convert `evaluate`'s mean loss (nats per target) over these batches to bits per byte of the same targets.

    The loss summed over the targets is loss x targets nats; divided by ln 2 it is bits, and divided by the
    bytes those very target tokens stand for (token_bytes, data.Tokenizer) it is bits per byte, the measure
    that does not depend on the tokenizer (lm-evaluation-harness counts the bytes of what it scored too).
    The split's average bytes per token would be another sample's: the first batches of the default val
    split hold 3.606 bytes per token, the whole split 3.690, a 2.3% error in the bpb."""
    token_bytes = token_bytes.to(rt.device)
    targets = torch.zeros((), device=rt.device)
    n_bytes = torch.zeros((), device=rt.device)
    for _, y in batches:
        scored = y[y != -1]
        targets += scored.numel()
        n_bytes += token_bytes[scored].sum()
    if rt.ddp:
        dist.all_reduce(targets)
        dist.all_reduce(n_bytes)
    return loss * targets.item() / math.log(2) / n_bytes.item()


def to_device(batch, rt):
    """Move a batch to the run's device. On CUDA the copy goes from pinned (page-locked) host memory, which is
    what lets non_blocking=True overlap it with the GPU's work; from ordinary memory it would wait."""
    if rt.device_type == "cuda":
        return tuple(t.pin_memory().to(rt.device, non_blocking=True) for t in batch)
    return tuple(t.to(rt.device) for t in batch)


# --- checkpoints ---

CKPT_NAME = re.compile(r"^ckpt_(\d+)\.(pt|dcp)$")


def list_checkpoints(out_dir):
    """Checkpoint paths in out_dir, oldest step first: ckpt_<step>.pt files and sharded ckpt_<step>.dcp folders. At
    one step the .pt comes last, so a file converted from a folder is what the single-file stages find. Half-written
    `.tmp` names never match."""
    if not os.path.isdir(out_dir):
        return []
    found = sorted((int(m.group(1)), m.group(2)) for m in map(CKPT_NAME.match, os.listdir(out_dir)) if m)
    return [os.path.join(out_dir, f"ckpt_{step:06d}.{kind}") for step, kind in found]


def is_sharded(path):
    """A checkpoint folder written by torch.distributed.checkpoint (DCP): its index is the .metadata file."""
    return os.path.isfile(os.path.join(path, ".metadata"))


def remove_checkpoint(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def rng_states():
    """Every random generator the run touches, as plain values (weights_only loading accepts no numpy arrays)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states):
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    for i, state in enumerate(states["cuda"][:torch.cuda.device_count()]):  # one per visible GPU
        torch.cuda.set_rng_state(state, i)


def write_plain(path, ckpt):
    """torch.save under a temporary name, flushed to disk, then renamed: a crash mid-write leaves a stray `.tmp`."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_sharded(path, model, optimizer, rest):
    """Save with torch.distributed.checkpoint (DCP) into the folder `path`, from every rank at once: each rank writes
    the shards it holds (__<rank>_0.distcp), rank 0 the .metadata index (which rows of which tensor lie where) and
    `rest`, the plain values of the checkpoint, as meta.pt. Any number of ranks loads it back, each reading the
    rows its own shards need (load_state): the layout that saved it does not matter. Written as path.tmp, renamed
    once every rank is done. From one plain process it writes a one-shard folder (convert_checkpoint)."""
    master, tmp = int(os.environ.get("RANK", 0)) == 0, path + ".tmp"
    if master and os.path.exists(tmp):
        shutil.rmtree(tmp)  # a crashed save's leftovers, perhaps of another number of ranks
    if dist.is_initialized():
        dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)  # keyed by parameter name; DTensor shards in FSDP
    with warnings.catch_warnings():  # one plain process (--convert): DCP warns it has no process group, as intended
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    if master:
        write_plain(os.path.join(tmp, "meta.pt"), rest)
        if os.path.exists(path):
            shutil.rmtree(path)  # the same step saved again, by a run resumed from an older checkpoint
        os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()  # no rank reads or prunes before the folder is complete
    return path


def save_checkpoint(out_dir, step, model, optimizer, config, loader_state, keep_last=2, **extra):
    """Write out_dir/ckpt_<step>.pt atomically and delete all but the newest keep_last; return its path.

    model is the unwrapped, uncompiled model (no `module.`/`_orig_mod.` prefixes). The file is written under
    a temporary name, flushed to disk, then renamed: a crash mid-write leaves only a stray `.tmp`, and the
    previous checkpoint stays the newest complete one. Everything is a tensor or a plain Python value, so
    load_checkpoint can use torch.load(weights_only=True), which runs no pickled code.
    A model sharded by FSDP is saved as the folder ckpt_<step>.dcp instead (write_sharded), and then every rank
    calls this; otherwise rank 0 alone does.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last}: keep at least the checkpoint being saved")
    rest = {"step": step, "model_config": asdict(model.config), "config": asdict(config), "loader": loader_state,
            "rng": rng_states(), **extra}
    if isinstance(model, FSDPModule):
        path = write_sharded(os.path.join(out_dir, f"ckpt_{step:06d}.dcp"), model, optimizer, rest)
    else:
        path = write_plain(os.path.join(out_dir, f"ckpt_{step:06d}.pt"),
                           {**rest, "model": model.state_dict(), "optimizer": optimizer.state_dict()})
    if int(os.environ.get("RANK", 0)) == 0:
        for old in list_checkpoints(out_dir)[:-keep_last]:  # keep_last >= 1: [:-0] would keep them all
            remove_checkpoint(old)
    return path


def find_checkpoint(path):
    """path itself, or for a run folder its newest checkpoint."""
    if os.path.isdir(path) and not is_sharded(path):
        found = list_checkpoints(path)
        if not found:
            raise TrainError(f"{path} holds no checkpoint (ckpt_<step>.pt or ckpt_<step>.dcp)")
        return found[-1]
    return path


def load_checkpoint(path, sharded_ok=False):
    """The checkpoint dict, tensors on the CPU. `path` may be a run folder: its newest checkpoint.
    A sharded folder is refused with the command that converts it, unless sharded_ok: then the dict holds
    everything but "model" and "optimizer", which load_state reads into a model and optimizer."""
    path = find_checkpoint(path)
    if is_sharded(path):
        if not sharded_ok:
            raise TrainError(f"{path} is a sharded checkpoint (--parallel fsdp); convert it to the single file this "
                             f"stage reads with: python train.py --convert {path}")
        path = os.path.join(path, "meta.pt")
    if not os.path.isfile(path):
        raise TrainError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainError(f"cannot read checkpoint {path}: {e}".splitlines()[0]) from None


def load_state(path, ckpt, model, optimizer):
    """Load checkpoint `path` (its dict `ckpt` from load_checkpoint) into model and optimizer, whatever the two
    layouts: a .pt file or a sharded folder, into a plain model or one sharded by FSDP over any number of ranks."""
    if is_sharded(path):
        # The target's own state dict says what this rank holds; DCP fills it in place from whichever files hold
        # those rows, so a checkpoint of 2 ranks loads on 1 or 8.
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        with warnings.catch_warnings():  # as in write_sharded
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    elif isinstance(model, FSDPModule):
        # One file into shards: each rank keeps its rows of the full tensors. optimizer.state_dict() numbers the
        # parameters in param-group order (which fully_shard keeps), DCP's functions name them.
        names = {p: name for name, p in model.named_parameters()}
        order = [names[p] for group in optimizer.param_groups for p in group["params"]]
        saved = ckpt["optimizer"]
        by_name = {"state": {order[i]: s for i, s in saved["state"].items()},
                   "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}
        set_state_dict(model, optimizer, model_state_dict=ckpt["model"], optim_state_dict=by_name,
                       options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])


def model_from_checkpoint(ckpt, **overrides):
    """The GPT saved in a checkpoint dict (on the CPU); overrides change runtime-only fields such as attn."""
    model = GPT(GPTConfig(**{**ckpt["model_config"], **overrides}))
    model.load_state_dict(ckpt["model"])
    return model


def convert_checkpoint(path):
    """A sharded checkpoint folder ckpt_<step>.dcp -> the single file ckpt_<step>.pt beside it, which every later
    stage loads; a .pt file -> a .dcp folder. Returns the new path. One process rebuilds the model and optimizer,
    loads the checkpoint into them and saves the other layout: the file numbers the optimizer's parameters where
    DCP names them, and only a live optimizer knows both (format_utils.dcp_to_torch_save would keep the names,
    which optimizer.load_state_dict cannot read). Either kind resumes a run on any number of ranks."""
    path = find_checkpoint(path).rstrip("/")
    target = os.path.splitext(path)[0] + (".pt" if is_sharded(path) else ".dcp")
    if os.path.exists(target):
        raise TrainError(f"--convert {path}: {target} exists already; move it away to convert again")
    ckpt = load_checkpoint(path, sharded_ok=True)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    # The same groups as the run's optimizer; their lr, betas and decay come from the saved param groups.
    optimizer = build_optimizer(model, lr=1.0, weight_decay=0.0, optimizer=ckpt["config"].get("optimizer", "adamw"))
    load_state(path, ckpt, model, optimizer)
    rest = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}
    if is_sharded(path):
        return write_plain(target, {**rest, "model": model.state_dict(), "optimizer": optimizer.state_dict()})
    return write_sharded(target, model, optimizer, rest)


# --- Ctrl-C ---

def interrupted(script, argv, out_dir=None, resumable=True):
    """Ctrl-C in any stage: one line on stderr instead of a traceback from deep inside autograd, then exit status
    130 (128 + SIGINT, what a shell reports for it). Every stage's command line ends this way.

    Nothing is left half-written: checkpoints and summaries go to a .tmp file that is then renamed, so all
    Ctrl-C can cut short is a .tmp, removed here. The newest checkpoint is whole, and `--resume auto` continues
    from it exactly as the run would have gone on. The step reached is the last one metrics.jsonl logged."""
    argv, line, checkpoints = list(sys.argv[1:] if argv is None else argv), "interrupted", []
    if out_dir and os.path.isdir(out_dir):
        for name in os.listdir(out_dir):
            if name.endswith(".tmp") and int(os.environ.get("RANK", 0)) == 0:  # once, not by every rank at once
                remove_checkpoint(os.path.join(out_dir, name))
        try:
            logged = read_metrics(out_dir)
        except (TrainError, ValueError):  # no metrics yet, or a last line cut short
            logged = []
        if logged and "step" in logged[-1]:
            line += f" after step {logged[-1]['step']}"
        checkpoints = list_checkpoints(out_dir)
        line += f"; newest checkpoint {checkpoints[-1]}" if checkpoints else f"; no checkpoint in {out_dir} yet"
    if resumable and checkpoints:
        args, i = [], 0
        while i < len(argv):  # the same command, its --resume (if any) replaced by --resume auto
            if argv[i] in ("--resume", "--stop-at") or argv[i].startswith(("--resume=", "--stop-at=")):
                i += 1 if "=" in argv[i] else 2
                continue
            args.append(argv[i])
            i += 1
        line += f"; continue with: python {script} {shlex.join(args + ['--resume', 'auto'])}"
    else:
        line += f"; run again with: python {script} {shlex.join(argv)}".rstrip()
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun every rank gets the Ctrl-C: one line, not N
        print(line, file=sys.stderr, flush=True)
    sys.exit(130)


# --- metrics and plots ---

def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise TrainError(f"{path} does not exist: give a run folder written by train.py")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_runs(run_dirs, path):
    """Train (line) and validation (markers) loss against tokens for each run folder, in one PNG."""
    import matplotlib  # only here: importing train.py for its loop should not need a plotting stack
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run_dir in enumerate(run_dirs):
        records, color = read_metrics(run_dir), f"C{i}"
        name = os.path.basename(os.path.normpath(run_dir))
        train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
        val = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.6, label=f"{name} train")
        if val:
            ax.plot(*zip(*val), "o--", color=color, label=f"{name} val")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_panels(records, panels, path, title, cols=4):
    """metrics.jsonl records against their step, one panel each: panels are (title, [(key, style, right), ...]),
    a line per key (right: on a second y axis, for two scales in one panel). Records without the key are skipped."""
    import matplotlib  # only here, as in plot_runs
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = min(cols, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.25 * cols, 3.5 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (name, lines) in zip(axes.flat, panels):
        for i, (key, style, right) in enumerate(lines):
            pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
            if pts:
                (ax.twinx() if right else ax).plot(*zip(*pts), style, color=f"C{i}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def unigram_entropy(loader, vocab_size, batches=64):
    """Loss (nats/token) of the best model that ignores context: the entropy of the token frequencies in
    `batches` batches of the loader. A trained model must end far below it."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for _ in range(batches):
        counts += np.bincount(loader.next_batch()[1].flatten().numpy(), minlength=vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# --- pretraining ---

def prepare_data(cfg, rt):
    """meta.json of cfg.data_dir, after rank 0 has prepared the dataset there if it was missing."""
    if rt.master and not os.path.exists(os.path.join(cfg.data_dir, "meta.json")):
        print0(f"preparing dataset {cfg.dataset} into {cfg.data_dir} (once)")
        data.prepare(data.DataConfig(dataset=cfg.dataset, out_dir=cfg.data_dir))
    if rt.ddp:
        dist.barrier()  # the other ranks wait for rank 0's shards
    return data.load_meta(cfg.data_dir)


def derive(cfg, rt):
    """Fill every field left at None from the device (a CPU-sized run on CPU, a GPT-2 run on CUDA)."""
    for name in ("eval_every", "log_every", "save_every", "keep_last", "eval_batches", "batch_size"):
        if getattr(cfg, name) < 1:  # steps are counted modulo these; keep_last 0 would keep every checkpoint
            raise TrainError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    gpu = rt.device_type == "cuda"
    preset = cfg.preset or ("gpt2" if gpu else "mini")
    if preset not in PRESETS:
        raise TrainError(f"--preset {preset}: choose one of {', '.join(PRESETS)}")
    uses_triton = "triton" in (cfg.attn, cfg.kernels)
    if uses_triton and not gpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise TrainError(f"--attn {cfg.attn} --kernels {cfg.kernels}: the Triton kernels need a CUDA GPU; on the CPU "
                         f"use the torch paths, or set TRITON_INTERPRET=1 for the (very slow) interpreter")
    max_steps = cfg.max_steps if cfg.max_steps is not None else (5000 if gpu else 1000)
    # GPT-2 trained on ~0.5M tokens per step (Radford et al. 2019; nanoGPT: 2^19); a CPU run takes one micro-batch.
    total_batch_tokens = cfg.total_batch_tokens if cfg.total_batch_tokens is not None else (2**19 if gpu else None)
    return replace(cfg, preset=preset, max_steps=max_steps, total_batch_tokens=total_batch_tokens,
                   seq_len=cfg.seq_len if cfg.seq_len is not None else PRESETS[preset].get("block_size", 1024),
                   data_dir=cfg.data_dir if cfg.data_dir is not None else os.path.join("data", cfg.dataset),
                   lr=cfg.lr if cfg.lr is not None else (6e-4 if gpu else 3e-3),
                   warmup_steps=max_steps // 20 if cfg.warmup_steps is None else cfg.warmup_steps,
                   compile=gpu if cfg.compile is None else cfg.compile)


def padded_vocab_size(vocab_size, device_type):
    """On CUDA the vocabulary is padded up to a multiple of 64 (GPT-2's 50257 -> 50304), which makes the output
    matmul markedly faster. The extra rows are never targets, and never sampled (GPTConfig.n_tokens)."""
    return 64 * math.ceil(vocab_size / 64) if device_type == "cuda" else vocab_size


def build_model_config(cfg, vocab_size, device_type="cpu"):
    """The model for the preset and overrides, with the vocabulary padded for the device. The loss runs over every
    row, padding too (the fused loss of kernels="triton" sees no mask either): a padding row is never a target, so
    training only pushes its logit down; generation alone leaves the padding out."""
    overrides = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd") if getattr(cfg, k) is not None}
    try:
        return config_from_preset(cfg.preset, vocab_size=padded_vocab_size(vocab_size, device_type),
                                  n_tokens=vocab_size, block_size=cfg.seq_len, attn=cfg.attn, kernels=cfg.kernels,
                                  dropout=cfg.dropout, **overrides)
    except ValueError as e:
        raise TrainError(str(e)) from None


def check_resume(ckpt, path, model_config, tokenizer_hash, data_dir):
    """Refuse a checkpoint that the current flags or data cannot continue, naming what differs."""
    if ckpt.get("tokenizer_hash") != tokenizer_hash:
        raise TrainError(f"cannot resume {path}: it was trained on tokenizer {ckpt.get('tokenizer_hash')} but the "
                         f"shards in {data_dir} use tokenizer {tokenizer_hash}; use the same --data-dir")
    theirs, ours = ckpt["model_config"], asdict(model_config)
    for key in ours:
        # attn/kernels change no weights; n_tokens is the tokenizer's size, already checked by its hash (and absent
        # from checkpoints saved before the field)
        if key not in ("attn", "kernels", "n_tokens") and theirs.get(key) != ours[key]:
            raise TrainError(f"cannot resume {path}: it has {key}={theirs.get(key)!r} but this run has "
                             f"{key}={ours[key]!r}; pass the same model flags or a new --out-dir")


def format_eta(seconds):
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def main(cfg):
    """Pretrain a GPT as cfg says; returns a summary dict (final val loss and bpb, params, paths)."""
    # --- setup ---
    if cfg.optimizer == "muon" and cfg.parallel == "fsdp":  # Newton-Schulz needs whole matrices, FSDP holds rows
        raise TrainError("--optimizer muon needs each matrix whole on every rank and --parallel fsdp shards them: "
                         "use --parallel ddp with muon, or --optimizer adamw with fsdp")
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.threads, cfg.parallel)
    cfg = derive(cfg, rt)
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise TrainError(f"--out-dir {cfg.out_dir} is a file; give a folder")
    if rt.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    print0(f"device {rt.device} x {rt.world_size} ({cfg.parallel}), dtype {str(rt.dtype).removeprefix('torch.')}, "
           f"compile {cfg.compile}, preset {cfg.preset}, {torch.get_num_threads()} threads")

    # --- data ---
    meta = prepare_data(cfg, rt)
    B, T = cfg.batch_size, cfg.seq_len
    micro_tokens = B * T * rt.world_size  # tokens per micro-step over all ranks
    total_batch_tokens = cfg.total_batch_tokens or micro_tokens
    if total_batch_tokens % micro_tokens:
        raise TrainError(f"--total-batch-tokens {total_batch_tokens} is not a multiple of batch {B} x seq {T} x "
                         f"world {rt.world_size} = {micro_tokens}")
    accum = total_batch_tokens // micro_tokens
    train_loader = data.TokenLoader(cfg.data_dir, "train", B, T, rt.rank, rt.world_size, seed=cfg.seed)
    val_loader = data.TokenLoader(cfg.data_dir, "val", B, T, rt.rank, rt.world_size, shuffle=False)
    # The same validation subset at every eval, and for any number of ranks (when it divides eval_batches).
    val_batches = [to_device(val_loader.next_batch(), rt) for _ in range(math.ceil(cfg.eval_batches / rt.world_size))]
    val_split = meta["splits"]["val"]
    tokenizer = data.load_tokenizer(cfg.data_dir)
    token_bytes = tokenizer.token_bytes()  # for the bits per byte of exactly these batches
    print0(f"data {cfg.data_dir}: {meta['splits']['train']['tokens']:,} train tokens, {val_split['tokens']:,} val "
           f"tokens, vocab {meta['vocab_size']}; {total_batch_tokens:,} tokens/step = {B} x {T} x "
           f"{rt.world_size} ranks x {accum} micro-steps")
    epochs = cfg.max_steps * total_batch_tokens / meta["splits"]["train"]["tokens"]
    if epochs > 4:  # past a few epochs repeated data stops helping (Muennighoff et al. 2023) and the model memorises
        print0(f"note: {cfg.max_steps} steps x {total_batch_tokens:,} tokens is {epochs:.0f} epochs of this dataset; "
               f"expect overfitting; a larger corpus (--dataset tinystories, fineweb-edu) fits this model better")
    unigram = unigram_entropy(data.TokenLoader(cfg.data_dir, "train", B, T, seed=cfg.seed + 1), meta["vocab_size"])
    print0(f"unigram baseline (token frequencies alone): {unigram:.4f} nats/token")

    # --- model ---
    model_config = build_model_config(cfg, meta["vocab_size"], rt.device_type)
    raw_model = GPT(model_config).to(rt.device)  # the module that is saved: never wrapped (under FSDP: sharded)
    raw_model.grad_checkpointing = cfg.grad_checkpointing
    print0(f"model: {raw_model.num_params():,} parameters, {raw_model.flops_per_token(T):,} FLOPs/token")
    if rt.fsdp:
        shard_model(raw_model, rt, cfg.compile)  # in place: each parameter now holds this rank's rows

    # --- optimizer ---
    optimizer = build_optimizer(raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), rt.device,
                                cfg.optimizer, cfg.muon_lr, cfg.muon_momentum)
    print0(describe_optimizer(optimizer))
    start_step, resume_path = 0, cfg.resume
    if resume_path == "auto":
        found = list_checkpoints(cfg.out_dir)
        resume_path = found[-1] if found else None
        if not found:
            print0(f"--resume auto: no checkpoint in {cfg.out_dir}, starting fresh")
    if resume_path:
        resume_path = find_checkpoint(resume_path)
        ckpt = load_checkpoint(resume_path, sharded_ok=True)  # any layout resumes on any number of ranks
        check_resume(ckpt, resume_path, model_config, meta["tokenizer_hash"], cfg.data_dir)
        saved_optimizer = ckpt["config"].get("optimizer", "adamw")  # checkpoints before --optimizer: AdamW
        if saved_optimizer != cfg.optimizer:  # their param groups and state do not fit each other
            raise TrainError(f"cannot resume {resume_path}: it was trained with --optimizer {saved_optimizer} but "
                             f"this run has --optimizer {cfg.optimizer}; pass the same or a new --out-dir")
        load_state(resume_path, ckpt, raw_model, optimizer)
        train_loader.load_state_dict(ckpt["loader"])
        set_rng_states(ckpt["rng"])
        start_step = ckpt["step"]
        print0(f"resumed from {resume_path} at step {start_step}")
        del ckpt
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if rt.master:
        # Keep the records up to the starting step: a run killed after its last checkpoint logged steps
        # that the resumed run is about to log again.
        resumed_here = resume_path and os.path.exists(metrics_path)
        kept = [r for r in read_metrics(cfg.out_dir) if r["step"] <= start_step] if resumed_here else []
        if not resume_path and list_checkpoints(cfg.out_dir):
            print0(f"fresh run: deleting the checkpoints of an earlier run in {cfg.out_dir}")
            for old in list_checkpoints(cfg.out_dir):
                remove_checkpoint(old)
        for name in ("summary.json", "eval.json"):  # written again once this run is complete (eval.json by eval.py)
            if os.path.exists(os.path.join(cfg.out_dir, name)):
                os.remove(os.path.join(cfg.out_dir, name))
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
    model = torch.compile(raw_model) if cfg.compile and not rt.fsdp else raw_model  # FSDP: blocks compiled above
    if rt.ddp and not rt.fsdp:
        model = DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)

    # --- loop ---
    t_start = time.time()
    last_loss, step_time = math.nan, None
    saved_at = start_step if resume_path else None
    evaluated_at, val_loss, val_bpb = None, None, None
    step = start_step
    for step in range(start_step, cfg.max_steps):
        t0 = time.time()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * cfg.muon_lr / cfg.lr if group.get("muon") else lr  # Muon's peak: --muon-lr
        micro_batches = [to_device(train_loader.next_batch(), rt) for _ in range(accum)]
        loss, grad_norm = train_step(model, optimizer, micro_batches, rt, cfg.grad_clip)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise Diverged(f"step {step + 1}: loss {loss}, grad norm {grad_norm} (last finite loss {last_loss:.4f}); "
                           f"stopped without updating; the last good checkpoint in {cfg.out_dir} is intact")
        last_loss = loss
        dt = time.time() - t0
        done = step + 1  # steps completed; checkpoints and logs count these
        # The first step includes compilation and warm-up: leave it out of the average.
        step_time = dt if step_time is None or step == start_step + 1 else 0.9 * step_time + 0.1 * dt
        is_eval = done % cfg.eval_every == 0 or done == cfg.max_steps
        if done % cfg.log_every == 0 or is_eval or done == start_step + 1:
            tok_s = total_batch_tokens / dt
            mfu = raw_model.estimate_mfu(tok_s / rt.world_size, rt.device, T)
            record = {"step": done, "loss": loss, "lr": lr, "tokens": done * total_batch_tokens,
                      "grad_norm": grad_norm, "tokens_per_sec": round(tok_s)}
            line = (f"step {done:>5}/{cfg.max_steps} | loss {loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                    f"{tok_s:,.0f} tok/s")
            if mfu is not None:
                line += f" | MFU {100 * mfu:.1f}%"
                record["mfu"] = mfu
            line += f" | ETA {format_eta(step_time * (cfg.max_steps - done))}"
            if is_eval:
                val_loss = evaluate(model, val_batches, rt)
                val_bpb = bits_per_byte(val_loss, val_batches, token_bytes, rt)
                record.update(val_loss=val_loss, val_bpb=val_bpb)
                evaluated_at = done
                line += f"\n      val loss {val_loss:.4f} | val bpb {val_bpb:.4f}"
            print0(line)
            if rt.master:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if is_eval:
                    plot_runs([cfg.out_dir], os.path.join(cfg.out_dir, "loss.png"))
        if done % cfg.save_every == 0 or done == cfg.max_steps or done == cfg.stop_at:
            if rt.master or rt.fsdp:  # a sharded checkpoint is written by every rank
                save_checkpoint(cfg.out_dir, done, raw_model, optimizer, cfg, train_loader.state_dict(),
                                cfg.keep_last, tokenizer_hash=meta["tokenizer_hash"])
            saved_at = done
        if done == cfg.stop_at:
            print0(f"--stop-at {cfg.stop_at}: stopping; continue with --resume auto")
            break
    done = step + 1 if cfg.max_steps > start_step else start_step

    # --- save ---
    if (rt.master or rt.fsdp) and saved_at != done:
        save_checkpoint(cfg.out_dir, done, raw_model, optimizer, cfg, train_loader.state_dict(), cfg.keep_last,
                        tokenizer_hash=meta["tokenizer_hash"])
    if evaluated_at != done:
        val_loss = evaluate(model, val_batches, rt)
        val_bpb = bits_per_byte(val_loss, val_batches, token_bytes, rt)
    print0(f"done: {done} steps, val loss {val_loss:.4f}, val bpb {val_bpb:.4f}; checkpoints in {cfg.out_dir}")
    if rt.fsdp:
        print0(f"the checkpoints are sharded: python train.py --convert {list_checkpoints(cfg.out_dir)[-1]} writes "
               f"the single file that sft.py, eval.py and the other stages read")
    sampler = raw_model
    if rt.fsdp and cfg.samples > 0:  # sample from a whole copy on rank 0; gathering it takes every rank
        full = get_model_state_dict(raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rt.master:
            sampler = GPT(model_config).to(rt.device)
            sampler.load_state_dict(full)
    if rt.master and cfg.samples > 0:
        start = torch.full((cfg.samples, 1), tokenizer.eot_id, dtype=torch.long, device=rt.device)
        out = sampler.generate(start, cfg.sample_tokens, temperature=0.8, top_k=50, seed=cfg.seed)
        for i, row in enumerate(out.tolist()):
            print0(f"--- sample {i + 1} ---\n{tokenizer.decode(row[1:])}")  # never a padding id (GPT.generate)
    if rt.master and done == cfg.max_steps:  # a complete run: the next stage and the report read this
        summary = {"stage": "pretrain", "checkpoint": list_checkpoints(cfg.out_dir)[-1], "steps": done,
                   "tokens": done * total_batch_tokens, "val_loss": val_loss, "val_bpb": val_bpb,
                   "unigram": unigram, "params": raw_model.num_params(), "data_dir": cfg.data_dir, "lr": cfg.lr,
                   "seconds": round(time.time() - t_start, 1)}  # this process's loop, evaluation and samples
        tmp = os.path.join(cfg.out_dir, "summary.json.tmp")
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(tmp, os.path.join(cfg.out_dir, "summary.json"))
    if rt.ddp:
        dist.barrier()  # rank 0 may still be saving or sampling: no rank tears the group down before the others
    return {"step": done, "val_loss": val_loss, "val_bpb": val_bpb, "params": raw_model.num_params(),
            "flops_per_token": raw_model.flops_per_token(T), "unigram": unigram, "out_dir": cfg.out_dir, "config": cfg}


# --- scaling laws (course exercise) ---

def compute_optimal(flops_budget, tokens_per_param=20):
    """Compute-optimal parameters N and tokens D for a budget C (Hoffmann et al. 2022, "Chinchilla"):
    training costs C ~= 6 N D FLOPs and the optimum has D ~= 20 N, so N = sqrt(C / 120) and D = 20 N."""
    params = math.sqrt(flops_budget / (6 * tokens_per_param))
    tokens = tokens_per_param * params
    print0(f"budget {flops_budget:.2e} FLOPs: compute-optimal ~{params / 1e6:.2f}M parameters on "
           f"~{tokens / 1e6:.1f}M tokens")
    return params, tokens


SWEEP_SIZES = [dict(n_layer=2, n_head=2, n_embd=64), dict(n_layer=3, n_head=4, n_embd=96),
               dict(n_layer=4, n_head=4, n_embd=128), dict(n_layer=6, n_head=6, n_embd=192)]


def sweep(cfg, flops_budget, sizes=SWEEP_SIZES):
    """Train each size on the same FLOPs budget, then plot validation loss against compute (the model's
    flops_per_token, 6N plus attention, times the tokens seen so far) and fit L = a * C^b through the
    compute-efficient frontier (Kaplan et al. 2020, figure 1) by least squares in log space."""
    compute_optimal(flops_budget)
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.threads)
    base = derive(cfg, rt)
    meta = prepare_data(base, rt)
    points = []  # (compute, val_loss, label)
    for size in sizes:
        run = replace(base, **size, out_dir=os.path.join(cfg.out_dir, "sweep", f"L{size['n_layer']}-C{size['n_embd']}"))
        tokens_per_step = run.total_batch_tokens or run.batch_size * run.seq_len * rt.world_size
        model_config = build_model_config(run, meta["vocab_size"], rt.device_type)
        flops_per_token = GPT(model_config).flops_per_token(run.seq_len)
        steps = max(1, int(flops_budget / (flops_per_token * tokens_per_step)))
        run = replace(run, max_steps=steps, eval_every=max(1, steps // 8), log_every=max(1, steps // 8),
                      save_every=steps, warmup_steps=steps // 20, samples=0)
        print0(f"--- sweep: {size} for {steps} steps ---")
        result = main(run)
        label = f"{result['params'] / 1e6:.2f}M"
        points += [(result["flops_per_token"] * r["tokens"], r["val_loss"], label)
                   for r in read_metrics(run.out_dir) if "val_loss" in r]
    # The frontier: points that no cheaper point beats.
    frontier, best = [], math.inf
    for c, loss, _ in sorted(points):
        if loss < best:
            frontier.append((c, loss))
            best = loss
    slope, intercept = np.polyfit(np.log([c for c, _ in frontier]), np.log([l for _, l in frontier]), 1)
    print0(f"fit on the frontier: L(C) = {math.exp(intercept):.3g} * C^{slope:.4f}")
    if rt.master:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 5))
        for i, label in enumerate(dict.fromkeys(p[2] for p in points)):
            ax.plot(*zip(*[(c, l) for c, l, lab in points if lab == label]), "o-", color=f"C{i}", label=label)
        cs = np.geomspace(frontier[0][0], frontier[-1][0], 50)
        ax.plot(cs, np.exp(intercept) * cs ** slope, "k--", label=f"{math.exp(intercept):.3g} C^{slope:.3f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training compute (FLOPs)")
        ax.set_ylabel("validation loss")
        ax.legend()
        fig.tight_layout()
        path = os.path.join(cfg.out_dir, "sweep", "scaling.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        print0(f"wrote {path}")
    return slope, math.exp(intercept)


def cli(argv=None):
    parser = data.config_parser(TrainConfig, __doc__, CHOICES)
    parser.add_argument("--plot", nargs="+", metavar="DIR", help="overlay the loss curves of these run folders "
                        "into loss_compare.png and exit")
    parser.add_argument("--sweep", nargs="?", const=5e12, type=float, metavar="FLOPS",
                        help="train a few sizes on this FLOPs budget (default 5e12: minutes on a CPU), fit a power law")
    parser.add_argument("--convert", metavar="CKPT", help="convert a sharded checkpoint folder (ckpt_<step>.dcp) to "
                        "the single file ckpt_<step>.pt beside it, or a .pt file to a .dcp folder, and exit")
    args = parser.parse_args(argv)
    cfg = config_from_args(TrainConfig, args)
    try:
        if args.plot:
            print(f"wrote {plot_runs(args.plot, 'loss_compare.png')}")
        elif args.convert:
            print(f"wrote {convert_checkpoint(args.convert)}")
        elif args.sweep:
            sweep(cfg, args.sweep)
        else:
            main(cfg)
    except (TrainError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "status", 2))
    except KeyboardInterrupt:
        interrupted("train.py", argv, None if args.plot or args.convert else cfg.out_dir,
                    resumable=not (args.plot or args.sweep or args.convert))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    cli(sys.argv[1:])
