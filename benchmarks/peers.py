"""Peer models for the throughput benchmark: HF transformers' VisualBERT and LXMERT pre-training models.

Both are randomly initialized at the size of our preset (hidden, heads, FFN, vocabulary, K objects)
and trained on the same synthetic batch with their own pre-training losses, so that a step of ours
and a step of theirs do the same job on the same data:

- VisualBERT (`VisualBertForPreTraining`, single-stream peer): L layers over [text; objects];
  masked LM over the text positions of a (text + objects)-long label tensor (-100 on objects) and
  sentence-image prediction, whose label convention is inverted (0 = matched, 1 = random).
  It has no box input: the 2048-d features go straight into its visual projection.
- LXMERT (`LxmertForPreTraining`, two-stream peer): 9 language / 5 object-relationship / 5 cross
  layers at base size (scaled by L/12 for smaller presets), masked LM, masked-object feature
  regression and object/attribute classification weighted by detector confidence on the masked
  objects (LXMERT's `obj_labels` dict), image-text matching and QA. Masked objects are zeroed in
  the input, as LXMERT's data pipeline does. Mismatched pairs carry no masked-LM or QA labels,
  the same rule as our model.

Neither peer supports SDPA in transformers 5 (both run eager attention); that is what a user of
these models runs, so it is what we compare against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from semvlp.config import SemVLPConfig

PEERS = ("visualbert", "lxmert")
# Which of our modes does the same job as each peer.
PEER_MODE = {"visualbert": "single", "lxmert": "two"}


def lxmert_layers(num_hidden_layers: int) -> tuple[int, int, int]:
    """LXMERT's (language, relationship, cross) layers: 9/5/5 at our L = 12, scaled for smaller presets."""
    if num_hidden_layers == 12:
        return 9, 5, 5
    scale = num_hidden_layers / 12
    return max(1, round(9 * scale)), max(1, round(5 * scale)), max(1, round(5 * scale))


def build_peer(name: str, cfg: SemVLPConfig) -> nn.Module:
    """A randomly initialized HF pre-training model of our preset's size."""
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_dropout_prob=cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
        max_position_embeddings=max(cfg.max_position_embeddings, 512),
        initializer_range=cfg.initializer_range,
    )
    if name == "visualbert":
        from transformers import VisualBertConfig, VisualBertForPreTraining

        config = VisualBertConfig(
            num_hidden_layers=cfg.num_hidden_layers, visual_embedding_dim=cfg.visual_feat_dim, **common
        )
        return VisualBertForPreTraining(config)
    if name == "lxmert":
        from transformers import LxmertConfig, LxmertForPreTraining

        l_layers, r_layers, x_layers = lxmert_layers(cfg.num_hidden_layers)
        return LxmertForPreTraining(
            LxmertConfig(
                l_layers=l_layers,
                r_layers=r_layers,
                x_layers=x_layers,
                num_qa_labels=cfg.num_qa_labels,
                num_object_labels=cfg.num_object_labels,
                num_attr_labels=cfg.num_attribute_labels,
                visual_feat_dim=cfg.visual_feat_dim,
                visual_pos_dim=cfg.visual_pos_dim,
                **common,
            )
        )
    raise ValueError(f"unknown peer {name!r}; known peers: {PEERS}")


def peer_inputs(name: str, inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    """Our batch (SemVLPForPreTraining's keyword arguments) as the peer's forward arguments.

    `dtype` is the dtype of the peer's parameters (features and float targets are cast to it,
    because HF's embeddings do not cast their inputs).
    """
    input_ids = inputs["input_ids"]
    batch, text_len = input_ids.shape
    attention_mask = inputs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    matched = inputs["itm_labels"].bool()
    mlm_labels = inputs["mlm_labels"].masked_fill(~matched[:, None], -100)
    obj_mask = inputs["obj_mask"].bool() & matched[:, None]
    feats = inputs["visual_feats"].to(dtype)
    num_objects = feats.shape[1]
    if name == "visualbert":
        visual_labels = mlm_labels.new_full((batch, num_objects), -100)
        return dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
            visual_embeds=feats,
            visual_attention_mask=attention_mask.new_ones(batch, num_objects),
            visual_token_type_ids=input_ids.new_ones(batch, num_objects),
            labels=torch.cat([mlm_labels, visual_labels], dim=1),  # [B, text + objects]
            sentence_image_labels=1 - inputs["itm_labels"],  # VisualBERT: 0 = matched
        )
    if name == "lxmert":
        mask = obj_mask.to(dtype)
        return dict(
            input_ids=input_ids,
            visual_feats=feats.masked_fill(obj_mask[..., None], 0),
            visual_pos=inputs["visual_pos"].to(dtype),
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
            labels=mlm_labels,
            obj_labels={
                "obj": (inputs["obj_labels"], mask * inputs["obj_confs"].to(dtype)),
                "attr": (inputs["attr_labels"], mask * inputs["attr_confs"].to(dtype)),
                "feat": (feats, mask),
            },
            matched_label=inputs["itm_labels"],
            ans=inputs["qa_labels"].masked_fill(~matched, -100),
        )
    raise ValueError(f"unknown peer {name!r}; known peers: {PEERS}")


def peer_forward(model: nn.Module, kwargs: dict) -> Callable[[], torch.Tensor]:
    """A closure running the peer's forward and returning its summed pre-training loss."""
    return lambda: model(**kwargs).loss
