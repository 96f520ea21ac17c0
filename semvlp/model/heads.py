"""Small prediction heads shared by pre-training and fine-tuning."""

from __future__ import annotations

import torch
from torch import nn


class Transform(nn.Module):
    """dense -> GELU -> LayerNorm (BERT's prediction-head transform)."""

    def __init__(self, hidden_size: int, out_size: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden_size, out_size)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(out_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(x)))


class AnswerHead(nn.Module):
    """LXMERT's answer classifier: hidden -> 2*hidden -> GELU -> LayerNorm -> num_answers."""

    def __init__(self, hidden_size: int, num_answers: int, eps: float):
        super().__init__()
        self.transform = Transform(hidden_size, 2 * hidden_size, eps)
        self.classifier = nn.Linear(2 * hidden_size, num_answers)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.transform(pooled))
