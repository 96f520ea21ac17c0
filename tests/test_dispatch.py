"""kernels/dispatch.py: which implementation "auto" and the explicit backends choose."""

from unittest import mock

import pytest
import torch

from semvlp_kernels import dispatch
from semvlp_kernels.attention import attention_reference, attention_sdpa
from semvlp_kernels.linear_cross_entropy import linear_cross_entropy


def select_on_gpu(capability: tuple[int, int], backend: str = "auto") -> dispatch.KernelOps:
    dispatch._select.cache_clear()
    with mock.patch("torch.cuda.get_device_capability", return_value=capability):
        try:
            return dispatch.select_ops(backend, torch.device("cuda", 0), torch.bfloat16)
        finally:
            dispatch._select.cache_clear()


def test_cpu_auto_uses_the_references():
    ops = dispatch.select_ops("auto", torch.device("cpu"), torch.float32)
    assert ops is dispatch.EAGER and ops.attention is attention_reference


@pytest.mark.parametrize("capability", [(7, 0), (8, 0), (9, 0)], ids=["V100", "A100", "H100"])
def test_gpu_auto_uses_what_was_measured_to_pay(capability):
    ops = select_on_gpu(capability)
    assert ops.attention is attention_sdpa  # SDPA beats the Triton attention forward+backward
    assert ops.linear_cross_entropy is linear_cross_entropy  # the one fused op that wins end to end


def test_explicit_backends_override_auto():
    assert select_on_gpu((9, 0), "eager") is dispatch.EAGER
    assert select_on_gpu((9, 0), "triton") is dispatch.TRITON
    with pytest.raises(ValueError, match="kernel_backend='fast'"):
        dispatch.select_ops("fast", torch.device("cpu"), torch.float32)
