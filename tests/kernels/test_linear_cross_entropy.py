"""Fused linear cross-entropy vs F.cross_entropy(F.linear(...).float()): loss and the gradients
of hidden, weight and bias, in fp32, fp16 and bf16 (the CE kernel upcasts after loading; the
GEMMs are cuBLAS/torch). The loss is multiplied by 3 so a grad_output == 1 shortcut would fail."""

import pytest
import torch
from _checks import assert_close, assert_matches_reference, value_and_grads

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


class _LaunchRecorder:
    """Stands in for a Triton kernel: records each launch grid, then launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_rows_are_processed_in_chunks(device, monkeypatch):
    """CHUNK_ROWS is read at each call, so the tests above run several chunks (the gradients of weight
    and bias accumulate across them)."""
    monkeypatch.setattr(lce, "CHUNK_ROWS", 16)
    recorder = _LaunchRecorder(lce._linear_cross_entropy_forward_kernel)
    monkeypatch.setattr(lce, "_linear_cross_entropy_forward_kernel", recorder)
    hidden = torch.randn(37, 32, device=device)
    weight = torch.randn(50, 32, device=device)
    labels = torch.randint(0, 50, (37,), device=device)
    loss = linear_cross_entropy(hidden, weight, None, labels)
    assert recorder.grids == [(16,), (16,), (5,)]
    assert_close("loss", loss, linear_cross_entropy_reference(hidden, weight, None, labels), atol=1e-5, rtol=1e-5)


def test_no_grad_computes_no_gradients(device, monkeypatch):
    """Evaluation (torch.no_grad) with parameters that require gradients: the gradient GEMMs and the
    fp32 [V, H] weight gradient were computed anyway, since needs_input_grad ignores grad mode."""
    asked = []
    forward = lce.linear_cross_entropy_forward

    def spy(*args, compute_grad, **kwargs):
        asked.append(compute_grad)
        return forward(*args, compute_grad=compute_grad, **kwargs)

    monkeypatch.setattr(lce, "linear_cross_entropy_forward", spy)
    hidden = torch.randn(4, 32, device=device, requires_grad=True)
    weight = torch.randn(50, 32, device=device, requires_grad=True)
    labels = torch.randint(0, 50, (4,), device=device)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, None, labels)
    assert asked == [False] and not loss.requires_grad
    assert_close("loss", loss, linear_cross_entropy_reference(hidden, weight, None, labels), atol=1e-5, rtol=1e-5)
    linear_cross_entropy(hidden, weight, None, labels).backward()  # with grad mode on, gradients
    assert asked == [False, True] and hidden.grad is not None


def test_labels_need_not_be_contiguous(device):
    """A strided view of labels (one column of a [N, 2] tensor) was read at stride 1: a wrong loss."""
    hidden = torch.randn(6, 32, device=device)
    weight = torch.randn(50, 32, device=device)
    labels = torch.randint(0, 50, (6, 2), device=device)[:, 0]
    assert not labels.is_contiguous()
    expected = linear_cross_entropy_reference(hidden, weight, None, labels)
    assert_close("loss", linear_cross_entropy(hidden, weight, None, labels), expected, atol=1e-5, rtol=1e-5)


def test_under_autocast_the_op_runs_in_autocast_dtype(device):
    """Under autocast, fp32 hidden states (autocast's LayerNorm output) met logits in autocast's dtype:
    the op's gradient GEMM failed to write its fp32 output ("Expected out tensor to have dtype
    BFloat16"). It now matches the reference run under the same autocast, in the inputs' dtypes."""
    dtype = torch.bfloat16 if device == "cpu" else torch.float16  # CPU autocast's dtype; either on CUDA
    hidden = torch.randn(9, 32, device=device, requires_grad=True)
    weight = torch.randn(50, 32, device=device, requires_grad=True)
    bias = torch.randn(50, device=device, requires_grad=True)
    labels = torch.randint(0, 50, (9,), device=device)
    results = []
    for fn in (linear_cross_entropy, linear_cross_entropy_reference):
        with torch.autocast(device, dtype=dtype):
            results.append(value_and_grads(lambda *inputs, fn=fn: fn(*inputs, labels), (hidden, weight, bias)))
    for name, ours, reference in zip(NAMES, *results, strict=True):
        assert ours.dtype == reference.dtype, name  # fp32 loss; gradients in their parameters' dtype
        assert_close(name, ours, reference, atol=2e-2, rtol=2e-2)  # both round logits to `dtype`
