"""LayerNorm and RMSNorm in Triton, forward and backward: one row per program.

Part of forge's kernels chapter. Run the benchmark on a GPU with `python -m kernels.layernorm`
(or `python bench.py kernels` for the full comparison); the tests run on the CPU through Triton's
interpreter: `python -m pytest -q tests/test_kernels.py`.

The math
--------
A row x of N features is normalised, then scaled and shifted per feature:

    LayerNorm:  mu = mean(x),  rstd = 1 / sqrt(mean((x - mu)^2) + eps),  xhat = (x - mu) * rstd
    RMSNorm:    mu = 0,        rstd = 1 / sqrt(mean(x^2) + eps),          xhat = x * rstd
    y = xhat * w + b                                                      (RMSNorm has no b)

The forward saves mu and rstd per row (two floats), so the backward never recomputes the reductions.

Backward. With dy the gradient of y and g = w * dy (the gradient of xhat), differentiating
xhat = (x - mu) * rstd through mu and rstd gives the well-known formula

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))         LayerNorm
    dx = rstd * (g - xhat * mean(g * xhat))                   RMSNorm (mu is a constant 0)

where the means run over the N features of the same row, so dx is again one row per program.
The parameter gradients are sums over all M rows:

    dw = sum_rows dy * xhat,      db = sum_rows dy

Summing M rows into one N-vector is the only part that crosses rows. The Triton tutorial
(05-layer-norm) lets many programs add into shared partial buffers under a spin lock, so the order
of the additions, and hence the rounding, changes from run to run. Here the reduction is in a fixed
order instead: program p owns a fixed contiguous range of rows, accumulates dw and db for those rows
in registers, and writes its partial sums to row p of a (GROUPS, N) buffer that no other program
touches. After the kernel, `.sum(0)` adds the GROUPS partial rows, again in a fixed order. Same
inputs, same device: bitwise the same gradients, with no atomics and no locks.
"""

import torch
import triton
import triton.language as tl

from kernels import check_device


# --- kernels ---

@triton.jit
def _norm_fwd_kernel(
    X, Y, W, B, MEAN, RSTD,  # x, y (M, N); w, b (N,); mean, rstd (M,) float32
    stride_x, stride_y,  # elements between two rows
    N, eps,
    HAS_BIAS: tl.constexpr, RMS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2^31 for large activations
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N  # BLOCK_N is N rounded up to a power of two
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        mean = 0.0
        xc = x
    else:
        mean = tl.sum(x, axis=0) / N
        xc = tl.where(mask, x - mean, 0.0)  # padded lanes must not add (0 - mean)^2 to the variance
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * w
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _norm_bwd_kernel(
    X, DY, DX, W, MEAN, RSTD,  # x, dy, dx (M, N); w (N,); mean, rstd (M,) float32
    DW_PARTIAL, DB_PARTIAL,  # (GROUPS, N) float32: one partial sum per program
    stride_x, stride_dy, stride_dx,
    M, N, ROWS_PER_PROGRAM,
    HAS_BIAS: tl.constexpr, RMS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    # The accumulators live in registers and start at zero here; each program writes its own row of
    # DW_PARTIAL/DB_PARTIAL exactly once at the end, so those buffers need neither zeroing nor a lock.
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * ROWS_PER_PROGRAM
    row_end = tl.minimum(row_start + ROWS_PER_PROGRAM, M)
    # Row pointers in int64 (row * stride can pass 2^31), advanced by one stride per row.
    x_ptrs = X + row_start.to(tl.int64) * stride_x + cols
    dy_ptrs = DY + row_start.to(tl.int64) * stride_dy + cols
    dx_ptrs = DX + row_start.to(tl.int64) * stride_dx + cols
    for row in range(row_start, row_end):  # a fixed range of rows, visited in a fixed order
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        g = w * dy  # gradient of xhat; zero on padded lanes because w and dy are
        c1 = tl.sum(g * xhat, axis=0) / N
        if RMS:
            dx = (g - xhat * c1) * rstd
        else:
            c2 = tl.sum(g, axis=0) / N
            dx = (g - c2 - xhat * c1) * rstd
        tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        if HAS_BIAS:
            db += dy
        x_ptrs += stride_x
        dy_ptrs += stride_dy
        dx_ptrs += stride_dx
    tl.store(DW_PARTIAL + pid * N + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid * N + cols, db, mask=mask)


# --- autograd ---

def _launch_params(N, element_size):
    """BLOCK_N holds the whole row; more warps for longer rows (as in Triton's tutorial 05)."""
    max_fused = 65536 // element_size  # 64 KiB of row per program: beyond this, registers spill
    BLOCK_N = triton.next_power_of_2(N)
    if BLOCK_N > max_fused:
        raise ValueError(f"layer_norm/rms_norm: rows of {N} features do not fit in one program "
                         f"(at most {max_fused} for this dtype)")
    num_warps = min(max(BLOCK_N // 256, 1), 8)
    return BLOCK_N, num_warps


class _Norm(torch.autograd.Function):
    """LayerNorm (rms=False) or RMSNorm (rms=True) over the last dimension of x."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (M, N): any leading shape becomes rows
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        M, N = x2.shape
        y = torch.empty_like(x2)
        mean = torch.empty(M, dtype=torch.float32, device=x.device)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        BLOCK_N, num_warps = _launch_params(N, x.element_size())
        if M > 0:
            _norm_fwd_kernel[(M,)](
                x2, y, weight, bias if bias is not None else weight, mean, rstd,
                x2.stride(0), y.stride(0), N, eps,
                HAS_BIAS=bias is not None, RMS=rms, BLOCK_N=BLOCK_N, num_warps=num_warps,
            )
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.has_bias, ctx.rms, ctx.shape = bias is not None, rms, shape
        ctx.launch = (BLOCK_N, num_warps)
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        M, N = x2.shape
        dy2 = dy.reshape(M, N)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        # GROUPS programs, each owning a contiguous range of rows. The number depends only on the device
        # and M, so the same call gives the same order of additions every time.
        if x2.is_cuda:
            GROUPS = 4 * torch.cuda.get_device_properties(x2.device).multi_processor_count
        else:
            GROUPS = 4  # interpreter: few programs keep the CPU test fast
        GROUPS = max(1, min(GROUPS, M))
        rows_per_program = triton.cdiv(M, GROUPS) if M > 0 else 0
        dw_partial = torch.zeros(GROUPS, N, dtype=torch.float32, device=x2.device)
        db_partial = torch.zeros(GROUPS, N, dtype=torch.float32, device=x2.device) if ctx.has_bias else None
        BLOCK_N, num_warps = ctx.launch
        if M > 0:
            _norm_bwd_kernel[(GROUPS,)](
                x2, dy2, dx, weight, mean, rstd, dw_partial, db_partial if ctx.has_bias else dw_partial,
                x2.stride(0), dy2.stride(0), dx.stride(0), M, N, rows_per_program,
                HAS_BIAS=ctx.has_bias, RMS=ctx.rms, BLOCK_N=BLOCK_N, num_warps=num_warps,
            )
        # Synchronisation point: the kernel has finished (same stream) before .sum(0) reads the partial
        # rows. .sum(0) over a fixed (GROUPS, N) shape reduces in a fixed order: deterministic.
        dw = dw_partial.sum(0).to(weight.dtype)
        db = db_partial.sum(0).to(weight.dtype) if ctx.has_bias else None
        return dx.reshape(ctx.shape), dw, db, None, None


# --- public functions ---

def _check(name, x, weight, bias):
    floats = (torch.float32, torch.float16, torch.bfloat16)
    for label, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in floats:
            raise ValueError(f"{name}: {label} has dtype {t.dtype}; expected float32, float16 or bfloat16")
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{name}: weight of shape {tuple(weight.shape)} does not match x of shape "
                         f"{tuple(x.shape)}; expected weight of shape ({x.shape[-1] if x.dim() else '?'},)")
    if bias is not None and bias.shape != weight.shape:
        raise ValueError(f"{name}: bias of shape {tuple(bias.shape)} differs from weight {tuple(weight.shape)}")
    check_device(name, x, weight, bias)


def layer_norm(x, weight, bias, eps=1e-5):
    """LayerNorm over the last dimension of x (..., N) with weight (N,) and bias (N,) or None."""
    _check("layer_norm", x, weight, bias)
    return _Norm.apply(x, weight, bias, eps, False)


def rms_norm(x, weight, eps=1e-6):
    """RMSNorm over the last dimension of x (..., N) with weight (N,)."""
    _check("rms_norm", x, weight, None)
    return _Norm.apply(x, weight, None, eps, True)


def layer_norm_ref(x, weight, bias, eps=1e-5):
    """Plain PyTorch LayerNorm, computed in float32 and cast back to x's dtype."""
    x32 = x.float()
    mean = x32.mean(-1, keepdim=True)
    var = (x32 - mean).pow(2).mean(-1, keepdim=True)
    y = (x32 - mean) * torch.rsqrt(var + eps) * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def rms_norm_ref(x, weight, eps=1e-6):
    """Plain PyTorch RMSNorm, computed in float32 and cast back to x's dtype."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype)


# --- benchmark ---

if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("python -m kernels.layernorm benchmarks on a CUDA GPU; none found here. "
                         "The CPU tests are in tests/test_kernels.py.")
    import torch.nn.functional as F
    M, N = 16 * 1024, 768  # GPT-2 small activations: 16 sequences of 1024 tokens
    x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(N, device="cuda", dtype=torch.bfloat16)
    b = torch.zeros(N, device="cuda", dtype=torch.bfloat16)
    for label, fn in (("triton", lambda: layer_norm(x, w, b)), ("torch", lambda: F.layer_norm(x, (N,), w, b))):
        ms = triton.testing.do_bench(fn)
        gbps = 2 * x.numel() * x.element_size() / ms * 1e-6  # read x, write y
        print(f"layer_norm fwd {label:>6}: {ms * 1e3:7.1f} us  {gbps:6.0f} GB/s")
    print("more figures: python bench.py kernels")
