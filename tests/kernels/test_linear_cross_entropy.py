"""Fused linear cross-entropy vs F.cross_entropy(F.linear(...).float()): loss and the gradients
of hidden, weight and bias, in fp32, fp16 and bf16 (the CE kernel upcasts after loading; the
GEMMs are cuBLAS/torch). The loss is multiplied by 3 so a grad_output == 1 shortcut would fail."""

import pytest
import torch
from _checks import assert_matches_reference, value_and_grads

import semvlp_kernels.linear_cross_entropy as lce
from semvlp_kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

# (rows, hidden, vocab): ~MLM rows of a small batch over the tiny preset, one row, a vocab not a
# multiple of the kernel block (BLOCK_V + 37, so the loop runs twice), and no rows at all.
SHAPES = [(37, 128, 1000), (1, 64, 257), (5, 32, lce.BLOCK_V + 37), (0, 32, 100)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = ("loss", "dhidden", "dweight", "dbias")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_linear_cross_entropy_matches_reference(shape, dtype, device, monkeypatch):
    n, h, v = shape
    monkeypatch.setattr(lce, "CHUNK_ROWS", 16)  # several chunks at test sizes
    hidden = (0.2 + torch.randn(n, h, device=device)).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device) / h**0.5).to(dtype).requires_grad_()
    bias = (0.1 * torch.randn(v, device=device)).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), device=device)
    if n > 3:
        labels[2] = -100  # ignored rows count neither in the loss nor in the mean

    def tripled(fn):
        return lambda hidden, weight, bias: 3.0 * fn(hidden, weight, bias, labels)

    ours = value_and_grads(tripled(linear_cross_entropy), (hidden, weight, bias))
    assert ours[0].dtype == torch.float32
    assert_matches_reference(
        NAMES, ours, tripled(linear_cross_entropy_reference), (hidden, weight, bias), atol=1e-5, rtol=1e-5
    )


def test_linear_cross_entropy_all_ignored_is_zero(device):
    hidden = torch.randn(4, 32, device=device, requires_grad=True)
    weight = torch.randn(50, 32, device=device, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, None, torch.full((4,), -100, device=device))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


def test_linear_cross_entropy_no_grad_skips_gradients(device):
    hidden = torch.randn(4, 32, device=device)
    weight = torch.randn(50, 32, device=device)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, None, torch.randint(0, 50, (4,), device=device))
    ref = linear_cross_entropy_reference(hidden, weight, None, torch.randint(0, 50, (4,), device=device) * 0)
    assert loss.isfinite() and ref.isfinite()
