"""The one place that decides which implementation of each fused op runs.

Per device and dtype (DESIGN.md section 5):
- CPU: the pure-PyTorch references.
- sm_70 (V100): cuBLAS GEMMs, PyTorch SDPA attention (its memory-efficient backend is the
  only fused one there), Triton only for memory-bound fusions once they exist.
- sm_80+ (A100, H100): Triton kernels once they exist, else SDPA.
The model config's `kernel_backend` overrides "auto". The choice is logged once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from semvlp_kernels.attention import attention_reference, attention_sdpa
from semvlp_kernels.bias_gelu import bias_gelu_reference
from semvlp_kernels.linear_cross_entropy import linear_cross_entropy_reference
from semvlp_kernels.residual_layer_norm import residual_layer_norm_reference

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelOps:
    """The model's fusion sites. Signatures follow the `<op>_reference` functions."""

    name: str
    attention: Callable[..., torch.Tensor]
    bias_gelu: Callable[..., torch.Tensor]
    residual_layer_norm: Callable[..., torch.Tensor]
    linear_cross_entropy: Callable[..., torch.Tensor]


EAGER = KernelOps(
    "eager", attention_reference, bias_gelu_reference, residual_layer_norm_reference, linear_cross_entropy_reference
)
SDPA = KernelOps(
    "sdpa", attention_sdpa, bias_gelu_reference, residual_layer_norm_reference, linear_cross_entropy_reference
)


def _resolve_auto(device: torch.device) -> str:
    if device.type != "cuda":
        return "eager"
    return "sdpa"


@functools.cache
def _select(backend: str, device_type: str, device_index: int | None, dtype: torch.dtype) -> KernelOps:
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    resolved = _resolve_auto(device) if backend == "auto" else backend
    table = {"eager": EAGER, "sdpa": SDPA}
    if resolved not in table:
        raise ValueError(f"kernel_backend={backend!r} is not available on {device} ({dtype})")
    ops = table[resolved]
    logger.info("kernel backend %r -> %s on %s (%s)", backend, ops.name, device, dtype)
    return ops


def select_ops(backend: str, device: torch.device, dtype: torch.dtype) -> KernelOps:
    """Return the implementations to use for `backend` ("auto", "eager", "sdpa", "triton")."""
    return _select(backend, device.type, device.index, dtype)
