"""Hand-written Triton kernels for forge: the "how the GPU really computes this" chapter.

One op per file, each with the same template (the style guide's rule 10): a docstring with the
math, the `@triton.jit` kernels, the `torch.autograd.Function`, the public function, a plain PyTorch
`*_ref` with the same signature, and a benchmark under `__main__`.

    kernels/attention.py       attention(q, k, v, causal=True, scale=None)         FlashAttention-2
    kernels/layernorm.py       layer_norm(x, weight, bias, eps), rms_norm(x, weight, eps)
    kernels/cross_entropy.py   linear_cross_entropy(h, weight, targets, ignore_index, reduction)

The kernels run on a CUDA GPU. On a CPU they run only through Triton's interpreter, which must be
switched on before the kernels are imported (Triton reads it when a kernel is decorated):

    TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels.py     # tests/conftest.py sets it for you
    python -m kernels.attention                                      # a benchmark; needs a GPU
"""
import os


def check_device(name, *tensors):
    """Every kernel's first check: one device for all tensors, and a CUDA GPU, or the CPU only through the
    interpreter. Anything else is a clear error, never a wrong answer or a crash inside Triton."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"{name}: all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    device = devices.pop()
    if device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return
    raise RuntimeError(f"{name} needs a CUDA GPU, or TRITON_INTERPRET=1 (set before importing kernels) for the "
                       f"slow CPU interpreter; got tensors on {device}")
