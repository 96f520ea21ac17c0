"""Model configuration: BERT's fields plus the visual inputs and SemVLP's cross-attention."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

KERNEL_BACKENDS = ("auto", "eager", "sdpa", "triton")


class SemVLPConfig(PretrainedConfig):
    """Configuration of the shared encoder and its heads.

    `cross_attention_start_layer` is the paper's L_s: blocks L_s+1..L (1-based) carry a
    cross-attention sub-layer used in two-stream mode; L_s = L means none, L_s = 0 means all.
    `kernel_backend` picks attention and fused-op implementations (see kernels/dispatch.py):
    "auto" chooses per device and dtype, "eager" is plain PyTorch math, "sdpa" uses
    torch's scaled_dot_product_attention, "triton" uses the project's fused kernels.
    `num_objects` is K, the objects per image of the feature stores a run trained on (the launchers
    set it; the model takes any K): it records the data, and the benchmarks make K objects from it.
    """

    model_type = "semvlp"

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        pad_token_id: int = 0,
        visual_feat_dim: int = 2048,
        visual_pos_dim: int = 4,
        num_objects: int = 100,
        cross_attention_start_layer: int = 6,
        num_object_labels: int = 1600,
        num_attribute_labels: int = 400,
        num_qa_labels: int = 9500,
        kernel_backend: str = "auto",
        **kwargs,
    ):
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.visual_feat_dim = visual_feat_dim
        self.visual_pos_dim = visual_pos_dim
        self.num_objects = num_objects
        self.cross_attention_start_layer = cross_attention_start_layer
        self.num_object_labels = num_object_labels
        self.num_attribute_labels = num_attribute_labels
        self.num_qa_labels = num_qa_labels
        self.kernel_backend = kernel_backend
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if not 0 <= self.cross_attention_start_layer <= self.num_hidden_layers:
            raise ValueError(
                f"cross_attention_start_layer={self.cross_attention_start_layer} must be in "
                f"0..num_hidden_layers={self.num_hidden_layers}"
            )
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"kernel_backend={self.kernel_backend!r}; expected one of {KERNEL_BACKENDS}")
        if self.hidden_act != "gelu":
            raise ValueError(f"hidden_act={self.hidden_act!r}; only exact (erf) 'gelu' is implemented")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


PRESETS: dict[str, dict] = {
    # BERT-base shape, as in the paper.
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    # Small enough for CPU tests and the demo; head_dim 32 keeps the kernels' tiles realistic.
    # BERT's init std 0.02 is tuned for width 768; at width 128 it leaves every sub-layer's output
    # ~6x smaller relative to the residual, so 0.02 * sqrt(768 / 128) ~ 0.05 keeps base's scale.
    # No dropout: a demo run sees a fraction of an epoch, and dropout only slowed it (masked-LM
    # loss at step 400 of an alternating run on the toy world, batch 32: 3.5 at init 0.1 with
    # dropout 0.1, 1.7 at 0.05 with dropout, 1.2 at 0.05 without; docs/data_format.md section 6).
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        cross_attention_start_layer=2,
        max_position_embeddings=64,
        initializer_range=0.05,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ),
}


def config_from_preset(name: str, **overrides) -> SemVLPConfig:
    """Build a config from a named preset (`base`, `tiny`) with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    return SemVLPConfig(**{**PRESETS[name], **overrides})


def is_semvlp_export(folder: str | Path) -> bool:
    """Whether `folder` holds a SemVLP model (a config.json of model_type "semvlp"), not e.g. BERT's."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    fields = read_config_json(config)
    return isinstance(fields, dict) and fields.get("model_type") == SemVLPConfig.model_type


def read_config_json(path: str | Path) -> Any:
    """A model folder's config.json (SemVLP's or BERT's), parsed; ValueError naming the file when it
    does not parse (json's own errors name no file)."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
