"""Kernel tests run compiled on CUDA when a GPU is present, else under the Triton interpreter.

TRITON_INTERPRET must be set before any `@triton.jit` function is defined (triton reads it at
decoration time), so it is set here, before the test modules import `semvlp_kernels.*`.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="gpu: no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    return DEVICE
