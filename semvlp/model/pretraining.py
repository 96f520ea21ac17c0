"""SemVLPForPreTraining: the encoder plus the four pre-training tasks (paper 3.3.1, DESIGN.md 2).

- Masked LM on the text states, decoder tied to the word embeddings, computed on masked rows only.
- Masked object prediction on the object states (not [IMG]): feature regression (SmoothL1
  averaged over the 2048 dims, as LXMERT), object-label and attribute classification weighted
  by the detector's confidence (LXMERT). As the paper says, only masked objects are predicted.
- Image-text matching on the pooled vector.
- Image QA (answer classification) on the pooled vector.
Text may come packed (a PackedText as input_ids); mlm_labels then follow it, packed [T] (the
batch's packed_mlm_labels), and everything else is as for padded text.
Mismatched pairs (itm_labels == 0) contribute no masked-LM, object or QA loss, but are corrupted
like matched ones (LXMERT). All losses are summed with equal weights. Objects are zeroed here, on
the device, from `obj_mask`; the batch carries the original features, the regression targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from semvlp.config import SemVLPConfig
from semvlp.model.heads import AnswerHead, Transform
from semvlp.model.modeling import PackedText, SemVLPModel, SemVLPPreTrainedModel

LOSS_NAMES = ("mlm", "obj_feat", "obj_label", "attr_label", "itm", "qa")


@dataclass
class PreTrainingOutput(ModelOutput):
    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] | None = None
    itm_logits: torch.Tensor | None = None  # [B, 2]
    qa_logits: torch.Tensor | None = None  # [B, num_qa_labels]
    mlm_logits: torch.Tensor | None = None  # [N_masked, vocab], eval mode only
    mlm_targets: torch.Tensor | None = None  # [N_masked]
    obj_label_logits: torch.Tensor | None = None  # [N_masked_objects, num_object_labels]
    obj_label_targets: torch.Tensor | None = None  # [N_masked_objects]


def _masked_mean(values: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """sum / count without a host sync; 0 (with a gradient path) when nothing is selected."""
    return values.sum() / count.clamp(min=1)


class SemVLPForPreTraining(SemVLPPreTrainedModel):
    def __init__(self, config: SemVLPConfig):
        super().__init__(config)
        self.semvlp = SemVLPModel(config)
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.mlm_transform = Transform(hidden, hidden, eps)
        self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.obj_transform = Transform(hidden, hidden, eps)
        self.obj_feat_head = nn.Linear(hidden, config.visual_feat_dim)
        self.obj_label_head = nn.Linear(hidden, config.num_object_labels)
        self.attr_label_head = nn.Linear(hidden, config.num_attribute_labels)
        self.itm_head = nn.Linear(hidden, 2)
        self.qa_head = AnswerHead(hidden, config.num_qa_labels, eps)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self:  # from_pretrained of an export without it (an encoder's) builds it empty
            nn.init.zeros_(self.mlm_bias)

    def resize_token_embeddings(self, *args, **kwargs) -> nn.Embedding:
        """HF's (new tokens for the word embeddings, which are also the masked-LM decoder), and the
        masked-LM bias with them: kept for the tokens that stay, 0 for new ones."""
        embeddings = super().resize_token_embeddings(*args, **kwargs)
        kept = min(embeddings.num_embeddings, self.mlm_bias.shape[0])
        bias = self.mlm_bias.new_zeros(embeddings.num_embeddings)
        bias[:kept] = self.mlm_bias.detach()[:kept]
        self.mlm_bias = nn.Parameter(bias)
        return embeddings

    def forward(
        self,
        input_ids: torch.Tensor | PackedText,
        visual_feats: torch.Tensor,
        visual_pos: torch.Tensor,
        mlm_labels: torch.Tensor,
        obj_mask: torch.Tensor,
        obj_labels: torch.Tensor,
        obj_confs: torch.Tensor,
        attr_labels: torch.Tensor,
        attr_confs: torch.Tensor,
        itm_labels: torch.Tensor,
        qa_labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        visual_attention_mask: torch.Tensor | None = None,
        mode: str = "single",
    ) -> PreTrainingOutput:
        if isinstance(input_ids, PackedText):
            if mlm_labels.shape != input_ids.input_ids.shape:
                raise ValueError(
                    f"mlm_labels has shape {tuple(mlm_labels.shape)}; with PackedText it is packed like "
                    f"PackedText.input_ids, {tuple(input_ids.input_ids.shape)} (the batch's packed_mlm_labels)"
                )
            mlm_labels = input_ids.layout.pad(mlm_labels, fill=-100)  # [B, max_seqlen], like text_states
        matched = itm_labels.bool()
        # Zero the masked objects of every pair, matched or not: if only matched pairs had zeroed
        # objects, "some objects are zero" would give the ITM label away. Only the losses skip
        # mismatched pairs.
        masked_feats = visual_feats.masked_fill(obj_mask.bool()[..., None], 0)
        obj_mask = obj_mask.bool() & matched[:, None]
        out = self.semvlp(
            input_ids, attention_mask, token_type_ids, masked_feats, visual_pos, visual_attention_mask, mode
        )
        ops = self.semvlp.kernel_ops(out.text_states)
        losses: dict[str, torch.Tensor] = {}

        # The heads run on masked rows only. Each set of rows is found once (nonzero: a host sync on
        # a GPU, and a graph break under torch.compile) and indexes every tensor that needs it.

        # Masked LM: gather masked rows of matched pairs, then one fused decoder + cross-entropy.
        mlm_labels = mlm_labels.masked_fill(~matched[:, None], -100)
        mlm_rows = (mlm_labels != -100).nonzero(as_tuple=True)
        mlm_hidden = self.mlm_transform(out.text_states[mlm_rows])
        mlm_targets = mlm_labels[mlm_rows]
        decoder = self.semvlp.embeddings.word_embeddings.weight
        losses["mlm"] = ops.linear_cross_entropy(mlm_hidden, decoder, self.mlm_bias, mlm_targets)

        # Masked objects: object states exclude [IMG] (index 0).
        obj_rows = obj_mask.nonzero(as_tuple=True)
        obj_hidden = self.obj_transform(out.visual_states[:, 1:][obj_rows])
        num_masked = obj_mask.sum()
        feat_error = F.smooth_l1_loss(
            self.obj_feat_head(obj_hidden).float(), visual_feats[obj_rows].float(), reduction="none"
        )
        losses["obj_feat"] = _masked_mean(feat_error.mean(dim=-1), num_masked)
        obj_logits = self.obj_label_head(obj_hidden).float()
        obj_targets = obj_labels[obj_rows]
        obj_ce = F.cross_entropy(obj_logits, obj_targets, reduction="none")
        losses["obj_label"] = _masked_mean(obj_ce * obj_confs[obj_rows], num_masked)
        attr_ce = F.cross_entropy(self.attr_label_head(obj_hidden).float(), attr_labels[obj_rows], reduction="none")
        losses["attr_label"] = _masked_mean(attr_ce * attr_confs[obj_rows], num_masked)

        # Cross-modal tasks on the pooled vector.
        itm_logits = self.itm_head(out.pooled).float()
        losses["itm"] = F.cross_entropy(itm_logits, itm_labels)
        qa_labels = qa_labels.masked_fill(~matched, -100)
        qa_logits = self.qa_head(out.pooled).float()
        qa_ce = F.cross_entropy(qa_logits, qa_labels, ignore_index=-100, reduction="none")
        losses["qa"] = _masked_mean(qa_ce, (qa_labels != -100).sum())

        mlm_logits = None
        if not self.training:
            mlm_logits = F.linear(mlm_hidden, decoder, self.mlm_bias).float()
        return PreTrainingOutput(
            loss=sum(losses.values()),
            losses=losses,
            itm_logits=itm_logits,
            qa_logits=qa_logits,
            mlm_logits=mlm_logits,
            mlm_targets=mlm_targets,
            obj_label_logits=obj_logits,
            obj_label_targets=obj_targets,
        )
