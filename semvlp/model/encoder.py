"""The shared encoder and its two modes (paper section 3.2).

One stack of L blocks. Every block has self-attention (phi_S) and an FFN (phi_F); blocks
above L_s also own a cross-attention sub-layer (phi_C) between them.

Single-stream: S^0 = [IMG, o_1..o_K, CLS, w_1.., SEP] runs through all L blocks without
cross-attention; pooled = h_CLS^L.
Two-stream: the text runs alone through all L blocks (H^L); the image runs alone through the
same blocks, and in blocks l > L_s attends to H^L after its self-attention; pooled = o_IMG^L.
Text never attends to the image in two-stream mode (paper footnote 1).

All fusion sites (attention, bias+GELU, bias+dropout+residual+LayerNorm) go through the
`KernelOps` chosen by `semvlp_kernels.dispatch`, so a kernel plugs in without touching the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from semvlp.config import SemVLPConfig
from semvlp_kernels.dispatch import KernelOps


class Attention(nn.Module):
    """Multi-head attention + output projection + dropout + residual + LayerNorm.

    Self-attention uses one fused QKV projection; cross-attention projects queries from the
    image and a fused key/value from the text.
    """

    def __init__(self, config: SemVLPConfig, cross: bool):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.cross = cross
        if cross:
            self.query = nn.Linear(hidden, hidden)
            self.key_value = nn.Linear(hidden, 2 * hidden)
        else:
            self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.attention_dropout = config.attention_probs_dropout_prob
        self.hidden_dropout = config.hidden_dropout_prob

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        return x.view(batch, length, self.num_heads, hidden // self.num_heads).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        ops: KernelOps,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.cross:
            q = self.query(x)
            k, v = self.key_value(context).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        attended = ops.attention(
            self._heads(q),
            self._heads(k),
            self._heads(v),
            key_padding_mask,
            self.attention_dropout if self.training else 0.0,
        )
        attended = attended.transpose(1, 2).reshape(x.shape)
        return ops.residual_layer_norm(
            F.linear(attended, self.out.weight),
            self.out.bias,
            x,
            self.norm.weight,
            self.norm.bias,
            self.norm.eps,
            self.hidden_dropout if self.training else 0.0,
        )


class FeedForward(nn.Module):
    """LayerNorm(x + dropout(W2 gelu(W1 x + b1) + b2))."""

    def __init__(self, config: SemVLPConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.hidden_dropout = config.hidden_dropout_prob

    def forward(self, x: torch.Tensor, ops: KernelOps) -> torch.Tensor:
        h = ops.bias_gelu(F.linear(x, self.up.weight), self.up.bias)
        return ops.residual_layer_norm(
            F.linear(h, self.down.weight),
            self.down.bias,
            x,
            self.norm.weight,
            self.norm.bias,
            self.norm.eps,
            self.hidden_dropout if self.training else 0.0,
        )


class Block(nn.Module):
    """Shared self-attention and FFN; the pluggable cross-attention exists only above L_s."""

    def __init__(self, config: SemVLPConfig, has_cross_attention: bool):
        super().__init__()
        self.attention = Attention(config, cross=False)
        self.cross_attention = Attention(config, cross=True) if has_cross_attention else None
        self.ffn = FeedForward(config)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        ops: KernelOps,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.attention(x, mask, ops)
        if context is not None:
            x = self.cross_attention(x, context_mask, ops, context=context)
        return self.ffn(x, ops)


@dataclass
class EncoderOutput:
    text_states: torch.Tensor  # [B, m, H]
    visual_states: torch.Tensor  # [B, 1+K, H], [IMG] first
    visual_hidden_states: tuple[torch.Tensor, ...] | None = None  # after embeddings and each block


class Encoder(nn.Module):
    def __init__(self, config: SemVLPConfig):
        super().__init__()
        start = config.cross_attention_start_layer
        self.layers = nn.ModuleList(
            Block(config, has_cross_attention=i >= start) for i in range(config.num_hidden_layers)
        )

    def single_stream(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        visual: torch.Tensor,
        visual_mask: torch.Tensor | None,
        ops: KernelOps,
        output_hidden_states: bool = False,
    ) -> EncoderOutput:
        num_visual = visual.shape[1]
        x = torch.cat([visual, text], dim=1)
        mask = _concat_masks(visual_mask, text_mask, visual.shape[:2], text.shape[:2], x.device)
        hidden = [x[:, :num_visual]] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, mask, ops)
            if hidden is not None:
                hidden.append(x[:, :num_visual])
        return EncoderOutput(x[:, num_visual:], x[:, :num_visual], tuple(hidden) if hidden else None)

    def two_stream(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        visual: torch.Tensor,
        visual_mask: torch.Tensor | None,
        ops: KernelOps,
        output_hidden_states: bool = False,
    ) -> EncoderOutput:
        for layer in self.layers:
            text = layer(text, text_mask, ops)
        hidden = [visual] if output_hidden_states else None
        for layer in self.layers:
            if layer.cross_attention is None:
                visual = layer(visual, visual_mask, ops)
            else:
                visual = layer(visual, visual_mask, ops, context=text, context_mask=text_mask)
            if hidden is not None:
                hidden.append(visual)
        return EncoderOutput(text, visual, tuple(hidden) if hidden else None)


def _concat_masks(
    visual_mask: torch.Tensor | None,
    text_mask: torch.Tensor | None,
    visual_shape: torch.Size,
    text_shape: torch.Size,
    device: torch.device,
) -> torch.Tensor | None:
    """Key padding mask of [visual, text]; None when nothing is padded (lets SDPA pick flash)."""
    if visual_mask is None and text_mask is None:
        return None
    if visual_mask is None:
        visual_mask = torch.ones(visual_shape, dtype=torch.bool, device=device)
    if text_mask is None:
        text_mask = torch.ones(text_shape, dtype=torch.bool, device=device)
    return torch.cat([visual_mask, text_mask], dim=1)
