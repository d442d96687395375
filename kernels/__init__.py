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
