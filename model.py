"""The GPT model: chapter "pre-training", part one (what is being trained).

One file holds the whole network, readable top to bottom:

    config   GPTConfig and the named presets (GPT-2 family, small CPU-sized ones)
    parts    norms, rotary positions, causal self-attention (with GQA, a KV cache and document masks for
             packed rows), the MLP, a block
    GPT      embeddings -> n_layer blocks -> final norm -> logits and the loss
    extras   sampling and generation with a KV cache (one tensor, or a list of prompts batched with left
             padding), growing the vocabulary, loading GPT-2 weights, FLOPs and MFU
    batching continuous batching: sequences of different lengths decoded together, joining and leaving
             between steps (DecodeBatch, what serve.py runs on)

The defaults reproduce GPT-2 (learned positions, LayerNorm, GELU MLP, tied embeddings), so its
weights load as a straight copy. The switches in GPTConfig turn it into a modern decoder: rotary
positions (RoPE), RMSNorm, SwiGLU or ReLU^2 MLPs, grouped-query attention, QK-norm, logit soft-capping.

Try it:

    python model.py                      # builds the `tiny` preset and samples from it (untrained)
    python -m pytest -q tests/test_model.py

Training lives in train.py; this file has no training code.
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# --- config ---

@dataclass
class GPTConfig:
    vocab_size: int = 50257         # rows of the embedding and the output layer (GPT-2: 50257)
    n_tokens: int | None = None     # ids that are tokens of the tokenizer; None = vocab_size. The rows above are
    #                                 padding (train.py pads to a multiple of 64 on a GPU): never sampled
    block_size: int = 1024          # longest sequence the model sees, in tokens
    n_layer: int = 12               # transformer blocks
    n_head: int = 12                # query heads
    n_kv_head: int | None = None    # key/value heads; None = n_head (multi-head), 1 = multi-query, else grouped
    n_embd: int = 768               # width of the residual stream
    dropout: float = 0.0            # dropout probability on embeddings, attention and residual branches
    bias: bool = True               # biases in Linear layers and LayerNorm (GPT-2: True)
    pos: str = "learned"            # "learned" absolute positions (GPT-2) or "rope" rotary positions
    rope_theta: float = 10000.0     # RoPE base wavelength
    norm: str = "layernorm"         # "layernorm" (GPT-2) or "rmsnorm"
    norm_eps: float = 1e-5          # epsilon inside the norms
    mlp: str = "gelu"               # "gelu" (GPT-2), "swiglu" (LLaMA) or "relu2" (squared ReLU, Primer)
    mlp_hidden: int | None = None   # MLP inner width; None = 4*n_embd, or 8/3*n_embd rounded up to 64 for swiglu
    tie_embeddings: bool = True     # lm_head shares its weight with the token embedding wte
    qk_norm: bool = False           # RMSNorm on queries and keys per head before attention
    logit_softcap: float | None = None  # cap logits smoothly at +-this value with tanh; None = off
    attn: str = "sdpa"              # "sdpa" (PyTorch fused), "naive" (readable reference), "triton" (kernels/)
    kernels: str = "torch"          # "torch" or "triton": norms and the fused linear cross-entropy from kernels/

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_tokens is None:  # also a checkpoint saved before this field: every row was a token
            self.n_tokens = self.vocab_size
        if self.n_tokens > self.vocab_size:
            raise ValueError(f"n_tokens={self.n_tokens} is more than vocab_size={self.vocab_size}: every token needs "
                             f"a row; give a vocab_size of at least {self.n_tokens}")
        choices = {"pos": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu", "relu2"),
                   "attn": ("sdpa", "naive", "triton"), "kernels": ("torch", "triton")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig.{name}={getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rope needs an even head dim, got n_embd/n_head={self.n_embd // self.n_head}")
        if self.attn == "triton" and self.dropout > 0:
            raise ValueError(f"attn='triton' has no attention dropout; use dropout=0 (got {self.dropout})")


# Named sizes. The GPT-2 family matches OpenAI's checkpoints; the small ones are for CPUs and tests.
PRESETS = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=96, block_size=64, vocab_size=512),       # ~0.27M params, for tests
    "mini": dict(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=4096),    # ~1.3M, CPU in minutes
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=8192),   # ~14M, CPU in an hour
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),                                   # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),                           # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),                            # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),                               # 1558M
}


def config_from_preset(name, **overrides):
    """GPTConfig for a named preset, with any field overridden (`config_from_preset("tiny", pos="rope")`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


def _triton_kernels():
    """kernels/ imports Triton, so it is loaded only when a config asks for it."""
    from kernels import attention, cross_entropy, layernorm
    return attention, layernorm, cross_entropy


# --- parts: norms and rotary positions ---

class Norm(nn.Module):
    """LayerNorm (GPT-2, optional bias) or RMSNorm over the last dimension; kernels="triton" uses kernels/."""

    def __init__(self, dim, kind, eps, bias, kernels="torch"):
        super().__init__()
        self.kind, self.eps, self.use_triton = kind, eps, kernels == "triton"
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layernorm" and bias else None

    def forward(self, x):
        if self.use_triton:
            _, layernorm, _ = _triton_kernels()
            if self.kind == "layernorm":
                return layernorm.layer_norm(x, self.weight, self.bias, self.eps)
            return layernorm.rms_norm(x, self.weight, self.eps)
        if self.kind == "layernorm":
            return F.layer_norm(x, (x.size(-1),), self.weight, self.bias, self.eps)
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def norm(config):
    """The residual stream's norm as the config asks for it."""
    return Norm(config.n_embd, config.norm, config.norm_eps, config.bias, config.kernels)


def rope_tables(head_dim, length, theta):
    """cos and sin tables of rotary embeddings (Su et al. 2021, RoFormer), each (length, head_dim/2).

    Pair i of a head's channels is rotated by angle position * theta^(-2i/head_dim): low pairs turn
    fast, high pairs slowly, and the dot product q.k then depends only on the distance between tokens.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (D/2,)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)              # (length, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate x (B, H, T, D) by the tables (T, D/2), or (B, 1, T, D/2) when each row has its own positions.

    Channels i and i + D/2 form a pair (the GPT-NeoX layout).
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.type_as(x)


# --- parts: attention ---

def causal_mask(T_q, T_k, device):
    """(T_q, T_k) bool, True where query i may see key j. The queries are the last T_q of T_k positions."""
    offset = T_k - T_q
    return torch.ones(T_q, T_k, dtype=torch.bool, device=device).tril(diagonal=offset)


# Document masks. Supervised fine-tuning packs several short conversations into one row of block_size
# tokens, and batched generation left-pads prompts of different lengths into one tensor. Both give each
# token a document id (B, T): a token may attend to an earlier-or-same slot only when the ids are equal,
# so a conversation never sees its neighbour and a real token never sees padding. Positions restart at 0
# in each document (GPT.forward's `pos`), so a packed document computes exactly what it would alone.

def document_mask(doc_q, doc_k):
    """(B, 1, T_q, T_k) bool, True where query i may see key j: same document id and j not after i.

    doc_q (B, T_q) are the ids of the queries, doc_k (B, T_k) those of all keys; the queries are the
    last T_q of the keys. Each query sees at least itself, so no softmax row is empty (no NaN, not even
    in a row that is all padding). Dim 1 broadcasts over the heads.
    """
    same = doc_q[:, :, None] == doc_k[:, None, :]  # (B, T_q, T_k)
    return (same & causal_mask(doc_q.size(1), doc_k.size(1), doc_q.device)).unsqueeze(1)


def left_pad(prompts, device=None):
    """Prompts (lists of token ids, any lengths) -> idx, doc, pos, each (B, longest), prompts right-aligned.

    Padding is token 0 with document id 0 and real tokens have id 1, so no real token sees padding;
    positions count from each row's first real token (padding sits at position 0), so each row computes
    exactly what it would alone.
    """
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} of {len(prompts)} is empty: give each prompt at least one token")
    B, T = len(prompts), max(len(p) for p in prompts)
    idx = torch.zeros(B, T, dtype=torch.long)
    doc = torch.zeros(B, T, dtype=torch.long)
    for row, p in enumerate(prompts):
        idx[row, T - len(p):] = torch.as_tensor(p, dtype=torch.long)
        doc[row, T - len(p):] = 1
    n_pad = T - torch.tensor([len(p) for p in prompts])              # (B,)
    pos = (torch.arange(T)[None, :] - n_pad[:, None]).clamp(min=0)  # (B, T)
    return idx.to(device), doc.to(device), pos.to(device)


def _last(t, n):
    """The last n columns of t (B, T), or None for None (generation without document ids)."""
    return None if t is None else t[:, -n:]


def naive_attention(q, k, v, mask, dropout_p=0.0):
    """The reference: explicit scores, mask, softmax, weighted sum. q (B, H, T_q, D), k/v (B, H, T_k, D).

    mask is bool, True where a query may see a key: (T_q, T_k) causal, or (B, 1, T_q, T_k) per document.
    """
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, H, T_q, T_k)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = F.softmax(scores.float(), dim=-1).type_as(q)
    weights = F.dropout(weights, p=dropout_p)
    return weights @ v                                                   # (B, H, T_q, D)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, so each new token costs one position.

    Preallocated as (n_layer, B, n_kv_head, max_len, head_dim). Filled one of two ways:

    together   `pos` counts the slots stored, the same in every row: one generate() call on a batch, whose
               prompts left padding has lined up. `doc` (B, max_len) holds each slot's document id (0 where
               forward had doc=None), so that a decoded token is masked against padding in the cache.
    per row    made with per_row=True, `lens` (B,) counts each row's slots: rows at different points of
               different answers decode in one forward, each new token going to slot lens[row] and seeing the
               slots before it. This is what continuous batching needs (DecodeBatch, below): rows are added
               and removed between two steps, and `rows(start, stop)` is a cache over some rows that shares
               this one's memory (a prefill fills one row while the others wait).

    GPT.forward advances `pos` or `lens` after the last layer has written its keys and values. Positions need
    no storing: they are already inside the cached keys (RoPE rotates them, learned positions were added to the
    residual stream before the keys were made), and a token's slot is its position.
    """

    def __init__(self, n_layer, batch_size, n_kv_head, max_len, head_dim, device, dtype, per_row=False):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.doc = torch.zeros(batch_size, max_len, device=device, dtype=torch.long)
        self.pos, self.max_len = 0, max_len
        self.lens = torch.zeros(batch_size, device=device, dtype=torch.long) if per_row else None
        self.slots = self.end = None  # per row, during one forward: where its tokens go (B, T), and keys in use

    def update(self, layer, k, v):
        """Store k, v (B, H_kv, T, D) after the cached ones; return all keys and values so far."""
        if self.lens is not None:  # each row's tokens go after that row's own slots
            index = self.slots[:, None, :, None].expand_as(k)  # (B, H_kv, T, D)
            self.k[layer].scatter_(2, index, k.to(self.k.dtype))  # under autocast k is bf16, the cache is not
            self.v[layer].scatter_(2, index, v.to(self.v.dtype))
            return self.k[layer, :, :, :self.end], self.v[layer, :, :, :self.end]
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def repeat_rows(self, n):
        """Copy each row's cache to n consecutive rows (B -> B*n): one prefill serves n samples of a prompt."""
        self.k, self.v = self.k.repeat_interleave(n, dim=1), self.v.repeat_interleave(n, dim=1)
        self.doc = self.doc.repeat_interleave(n, dim=0)

    def rows(self, start, stop):
        """A per-row cache over rows start:stop, sharing this one's memory: what forward writes there is here."""
        view = KVCache.__new__(KVCache)
        view.k, view.v, view.doc = self.k[:, start:stop], self.v[:, start:stop], self.doc[start:stop]
        view.lens, view.pos, view.max_len, view.slots, view.end = self.lens[start:stop], 0, self.max_len, None, None
        return view

    def copy_row(self, src, dst):
        """Row src's keys, values and length into row dst (per row)."""
        n = int(self.lens[src])
        self.k[:, dst, :, :n], self.v[:, dst, :, :n] = self.k[:, src, :, :n], self.v[:, src, :, :n]
        self.lens[dst] = n


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx, self.attn, self.dropout = layer_idx, config.attn, config.dropout
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        # One matmul makes queries, keys and values: [q (n_head heads) | k (n_kv_head) | v (n_kv_head)].
        # With n_kv_head == n_head this is exactly GPT-2's c_attn.
        qkv_dim = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm = Norm(self.head_dim, "rmsnorm", config.norm_eps, bias=False, kernels=config.kernels)
            self.k_norm = Norm(self.head_dim, "rmsnorm", config.norm_eps, bias=False, kernels=config.kernels)

    def forward(self, x, rope=None, kv_cache=None, mask=None):
        """x (B, T, C); mask None = causal, or (B, 1, T, T_k) bool from document_mask, made once per forward."""
        B, T, C = x.shape  # batch, time, channels (n_embd)
        H, H_kv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([H * D, H_kv * D, H_kv * D], dim=2)
        q = q.view(B, T, H, D)
        k = k.view(B, T, H_kv, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, H_kv, D).transpose(1, 2)  # (B, heads, T, D)
        if rope is not None:
            cos, sin = rope  # (T, D/2), or (B, 1, T, D/2) with per-token positions, for these T tokens
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, H_kv, T_past + T, D)
        dropout_p = self.dropout if self.training else 0.0
        T_k = k.size(2)
        if self.attn == "triton" and T_k == T and mask is None:
            attention, _, _ = _triton_kernels()
            y = attention.attention(q, k, v, causal=True)
        elif self.attn == "naive":
            rep = H // H_kv  # each key/value head serves `rep` query heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            y = naive_attention(q, k, v, causal_mask(T, T_k, x.device) if mask is None else mask, dropout_p)
        else:
            # SDPA's is_causal aligns the mask to the top-left corner, right only when T_q == T_k; a single
            # decoded token sees every cached key, and a chunk after a cache needs the explicit offset mask.
            # triton lands here too while decoding with a cache (the kernel takes T_q == T_k only) and with
            # document masks (the kernel knows only the causal mask; on a GPU, torch's flex_attention with a
            # block mask could skip the masked tiles instead, not built here). On the CPU at the mini preset
            # the bool mask trains within noise of is_causal, and a float additive mask was no faster.
            if mask is None:
                mask = None if T_k == T or T == 1 else causal_mask(T, T_k, x.device)
                is_causal = T_k == T
            else:
                is_causal = False  # the document mask already holds causality
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                               is_causal=is_causal, enable_gqa=(H != H_kv))
        y = y.transpose(1, 2).contiguous().view(B, T, H * D)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


# --- parts: MLP and block ---

class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.kind = config.mlp
        hidden = config.mlp_hidden
        if hidden is None:
            # SwiGLU has three matrices instead of two, so 8/3 * n_embd keeps the parameter count of 4 * n_embd.
            hidden = 64 * math.ceil(8 * config.n_embd / 3 / 64) if self.kind == "swiglu" else 4 * config.n_embd
        # For SwiGLU, c_fc makes the value and the gate side by side (one matmul), split in forward.
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.kind == "swiglu" else hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "gelu":
            # The tanh approximation, GPT-2's "gelu_new" (what its weights were trained with), not the exact erf
            # GELU that nn.GELU() and HF's "gelu" compute; they differ by under 1e-3 per activation.
            h = F.gelu(h, approximate="tanh")
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            value, gate = h.chunk(2, dim=-1)
            h = value * F.silu(gate)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, kv_cache=None, mask=None):
        x = x + self.attn(self.ln_1(x), rope, kv_cache, mask)
        x = x + self.mlp(self.ln_2(x))
        return x


# --- sampling ---

def filter_logits(logits, top_k=None, top_p=None):
    """Set to -inf every logit outside the top k and outside the nucleus of probability top_p. logits (B, V).

    The nucleus keeps the smallest set of most likely tokens whose probabilities sum to at least top_p:
    a token is dropped only when the tokens ranked above it already reach top_p, so the token that
    crosses the threshold stays, and the most likely token always survives.
    """
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits.float(), dim=-1)
        mass_above = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked strictly higher
        drop_sorted = mass_above >= top_p
        drop_sorted[:, 0] = False  # the most likely token has nothing above it: with top_p=0 it is all that is left
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw(probs, u):
    """One token id per row of probs (B, V), from uniforms u (B, 1) in [0, 1): the first token whose cumulative
    probability passes u times the row's total (the inverse of the CDF). A token of probability 0 is never drawn.

    torch.multinomial gives the same distribution, but on the 2-core CPU it took 188 us for one row of 4,096
    tokens and 2.7 ms for 16 rows, where this takes 22 us and 0.21 ms with the uniforms drawn (measured side by
    side, BENCHMARKS.md): multinomial was a quarter of a 16-row decode step of the mini preset."""
    cdf = probs.cumsum(dim=-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (B, 1)


# A temperature below this samples greedily: logits / 1e-40 overflow to inf and the softmax to NaN (vLLM's bound).
GREEDY_BELOW = 1e-5


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id per row from logits (B, V); temperature 0 (or below GREEDY_BELOW) means greedy (argmax)."""
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1, keepdim=True)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    u = torch.rand(logits.size(0), 1, generator=generator, device=logits.device)
    return draw(F.softmax(logits, dim=-1), u)  # (B, 1)


# --- the GPT ---

# Peak dense bf16 tensor-core FLOP/s per GPU, from the vendors' datasheets (without sparsity).
# A key matches when its words appear, in order and whole, among the words of torch.cuda.get_device_name
# ("NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB"): "L4" is not read inside "L40S", nor "H200" inside "GH200".
# When several keys match ("H100" and "H100 PCIe"), the one with the most words wins, so order does not matter.
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),     # SXM
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("L40", 181e12),
    ("L40S", 362e12),
    ("RTX 4090", 165e12),
]


def _words(name):
    return name.replace("-", " ").replace("_", " ").split()


def peak_flops(device_name):
    """Peak bf16 FLOP/s of a GPU by name, or None when it is not in the table (never a guess)."""
    words = _words(device_name)
    best = None
    for key, flops in PEAK_BF16_FLOPS:
        k = _words(key)
        found = any(words[i:i + len(k)] == k for i in range(len(words) - len(k) + 1))
        if found and (best is None or len(k) > best[0]):
            best = (len(k), flops)
    return best[1] if best else None


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # one tensor, two uses
        if config.pos == "rope":
            cos, sin = rope_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta)
            # Not saved in checkpoints (persistent=False): they are a function of the config.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.grad_checkpointing = False  # recompute each block during backward: less memory, ~30% more compute
        self.apply(self._init_weights)
        # GPT-2 paper, section 2.3: residual projections scaled by 1/sqrt(number of residual layers), two per block.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, reduction="mean", kv_cache=None, pos=None, doc=None, last_only=False):
        """idx (B, T) token ids -> (logits (B, T, V), loss).

        targets (B, T) with -1 where no loss is wanted; reduction "mean" (over counted tokens) or "sum"
        (a trainer divides by the global count of targets != -1). With kv_cache, idx holds only the new
        tokens, which go into the slots after the cached ones. With kernels="triton" and targets, the
        fused loss never builds the logits and None is returned in their place.

        pos (B, T) long: the position of each token, each below block_size (packed documents restart at
        0, left-padded prompts count from their first real token). None = slots start..start+T-1, where
        start = kv_cache.pos (0 without a cache).
        doc (B, T) integer ids: a token attends only to earlier-or-same slots with the same id (packing
        several documents per row; padding given its own id). With kv_cache the ids are stored with the
        keys, so later tokens are masked against the cached ones. None = plain causal attention through
        the fast path (SDPA's is_causal, or the Triton kernel); attn="triton" runs SDPA when doc is given.
        last_only (without targets): logits of the last position only, (B, 1, V). Generation needs no more,
        and the output layer is a large share of a small model's FLOPs over a whole prompt.
        """
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        mask = None
        if kv_cache is not None and kv_cache.lens is not None:
            pos, mask = self._rows_ahead(kv_cache, T, pos, doc)
        elif start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}")
        elif kv_cache is not None:
            kv_cache.doc[:, start:start + T] = 0 if doc is None else doc
        if doc is not None:
            # One mask for all layers and heads: (B, 1, T, T_past + T).
            mask = document_mask(doc, kv_cache.doc[:, :start + T] if kv_cache is not None else doc)
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device) if pos is None else pos)
        elif pos is None:
            rope = self.rope_cos[start:start + T], self.rope_sin[start:start + T]  # (T, D/2)
        else:
            rope = self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)  # (B, 1, T, D/2): over heads
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, rope, None, mask, use_reentrant=False)
            else:
                x = block(x, rope, kv_cache, mask)
        x = self.transformer.ln_f(x)
        if kv_cache is not None and kv_cache.lens is not None:
            kv_cache.lens += T  # in place: a cache from rows() advances the rows of the cache it came from
        elif kv_cache is not None:
            kv_cache.pos += T

        if targets is None:
            return self._logits(x[:, -1:] if last_only else x), None
        if self.config.kernels == "triton" and self.config.logit_softcap is None:
            _, _, cross_entropy = _triton_kernels()
            h, weight = x.view(B * T, -1), self.lm_head.weight
            if torch.is_autocast_enabled(h.device.type):  # autocast does not reach inside the kernel: cast here
                dtype = torch.get_autocast_dtype(h.device.type)
                h, weight = h.to(dtype), weight.to(dtype)
            loss = cross_entropy.linear_cross_entropy(h, weight, targets.reshape(-1), ignore_index=-1,
                                                      reduction=reduction)
            return None, loss
        logits = self._logits(x)
        loss = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(-1), ignore_index=-1,
                               reduction=reduction)
        return logits, loss

    def _rows_ahead(self, cache, T, pos, doc):
        """For a per-row cache: each row's T new tokens go to slots lens[row].. (cache.slots), which are also
        their positions; the keys in use are the first cache.end slots. -> (pos, mask): the mask is None when
        every row has the same length (plain causal attention then sees exactly the right keys), else
        (B, 1, T, end), True where a key's slot is at or before the query's."""
        if doc is not None:
            raise ValueError("a per-row KV cache keeps no document ids: give each document its own row")
        lo, hi = cache.lens.aminmax()
        lo, hi = int(lo), int(hi)
        if hi + T > min(cache.max_len, self.config.block_size):
            raise ValueError(f"a row of {hi} cached tokens has no room for {T} more: the cache holds "
                             f"{min(cache.max_len, self.config.block_size)}")
        cache.slots = cache.lens[:, None] + torch.arange(T, device=cache.lens.device)  # (B, T)
        cache.end = hi + T
        mask = None
        if lo != hi:
            keys = torch.arange(cache.end, device=cache.lens.device)
            mask = (keys[None, None, :] <= cache.slots[:, :, None]).unsqueeze(1)  # (B, 1, T, end)
        return (cache.slots if pos is None else pos), mask

    def _logits(self, x):
        logits = self.lm_head(x)
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap  # Gemma 2: cap * tanh(logits / cap), smooth and bounded
            logits = cap * torch.tanh(logits / cap)
        return logits

    # --- generation ---

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_tokens=None, seed=None,
                 use_cache=True, on_token=None, n=1):
        """Append up to max_new_tokens sampled tokens to idx (B, T) and return the longer (B, T') tensor.

        With the KV cache the prompt is run once (prefill), then each step feeds one token. When the
        window of block_size tokens is full, the step recomputes the last block_size tokens instead,
        which is what use_cache=False does at every step. Generation stops early once every row has
        produced one of stop_tokens; rows that stopped are padded with the token they stopped on.

        idx may also be a list of prompts (lists of token ids, of any lengths). They are left-padded into
        one batch (left_pad: padding has its own document id, positions count from each row's first real
        token), and a list comes back: the new tokens of each row, up to and including its stop token when
        it produced one. Rows that stopped are fed padding from then on. max_new_tokens is clipped so the
        longest prompt plus the new tokens fit in block_size: there is no sliding window for a list (the
        padding would have to slide too). Greedy rows equal what each prompt gives alone.

        on_token, when given, is called after every step with a list of B ints: each row's new token, or
        None for a row that had already stopped. A chat streams its answer through it.

        n > 1 samples n continuations of every prompt from one prefill: the prompt is run once, then its
        logits, cache and tokens are copied to n consecutive rows (B -> B*n rows, row i*n + j is sample j
        of prompt i). With one seed this gives the same samples as passing each prompt n times (GRPO's
        G answers per prompt, rlhf.py), for a prefill n times smaller.
        """
        was_training = self.training
        self.eval()  # no dropout; restored in `finally`, also when on_token raises to stop a generation
        try:
            cfg, block = self.config, self.config.block_size
            as_list = isinstance(idx, (list, tuple))
            doc = pos = None  # (B, T) each for a list of prompts; None keeps a tensor on the plain causal path
            if as_list:
                idx, doc, pos = left_pad(idx, self.transformer.wte.weight.device)
                if idx.size(1) > block:
                    raise ValueError(f"the longest prompt has {idx.size(1)} tokens, more than block_size={block}")
                max_new_tokens = min(max_new_tokens, block - idx.size(1))
            prompt_len = idx.size(1)
            generator = None
            if seed is not None:
                generator = torch.Generator(device=idx.device).manual_seed(seed)
            stop = torch.tensor(sorted(stop_tokens or []), device=idx.device, dtype=idx.dtype)
            done = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)
            cache = None
            for _ in range(max_new_tokens):
                if use_cache and cache is not None and cache.pos < block:
                    logits, _ = self(idx[:, -1:], kv_cache=cache, pos=_last(pos, 1), doc=_last(doc, 1))
                else:
                    window = idx[:, -block:]
                    if use_cache:
                        # A list never slides, so its cache needs only the slots it will fill: at 256 prompts a
                        # block_size cache would be mostly zeros to allocate.
                        max_len = prompt_len + max_new_tokens if as_list else block
                        cache = KVCache(cfg.n_layer, idx.size(0), cfg.n_kv_head, max_len, cfg.n_embd // cfg.n_head,
                                        idx.device, self.transformer.wte.weight.dtype)
                    # prefill, or a full recompute
                    logits, _ = self(window, kv_cache=cache, pos=_last(pos, block), doc=_last(doc, block),
                                     last_only=True)
                    if n > 1:  # after the first prefill only: from here on the batch has B*n rows
                        logits, idx, done = (t.repeat_interleave(n, dim=0) for t in (logits, idx, done))
                        doc, pos = (None if t is None else t.repeat_interleave(n, dim=0) for t in (doc, pos))
                        if cache is not None:
                            cache.repeat_rows(n)
                        n = 1
                # Only ids below n_tokens are tokens: the rows above are padding, never trained as targets, that
                # the tokenizer cannot decode. Every sampling path (chat, serve, eval, DPO and RL samples) is here.
                next_id = sample_next(logits[:, -1, :cfg.n_tokens], temperature, top_k, top_p, generator)  # (B, 1)
                if len(stop):
                    # A row that stopped repeats its stop token (tensor input) or is fed padding, token 0 (a list).
                    next_id = torch.where(done, idx[:, -1:] if doc is None else torch.zeros_like(next_id), next_id)
                if doc is not None:
                    doc = torch.cat([doc, (~done).long()], dim=1)     # id 1 for a real token, 0 for padding
                    pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)
                if on_token is not None:
                    on_token([None if d else t for d, t in zip(done[:, 0].tolist(), next_id[:, 0].tolist())])
                if len(stop):
                    done = done | torch.isin(next_id, stop)
                idx = torch.cat([idx, next_id], dim=1)
                if len(stop) and bool(done.all()):
                    break
            if not as_list:
                return idx
            new, real = idx[:, prompt_len:].tolist(), doc[:, prompt_len:].bool().tolist()  # real: not padding
            return [[t for t, is_real in zip(row, row_real) if is_real] for row, row_real in zip(new, real)]
        finally:
            self.train(was_training)

    # --- vocabulary ---

    def resize_vocab(self, new_size):
        """Make the ids below new_size tokens, for tokens the tokenizer lacks (chat markers added to GPT-2's).

        The new tokens take the padding rows above config.n_tokens first (train.py pads the vocabulary on a
        GPU), and wte gets new rows when those are too few, and so does lm_head when untied (tied stays one
        tensor). The old rows, and so the logits of old tokens on old inputs, are unchanged; config.n_tokens
        and config.vocab_size follow. Make the optimizer after this: the parameters are new tensors.
        """
        old_size, rows = self.config.n_tokens, max(self.config.vocab_size, new_size)
        if new_size < old_size:
            raise ValueError(f"resize_vocab({new_size}) would drop tokens: the vocabulary already has {old_size}")
        if new_size == old_size:
            return  # keep the same parameter tensors (an optimizer made earlier still holds them)
        generator = torch.Generator().manual_seed(old_size)  # the same base always grows the same rows

        def grown(weight):
            # New rows start near the mean of the old ones (Hewitt 2021, "Initializing new word embeddings for
            # pretrained language models"): a new token's logit h . mean(W) is then exactly the average of the
            # old logits, so it starts near the others. A random row would give a logit near 0, which can sit
            # far above a trained model's typical (negative) logits: the new token would take over sampling
            # and the first updates would be spent pushing it down. Each new row also gets its own noise, a
            # tenth of the old rows' spread in each dimension: rows that start equal get equal logits, and a
            # fine-tuning that trains them little could not tell <|end|> from <|system|>.
            old = weight.detach()[:old_size].float()                        # the tokens' rows, never padding
            noise = torch.randn(new_size - old_size, old.size(1), generator=generator).to(old.device)
            new = (old.mean(dim=0) + 0.1 * old.std(dim=0) * noise).to(weight.dtype)  # (new_size - old_size, C)
            kept = weight.detach()[new_size:]                                # padding left above the new tokens
            return nn.Parameter(torch.cat([weight.detach()[:old_size], new, kept]), requires_grad=weight.requires_grad)

        wte = self.transformer.wte
        wte.weight, wte.num_embeddings = grown(wte.weight), rows
        self.lm_head.weight = wte.weight if self.config.tie_embeddings else grown(self.lm_head.weight)
        self.lm_head.out_features = rows
        self.config.vocab_size, self.config.n_tokens = rows, new_size

    # --- size, FLOPs and MFU ---

    def num_params(self, non_embedding=False):
        """Parameters, each shared tensor counted once; non_embedding leaves out wte and wpe (Kaplan et al.)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel()
            if self.transformer.wpe is not None:
                n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6N + 12 * n_layer * n_head * head_dim * seq_len.

        The convention of PaLM (Chowdhery et al. 2022, appendix B), also nanoGPT's: N counts the
        parameters that take part in a matmul (the output projection, not the position table or the
        embedding lookup), each costing 2 FLOPs forward and 4 backward; the second term is the
        attention scores and weighted sum over the full T x T square (causal skipping not deducted).
        """
        cfg = self.config
        n = self.num_params()
        if self.transformer.wpe is not None:
            n -= self.transformer.wpe.weight.numel()
        if not cfg.tie_embeddings:
            n -= self.transformer.wte.weight.numel()  # a lookup, not a matmul; lm_head is counted
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * seq_len

    def estimate_mfu(self, tokens_per_sec, device, seq_len=None):
        """Model FLOPs utilisation: achieved training FLOP/s over the GPU's peak bf16 FLOP/s; None if unknown."""
        device = torch.device(device)
        if device.type != "cuda":
            return None
        peak = peak_flops(torch.cuda.get_device_name(device))
        if peak is None:
            return None
        return tokens_per_sec * self.flops_per_token(seq_len or self.config.block_size) / peak

    # --- GPT-2 weights ---

    @classmethod
    def from_pretrained(cls, name_or_dir, **overrides):
        """A GPT with the weights of a Hugging Face GPT-2 checkpoint: a local directory written by
        `save_pretrained`, or a hub name such as "gpt2" where the network allows.

        HF's GPT-2 stores its linear layers as Conv1D, whose weight is the transpose of nn.Linear's,
        so those four matrices are copied transposed; everything else is a straight copy by name.
        """
        try:
            from transformers import GPT2LMHeadModel
        except ImportError:
            raise ImportError("GPT.from_pretrained needs transformers: pip install -r requirements-dev.txt") from None
        if os.path.isdir(name_or_dir):
            config_path = os.path.join(name_or_dir, "config.json")
            model_type = None
            if os.path.exists(config_path):
                with open(config_path) as f:
                    model_type = json.load(f).get("model_type")
            if model_type != "gpt2":
                raise ValueError(f"{name_or_dir} is not a GPT-2 checkpoint (config.json model_type={model_type!r}, "
                                 f"expected 'gpt2'); give a directory written by GPT2LMHeadModel.save_pretrained")
        try:
            hf = GPT2LMHeadModel.from_pretrained(name_or_dir)
        except OSError as e:  # not a directory, and the hub is out of reach or has no such model
            raise OSError(f"could not load GPT-2 weights {name_or_dir!r}: not a local directory and the hub "
                          f"did not answer ({type(e).__name__}); give a directory written by save_pretrained") from e
        hc = hf.config
        # Every GPT2Config field that changes what the model computes is either honoured below (sizes, n_inner,
        # layer_norm_epsilon, tie_word_embeddings) or refused here by name: loading it anyway would give a model
        # that runs and computes something else. reorder_and_upcast_attn only changes the float32 rounding.
        if hc.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{name_or_dir}: activation {hc.activation_function!r} is not GPT-2's tanh GELU")
        refused = {"scale_attn_weights": (hc.scale_attn_weights, True),  # False: no 1/sqrt(head_dim) in attention
                   "scale_attn_by_inverse_layer_idx": (hc.scale_attn_by_inverse_layer_idx, False),  # 1/(layer+1)
                   "add_cross_attention": (hc.add_cross_attention, False)}  # an encoder-decoder block
        for field, (got, want) in refused.items():
            if got != want:
                raise ValueError(f"{name_or_dir}: {field}={got!r} is not computed by forge's GPT (needs {want!r})")
        config = GPTConfig(vocab_size=hc.vocab_size, block_size=hc.n_positions, n_layer=hc.n_layer, n_head=hc.n_head,
                           n_embd=hc.n_embd, norm_eps=hc.layer_norm_epsilon, bias=True, mlp_hidden=hc.n_inner,
                           tie_embeddings=hc.tie_word_embeddings, **overrides)
        model = cls(config)
        theirs = hf.state_dict()
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        with torch.no_grad():
            for name, p in model.state_dict().items():
                src = theirs[name]
                p.copy_(src.t() if name.endswith(transposed) else src)
        return model


# --- continuous batching ---
# GPT.generate decodes a batch whose rows start together and stay until the last one is done. A server's
# requests arrive and finish at any time, and decoding them one after another reads every weight once per token
# of each request. Continuous batching (Yu et al. 2022, "Orca") decodes every active sequence in one forward per
# step, and lets sequences join and leave between two steps: the weights are read once per step for all of them.
# On a CPU or a GPU a small batch costs about what one row costs (the step is spent reading weights and in
# Python, not in arithmetic), so the tokens per second grow nearly with the batch. serve.py runs its requests
# through this; anything that samples many prompts of different lengths can too.

class Sequence:
    """One sequence being decoded: its sampling settings and random generator, and the tokens sampled so far
    (the last one not yet fed to the model). `row` is its row of the batch's cache, None once removed."""

    def __init__(self, temperature, top_k, top_p, generator):
        temperature = temperature if temperature >= GREEDY_BELOW else 0  # greedy, as in sample_next
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator
        self.tokens, self.row = [], None


class DecodeBatch:
    """Sequences decoded together, each at its own length, joining and leaving between steps.

        batch = DecodeBatch(model, max_rows=16)
        a = batch.add(prompt_ids, temperature=0)[0]   # prefill; a.tokens holds its first token
        batch.step()                                  # one forward for every sequence: each gets one more token
        batch.remove(a)                               # its row is free for the next add

    The cache is per row (KVCache(per_row=True)): a sequence's tokens sit in its row at slots equal to their
    positions, and a step feeds each row its last token at slot lens[row], masked to see only its own slots.
    Rows in use are always the first len(batch): remove moves the last sequence into the freed row, so a step
    computes no empty rows. What a sequence samples does not depend on the others: the same logits up to float
    rounding, and its own generator. The model is put in eval mode (no dropout) and stays there.
    """

    def __init__(self, model, max_rows, max_len=None):
        cfg, weight = model.config, model.transformer.wte.weight
        self.model, self.max_rows = model.eval(), max_rows
        self.cache = KVCache(cfg.n_layer, max_rows, cfg.n_kv_head, max_len or cfg.block_size, cfg.n_embd // cfg.n_head,
                             weight.device, weight.dtype, per_row=True)
        self.seqs = []  # seqs[i] is in row i

    def __len__(self):
        return len(self.seqs)

    @torch.no_grad()
    def add(self, prompt, n=1, temperature=1.0, top_k=None, top_p=None, seed=None):
        """Prefill prompt (a list of token ids) once into n free rows and sample each one's first token.

        -> the n new Sequences. With a seed, sequence j draws from a generator seeded seed + j: its tokens are
        those of the same prompt added alone with seed + j, whatever else the batch holds."""
        if not prompt:
            raise ValueError("the prompt is empty: give it at least one token")
        if len(self.seqs) + n > self.max_rows:
            raise ValueError(f"{n} new sequences do not fit: {self.max_rows - len(self.seqs)} of {self.max_rows} "
                             f"rows are free; remove a sequence first")
        row, device = len(self.seqs), self.cache.lens.device
        view = self.cache.rows(row, row + 1)
        view.lens.zero_()
        logits, _ = self.model(torch.tensor([prompt], device=device), kv_cache=view, last_only=True)
        new = []
        for j in range(n):
            if j:
                self.cache.copy_row(row, row + j)
            generator = None if seed is None else torch.Generator(device=device).manual_seed(seed + j)
            seq = Sequence(temperature, top_k, top_p, generator)
            seq.row = row + j
            new.append(seq)
        self.seqs += new
        self._sample(new, logits[:, -1].expand(n, -1))
        return new

    @torch.no_grad()
    def step(self):
        """One forward for every sequence, fed its last token; each samples its next one (appended to .tokens)."""
        if not self.seqs:
            return
        last = torch.tensor([[s.tokens[-1]] for s in self.seqs], device=self.cache.lens.device)  # (B, 1)
        logits, _ = self.model(last, kv_cache=self.cache.rows(0, len(self.seqs)))
        self._sample(self.seqs, logits[:, -1])

    def remove(self, seq):
        """Free seq's row; the last sequence moves into it (its cache row copied), so rows in use stay first."""
        last = self.seqs.pop()
        if last is not seq:
            self.cache.copy_row(last.row, seq.row)
            last.row = seq.row
            self.seqs[seq.row] = last
        seq.row = None

    def _sample(self, seqs, logits):
        """Each sequence's next token from its row of logits (B, V), with its own settings and generator: what
        sample_next gives that row alone, computed for all rows at once."""
        logits = logits[:, :self.model.config.n_tokens].float()  # rows above n_tokens are padding (see generate)
        temperatures, device = [s.temperature for s in seqs], logits.device
        if not any(temperatures):
            ids = logits.argmax(dim=-1).tolist()  # all greedy: one call for the batch
        else:
            if len(set(temperatures)) == 1:
                logits = logits / temperatures[0]
            else:  # greedy rows are divided by 1 here and take their argmax below
                logits = logits / torch.tensor([[t or 1.0] for t in temperatures], device=device)
            for i, s in enumerate(seqs):
                if s.top_k is not None or (s.top_p is not None and s.top_p < 1.0):
                    logits[i:i + 1] = filter_logits(logits[i:i + 1], s.top_k, s.top_p)
            if any(s.generator is not None for s in seqs):  # each row's uniform from its own generator
                u = torch.cat([torch.rand(1, 1, generator=s.generator, device=device) for s in seqs])
            else:
                u = torch.rand(len(seqs), 1, device=device)
            ids = draw(F.softmax(logits, dim=-1), u).view(-1).tolist()
            if not all(temperatures):
                greedy = logits.argmax(dim=-1).tolist()  # dividing by 1 moved no argmax
                ids = [g if t == 0 else i for g, i, t in zip(greedy, ids, temperatures)]
        for s, t in zip(seqs, ids):
            s.tokens.append(t)


if __name__ == "__main__":
    torch.manual_seed(0)
    model = GPT(config_from_preset("tiny"))
    print(f"tiny preset: {model.num_params():,} parameters, {model.flops_per_token(64):,} training FLOPs/token")
    out = model.generate(torch.zeros(1, 1, dtype=torch.long), max_new_tokens=16, top_k=50, seed=0)
    print("sampled ids (untrained):", out[0].tolist())
