"""gelu(x + bias), exact (erf) GELU: the op after the FFN up-projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.gelu(x + bias)
