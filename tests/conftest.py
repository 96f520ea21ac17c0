"""Set once for the whole suite, before any test module imports `semvlp`.

TRITON_INTERPRET must be set before any `@triton.jit` function is defined (triton reads it at
decoration time), so the kernels can run on CPU tensors; only on machines without CUDA, where the
kernels are compiled instead.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
