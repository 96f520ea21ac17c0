"""The shared encoder and its two modes (paper section 3.2).

One stack of L blocks. Every block has self-attention (phi_S) and an FFN (phi_F); blocks
above L_s also own a cross-attention sub-layer (phi_C) between them.

Single-stream: S^0 = [IMG, o_1..o_K, CLS, w_1.., SEP] runs through all L blocks without
cross-attention; pooled = h_CLS^L.
Two-stream: the text runs alone through all L blocks (H^L); the image runs alone through the
same blocks, and in blocks l > L_s attends to H^L after its self-attention; pooled = o_IMG^L.
Text never attends to the image in two-stream mode (paper footnote 1).

Text comes padded ([B, m, H] + a key padding mask) or packed ([T, H], the captions end to end,
described by a `Packed` in the mask's place). Only attention looks at the layout: packed
self-attention is `ops.varlen_attention`. Packed single-stream runs example b as the one
sequence [IMG, o_1..o_K, text_b] of a varlen batch (no padding at all); packed two-stream runs the
text pass packed and gives cross-attention the final text states padded, with a key mask.

All fusion sites (attention, bias+GELU, bias+dropout+residual+LayerNorm) go through the
`KernelOps` chosen by `semvlp_kernels.dispatch`, so a kernel plugs in without touching the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from semvlp.config import SemVLPConfig
from semvlp_kernels.attention import attention_with_probs
from semvlp_kernels.dispatch import KernelOps
from semvlp_kernels.varlen_attention import sequence_positions


@dataclass(frozen=True)
class Packed:
    """Layout of packed rows [T, ...]: sequence b is rows cu_seqlens[b]:cu_seqlens[b + 1]."""

    cu_seqlens: torch.Tensor  # [B + 1] int32, starts at 0, ends at T
    max_seqlen: int  # longest sequence (bound), a Python int: padded outputs are [B, max_seqlen, ...]

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.numel() - 1

    def slots(self, total: int) -> torch.Tensor:
        """[T] int64: the row of each packed token in a padded [B * max_seqlen] layout."""
        sequence, position = sequence_positions(self.cu_seqlens, total)
        return sequence * self.max_seqlen + position

    def pad(self, x: torch.Tensor, fill: float = 0) -> torch.Tensor:
        """[T, ...] -> [B, max_seqlen, ...], `fill` at the padding positions."""
        padded = x.new_full((self.batch_size * self.max_seqlen, *x.shape[1:]), fill)
        return padded.index_copy(0, self.slots(x.shape[0]), x).view(self.batch_size, self.max_seqlen, *x.shape[1:])

    def key_padding_mask(self, total: int) -> torch.Tensor:
        """[B, max_seqlen] bool, True at real tokens."""
        return self.pad(torch.ones(total, dtype=torch.bool, device=self.cu_seqlens.device), fill=False)

    def prepend(self, prefix: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, Packed, torch.Tensor]:
        """Put prefix[b] ([B, P, H]) before sequence b of x ([T, H]).

        Returns the packed [B*P + T, H] rows, their layout, and `rows` [B*P + T]: where each row of
        cat([prefix.flatten(0, 1), x]) went (`joined[rows]` takes them back out, in that order).
        """
        batch, num_prefix, hidden = prefix.shape
        arange = torch.arange(batch + 1, dtype=self.cu_seqlens.dtype, device=self.cu_seqlens.device)
        joined = Packed(self.cu_seqlens + num_prefix * arange, self.max_seqlen + num_prefix)
        sequence, _ = sequence_positions(self.cu_seqlens, x.shape[0])
        prefix_rows = joined.cu_seqlens[:-1, None].long() + torch.arange(num_prefix, device=x.device)  # [B, P]
        x_rows = torch.arange(x.shape[0], device=x.device) + num_prefix * (sequence + 1)  # [T]
        rows = torch.cat([prefix_rows.flatten(), x_rows])
        out = x.new_empty(rows.shape[0], hidden).index_copy(0, rows, torch.cat([prefix.flatten(0, 1), x]))
        return out, joined, rows


@dataclass
class AttentionMaps:
    """Attention probabilities recorded block by block (output_attentions): [B, heads, T_q, T_k]
    in fp32, before dropout."""

    self_attention: list[torch.Tensor] = field(default_factory=list)
    cross_attention: list[torch.Tensor] = field(default_factory=list)


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
        return x.view(batch, length, self.num_heads, hidden // self.num_heads).transpose(1, 2)  # (B, nh, T, hs)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | Packed | None,
        ops: KernelOps,
        context: torch.Tensor | None = None,
        record: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [B, T, H] with `mask` a key padding mask [B, T_keys] (or None), or packed x [T, H] with
        `mask` its Packed layout (self-attention only). With `record` (padded x only), attention
        runs eagerly and appends its probabilities: the fused kernels never form them."""
        if self.cross:
            q = self.query(x)
            k, v = self.key_value(context).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        dropout = self.attention_dropout if self.training else 0.0
        if isinstance(mask, Packed):
            heads = lambda t: t.view(t.shape[0], self.num_heads, -1)  # (T, nh, hs)
            attended = ops.varlen_attention(heads(q), heads(k), heads(v), mask.cu_seqlens, mask.max_seqlen, dropout)
        elif record is not None:
            attended, probs = attention_with_probs(self._heads(q), self._heads(k), self._heads(v), mask, dropout)
            attended = attended.transpose(1, 2)
            record.append(probs)
        else:
            attended = ops.attention(self._heads(q), self._heads(k), self._heads(v), mask, dropout).transpose(1, 2)
        attended = attended.reshape(x.shape)
        return ops.linear_residual_layer_norm(
            attended,
            self.out.weight,
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
        h = ops.linear_gelu(x, self.up.weight, self.up.bias)
        return ops.linear_residual_layer_norm(
            h,
            self.down.weight,
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
        mask: torch.Tensor | Packed | None,
        ops: KernelOps,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        maps: AttentionMaps | None = None,
    ) -> torch.Tensor:
        x = self.attention(x, mask, ops, record=None if maps is None else maps.self_attention)
        if context is not None:
            record = None if maps is None else maps.cross_attention
            x = self.cross_attention(x, context_mask, ops, context=context, record=record)
        return self.ffn(x, ops)


@dataclass
class EncoderOutput:
    text_states: torch.Tensor  # [B, m, H], or [T, H] for packed text
    visual_states: torch.Tensor  # [B, 1+K, H], [IMG] first
    # output_hidden_states: the states entering block 1, then leaving each block (L + 1 of each)
    text_hidden_states: tuple[torch.Tensor, ...] | None = None  # packed text: [T, H] each
    visual_hidden_states: tuple[torch.Tensor, ...] | None = None
    # output_attentions: single-stream fills `attentions` (keys [IMG, objects, text]); two-stream
    # fills `text_attentions` (the text pass), `visual_attentions` (the image pass's
    # self-attention) and `cross_attentions` (image queries, text keys; blocks L_s+1..L only).
    attentions: tuple[torch.Tensor, ...] | None = None
    text_attentions: tuple[torch.Tensor, ...] | None = None
    visual_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


class Encoder(nn.Module):
    def __init__(self, config: SemVLPConfig):
        super().__init__()
        start = config.cross_attention_start_layer
        self.layers = nn.ModuleList(
            Block(config, has_cross_attention=i >= start) for i in range(config.num_hidden_layers)
        )
        # Set with `_gradient_checkpointing_func` by HF's gradient_checkpointing_enable (the
        # model's supports_gradient_checkpointing): see `block`.
        self.gradient_checkpointing = False

    def block(self, layer: Block, *inputs, maps: AttentionMaps | None = None) -> torch.Tensor:
        """`layer(*inputs)` (Block.forward's inputs, in order). Under activation checkpointing, in
        training, autograd keeps only the inputs and runs the block again in the backward
        (torch.utils.checkpoint restores the RNG, so dropout draws the same masks): ~1/3 more compute
        for a fraction of the activation memory. Not while recording attention maps, which a second
        run would record twice."""
        if self.gradient_checkpointing and self.training and maps is None:
            return self._gradient_checkpointing_func(layer.__call__, *inputs)
        return layer(*inputs, maps=maps)

    def single_stream(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor | Packed | None,
        visual: torch.Tensor,
        visual_mask: torch.Tensor | None,
        ops: KernelOps,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> EncoderOutput:
        batch, num_visual, hidden_size = visual.shape
        if isinstance(text_mask, Packed):  # example b = [IMG, o_1..o_K, text_b], one varlen batch
            x, mask, rows = text_mask.prepend(visual, text)
            visual_of = lambda x: x[rows[: batch * num_visual]].view(batch, num_visual, hidden_size)
            text_of = lambda x: x[rows[batch * num_visual :]]
        else:
            x = torch.cat([visual, text], dim=1)
            mask = _concat_masks(visual_mask, text_mask, visual.shape[:2], text.shape[:2], x.device)
            visual_of, text_of = (lambda x: x[:, :num_visual]), (lambda x: x[:, num_visual:])
        text_hidden, visual_hidden = ([text], [visual]) if output_hidden_states else (None, None)
        maps = AttentionMaps() if output_attentions else None
        for layer in self.layers:
            x = self.block(layer, x, mask, ops, maps=maps)
            if output_hidden_states:
                text_hidden.append(text_of(x))
                visual_hidden.append(visual_of(x))
        return EncoderOutput(
            text_of(x),
            visual_of(x),
            _tuple_or_none(text_hidden),
            _tuple_or_none(visual_hidden),
            attentions=None if maps is None else tuple(maps.self_attention),
        )

    def two_stream(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor | Packed | None,
        visual: torch.Tensor,
        visual_mask: torch.Tensor | None,
        ops: KernelOps,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> EncoderOutput:
        text_maps, visual_maps = (AttentionMaps(), AttentionMaps()) if output_attentions else (None, None)
        text_hidden, visual_hidden = ([text], [visual]) if output_hidden_states else (None, None)
        text = self.text_stream(text, text_mask, ops, hidden=text_hidden, maps=text_maps)
        # Cross-attention keys: the final text states, padded if packed (queries and keys differ).
        context, context_mask = text, text_mask
        if isinstance(text_mask, Packed):
            context, context_mask = text_mask.pad(text), text_mask.key_padding_mask(text.shape[0])
        visual = self.visual_stream(
            visual, visual_mask, ops, context, context_mask, hidden=visual_hidden, maps=visual_maps
        )
        return EncoderOutput(
            text,
            visual,
            _tuple_or_none(text_hidden),
            _tuple_or_none(visual_hidden),
            text_attentions=None if text_maps is None else tuple(text_maps.self_attention),
            visual_attentions=None if visual_maps is None else tuple(visual_maps.self_attention),
            cross_attentions=None if visual_maps is None else tuple(visual_maps.cross_attention),
        )

    # The two streams apart. The text never sees the image, and the image blocks below L_s never
    # see the text: a retrieval scorer encodes each caption and each image's lower blocks once.

    def text_stream(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor | Packed | None,
        ops: KernelOps,
        hidden: list[torch.Tensor] | None = None,
        maps: AttentionMaps | None = None,
    ) -> torch.Tensor:
        """Two-stream text: every block, self-attention only."""
        for layer in self.layers:
            text = self.block(layer, text, text_mask, ops, maps=maps)
            if hidden is not None:
                hidden.append(text)
        return text

    def visual_stream(
        self,
        visual: torch.Tensor,
        visual_mask: torch.Tensor | None,
        ops: KernelOps,
        context: torch.Tensor | None,
        context_mask: torch.Tensor | None,
        blocks: slice = slice(None),
        hidden: list[torch.Tensor] | None = None,
        maps: AttentionMaps | None = None,
    ) -> torch.Tensor:
        """Two-stream image through `self.layers[blocks]`; blocks from L_s on also attend to
        `context`, the final text states (None is allowed only for blocks below L_s)."""
        for layer in self.layers[blocks]:
            if layer.cross_attention is None:
                visual = self.block(layer, visual, visual_mask, ops, maps=maps)
            elif context is None:
                raise ValueError("blocks from cross_attention_start_layer on need the text states as context")
            else:
                visual = self.block(layer, visual, visual_mask, ops, context, context_mask, maps=maps)
            if hidden is not None:
                hidden.append(visual)
        return visual


def _tuple_or_none(states: list[torch.Tensor] | None) -> tuple[torch.Tensor, ...] | None:
    return None if states is None else tuple(states)


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
