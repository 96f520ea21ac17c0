"""Input embeddings: text exactly as BERT, objects as one projection of [feature; box].

Visual tokens get no segment (token-type) or position embedding: the paper embeds an
object as a linear projection of its 2048-d feature concatenated with its normalized box
(section 3.1.1), so the box already carries position and the projection's own subspace
separates the modalities. A learned [IMG] token is prepended: its final state is o_IMG,
the two-stream pooled representation.
"""

from __future__ import annotations

import torch
from torch import nn

from semvlp.config import SemVLPConfig


class TextEmbeddings(nn.Module):
    """word + segment + position, LayerNorm, dropout (BERT)."""

    def __init__(self, config: SemVLPConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, m] ids -> [B, m, H] (positions 0..m-1), or packed [T] ids with their position_ids -> [T, H]."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device) if position_ids is None else position_ids
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(token_type_ids)
        )
        return self.dropout(self.norm(x))


class VisualEmbeddings(nn.Module):
    """[IMG] + LayerNorm(W [f; l] + b) per object, dropout: K objects -> K+1 tokens."""

    def __init__(self, config: SemVLPConfig):
        super().__init__()
        self.projection = nn.Linear(config.visual_feat_dim + config.visual_pos_dim, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.img_token = nn.Parameter(torch.zeros(config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, visual_feats: torch.Tensor, visual_pos: torch.Tensor) -> torch.Tensor:
        dtype = self.projection.weight.dtype
        objects = self.norm(self.projection(torch.cat([visual_feats.to(dtype), visual_pos.to(dtype)], dim=-1)))
        img = self.img_token.to(objects.dtype).expand(objects.shape[0], 1, -1)
        return self.dropout(torch.cat([img, objects], dim=1))
