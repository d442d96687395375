"""Tests for kernels/: every Triton kernel, forward and backward, against its plain PyTorch `*_ref`.

    python -m pytest -q tests/test_kernels.py

Without a GPU the kernels run on CPU tensors through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before this module imports them) in float32 with tight tolerances. The interpreter
is slow, so shapes are tiny, chosen to hit the edges: lengths that are not block multiples, a single
token, head dims that are not powers of two, grouped-query attention. With a GPU the same cases run
in bfloat16 and float16 against the reference computed in float32 from the same inputs.
"""
import math
import os

import pytest
import torch

from kernels.attention import attention, attention_ref
from kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from kernels.layernorm import layer_norm, layer_norm_ref, rms_norm, rms_norm_ref
import kernels.cross_entropy

_NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16/fp16 kernel runs)")
# float32 cases run through the interpreter on the CPU, or on the GPU when there is one (then conftest.py
# leaves TRITON_INTERPRET unset and the kernels compile for the GPU).
DEV = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
# (device, dtype): float32 always; the half types on a GPU when there is one.
DEVICE_DTYPES = [
    pytest.param(DEV, torch.float32, id="fp32"),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=_NO_GPU),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=_NO_GPU),
]
# (atol, rtol) per dtype, for results of order one. _check_against_ref scales them for larger results.
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 2e-2), torch.float16: (5e-3, 5e-3)}


def _leaf(t, dtype):
    """A leaf tensor in `dtype` that collects gradients."""
    return t.to(dtype).detach().requires_grad_()


def _run(fn, inputs, grad_out_seed=0):
    """Output of fn(*inputs) in float32 and the gradients of a fixed random projection of it."""
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed)).to(out.device, out.dtype)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, leaves, g)
    return out.float(), [d.float() for d in grads]


def _check_against_ref(fn, ref, inputs, dtype, scale=1.0, out_terms=1):
    """fn on inputs in dtype against ref on the same values in float32: output and every gradient.

    The tolerances are for results of order one. Rounding errors grow with the values, so `scale` (the
    size of the inputs, e.g. 100 for logits x100) multiplies the absolute tolerance of everything. An output
    that is a sum of out_terms order-one terms (a "sum" loss) gets out_terms times the absolute tolerance and
    no relative one: rtol=2e-2 on a summed loss of ~80 nats would let 1.6 nats of error through.
    """
    out, grads = _run(fn, [_leaf(t, dtype) if t.is_floating_point() else t for t in inputs])
    # The reference sees the same values, rounded to dtype, and computes in float32.
    out_ref, grads_ref = _run(ref, [_leaf(t.to(dtype), torch.float32) if t.is_floating_point() else t for t in inputs])
    atol, rtol = TOL[dtype]
    out_atol, out_rtol = (atol * scale * out_terms, 0.0) if out_terms > 1 else (atol * scale, rtol)
    torch.testing.assert_close(out, out_ref, atol=out_atol, rtol=out_rtol, equal_nan=True)
    for i, (d, d_ref) in enumerate(zip(grads, grads_ref)):
        torch.testing.assert_close(d, d_ref, atol=atol * scale, rtol=rtol, msg=lambda m: f"gradient {i}: {m}")


# --- layer_norm / rms_norm ---

@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 37), (1, 16), (130, 100)])  # N odd, N a power of two, many rows
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_matches_ref(device, dtype, shape, with_bias):
    torch.manual_seed(0)
    N = shape[-1]
    x = torch.randn(shape, device=device) * 2 + 0.5
    w, b = torch.randn(N, device=device), torch.randn(N, device=device)
    if with_bias:
        _check_against_ref(layer_norm, layer_norm_ref, [x, w, b], dtype)
    else:
        _check_against_ref(lambda x, w: layer_norm(x, w, None), lambda x, w: layer_norm_ref(x, w, None), [x, w], dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 37), (130, 100)])
def test_rms_norm_matches_ref(device, dtype, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, device=device) * 2 + 0.5
    w = torch.randn(shape[-1], device=device)
    _check_against_ref(rms_norm, rms_norm_ref, [x, w], dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_norms_of_constant_tiny_and_huge_rows_match_ref(device, dtype, norm):
    """A constant row has variance 0 and a row of size 1e-3 has variance 1e-6, below eps=1e-5: without eps in
    the kernel both divide by ~0. Rows of size 1e3 check the mean is taken out before squaring."""
    torch.manual_seed(0)
    N, eps = 40, 1e-5
    x = torch.randn(6, N, device=device)
    x[0] = 3.0                  # constant: xhat = 0, rstd = 1/sqrt(eps)
    x[1] = -0.25                # constant, another value
    x[2] *= 1e-3                # tiny: eps dominates the variance
    x[3] = x[3] * 1e3 + 5e3     # huge, far from zero
    w, b = torch.randn(N, device=device), torch.randn(N, device=device)
    # dx is of order rstd = 1/sqrt(var + eps), up to 316 here: the tolerance scales with it
    if norm == "layer_norm":
        _check_against_ref(lambda x, w, b: layer_norm(x, w, b, eps), lambda x, w, b: layer_norm_ref(x, w, b, eps),
                           [x, w, b], dtype, scale=eps ** -0.5)
    else:
        _check_against_ref(lambda x, w: rms_norm(x, w, eps), lambda x, w: rms_norm_ref(x, w, eps), [x, w], dtype,
                           scale=eps ** -0.5)
    y = (layer_norm(x, w, b, eps) if norm == "layer_norm" else rms_norm(x, w, eps)).float()
    assert torch.isfinite(y).all()
    if norm == "layer_norm":
        torch.testing.assert_close(y[0], b, atol=1e-3, rtol=0)  # a constant row normalises to 0: y = b


# On the CPU interpreter the programs of a launch run one after another in a fixed order, so any kernel,
# even one that adds into shared buffers with atomics, gives the same bits twice: this test cannot fail
# there and runs on a GPU only, where programs race and an order-dependent reduction shows up at once.
@_NO_GPU
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_norm_weight_grads_are_bitwise_deterministic(norm):
    torch.manual_seed(0)
    M, N = 8192, 768  # many rows per program, many programs
    x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    w, b = torch.randn(N, device="cuda", dtype=torch.bfloat16), torch.randn(N, device="cuda", dtype=torch.bfloat16)

    def grads():
        ww, bb = w.clone().requires_grad_(), b.clone().requires_grad_()
        y = layer_norm(x, ww, bb) if norm == "layer_norm" else rms_norm(x, ww)
        y.backward(dy)
        return ww.grad, bb.grad

    first = grads()
    for _ in range(5):
        again = grads()
        assert torch.equal(first[0], again[0])
        if norm == "layer_norm":
            assert torch.equal(first[1], again[1])


def test_norms_reject_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="does not match"):
        layer_norm(x, torch.ones(7), None)
    with pytest.raises(ValueError, match="dtype"):
        rms_norm(x.long(), torch.ones(8))
    with pytest.raises(ValueError, match="bias"):
        layer_norm(x, torch.ones(8), torch.ones(9))


# --- linear_cross_entropy ---

@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_matches_ref(device, dtype, reduction, monkeypatch):
    monkeypatch.setattr(kernels.cross_entropy, "MAX_CHUNK_ELEMENTS", 5 * 100)  # 5 rows per chunk: 4 chunks
    torch.manual_seed(0)
    N, C, V = 19, 24, 100  # V is not a multiple of the vocabulary block (64 on the interpreter)
    h, w = torch.randn(N, C, device=device), torch.randn(V, C, device=device) / C ** 0.5
    targets = torch.randint(0, V, (N,), device=device)
    targets[::3] = -1  # ignored
    _check_against_ref(lambda h, w: linear_cross_entropy(h, w, targets, reduction=reduction),
                       lambda h, w: linear_cross_entropy_ref(h, w, targets, reduction=reduction), [h, w], dtype,
                       out_terms=int((targets != -1).sum()) if reduction == "sum" else 1)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_linear_cross_entropy_of_huge_logits_matches_ref(device, dtype):
    """Logits x100 (up to ~400): exp(z) overflows float32 past 88, so only a kernel that subtracts the
    running max gets a finite loss; a constant row (all logits equal) gives exactly log V."""
    torch.manual_seed(0)
    N, C, V = 7, 16, 100
    h, w = torch.randn(N, C, device=device) * 100, torch.randn(V, C, device=device) / C ** 0.5
    h[0] = 0.0  # all logits 0: loss log V
    targets = torch.randint(0, V, (N,), device=device)
    _check_against_ref(lambda h, w: linear_cross_entropy(h, w, targets, reduction="none"),
                       lambda h, w: linear_cross_entropy_ref(h, w, targets, reduction="none"), [h, w], dtype,
                       scale=100)
    loss = linear_cross_entropy(h.to(dtype), w.to(dtype), targets, reduction="none")
    assert torch.isfinite(loss).all() and loss[0].item() == pytest.approx(math.log(V), abs=1e-3)


def test_linear_cross_entropy_under_no_grad_computes_no_gradients(monkeypatch):
    """evaluate() runs under torch.no_grad(): the loss alone, without a (V, C) float32 weight gradient."""
    asked = []
    real = kernels.cross_entropy._chunked_loss_and_grads

    def spy(*args):
        asked.append(args[-1])  # need_grad
        return real(*args)
    monkeypatch.setattr(kernels.cross_entropy, "_chunked_loss_and_grads", spy)
    h = torch.randn(5, 8, device=DEV, requires_grad=True)
    w = torch.randn(10, 8, device=DEV, requires_grad=True)
    targets = torch.randint(0, 10, (5,), device=DEV)
    with torch.no_grad():
        no_grad_loss = linear_cross_entropy(h, w, targets, reduction="sum")
    with torch.inference_mode():
        linear_cross_entropy(h, w, targets)
    assert asked == [False, False] and not no_grad_loss.requires_grad
    loss = linear_cross_entropy(h, w, targets, reduction="sum")  # with grad mode on, the gradients as before
    assert asked[-1] is True and loss.item() == pytest.approx(no_grad_loss.item())
    loss.backward()
    assert h.grad is not None and w.grad is not None


def test_linear_cross_entropy_takes_leading_dims_and_other_ignore_index():
    torch.manual_seed(0)
    B, T, C, V = 2, 5, 16, 33
    h, w = torch.randn(B, T, C, device=DEV), torch.randn(V, C, device=DEV)
    targets = torch.randint(0, V, (B, T), device=DEV)
    targets[0, 1] = targets[1, 4] = 7  # ignore_index below: targets equal to 7 are skipped
    for reduction in ("mean", "none"):
        _check_against_ref(lambda h, w: linear_cross_entropy(h, w, targets, ignore_index=7, reduction=reduction),
                           lambda h, w: linear_cross_entropy_ref(h, w, targets, ignore_index=7, reduction=reduction),
                           [h, w], torch.float32)


def test_linear_cross_entropy_all_ignored_matches_torch():
    h, w = torch.randn(4, 8, device=DEV, requires_grad=True), torch.randn(10, 8, device=DEV, requires_grad=True)
    targets = torch.full((4,), -1, device=DEV)
    loss = linear_cross_entropy(h, w, targets)  # mean over zero tokens: nan, like F.cross_entropy
    assert torch.isnan(loss) and torch.isnan(linear_cross_entropy_ref(h, w, targets))
    loss.backward()
    assert not h.grad.any() and not w.grad.any()  # gradients are zero, as in torch
    assert linear_cross_entropy(h, w, targets, reduction="sum").item() == 0.0


def test_linear_cross_entropy_out_of_range_target_is_nan_not_garbage():
    h, w = torch.randn(3, 8, device=DEV), torch.randn(10, 8, device=DEV)
    loss = linear_cross_entropy(h, w, torch.tensor([1, 10, 2], device=DEV), reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


def test_linear_cross_entropy_rejects_bad_inputs():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="avg")
    with pytest.raises(ValueError, match="dtype"):
        linear_cross_entropy(h, w.double(), t)
    with pytest.raises(ValueError, match="integers"):
        linear_cross_entropy(h, w, t.float())
    with pytest.raises(ValueError, match="expected h"):
        linear_cross_entropy(h, torch.randn(10, 9), t)


# --- attention ---

# (B, H, H_kv, T, D, causal): T of 1, 17 and 130 against tiles of 16 and 32 (interpreter), head dims
# 16, 48, 80, 96 (padded to 64 and 128 inside the kernel) and 64; multi-head, grouped and multi-query.
ATTENTION_CASES = [
    (1, 2, 2, 17, 16, True),
    (1, 2, 2, 130, 64, True),
    (2, 4, 2, 130, 48, False),
    (1, 4, 2, 130, 48, True),
    (1, 3, 1, 17, 64, True),
    (1, 2, 1, 1, 16, True),
    (1, 2, 2, 1, 64, False),
    (1, 2, 2, 33, 80, False),
    (1, 2, 1, 130, 96, True),
]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("B,H,H_kv,T,D,causal", ATTENTION_CASES)
def test_attention_matches_ref(device, dtype, B, H, H_kv, T, D, causal):
    torch.manual_seed(0)
    q = torch.randn(B, H, T, D, device=device)
    k, v = torch.randn(B, H_kv, T, D, device=device), torch.randn(B, H_kv, T, D, device=device)
    _check_against_ref(lambda q, k, v: attention(q, k, v, causal=causal),
                       lambda q, k, v: attention_ref(q, k, v, causal=causal), [q, k, v], dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_attention_of_huge_scores_matches_ref(device, dtype, causal):
    """Scores x30 (up to ~150): exp overflows float32 past 88, so this fails without the running-max
    subtraction of the online softmax; softmax rows are nearly one-hot, the hardest case for its rescaling."""
    torch.manual_seed(0)
    B, H, T, D = 1, 2, 40, 16
    q = torch.randn(B, H, T, D, device=device) * 30
    k, v = torch.randn(B, H, T, D, device=device), torch.randn(B, H, T, D, device=device)
    # dk = dS^T q carries the factor 30 of q: the tolerance scales with it
    _check_against_ref(lambda q, k, v: attention(q, k, v, causal=causal),
                       lambda q, k, v: attention_ref(q, k, v, causal=causal), [q, k, v], dtype, scale=30)


def test_attention_takes_transposed_views_and_a_scale():
    """The model's q, k, v are (B, T, H, D) tensors viewed as (B, H, T, D): not contiguous."""
    torch.manual_seed(0)
    B, T, H, D = 2, 20, 2, 32
    q, k, v = (torch.randn(B, T, H, D, device=DEV).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    _check_against_ref(lambda q, k, v: attention(q, k, v, scale=0.3),
                       lambda q, k, v: attention_ref(q, k, v, scale=0.3), [q, k, v], torch.float32)


@pytest.mark.parametrize("shapes,dtype,match", [
    (((1, 2, 8, 8), (1, 2, 8, 8)), torch.float32, "head dim 8"),
    (((1, 2, 8, 256), (1, 2, 8, 256)), torch.float32, "head dim 256"),
    (((1, 3, 8, 16), (1, 2, 8, 16)), torch.float32, "not a multiple"),
    (((1, 2, 8, 16), (1, 2, 9, 16)), torch.float32, "must both be"),
    (((2, 8, 16), (2, 8, 16)), torch.float32, "expected q"),
    (((1, 2, 8, 16), (1, 2, 8, 16)), torch.int32, "dtype"),
    (((1, 2, 8, 16), (1, 2, 8, 16)), torch.float64, "dtype"),
])
def test_attention_rejects_unsupported_inputs(shapes, dtype, match):
    q_shape, kv_shape = shapes
    q, k, v = torch.zeros(q_shape, dtype=dtype), torch.zeros(kv_shape, dtype=dtype), torch.zeros(kv_shape, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v)


# --- all kernels ---

def test_kernels_on_cpu_without_interpreter_say_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 8)
    for call in (lambda: layer_norm(x, torch.ones(8), None), lambda: rms_norm(x, torch.ones(8)),
                 lambda: linear_cross_entropy(x, torch.randn(5, 8), torch.zeros(2, dtype=torch.long)),
                 lambda: attention(*[torch.randn(1, 2, 4, 16)] * 3)):
        with pytest.raises(RuntimeError, match="needs a CUDA GPU, or TRITON_INTERPRET=1"):
            call()
