"""Triton LayerNorm(residual + dropout(x + bias)) vs the eager composition: y and the gradients
of x, bias, residual, weight and ln_bias, in fp32, fp16 and bf16 (kernels upcast after loading),
with and without dropout (same Philox mask materialised for the reference)."""

from functools import partial

import pytest
import torch
from _checks import assert_close, assert_matches_reference, autotune_choices, value_and_grads

from semvlp_kernels import residual_layer_norm as module
from semvlp_kernels.residual_layer_norm import (
    MAX_COLS,
    residual_dropout_mask,
    residual_layer_norm,
    residual_layer_norm_reference,
)

# (rows shape, features): tiny preset (128), an odd width, a single row, BERT-base (768).
# (N = 1 is degenerate: xhat = 0 exactly in the kernel, rounding noise * 1e6 in torch.)
SHAPES = [((2, 61), 128), ((3, 7), 257), ((1,), 33), ((1, 9), 768)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = ("y", "dx", "dbias", "dresidual", "dweight", "dln_bias")


def _inputs(rows, n, dtype, device):
    def make(*shape, mean=0.0, std=1.0):
        return (mean + std * torch.randn(*shape, device=device)).to(dtype).requires_grad_()

    return (
        make(*rows, n, mean=0.5),  # x
        make(n, std=0.1),  # bias
        make(*rows, n, mean=-1.0),  # residual
        make(n, mean=1.0, std=0.1),  # weight
        make(n, std=0.1),  # ln_bias
    )


@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["nodrop", "drop0.1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_residual_layer_norm_matches_reference(shape, dtype, dropout_p, device):
    rows, n = shape
    inputs = _inputs(rows, n, dtype, device)
    before = [t.detach().clone() for t in inputs]
    dy = (0.1 * torch.randn(*rows, n, device=device)).to(dtype)
    ours = value_and_grads(partial(residual_layer_norm, eps=1e-12, dropout_p=dropout_p, seed=7), inputs, dy)
    for t, t0 in zip(inputs, before, strict=True):
        assert torch.equal(t.detach(), t0), "inputs modified"

    keep = residual_dropout_mask(inputs[0].shape, dropout_p, 7, inputs[0].device) if dropout_p else None
    if keep is not None and keep.numel() > 500:
        assert abs(keep.float().mean().item() - (1 - dropout_p)) < 0.03, "keep fraction far from 1 - p"
    reference = partial(residual_layer_norm_reference, eps=1e-12, dropout_p=dropout_p, keep_mask=keep)
    assert_matches_reference(NAMES, ours, reference, inputs, dy)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["nodrop", "drop0.1"])
@pytest.mark.parametrize("n", [257, 2500], ids=["n257", "n2500"])  # 2500: tiles capped at MAX_TILE // 4096 rows
@pytest.mark.parametrize("kernel, config", autotune_choices(module, "backward"))
def test_every_config_the_autotuner_may_pick_matches_reference(kernel, config, n, dropout_p, device, monkeypatch):
    monkeypatch.setattr(kernel, "configs", [config])
    inputs = _inputs((11,), n, torch.float32, device)  # 11 rows: loops end mid-tile
    dy = 0.1 * torch.randn(11, n, device=device)
    ours = value_and_grads(partial(residual_layer_norm, eps=1e-12, dropout_p=dropout_p, seed=7), inputs, dy)
    keep = residual_dropout_mask(inputs[0].shape, dropout_p, 7, inputs[0].device) if dropout_p else None
    reference = partial(residual_layer_norm_reference, eps=1e-12, dropout_p=dropout_p, keep_mask=keep)
    assert_matches_reference(NAMES, ours, reference, inputs, dy)


# (x, bias, residual) dtypes: under autocast the output projection's x is half precision while the
# parameters and the residual stream stay fp32 (autocast runs LayerNorm in fp32 on CUDA); the others
# promote the other way or through the bias alone.
MIXED_DTYPES = [
    (torch.float16, torch.float32, torch.float32),
    (torch.bfloat16, torch.float32, torch.float32),
    (torch.float32, torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float32, torch.bfloat16),
]


@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["nodrop", "drop0.1"])
@pytest.mark.parametrize("dtypes", MIXED_DTYPES, ids=lambda ds: "-".join(str(d).removeprefix("torch.") for d in ds))
def test_mixed_dtypes_give_the_references_dtypes_and_values(dtypes, dropout_p, device):
    """y has the dtype of x + bias + residual, as in the reference, and each gradient its input's;
    both compute in fp32 from the inputs as given, so they agree to fp32 rounding (then to the
    rounding of a half-precision result)."""
    x, bias, residual, weight, ln_bias = _inputs((3, 7), 257, torch.float32, device)
    mixed = [t.detach().to(dtype).requires_grad_() for t, dtype in zip((x, bias, residual), dtypes, strict=True)]
    inputs = (*mixed, weight, ln_bias)
    dy = 0.1 * torch.randn(3, 7, 257, device=device)
    ours = value_and_grads(partial(residual_layer_norm, eps=1e-12, dropout_p=dropout_p, seed=7), inputs, dy)
    keep = residual_dropout_mask(x.shape, dropout_p, 7, x.device) if dropout_p else None
    reference = partial(residual_layer_norm_reference, eps=1e-12, dropout_p=dropout_p, keep_mask=keep)
    expected = value_and_grads(reference, inputs, dy)
    assert [t.dtype for t in expected] == [torch.float32, *(t.dtype for t in inputs)]
    for name, a, e in zip(NAMES, ours, expected, strict=True):
        assert a.dtype == e.dtype, (name, a.dtype, e.dtype)
        half = a.dtype != torch.float32  # the same fp32 value may round to neighbouring halves
        assert_close(name, a, e, atol=1e-3 if half else 2e-5, rtol=1e-2 if half else 1e-4)


def test_residual_layer_norm_rejects_wide_rows(device):
    n = MAX_COLS + 1
    x = torch.randn(1, n, device=device)
    vec = torch.randn(n, device=device)
    with pytest.raises(ValueError, match="MAX_COLS"):
        residual_layer_norm(x, vec, x, vec, vec, 1e-5)


def test_keep_masks_without_dropout_keep_everything():
    """The keep-mask helpers load their seed whatever dropout_p (it once was an empty tensor at
    p = 0, and the kernels read past it)."""
    from semvlp_kernels.attention import attention_dropout_mask

    cpu = torch.device("cpu")
    assert residual_dropout_mask((3, 5), 0.0, 7, cpu).all()
    assert attention_dropout_mask(1, 2, 3, 5, 0.0, 7, cpu).all()
