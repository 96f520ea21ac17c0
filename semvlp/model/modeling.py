"""SemVLPModel: embeddings + the shared encoder + pooler, run in "single" or "two" stream mode."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from semvlp.config import SemVLPConfig
from semvlp.model.embeddings import TextEmbeddings, VisualEmbeddings
from semvlp.model.encoder import Encoder
from semvlp_kernels.dispatch import KernelOps, select_ops

MODES = ("single", "two")


@dataclass
class SemVLPOutput(ModelOutput):
    text_states: torch.Tensor | None = None  # [B, m, H]
    visual_states: torch.Tensor | None = None  # [B, 1+K, H], [IMG] first
    pooled: torch.Tensor | None = None  # [B, H]: pooler(h_CLS) single-stream, pooler(o_IMG) two-stream
    visual_hidden_states: tuple[torch.Tensor, ...] | None = None


class SemVLPPreTrainedModel(PreTrainedModel):
    config_class = SemVLPConfig
    base_model_prefix = "semvlp"

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, VisualEmbeddings):
            nn.init.normal_(module.img_token, std=std)

    def kernel_ops(self, reference: torch.Tensor) -> KernelOps:
        """The fused-op implementations for this config on `reference`'s device and dtype."""
        return select_ops(self.config.kernel_backend, reference.device, reference.dtype)


class Pooler(nn.Module):
    """BERT's pooler: tanh(W x + b) on the first token of a sequence."""

    def __init__(self, config: SemVLPConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, first_token: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(first_token))


class SemVLPModel(SemVLPPreTrainedModel):
    def __init__(self, config: SemVLPConfig):
        super().__init__(config)
        self.embeddings = TextEmbeddings(config)
        self.visual_embeddings = VisualEmbeddings(config)
        self.encoder = Encoder(config)
        self.pooler = Pooler(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        visual_feats: torch.Tensor | None = None,
        visual_pos: torch.Tensor | None = None,
        visual_attention_mask: torch.Tensor | None = None,
        mode: str = "single",
        output_hidden_states: bool = False,
    ) -> SemVLPOutput:
        """Encode a batch of (text, image) pairs.

        Args:
            input_ids: [B, m] WordPiece ids, `[CLS] ... [SEP]`.
            attention_mask: [B, m], 1 for real tokens, 0 for padding.
            token_type_ids: [B, m] segment ids (zeros if None).
            visual_feats: [B, K, visual_feat_dim] region features.
            visual_pos: [B, K, 4] boxes (x1, y1, x2, y2) normalized to [0, 1].
            visual_attention_mask: [B, K], 1 for real objects; None when nothing is padded.
            mode: "single" (image and text concatenated) or "two" (separate, cross-attention above L_s).
            output_hidden_states: also return the visual states after the embeddings and each block.
        """
        self._check_inputs(
            input_ids, attention_mask, token_type_ids, visual_feats, visual_pos, visual_attention_mask, mode
        )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        text = self.embeddings(input_ids, token_type_ids)
        visual = self.visual_embeddings(visual_feats, visual_pos)
        text_mask = None if attention_mask is None else attention_mask.bool()
        visual_mask = None
        if visual_attention_mask is not None:
            img_is_valid = visual_attention_mask.new_ones(visual_attention_mask.shape[0], 1)
            visual_mask = torch.cat([img_is_valid, visual_attention_mask], dim=1).bool()

        ops = self.kernel_ops(text)
        run = self.encoder.single_stream if mode == "single" else self.encoder.two_stream
        out = run(text, text_mask, visual, visual_mask, ops, output_hidden_states)
        first = out.text_states[:, 0] if mode == "single" else out.visual_states[:, 0]
        return SemVLPOutput(out.text_states, out.visual_states, self.pooler(first), out.visual_hidden_states)

    def _check_inputs(
        self, input_ids, attention_mask, token_type_ids, visual_feats, visual_pos, visual_attention_mask, mode
    ) -> None:
        cfg = self.config
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; expected one of {MODES}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; expected [batch, text_len]")
        batch, length = input_ids.shape
        if length > cfg.max_position_embeddings:
            raise ValueError(
                f"input_ids has {length} tokens; the position table holds "
                f"max_position_embeddings={cfg.max_position_embeddings}"
            )
        if visual_feats is None or visual_pos is None:
            raise ValueError("visual_feats and visual_pos are required")
        if visual_feats.dim() != 3 or visual_feats.shape[-1] != cfg.visual_feat_dim:
            raise ValueError(
                f"visual_feats has shape {tuple(visual_feats.shape)}; expected "
                f"[batch, num_objects, visual_feat_dim={cfg.visual_feat_dim}]"
            )
        num_objects = visual_feats.shape[1]
        if tuple(visual_pos.shape) != (visual_feats.shape[0], num_objects, cfg.visual_pos_dim):
            raise ValueError(
                f"visual_pos has shape {tuple(visual_pos.shape)}; expected "
                f"{(visual_feats.shape[0], num_objects, cfg.visual_pos_dim)}"
            )
        expected_text = (batch, length)
        for name, tensor in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if tensor is not None and tuple(tensor.shape) != expected_text:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected {expected_text}")
        if visual_feats.shape[0] != batch:
            raise ValueError(f"visual_feats has batch size {visual_feats.shape[0]} but input_ids has {batch}")
        if visual_attention_mask is not None and tuple(visual_attention_mask.shape) != (batch, num_objects):
            raise ValueError(
                f"visual_attention_mask has shape {tuple(visual_attention_mask.shape)}; expected {(batch, num_objects)}"
            )
        # One host sync per forward; skipped while torch.compile traces the model.
        if not torch.compiler.is_compiling():
            low, high = torch.stack(torch.aminmax(visual_pos.float())).tolist()
            if low < -1e-4 or high > 1 + 1e-4:
                raise ValueError(
                    f"visual_pos holds values in [{low:.4g}, {high:.4g}]; boxes must be normalized to [0, 1]"
                )
