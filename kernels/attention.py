"""Fused multi-head attention in Triton, forward and backward, in the FlashAttention-2 style.

Part of forge's kernels chapter. Run the benchmark on a GPU with `python -m kernels.attention`
(or `python bench.py kernels` for the full comparison); the tests run on the CPU through Triton's
interpreter: `python -m pytest -q tests/test_kernels.py`.

    o = attention(q, k, v, causal=True, scale=None)     q (B, H, T, D), k and v (B, H_kv, T, D)

computes softmax(scale * q @ k^T + mask) @ v per head, where the causal mask hides the keys after
each query, and query head h reads key/value head h // (H / H_kv) (grouped-query attention; H_kv = 1
is multi-query attention).

Why a kernel
------------
The T x T score matrix S = scale * Q K^T of one head at T = 8192 is 64M numbers: writing it to GPU
memory, reading it back for the softmax and again for P @ V costs far more time than the matmuls.
FlashAttention computes the output one tile of BLOCK_M queries at a time and streams the keys and
values through fast on-chip memory in tiles of BLOCK_N, so S never leaves the chip.

Forward: online softmax
-----------------------
For one query row, softmax over all keys needs the row maximum and the sum of exponentials before
any output can be normalised, but only one tile of keys is on chip at a time. The online softmax
keeps a running maximum m, a running sum l and an unnormalised output acc, and rescales them when a
new tile raises the maximum. For a tile of scores s (BLOCK_N,) and values V_j (BLOCK_N, D):

    m_new = max(m, max(s))
    p     = exp(s - m_new)                        (BLOCK_N,), all <= 1: no overflow
    l     = l * exp(m - m_new) + sum(p)
    acc   = acc * exp(m - m_new) + p @ V_j
    m     = m_new

and after the last tile o = acc / l. The kernel saves one number per row for the backward, the
log-sum-exp lse = m + log(l), so that softmax(s) = exp(s - lse) can be recomputed exactly.

Two GPU details. exp(x) is computed as exp2(x * log2(e)), the instruction the hardware has, so the
scores are scaled once by scale * log2(e) and m, lse live in base-2 units. And with a causal mask,
tiles of keys strictly below the diagonal need no mask at all and tiles above it are skipped, so the
loop runs in two stages: the off-diagonal tiles without any masking, then the few tiles that touch the
diagonal (or the end of the sequence) with the mask. For T not a multiple of the tile, and head dims
that are not a power of two (48, 80, 96), loads are masked and the missing entries read as zero:
a zero in the head dim adds nothing to q . k, and masked keys get a score of -inf.

Backward: FlashAttention-2
--------------------------
With P = softmax(S) recomputed from the saved lse, and dO the gradient of O:

    dV = P^T dO
    dP = dO V^T
    dS = P * (dP - Delta),   Delta_i = sum_j P_ij dP_ij = sum_d dO_id O_id    (rowsum(dO * O))
    dQ = scale * dS K
    dK = scale * dS^T Q

Delta needs the whole row of P, but the identity on the right gives it from dO and O in a small
preprocess kernel. Then two kernels, each owning one output so no two programs ever write the same
memory: the dK/dV kernel keeps a tile of keys and values on chip and loops over the query tiles (only
those at or after the keys when causal), and the dQ kernel keeps a tile of queries and loops over the
key tiles. Grouped-query attention: the H / H_kv query heads that share a key/value head all
contribute to its dK and dV. The dK/dV kernel loops over those query heads itself and accumulates in
registers, instead of writing per-query-head dK/dV to memory and summing them afterwards: no extra
(B, H, T, D) buffers, no atomics, the same result every run. The cost is less parallelism when
B * H_kv * T / BLOCK_N is small (multi-query attention on short batches).

Precision: the matmuls accumulate in float32; P and dS are cast to the input dtype before their
matmuls, as in FlashAttention. float32 inputs use full-precision (not TF32) matmuls.
"""
import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import check_device

# Triton reads TRITON_INTERPRET when the kernels below are decorated, so we read it at the same time
# to give the interpreter one small tile configuration instead of a GPU autotuning sweep.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs(gpu_tiles, interpreter_tile):
    """Autotuning candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) on a GPU; one tile in the interpreter."""
    tiles = [interpreter_tile] if _INTERPRET else gpu_tiles
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


# Causal masking needs BLOCK_M % BLOCK_N == 0 in the forward and dQ kernels (the diagonal of a query
# tile is a whole number of key tiles) and BLOCK_N % BLOCK_M == 0 in the dK/dV kernel. The GPU tiles
# follow Triton's tutorial 06 and FlashAttention-2 for H100, kept to those that compile for sm_90
# without register spills at head dim 64 (checked with Triton's bundled ptxas); at head dim 128 the
# dK/dV kernel spills a little in every tile tried, and these are the least affected.
_FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3),
                         (64, 32, 4, 4)], (32, 16, 4, 1))
_DKDV_CONFIGS = _configs([(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 8, 3), (64, 64, 8, 3), (16, 64, 4, 3),
                          (16, 128, 8, 3)], (16, 32, 4, 1))
_DQ_CONFIGS = _configs([(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3)], (32, 16, 4, 1))


# --- forward ---

@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,  # running state (BLOCK_M, BLOCK_D), (BLOCK_M,), (BLOCK_M,); q (BLOCK_M, BLOCK_D)
    K, V, stride_kt, stride_vt,  # this head's keys and values
    offs_m, offs_d, lo, hi, T, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax over the key tiles [lo, hi); MASKED applies the causal and end-of-sequence mask."""
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < T)[:, None] & d_ok[None, :]
        k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base 2
        if MASKED:
            keep = (offs_n < T)[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            s = tl.where(keep, s, -float("inf"))
        # Every row has seen an unmasked key in its first tile, so m_i is finite from then on and
        # exp2(-inf - m_new) = 0 for masked scores.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=["T", "HEAD_DIM", "CAUSAL"])
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,  # q, o (B, H, T, D); k, v (B, H_kv, T, D); lse (B * H, T) float32 in base 2
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    H, GROUP, T, qk_scale,  # GROUP = H // H_kv; qk_scale = scale * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Causal query tiles near the end of the sequence have the most work: start them first so the
    # GPU is not left waiting on a few long programs at the end.
    start_m = tl.num_programs(0) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # int64: b * stride_qb passes 2^31 for large batches
    h = (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + (h // GROUP) * stride_kh
    V += b * stride_vb + (h // GROUP) * stride_vh
    O += b * stride_ob + h * stride_oh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)  # BLOCK_D: HEAD_DIM rounded up to a power of two
    q_mask = (offs_m < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)

    m_i = tl.full((BLOCK_M,), -float("inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if CAUSAL:  # keys before this query tile need no mask; the diagonal tile does; later keys are skipped
        hi_unmasked = start_m * BLOCK_M
        hi = tl.minimum((start_m + 1) * BLOCK_M, T)
    else:  # every key; only the last, partial key tile needs a mask
        hi_unmasked = (T // BLOCK_N) * BLOCK_N
        hi = T
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, offs_d, 0, hi_unmasked,
                                    T, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, False, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, offs_d, hi_unmasked, hi,
                                    T, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, True, DOT_PRECISION)

    acc = acc / l_i[:, None]
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < T)
    tl.store(O + offs_m[:, None] * stride_ot + offs_d[None, :], acc.to(O.dtype.element_ty), mask=q_mask)


# --- backward ---

@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA,  # o, do (B, H, T, D); delta (B * H, T) float32
    stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
    H, T,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Delta_i = sum_d dO_id * O_id, one row per query."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :], mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v,  # accumulators (BLOCK_N, BLOCK_D) float32; this program's keys and values
    Q, DO, LSE, DELTA, stride_qt, stride_dot,  # one query head
    offs_n, offs_d, lo, hi, T, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dV += P^T dO and dK += dS^T Q over the query tiles [lo, hi), all computed transposed (keys on rows)."""
    d_ok = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < T
        mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=mask, other=0.0)  # (BLOCK_M, BLOCK_D)
        do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :], mask=mask, other=0.0)  # (BLOCK_M, BLOCK_D)
        lse = tl.load(LSE + offs_m, mask=m_ok, other=float("inf"))  # (BLOCK_M,); padded queries: P = 0
        delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M), base 2
        if MASKED:  # masked scores become -inf before exp2, so nothing overflows
            keep = m_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            s_t = tl.where(keep, s_t, -float("inf"))
        p_t = tl.math.exp2(s_t - lse[None, :])  # P^T, the softmax recomputed from the saved lse
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M) = (dO V^T)^T
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=["T", "HEAD_DIM", "CAUSAL"])
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,  # q, do (B, H, T, D); k, v, dk, dv (B, H_kv, T, D); lse, delta (B * H, T)
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot, stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
    H, GROUP, T, scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0)
    bh_kv = tl.program_id(1)
    H_KV = H // GROUP
    b = (bh_kv // H_KV).to(tl.int64)
    h_kv = (bh_kv % H_KV).to(tl.int64)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(K + b * stride_kb + h_kv * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D), stays on chip for the whole loop
    v = tl.load(V + b * stride_vb + h_kv * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)

    # Query tiles in three ranges: [lo_diag, hi_diag) touches the diagonal (masked), [lo_full, hi_full) is
    # entirely after these keys and before the end (no mask), [hi_full, T) is the last partial tile (masked).
    if CAUSAL:
        lo_diag = start_n * BLOCK_N
        hi_diag = tl.minimum((start_n + 1) * BLOCK_N, T)
        lo_full = (start_n + 1) * BLOCK_N
    else:
        lo_diag = 0
        hi_diag = 0
        lo_full = 0
    hi_full = tl.maximum((T // BLOCK_M) * BLOCK_M, lo_full)

    for g in range(GROUP):  # every query head that reads this key/value head (grouped-query attention)
        h = h_kv * GROUP + g
        Q_h = Q + b * stride_qb + h * stride_qh
        DO_h = DO + b * stride_dob + h * stride_doh
        LSE_h = LSE + (b * H + h) * T
        DELTA_h = DELTA + (b * H + h) * T
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q_h, DO_h, LSE_h, DELTA_h, stride_qt, stride_dot, offs_n, offs_d,
                                      lo_diag, hi_diag, T, qk_scale, HEAD_DIM, BLOCK_M, CAUSAL, True, DOT_PRECISION)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q_h, DO_h, LSE_h, DELTA_h, stride_qt, stride_dot, offs_n, offs_d,
                                      lo_full, hi_full, T, qk_scale, HEAD_DIM, BLOCK_M, CAUSAL, False, DOT_PRECISION)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q_h, DO_h, LSE_h, DELTA_h, stride_qt, stride_dot, offs_n, offs_d,
                                      hi_full, T, T, qk_scale, HEAD_DIM, BLOCK_M, CAUSAL, True, DOT_PRECISION)

    dk *= scale  # S = scale * Q K^T
    tl.store(DK + b * stride_dkb + h_kv * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + h_kv * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse, delta,  # dq (BLOCK_M, BLOCK_D) float32; this program's queries, dO, lse and Delta
    K, V, stride_kt, stride_vt,  # the key/value head of this query head
    offs_m, offs_d, lo, hi, T, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dQ += dS K over the key tiles [lo, hi) (unscaled: the caller multiplies by scale once)."""
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < T)[:, None] & d_ok[None, :]
        k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base 2
        if MASKED:
            keep = (offs_n < T)[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            s = tl.where(keep, s, -float("inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=["T", "HEAD_DIM", "CAUSAL"])
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,  # q, do, dq (B, H, T, D); k, v (B, H_kv, T, D); lse, delta (B * H, T)
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot, stride_dqb, stride_dqh, stride_dqt,
    H, GROUP, T, scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.num_programs(0) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)  # longest first
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    K += b * stride_kb + (h // GROUP) * stride_kh
    V += b * stride_vb + (h // GROUP) * stride_vh
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :], mask=mask,
                other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :], mask=mask,
                 other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=m_ok, other=float("inf"))  # padded queries: P = 0
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if CAUSAL:  # the same two stages as the forward
        hi_unmasked = start_m * BLOCK_M
        hi = tl.minimum((start_m + 1) * BLOCK_M, T)
    else:
        hi_unmasked = (T // BLOCK_N) * BLOCK_N
        hi = T
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m, offs_d, 0, hi_unmasked, T,
                            qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, False, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m, offs_d, hi_unmasked, hi, T,
                            qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, True, DOT_PRECISION)
    dq *= scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask)


# --- autograd ---

class _Attention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        B, H, T, D = q.shape
        H_kv = k.shape[1]
        o = torch.empty_like(q)  # same memory layout as q: a (B, T, H, D) layout stays free to transpose
        lse = torch.empty(B * H, T, dtype=torch.float32, device=q.device)
        consts = dict(HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), CAUSAL=causal,
                      # full-precision fp32 matmuls, not TF32; the setting does not affect fp16/bf16
                      DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
        qk_scale = scale * 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)
        _attn_fwd_kernel[grid](q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
                               H, H // H_kv, T, qk_scale, **consts)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.qk_scale, ctx.consts = scale, qk_scale, consts
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        H_kv = k.shape[1]
        if do.stride(-1) != 1:
            do = do.contiguous()
        consts = ctx.consts
        delta = torch.empty_like(lse)
        PRE_BLOCK = 64 if do.is_cuda else 32
        _attn_bwd_preprocess_kernel[(triton.cdiv(T, PRE_BLOCK), B * H)](
            o, do, delta, *o.stride()[:3], *do.stride()[:3], H, T,
            HEAD_DIM=D, BLOCK_D=consts["BLOCK_D"], BLOCK_M=PRE_BLOCK,
        )
        # Kernels on one stream run in order: delta is complete before the two kernels below read it,
        # and those two only read q, k, v, do, lse, delta and write disjoint outputs, so they need no sync.
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H_kv)
        _attn_bwd_dkdv_kernel[grid](
            q, k, v, do, lse, delta, dk, dv, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
            *dk.stride()[:3], *dv.stride()[:3], H, H // H_kv, T, ctx.scale, ctx.qk_scale, **consts,
        )
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)
        _attn_bwd_dq_kernel[grid](
            q, k, v, do, lse, delta, dq, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
            *dq.stride()[:3], H, H // H_kv, T, ctx.scale, ctx.qk_scale, **consts,
        )
        return dq, dk, dv, None, None


# --- public function ---

def attention(q, k, v, causal=True, scale=None):
    """softmax(scale * q @ k^T [+ causal mask]) @ v with q (B, H, T, D) and k, v (B, H_kv, T, D).

    H must be a multiple of H_kv; 16 <= D <= 128; float32, float16 or bfloat16; scale defaults to
    1 / sqrt(D). Queries and keys are the same positions (self-attention: no KV cache).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: expected q (B, H, T, D) and k, v (B, H_kv, T, D), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (T, D):
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must both be (B={B}, H_kv, T={T}, "
                         f"D={D}) to match q {tuple(q.shape)}")
    if H_kv == 0 or H % H_kv != 0:
        raise ValueError(f"attention: {H} query heads are not a multiple of {H_kv} key/value heads")
    if not 16 <= D <= 128:
        raise ValueError(f"attention: head dim {D} is not supported; the kernel handles 16 to 128")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"attention: q, k, v must share one dtype among float32, float16, bfloat16; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if B == 0 or T == 0:
        raise ValueError(f"attention: empty input q {tuple(q.shape)}")
    check_device("attention", q, k, v)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # the kernels need unit stride in D
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    return _Attention.apply(q, k, v, bool(causal), scale)


def attention_ref(q, k, v, causal=True, scale=None):
    """Plain PyTorch attention with the T x T scores materialised, computed in float32."""
    B, H, T, D = q.shape
    group = H // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, H, T, D): query head h reads key head h // group
    v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, T, T)
    if causal:
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (F.softmax(s, dim=-1) @ v.float()).to(q.dtype)


# --- benchmark ---

if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("python -m kernels.attention benchmarks on a CUDA GPU; none found here. "
                         "The CPU tests are in tests/test_kernels.py.")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    B, H, D = 4, 16, 64
    for T in (1024, 4096):
        q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * B * H * T * T * D / 2  # two matmuls of 2*T*T*D FLOPs, half of them under the causal mask
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            for label, fn in (("triton", lambda: attention(q, k, v)),
                              ("sdpa-flash", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))):
                ms = triton.testing.do_bench(fn)
                print(f"attention fwd T={T:5d} {label:>10}: {flops / ms * 1e-9:6.1f} TFLOP/s")
    print("more figures: python bench.py kernels")
