"""Comparison helpers shared by the kernel tests."""

import pytest
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


def value_and_grads(fn, inputs, dout: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """(fn(*inputs), its gradients with respect to `inputs` for output gradient `dout`)."""
    out = fn(*inputs)
    return (out, *torch.autograd.grad(out, inputs, dout))


def assert_matches_reference(
    names, ours, reference, inputs, dout=None, lowp_reference=None, atol: float = 2e-5, rtol: float = 1e-4
) -> None:
    """`ours` is a kernel's (output, *gradients) on `inputs`, named `names`. In fp32 it must equal
    `reference` on the same inputs within atol / rtol. In fp16 / bf16 its error against `reference`
    run in fp32 must stay within 2x that of `lowp_reference` (default: `reference`) run in the
    inputs' own dtype, torch's own rounding error (assert_lowp_close)."""
    upcast = [t.detach().float().requires_grad_() for t in inputs]
    expected = value_and_grads(reference, upcast, None if dout is None else dout.float())
    if inputs[0].dtype == torch.float32:
        for name, a, e in zip(names, ours, expected, strict=True):
            assert_close(name, a, e, atol=atol, rtol=rtol)
        return
    same_dtype = [t.detach().clone().requires_grad_() for t in inputs]
    torch_lowp = value_and_grads(lowp_reference or reference, same_dtype, dout)
    for name, a, e, lo in zip(names, ours, expected, torch_lowp, strict=True):
        assert_lowp_close(name, a, e, lo)


def autotune_choices(module, *passes: str) -> list:
    """pytest params (kernel, config), one per config the GPU's autotuner may pick for the kernels of
    `passes` ("forward": the module's *_forward_kernel over FORWARD_CONFIGS, likewise "backward");
    the suite otherwise runs only each kernel's first (kernels/tuning.py). A test pins one with
    monkeypatch.setattr(kernel, "configs", [config])."""
    params = []
    for which in passes:
        [kernel] = [k for n, k in vars(module).items() if n.endswith(f"_{which}_kernel") and hasattr(k, "configs")]
        for config in getattr(module, f"{which.upper()}_CONFIGS"):
            tiles = (f"{k}{v}" for k, v in config.kwargs.items())
            params.append(pytest.param(kernel, config, id="-".join([which, *tiles, f"warps{config.num_warps}"])))
    return params


def skip_bf16_in_interpreter(dtype: torch.dtype, device: str) -> None:
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("bf16 tl.dot is wrong in the Triton interpreter (DESIGN.md 6); tested compiled on CUDA")
