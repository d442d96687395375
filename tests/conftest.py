"""Shared pytest setup for forge's tests: `python -m pytest -q tests`.

Triton kernels run on CPU tensors only through Triton's interpreter, and Triton reads
TRITON_INTERPRET when a kernel is decorated, so it is set here, before any test module
imports `kernels/`. With a GPU present the kernels compile for it instead.

Tests never use the network; HF_HUB_OFFLINE makes transformers fail at once instead of retrying
a hub it cannot reach (huggingface_hub reads it when first imported, hence here).
"""
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
