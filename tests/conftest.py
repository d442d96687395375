"""Shared pytest setup for forge's tests: `python -m pytest -q tests`.

Triton kernels run on CPU tensors only through Triton's interpreter, and Triton reads
TRITON_INTERPRET when a kernel is decorated, so it is set here, before any test module
imports `kernels/`. With a GPU present the kernels compile for it instead.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
