"""Cross-entropy of linear(hidden, weight, bias) against labels: the masked-LM decoder and loss.

Called only on masked rows. The reference materializes fp32 logits [N, V].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy over rows (labels >= 0); 0 when no row has a label."""
    logits = F.linear(hidden, weight, bias).float()
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels)
