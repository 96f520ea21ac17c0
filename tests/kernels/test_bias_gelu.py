"""Triton bias+GELU vs F.gelu(x + bias): y, dx, dbias in fp32, fp16 and bf16 (the kernels upcast
after loading, so the interpreter's bf16 is trustworthy here, DESIGN.md 6)."""

import pytest
import torch
from _checks import assert_close, assert_lowp_close

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

    y = bias_gelu(x, bias)
    dx, db = torch.autograd.grad(y, (x, bias), dy)
    assert torch.equal(x.detach(), x0) and torch.equal(bias.detach(), b0), "inputs modified"

    x32, b32 = (t.detach().float().requires_grad_() for t in (x, bias))
    ref = bias_gelu_reference(x32, b32)
    ref_grads = torch.autograd.grad(ref, (x32, b32), dy.float())
    if dtype == torch.float32:
        for name, a, e in zip(("y", "dx", "dbias"), (y, dx, db), (ref, *ref_grads), strict=True):
            assert_close(name, a, e, atol=1e-5, rtol=1e-5)
    else:
        xl, bl = (t.detach().clone().requires_grad_() for t in (x, bias))
        low = bias_gelu_reference(xl, bl)
        low_grads = torch.autograd.grad(low, (xl, bl), dy)
        for name, a, e, lo in zip(("y", "dx", "dbias"), (y, dx, db), (ref, *ref_grads), (low, *low_grads), strict=True):
            assert_lowp_close(name, a, e, lo)


def test_bias_gelu_rejects_mismatched_bias(device):
    with pytest.raises(ValueError, match="does not match"):
        bias_gelu(torch.randn(2, 8, device=device), torch.randn(7, device=device))
