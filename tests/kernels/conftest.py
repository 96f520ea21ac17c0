"""Kernel tests: compiled on CUDA when a GPU is present, else under the Triton interpreter.

TRITON_INTERPRET is set for the whole suite in tests/conftest.py.

Every test that takes a `device` argument runs twice: "cpu" (interpreter; skipped on CUDA
machines, where the kernels are compiled and cannot take CPU tensors) and "cuda" (marked `gpu`;
skipped without a GPU). `pytest -m gpu tests/kernels` therefore runs the same tests compiled.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
os.environ.setdefault("SEMVLP_TRITON_AUTOTUNE", "0")  # one pinned config per kernel under pytest

DEVICES = [
    pytest.param(
        "cpu",
        id="cpu",
        marks=pytest.mark.skipif(HAS_CUDA, reason="interpreter run: this machine has CUDA, see the gpu variant"),
    ),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="gpu: no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_poison(monkeypatch):
    """Pin the seed, and make every fresh allocation NaN (float) or 0x5A (integer) so that an
    element a kernel forgets to write shows up as NaN or garbage instead of a lucky zero."""
    torch.manual_seed(1234)
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            return t.fill_(float("nan"))
        return t.fill_(0x5A if t.dtype != torch.bool else True)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


@pytest.fixture
def split_backward(monkeypatch):
    """Pin the attention backwards (padded and packed) to their split layout (attention.py's
    docstring) with `key_block` keys per dK/dV program; the suite otherwise pins the fused one."""

    def pin(key_block: int, block_m: int = 16) -> None:
        import triton

        from semvlp_kernels import attention, varlen_attention

        config = triton.Config({"BLOCK_M": block_m, "KEY_BLOCK": key_block}, num_warps=4, num_stages=1)
        monkeypatch.setattr(attention._attention_backward_kernel, "configs", [config])
        monkeypatch.setattr(varlen_attention._varlen_attention_backward_kernel, "configs", [config])

    return pin
