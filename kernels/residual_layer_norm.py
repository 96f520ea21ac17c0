"""LayerNorm(residual + dropout(x + bias)): the sub-layer output of every Transformer block."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def residual_layer_norm_reference(
    x: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    h = F.dropout(x + bias, p=dropout_p) if dropout_p > 0.0 else x + bias
    return F.layer_norm(h + residual, (x.shape[-1],), weight, ln_bias, eps)
