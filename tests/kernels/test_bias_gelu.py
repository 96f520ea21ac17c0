"""Triton bias+GELU vs F.gelu(x + bias): y, dx, dbias in fp32, fp16 and bf16 (the kernels upcast
after loading, so the interpreter's bf16 is trustworthy here, DESIGN.md 6)."""

import pytest
import torch
from _checks import assert_matches_reference, autotune_choices, value_and_grads

from semvlp_kernels import bias_gelu as module
from semvlp_kernels.bias_gelu import bias_gelu, bias_gelu_reference

# (rows shape, features): the tiny preset's FFN (512), an odd/prime width, a single row,
# and BERT-base's 3072 on a few rows.
SHAPES = [((2, 121), 512), ((3, 7), 257), ((1,), 1), ((1, 5), 3072)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bias_gelu_matches_reference(shape, dtype, device):
    rows, n = shape
    x = (-0.3 + torch.randn(*rows, n, device=device)).to(dtype).requires_grad_()
    bias = (0.1 * torch.randn(n, device=device)).to(dtype).requires_grad_()
    dy = (0.1 * torch.randn(*rows, n, device=device)).to(dtype)
    x0, b0 = x.detach().clone(), bias.detach().clone()

    ours = value_and_grads(bias_gelu, (x, bias), dy)
    assert torch.equal(x.detach(), x0) and torch.equal(bias.detach(), b0), "inputs modified"
    assert_matches_reference(("y", "dx", "dbias"), ours, bias_gelu_reference, (x, bias), dy, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel, config", autotune_choices(module, "forward", "backward"))
def test_every_config_the_autotuner_may_pick_matches_reference(kernel, config, device, monkeypatch):
    monkeypatch.setattr(kernel, "configs", [config])
    x = (-0.3 + torch.randn(37, 1100, device=device)).requires_grad_()  # partial tiles in both dims
    bias = (0.1 * torch.randn(1100, device=device)).requires_grad_()
    dy = 0.1 * torch.randn(37, 1100, device=device)
    ours = value_and_grads(bias_gelu, (x, bias), dy)
    assert_matches_reference(("y", "dx", "dbias"), ours, bias_gelu_reference, (x, bias), dy, atol=1e-5, rtol=1e-5)


def test_bias_gelu_rejects_mismatched_bias(device):
    with pytest.raises(ValueError, match="does not match"):
        bias_gelu(torch.randn(2, 8, device=device), torch.randn(7, device=device))
