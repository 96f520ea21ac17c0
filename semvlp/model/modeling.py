"""SemVLPModel: embeddings + the shared encoder + pooler, run in "single" or "two" stream mode.

Text comes padded (input_ids [B, m] + attention_mask) or packed (a `PackedText` in input_ids'
place: the captions end to end, no padding tokens). Packed text runs the encoder without padding
(encoder.py); the outputs have one shape either way, text_states [B, m, H] with m = max_seqlen, and
equal states at the real tokens. At the padding positions packed text gives zeros and padded text
the states computed there (which nothing reads), so heads and losses do not care which form came in.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput
from transformers.utils import logging as hf_logging

from semvlp.config import SemVLPConfig
from semvlp.model.embeddings import TextEmbeddings, VisualEmbeddings
from semvlp.model.encoder import Encoder, Packed
from semvlp_kernels.dispatch import KernelOps, select_ops
from semvlp_kernels.varlen_attention import sequence_positions

MODES = ("single", "two")


@dataclass
class PackedText:
    """A batch of captions without padding (FlashAttention's varlen layout).

    Caption b is input_ids[cu_seqlens[b]:cu_seqlens[b + 1]], `[CLS] ... [SEP]`; its positions
    restart at 0 (the model derives them from cu_seqlens). Pre-training batches carry these as
    packed_input_ids, packed_token_type_ids, cu_seqlens and max_seqlen: see `from_batch`.
    """

    input_ids: torch.Tensor  # [T] int64, T = total tokens
    cu_seqlens: torch.Tensor  # [B + 1] int32, 0, ..., T
    max_seqlen: int  # the longest caption, a Python int; text_states come back [B, max_seqlen, H]
    token_type_ids: torch.Tensor | None = None  # [T]; zeros if None

    @classmethod
    def from_batch(cls, batch: dict) -> PackedText:
        return cls(batch["packed_input_ids"], batch["cu_seqlens"], batch["max_seqlen"], batch["packed_token_type_ids"])

    @property
    def layout(self) -> Packed:
        return Packed(self.cu_seqlens, self.max_seqlen)


@dataclass
class SemVLPOutput(ModelOutput):
    text_states: torch.Tensor | None = None  # [B, m, H] (m = max_seqlen for PackedText, zeros past each caption)
    visual_states: torch.Tensor | None = None  # [B, 1+K, H], [IMG] first
    pooled: torch.Tensor | None = None  # [B, H]: pooler(h_CLS) single-stream, pooler(o_IMG) two-stream
    # output_hidden_states=True: the states entering block 1, then leaving each block (L + 1 tensors
    # each; [B, m, H] text, zeros past each caption for PackedText; [B, 1+K, H] image)
    text_hidden_states: tuple[torch.Tensor, ...] | None = None
    visual_hidden_states: tuple[torch.Tensor, ...] | None = None
    # output_attentions=True, per block, [B, heads, T_q, T_k] fp32 probabilities before dropout.
    # "single": `attentions`, over [IMG, o_1..o_K, text] (T = 1 + K + m). "two": `text_attentions`
    # [B, heads, m, m], `visual_attentions` [B, heads, 1+K, 1+K] and `cross_attentions`
    # [B, heads, 1+K, m] (image queries, final text states as keys; blocks L_s+1..L only).
    attentions: tuple[torch.Tensor, ...] | None = None
    text_attentions: tuple[torch.Tensor, ...] | None = None
    visual_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class StreamStates:
    """One stream of mode="two" computed on its own (SemVLPModel.two_stream_text / two_stream_image)."""

    states: torch.Tensor  # [B, n, H]
    mask: torch.Tensor | None  # [B, n] bool, True for real tokens / objects; None when nothing is padded

    def rows(self, index: torch.Tensor) -> StreamStates:
        """The states (and mask) of rows `index`, e.g. one image repeated for a chunk of captions."""
        return StreamStates(self.states[index], None if self.mask is None else self.mask[index])


class SemVLPPreTrainedModel(PreTrainedModel):
    config_class = SemVLPConfig
    base_model_prefix = "semvlp"
    # HF's activation checkpointing (gradient_checkpointing_enable; activation_checkpointing_enable
    # in transformers 5) recomputes each encoder block in the backward: Encoder.block
    supports_gradient_checkpointing = True

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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """HF's from_pretrained; a training checkpoint, which holds a config.json but DeepSpeed's shards
        instead of the weights, is named as such (HF would say only that it has no model.safetensors)."""
        from semvlp.checkpoint import is_checkpoint  # the model package does not depend on training

        path = Path(str(pretrained_model_name_or_path))
        if path.is_dir() and is_checkpoint(path):
            raise ValueError(
                f"{path} is a training checkpoint (DeepSpeed shards), not a model folder: export it first "
                f"(python -m semvlp.export {path} --out DIR), then load DIR"
            )
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings and progress bars off around a from_pretrained or save_pretrained whose
    caller says what matters itself: the LOAD REPORT table lists the heads an export lacks (expected),
    and a progress bar over one file is noise in a run's log."""
    verbosity, progress_bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress_bar:
            hf_logging.enable_progress_bar()


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """HF's activation checkpointing, non-reentrant, under this transformers' name for it (5.x renamed
    gradient_checkpointing_enable, which now warns)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


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

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor | PackedText,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        visual_feats: torch.Tensor | None = None,
        visual_pos: torch.Tensor | None = None,
        visual_attention_mask: torch.Tensor | None = None,
        mode: str = "single",
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> SemVLPOutput:
        """Encode a batch of (text, image) pairs.

        Args:
            input_ids: [B, m] WordPiece ids, `[CLS] ... [SEP]`; or a PackedText, the same text
                without padding (then attention_mask and token_type_ids must be None).
            attention_mask: [B, m], 1 for real tokens, 0 for padding.
            token_type_ids: [B, m] segment ids (zeros if None).
            visual_feats: [B, K, visual_feat_dim] region features.
            visual_pos: [B, K, 4] boxes (x1, y1, x2, y2) normalized to [0, 1].
            visual_attention_mask: [B, K], 1 for real objects; None when nothing is padded.
            mode: "single" (image and text concatenated) or "two" (separate, cross-attention above L_s).
            output_hidden_states: also return the text and image states entering block 1 and leaving each block.
            output_attentions: also return every block's attention probabilities (see
                SemVLPOutput). Attention then runs eagerly, whatever the kernel backend: fused
                kernels never form the probabilities. Padded text only.
        """
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; expected one of {MODES}")
        if mode == "single" and isinstance(input_ids, PackedText) and visual_attention_mask is not None:
            raise ValueError(
                "visual_attention_mask with PackedText in single-stream mode is not supported "
                "(the packed sequences [IMG, objects, text] cannot mask objects); pass padded text"
            )
        if output_attentions and isinstance(input_ids, PackedText):
            raise ValueError("output_attentions needs padded text (input_ids [B, m]), not a PackedText")
        batch = self._check_text(input_ids, attention_mask, token_type_ids)
        self._check_visual(visual_feats, visual_pos, visual_attention_mask, batch)
        text, text_mask = self._embed_text(input_ids, attention_mask, token_type_ids)
        visual, visual_mask = self._embed_visual(visual_feats, visual_pos, visual_attention_mask)
        ops = self.kernel_ops(text)
        run = self.encoder.single_stream if mode == "single" else self.encoder.two_stream
        out = run(text, text_mask, visual, visual_mask, ops, output_hidden_states, output_attentions)
        text_states, text_hidden = out.text_states, out.text_hidden_states
        if isinstance(text_mask, Packed):
            text_states = text_mask.pad(text_states)
            text_hidden = None if text_hidden is None else tuple(text_mask.pad(h) for h in text_hidden)
        first = text_states[:, 0] if mode == "single" else out.visual_states[:, 0]
        return SemVLPOutput(
            text_states=text_states,
            visual_states=out.visual_states,
            pooled=self.pooler(first),
            text_hidden_states=text_hidden,
            visual_hidden_states=out.visual_hidden_states,
            attentions=out.attentions,
            text_attentions=out.text_attentions,
            visual_attentions=out.visual_attentions,
            cross_attentions=out.cross_attentions,
        )

    # mode="two" in pieces. The text never sees the image and the image blocks below L_s never see
    # the text, so scoring C captions against I images needs C text encodings and I lower-image
    # encodings, and only the blocks from L_s on per pair (SemVLPForRetrieval.score_pairs).

    def two_stream_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> StreamStates:
        """The final text states of mode="two" (padded text: [B, m] as in forward)."""
        if isinstance(input_ids, PackedText):
            raise ValueError("two_stream_text takes padded text (input_ids [B, m]), not a PackedText")
        self._check_text(input_ids, attention_mask, token_type_ids)
        text, text_mask = self._embed_text(input_ids, attention_mask, token_type_ids)
        return StreamStates(self.encoder.text_stream(text, text_mask, self.kernel_ops(text)), text_mask)

    def two_stream_image(
        self,
        visual_feats: torch.Tensor,
        visual_pos: torch.Tensor,
        visual_attention_mask: torch.Tensor | None = None,
    ) -> StreamStates:
        """The image states of mode="two" after the blocks below L_s (those without cross-attention)."""
        self._check_visual(visual_feats, visual_pos, visual_attention_mask, batch=None)
        visual, visual_mask = self._embed_visual(visual_feats, visual_pos, visual_attention_mask)
        below = slice(0, self.config.cross_attention_start_layer)
        states = self.encoder.visual_stream(visual, visual_mask, self.kernel_ops(visual), None, None, below)
        return StreamStates(states, visual_mask)

    def two_stream_pairs(self, image: StreamStates, text: StreamStates) -> SemVLPOutput:
        """forward(mode="two") of the pairs (image row i, text row i) from their pieces: the blocks
        from L_s on, then the pooler on [IMG]."""
        if image.states.shape[0] != text.states.shape[0]:
            raise ValueError(f"{image.states.shape[0]} images for {text.states.shape[0]} texts: pair them row by row")
        above = slice(self.config.cross_attention_start_layer, None)
        ops = self.kernel_ops(image.states)
        visual = self.encoder.visual_stream(image.states, image.mask, ops, text.states, text.mask, above)
        return SemVLPOutput(text.states, visual, self.pooler(visual[:, 0]))

    def _check_text(self, input_ids, attention_mask, token_type_ids) -> int:
        """Shape checks of the text (padded or packed; a host read of cu_seqlens when packed).
        Returns the batch size."""
        if isinstance(input_ids, PackedText):
            batch, length = self._check_packed_text(input_ids, attention_mask, token_type_ids)
        elif input_ids.dim() != 2:
            raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; expected [batch, text_len]")
        else:
            batch, length = input_ids.shape
        if length > self.config.max_position_embeddings:
            what = "PackedText.max_seqlen is" if isinstance(input_ids, PackedText) else "input_ids has"
            raise ValueError(
                f"{what} {length} tokens; the position table holds "
                f"max_position_embeddings={self.config.max_position_embeddings}"
            )
        for name, tensor in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if tensor is not None and tuple(tensor.shape) != (batch, length):
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected {(batch, length)}")
        # A host sync; skipped while torch.compile traces the model.
        if isinstance(input_ids, PackedText) and not torch.compiler.is_compiling():
            self._check_packed_lengths(input_ids)
        return batch

    def _check_visual(self, visual_feats, visual_pos, visual_attention_mask, batch: int | None) -> None:
        """Shape checks of the image side (batch None: any batch size) and the box range (a host sync)."""
        cfg = self.config
        if visual_feats is None or visual_pos is None:
            raise ValueError("visual_feats and visual_pos are required")
        if visual_feats.dim() != 3 or visual_feats.shape[-1] != cfg.visual_feat_dim:
            raise ValueError(
                f"visual_feats has shape {tuple(visual_feats.shape)}; expected "
                f"[batch, num_objects, visual_feat_dim={cfg.visual_feat_dim}]"
            )
        images, num_objects = visual_feats.shape[:2]
        if tuple(visual_pos.shape) != (images, num_objects, cfg.visual_pos_dim):
            raise ValueError(
                f"visual_pos has shape {tuple(visual_pos.shape)}; expected {(images, num_objects, cfg.visual_pos_dim)}"
            )
        if batch is not None and images != batch:
            raise ValueError(f"visual_feats has batch size {images} but input_ids has {batch}")
        if visual_attention_mask is not None and tuple(visual_attention_mask.shape) != (images, num_objects):
            shape = tuple(visual_attention_mask.shape)
            raise ValueError(f"visual_attention_mask has shape {shape}; expected {(images, num_objects)}")
        if not torch.compiler.is_compiling():
            low, high = torch.stack(torch.aminmax(visual_pos.float())).tolist()
            if low < -1e-4 or high > 1 + 1e-4:
                raise ValueError(
                    f"visual_pos holds values in [{low:.4g}, {high:.4g}]; boxes must be normalized to [0, 1]"
                )

    def _embed_text(
        self, input_ids, attention_mask, token_type_ids
    ) -> tuple[torch.Tensor, torch.Tensor | Packed | None]:
        """Text embeddings and their mask: a bool key padding mask, or the Packed layout."""
        position_ids = None
        if isinstance(input_ids, PackedText):  # text [T, H]; its layout goes where the mask would
            text_mask, token_type_ids = input_ids.layout, input_ids.token_type_ids
            input_ids = input_ids.input_ids
            _, position_ids = sequence_positions(text_mask.cu_seqlens, input_ids.shape[0])
        else:
            text_mask = None if attention_mask is None else attention_mask.bool()
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        return self.embeddings(input_ids, token_type_ids, position_ids), text_mask

    def _embed_visual(
        self, visual_feats, visual_pos, visual_attention_mask
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[IMG] + object embeddings, and their bool key padding mask ([IMG] always valid)."""
        visual_mask = None
        if visual_attention_mask is not None:
            img_is_valid = visual_attention_mask.new_ones(visual_attention_mask.shape[0], 1)
            visual_mask = torch.cat([img_is_valid, visual_attention_mask], dim=1).bool()
        return self.visual_embeddings(visual_feats, visual_pos), visual_mask

    @staticmethod
    def _check_packed_text(text: PackedText, attention_mask, token_type_ids) -> tuple[int, int]:
        """Shape checks of packed text (no device sync); returns (batch, max_seqlen)."""
        if attention_mask is not None or token_type_ids is not None:
            raise ValueError(
                "attention_mask and token_type_ids must be None when input_ids is a PackedText "
                "(cu_seqlens gives the lengths; PackedText.token_type_ids the segments)"
            )
        if text.input_ids.dim() != 1:
            raise ValueError(f"PackedText.input_ids has shape {tuple(text.input_ids.shape)}; expected [total_tokens]")
        if text.token_type_ids is not None and text.token_type_ids.shape != text.input_ids.shape:
            raise ValueError(
                f"PackedText.token_type_ids has shape {tuple(text.token_type_ids.shape)}; "
                f"expected {tuple(text.input_ids.shape)} like PackedText.input_ids"
            )
        cu = text.cu_seqlens
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2 or cu.device != text.input_ids.device:
            raise ValueError(
                f"PackedText.cu_seqlens must be int32 [batch + 1] on input_ids' device; got {cu.dtype} "
                f"{tuple(cu.shape)} on {cu.device}"
            )
        if isinstance(text.max_seqlen, bool) or not isinstance(text.max_seqlen, int) or text.max_seqlen < 1:
            raise ValueError(f"PackedText.max_seqlen must be a positive Python int; got {text.max_seqlen!r}")
        return cu.numel() - 1, text.max_seqlen

    @staticmethod
    def _check_packed_lengths(text: PackedText) -> None:
        """cu_seqlens' values (a host read): 0 first, T last, every caption 1..max_seqlen tokens."""
        offsets = text.cu_seqlens.tolist()
        lengths = [end - begin for begin, end in zip(offsets[:-1], offsets[1:], strict=True)]
        total = text.input_ids.shape[0]
        if offsets[0] != 0 or offsets[-1] != total:
            raise ValueError(f"PackedText.cu_seqlens must run from 0 to len(input_ids) = {total}; got {offsets}")
        if min(lengths) < 1 or max(lengths) > text.max_seqlen:
            raise ValueError(
                f"PackedText.cu_seqlens gives caption lengths {lengths}; each must be in 1..max_seqlen="
                f"{text.max_seqlen} (a caption has at least [CLS])"
            )
