"""Fused linear cross-entropy in Triton: the loss of h @ weight.T without the full logits.

Part of forge's kernels chapter. Run the benchmark on a GPU with `python -m kernels.cross_entropy`
(or `python bench.py kernels` for the full comparison); the tests run on the CPU through Triton's
interpreter: `python -m pytest -q tests/test_kernels.py`.

Why
---
The last layer of a GPT maps N hidden states h (N, C) to logits z = h @ W.T (N, V). At GPT-2 sizes
(N = 8 x 1024 tokens, V = 50304) z alone is 412M numbers: 0.8 GB in bfloat16, and the usual
`F.cross_entropy(z.float(), y)` makes a float32 copy and a float32 gradient of the same size on top.
Yet the loss needs only one number per row, and the gradients dh and dW are small. So we walk over
the rows in chunks, build the logits of one chunk, turn them into their gradient in place, push that
gradient through the two matmuls, and drop the chunk (the Liger-Kernel recipe).

The math
--------
For one row with logits z (V,) and target y:

    lse  = log sum_j exp(z_j) = m + log sum_j exp(z_j - m),    m = max_j z_j    (no overflow)
    loss = lse - z_y
    dloss/dz_j = softmax(z)_j - [j == y] = exp(z_j - lse) - [j == y]

The kernel reads a row twice: a first pass computes m and the sum with the online update
(m' = max(m, max(block)), d' = d * exp(m - m') + sum exp(block - m')), one block of the vocabulary at
a time; the second pass overwrites each logit with its gradient, times a per-row scale s_i:
1/(number of non-ignored rows) for reduction="mean", 1 for "sum". Ignored rows (target ==
ignore_index) get loss 0 and gradient 0. Then, with G the (chunk, V) gradient of the logits:

    dh[chunk] = G @ W            dW += G.T @ h[chunk]       (float32 accumulator across chunks)

For "mean" and "sum" all of this happens in the forward, so the backward only multiplies the saved
dh and dW by the incoming scalar gradient. For "none" the incoming gradient is a vector, one scale
per row, that is not known during the forward, so the backward runs the same chunk loop again with
s_i = grad_output[i].

Conventions: the result is float32 (like the reference, which upcasts the logits). With reduction
"mean" and every target ignored the loss is nan (0/0) and the gradients are zero, exactly as
F.cross_entropy. A target outside [0, V) that is not ignore_index gives a nan loss and nan
gradients for its row instead of reading out of bounds. The matmuls run in the dtype of h and weight
(which must match): autocast does not reach inside, so cast them before the call if you want bf16.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import check_device

# Upper bound on the elements of one chunk of logits: 2^26 = 128 MB in bf16. At V = 50304 that is
# 1334 rows per chunk: big enough for efficient matmuls, small next to the full (N, V) logits.
MAX_CHUNK_ELEMENTS = 2 ** 26


# --- kernel ---

@triton.jit
def _ce_loss_grad_kernel(
    LOGITS,  # (rows, V), row stride stride_row; overwritten by the scaled gradient when HAS_GRAD
    stride_row,
    TARGETS,  # (rows,) int64
    LOSS,  # (rows,) float32
    SCALE, stride_scale,  # per-row gradient scale, float32; stride 0 broadcasts one value
    V, ignore_index,
    HAS_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * V passes 2^31 for large chunks
    LOGITS += row * stride_row
    target = tl.load(TARGETS + row)
    cols = tl.arange(0, BLOCK_V)

    if target == ignore_index:  # loss 0, gradient 0
        tl.store(LOSS + row, 0.0)
        if HAS_GRAD:
            for start in range(0, V, BLOCK_V):
                tl.store(LOGITS + start + cols, tl.zeros((BLOCK_V,), dtype=LOGITS.dtype.element_ty),
                         mask=start + cols < V)
        return

    # Pass 1: running max m and running sum d of exp(z - m), one block of the vocabulary at a time.
    m = -float("inf")
    d = 0.0
    for start in range(0, V, BLOCK_V):
        z = tl.load(LOGITS + start + cols, mask=start + cols < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)

    # A target outside [0, V) makes the row nan instead of reading another row's memory.
    in_range = (target >= 0) & (target < V)
    z_target = tl.load(LOGITS + target, mask=in_range, other=0.0).to(tl.float32)
    z_target = tl.where(in_range, z_target, float("nan"))
    tl.store(LOSS + row, lse - z_target)

    # Pass 2: overwrite the logits with (softmax - onehot) * scale. Each program touches only its row,
    # and it read z_target above before any store, so no synchronisation is needed.
    if HAS_GRAD:
        scale = tl.load(SCALE + row * stride_scale)
        scale = tl.where(in_range, scale, float("nan"))
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            z = tl.load(LOGITS + start + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(z - lse)
            grad = tl.where(start + cols == target, p - 1.0, p) * scale
            tl.store(LOGITS + start + cols, grad.to(LOGITS.dtype.element_ty), mask=mask)


# --- autograd ---

def _chunked_loss_and_grads(h, weight, targets, ignore_index, scale, need_grad):
    """Loss per row (N,) float32 and, when need_grad, dh (N, C) and dW (V, C) float32.

    h (N, C), weight (V, C), targets (N,) int64, scale (N,) float32 (may have stride 0).
    """
    N, C = h.shape
    V = weight.shape[0]
    loss = torch.empty(N, dtype=torch.float32, device=h.device)
    dh = torch.empty_like(h) if need_grad else None
    dweight = torch.zeros(V, C, dtype=torch.float32, device=h.device) if need_grad else None
    chunk = max(1, min(N, MAX_CHUNK_ELEMENTS // V))
    BLOCK_V = min(triton.next_power_of_2(V), 4096 if h.is_cuda else 64)  # the interpreter likes small blocks
    num_warps = 8 if BLOCK_V >= 2048 else 4
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        h_c = h[start:end]  # (n, C)
        logits = h_c @ weight.t()  # (n, V), the only logits that ever exist
        scale_c = scale[start:end]
        _ce_loss_grad_kernel[(end - start,)](
            logits, logits.stride(0), targets[start:end], loss[start:end], scale_c, scale_c.stride(0),
            V, ignore_index, HAS_GRAD=need_grad, BLOCK_V=BLOCK_V, num_warps=num_warps,
        )
        # The kernel and the matmuls below run in order on one stream: `logits` holds the gradient by then.
        if need_grad:
            torch.mm(logits, weight, out=dh[start:end])  # (n, V) @ (V, C)
            dweight += logits.t() @ h_c  # (V, n) @ (n, C), summed across chunks in float32
    return loss, dh, dweight


class _LinearCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, reduction, grad_enabled):
        with torch.autocast(h.device.type, enabled=False):
            N = h.shape[0]
            valid = (targets != ignore_index).sum()  # a tensor: no host synchronisation
            if reduction == "mean":
                scale = (1.0 / valid.float()).reshape(1).expand(N)  # inf when all ignored; those rows write 0
            else:
                scale = torch.ones(1, dtype=torch.float32, device=h.device).expand(N)
            # needs_input_grad stays True under torch.no_grad(), so grad_enabled is read by the caller (inside
            # forward grad mode is always off): evaluation gets the loss without a (V, C) weight gradient.
            need_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]) and reduction != "none"
            loss, dh, dweight = _chunked_loss_and_grads(h, weight, targets, ignore_index, scale, need_grad)
        ctx.reduction, ctx.ignore_index = reduction, ignore_index
        if reduction == "none":
            ctx.save_for_backward(h, weight, targets)
            return loss
        ctx.save_for_backward(dh, dweight.to(weight.dtype) if need_grad else None)
        return loss.sum() / valid if reduction == "mean" else loss.sum()

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            h, weight, targets = ctx.saved_tensors
            with torch.autocast(h.device.type, enabled=False):
                scale = grad_output.float().contiguous()  # (N,): one gradient scale per row
                _, dh, dweight = _chunked_loss_and_grads(h, weight, targets, ctx.ignore_index, scale, True)
            return dh, dweight.to(weight.dtype), None, None, None, None
        dh, dweight = ctx.saved_tensors
        return dh * grad_output, dweight * grad_output, None, None, None, None


# --- public function ---

def linear_cross_entropy(h, weight, targets, ignore_index=-1, reduction="mean"):
    """Cross-entropy of the logits h @ weight.T against targets, never building all the logits.

    h (..., C) float, weight (V, C) of the same dtype, targets (...) integer. Returns a float32 scalar
    for reduction "mean" (over non-ignored targets) or "sum", or float32 of targets' shape for "none".
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"linear_cross_entropy: reduction={reduction!r}; expected 'mean', 'sum' or 'none'")
    if h.dtype not in (torch.float32, torch.float16, torch.bfloat16) or weight.dtype != h.dtype:
        raise ValueError(f"linear_cross_entropy: h and weight must share one dtype among float32, float16, "
                         f"bfloat16; got {h.dtype} and {weight.dtype}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"linear_cross_entropy: targets must be integers, got {targets.dtype}")
    if h.dim() < 1 or weight.dim() != 2 or weight.shape[1] != h.shape[-1] or targets.shape != h.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: expected h (..., C), weight (V, C), targets (...); got h "
                         f"{tuple(h.shape)}, weight {tuple(weight.shape)}, targets {tuple(targets.shape)}")
    check_device("linear_cross_entropy", h, weight, targets)
    h2 = h.reshape(-1, h.shape[-1]).contiguous()  # (N, C)
    loss = _LinearCrossEntropy.apply(h2, weight.contiguous(), targets.reshape(-1).long().contiguous(),
                                     ignore_index, reduction, torch.is_grad_enabled())
    return loss.reshape(targets.shape) if reduction == "none" else loss


def linear_cross_entropy_ref(h, weight, targets, ignore_index=-1, reduction="mean"):
    """Plain PyTorch: materialise the logits, upcast, F.cross_entropy."""
    logits = (h @ weight.t()).float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction)
    return loss.reshape(targets.shape) if reduction == "none" else loss


# --- benchmark ---

if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("python -m kernels.cross_entropy benchmarks on a CUDA GPU; none found here. "
                         "The CPU tests are in tests/test_kernels.py.")
    N, C, V = 8 * 1024, 768, 50304  # GPT-2 small: 8 sequences of 1024 tokens
    h = torch.randn(N, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(V, C, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    y = torch.randint(0, V, (N,), device="cuda")
    for label, fn in (("triton", linear_cross_entropy), ("torch", linear_cross_entropy_ref)):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = triton.testing.do_bench(lambda: fn(h, w, y).backward(), grad_to_none=[h, w])
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        print(f"linear CE fwd+bwd {label:>6}: {ms:6.2f} ms, peak {peak:7.0f} MiB above inputs")
    print("more figures: python bench.py kernels")
