"""Comparison helpers shared by the kernel tests."""

import torch


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> None:
    """torch.testing.assert_close (mismatch count, worst index, NaN disagreement) naming the tensor."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def assert_lowp_close(name: str, ours: torch.Tensor, ref32: torch.Tensor, torch_lowp: torch.Tensor) -> None:
    """The quack criterion (Liger test_geglu.py): our low-precision max error against the fp32
    reference stays within 2x torch's own low-precision error, plus 1e-6... and an ulp-scale
    floor, because when torch's low-precision result happens to be exact its error is 0."""
    assert torch.isfinite(ours).all(), f"{name}: non-finite values (unwritten or overflowed elements)"
    if ours.numel() == 0:
        return
    ours_err = (ours.float() - ref32.float()).abs().max().item()
    torch_err = (torch_lowp.float() - ref32.float()).abs().max().item()
    ulp = torch.finfo(ours.dtype).eps * ref32.float().abs().max().item()
    assert ours_err <= 2 * torch_err + ulp + 1e-6, f"{name}: max error {ours_err:.3g} vs torch's {torch_err:.3g}"
