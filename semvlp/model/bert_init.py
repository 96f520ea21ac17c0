"""Initialize SemVLP from a local BERT folder in the HuggingFace layout (config.json + weights).

The paper initializes from StructBERT-base; bert-base-uncased is the common public substitute.
BERT's embeddings, blocks, pooler and (when present) masked-LM head transform are loaded; the
visual embedding, cross-attention sub-layers and the other heads start fresh.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from semvlp.checkpoint import weights_file
from semvlp.config import SemVLPConfig, read_config_json

logger = logging.getLogger(__name__)

BERT_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
    "initializer_range", "layer_norm_eps", "pad_token_id",
)  # fmt: skip

# BERT name (after stripping a leading "bert.") -> our name, for everything but the fused QKV.
_RENAMES = [
    (r"^embeddings\.LayerNorm\.", "embeddings.norm."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"encoder.layers.\1.attention.out."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"encoder.layers.\1.attention.norm."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"encoder.layers.\1.ffn.up."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"encoder.layers.\1.ffn.down."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"encoder.layers.\1.ffn.norm."),
    (r"^(embeddings\.(word|position|token_type)_embeddings\.weight)$", r"\1"),
    (r"^(pooler\.dense\.(weight|bias))$", r"\1"),
]
# BertForPreTraining's masked-LM transform, kept outside the encoder (prefix "cls.").
_HEAD_RENAMES = [
    (r"^cls\.predictions\.transform\.dense\.", "mlm_transform.dense."),
    (r"^cls\.predictions\.transform\.LayerNorm\.", "mlm_transform.norm."),
    (r"^cls\.predictions\.bias$", "mlm_bias"),
]
_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)$")


@dataclass
class InitReport:
    loaded: list[str]  # our parameter names filled from BERT
    new: list[str]  # our parameter names left at their fresh initialization
    unused: list[str]  # BERT names with no counterpart (e.g. the next-sentence head)


def config_from_bert(bert_dir: str | Path, **overrides) -> SemVLPConfig:
    """A SemVLPConfig with the BERT folder's shape (its config.json) and SemVLP's other defaults."""
    path = Path(bert_dir) / "config.json"
    if not path.is_file():
        export = Path(bert_dir) / "export"
        hint = f" (a run folder? its model is {export})" if (export / "config.json").is_file() else ""
        raise FileNotFoundError(f"{path}: no config.json in the BERT folder {bert_dir}{hint}")
    bert = read_config_json(path)
    fields = {k: bert[k] for k in BERT_CONFIG_FIELDS if k in bert}
    return SemVLPConfig(**{**fields, **overrides})


def read_bert_state_dict(bert_dir: str | Path) -> dict[str, torch.Tensor]:
    path = weights_file(bert_dir)
    if path.suffix == ".safetensors":
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
    return {k.replace(".gamma", ".weight").replace(".beta", ".bias"): v for k, v in state.items()}


def _rename(name: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, replacement in rules:
        if re.search(pattern, name):
            return re.sub(pattern, replacement, name)
    return None


def init_from_bert(model: torch.nn.Module, bert_dir: str | Path) -> InitReport:
    """Copy BERT weights into `model` (a SemVLPModel or a model holding one as `.semvlp`).

    Raises ValueError naming the tensor when a shape differs from the model's.
    """
    encoder_prefix = "semvlp." if hasattr(model, "semvlp") else ""
    bert = read_bert_state_dict(bert_dir)
    ours = model.state_dict()
    updates: dict[str, torch.Tensor] = {}
    qkv_parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unused = []
    for name, tensor in bert.items():
        name = name.removeprefix("bert.")
        if match := _QKV.match(name):
            layer, part, kind = match.groups()
            qkv_parts.setdefault((layer, kind), {})[part] = tensor
            continue
        target = _rename(name, _RENAMES)
        if target is not None:
            target = encoder_prefix + target
        else:
            target = _rename(name, _HEAD_RENAMES) if encoder_prefix else None
        if target is None or target not in ours:
            unused.append(name)
            continue
        updates[target] = tensor
    for (layer, kind), parts in qkv_parts.items():
        target = f"{encoder_prefix}encoder.layers.{layer}.attention.qkv.{kind}"
        if target not in ours or len(parts) != 3:
            unused.extend(f"encoder.layer.{layer}.attention.self.{p}.{kind}" for p in parts)
            continue
        updates[target] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)

    for target, tensor in updates.items():
        if tuple(tensor.shape) != tuple(ours[target].shape):
            raise ValueError(
                f"{bert_dir}: BERT tensor for {target} has shape {tuple(tensor.shape)}; "
                f"the model expects {tuple(ours[target].shape)}"
            )
    model.load_state_dict(updates, strict=False)
    report = InitReport(loaded=sorted(updates), new=sorted(set(ours) - set(updates)), unused=sorted(unused))
    logger.info(
        "initialized from %s: %d tensors loaded, %d new (%s), %d BERT tensors unused",
        bert_dir,
        len(report.loaded),
        len(report.new),
        ", ".join(_summarize(report.new)),
        len(report.unused),
    )
    return report


def _summarize(names: list[str]) -> list[str]:
    """Collapse per-layer names: 'encoder.layers.7.cross_attention.query.weight' -> 'cross_attention'."""
    groups = []
    for name in names:
        group = re.sub(r"^semvlp\.", "", name)
        group = re.sub(r"^encoder\.layers\.\d+\.", "", group).split(".")[0]
        if group not in groups:
            groups.append(group)
    return groups
