"""Fine-tuning models (paper 3.3.3, 4.2). Each runs in either mode, chosen per call.

- Question answering (VQA, GQA): answer classifier on the pooled vector; BCE against soft
  scores, scaled by the number of answers as LXMERT does.
- NLVR2: (sentence, img0) and (sentence, img1) encoded separately, pooled vectors
  concatenated -> MLP -> 2 classes (LXMERT).
- Retrieval: the ITM score of a pair; its head has the pre-training ITM head's name and shape,
  so a pre-trained export initializes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from semvlp.config import SemVLPConfig
from semvlp.model.heads import AnswerHead, Transform
from semvlp.model.modeling import SemVLPModel, SemVLPPreTrainedModel, StreamStates


@dataclass
class ClassificationOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class SemVLPForQuestionAnswering(SemVLPPreTrainedModel):
    """`config.num_qa_labels` answers (3,129 for VQA v2, 1,842 for GQA)."""

    def __init__(self, config: SemVLPConfig):
        super().__init__(config)
        self.semvlp = SemVLPModel(config)
        self.answer_head = AnswerHead(config.hidden_size, config.num_qa_labels, config.layer_norm_eps)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        visual_feats: torch.Tensor,
        visual_pos: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        visual_attention_mask: torch.Tensor | None = None,
        answer_targets: torch.Tensor | None = None,
        mode: str = "single",
    ) -> ClassificationOutput:
        """answer_targets: [B, num_answers] soft scores in [0, 1]."""
        pooled = self.semvlp(
            input_ids, attention_mask, token_type_ids, visual_feats, visual_pos, visual_attention_mask, mode
        ).pooled
        logits = self.answer_head(pooled).float()
        loss = None
        if answer_targets is not None:
            loss = F.binary_cross_entropy_with_logits(logits, answer_targets.float()) * logits.shape[1]
        return ClassificationOutput(loss, logits)

    @torch.no_grad()
    def start_from_qa_head(self, qa_head: dict[str, torch.Tensor], answers: list[str]) -> int:
        """Start the answer head from a pre-training QA head, as LXMERT's fine-tuning does (its
        --loadLXMERTQA): the transform whole, and the classifier row of every answer both tables
        hold; the other rows keep their initialization. `qa_head`: the pre-training model's qa_head
        tensors (names without "qa_head."); `answers`: its answer table, row by row. Returns how many
        answers were carried over."""
        head = self.answer_head
        for name, param in head.transform.named_parameters():
            param.copy_(qa_head[f"transform.{name}"])
        row_of = {answer: row for row, answer in self.config.id2label.items()}
        shared = [(row_of[answer], source) for source, answer in enumerate(answers) if answer in row_of]
        if shared:
            rows, sources = (list(pair) for pair in zip(*shared, strict=True))
            head.classifier.weight[rows] = qa_head["classifier.weight"][sources].to(head.classifier.weight.dtype)
            head.classifier.bias[rows] = qa_head["classifier.bias"][sources].to(head.classifier.bias.dtype)
        return len(shared)


class SemVLPForNLVR2(SemVLPPreTrainedModel):
    def __init__(self, config: SemVLPConfig):
        super().__init__(config)
        self.semvlp = SemVLPModel(config)
        self.classifier = nn.Sequential(
            Transform(2 * config.hidden_size, 2 * config.hidden_size, config.layer_norm_eps),
            nn.Linear(2 * config.hidden_size, 2),
        )
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        visual_feats: torch.Tensor,
        visual_pos: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        visual_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mode: str = "single",
    ) -> ClassificationOutput:
        """visual_feats [B, 2, K, D], visual_pos [B, 2, K, 4]: the two images of each statement."""
        if visual_feats.dim() != 4 or visual_feats.shape[1] != 2:
            raise ValueError(f"visual_feats has shape {tuple(visual_feats.shape)}; expected [batch, 2, K, D]")
        batch = input_ids.shape[0]

        def twice(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.repeat_interleave(2, dim=0)

        pooled = self.semvlp(
            twice(input_ids),
            twice(attention_mask),
            twice(token_type_ids),
            visual_feats.flatten(0, 1),
            visual_pos.flatten(0, 1),
            None if visual_attention_mask is None else visual_attention_mask.flatten(0, 1),
            mode,
        ).pooled
        logits = self.classifier(pooled.view(batch, -1)).float()
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return ClassificationOutput(loss, logits)


class SemVLPForRetrieval(SemVLPPreTrainedModel):
    """Scores (image, caption) pairs; the score is the matched-class ITM logit."""

    def __init__(self, config: SemVLPConfig):
        super().__init__(config)
        self.semvlp = SemVLPModel(config)
        self.itm_head = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        visual_feats: torch.Tensor,
        visual_pos: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        visual_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mode: str = "single",
    ) -> ClassificationOutput:
        """labels: [B] 1 matched, 0 mismatched. logits: [B, 2]; `score(logits)` ranks pairs."""
        pooled = self.semvlp(
            input_ids, attention_mask, token_type_ids, visual_feats, visual_pos, visual_attention_mask, mode
        ).pooled
        logits = self.itm_logits(pooled)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return ClassificationOutput(loss, logits)

    def itm_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """The head in fp32 whatever the model's precision: rounded to bf16 (8 significant bits) the
        logits of a 1K x 5K score matrix tie often, and ties count against the true item (R@K)."""
        return F.linear(pooled.float(), self.itm_head.weight.float(), self.itm_head.bias.float())

    def score_pairs(self, image: StreamStates, text: StreamStates) -> torch.Tensor:
        """`score` of the two-stream pairs (image row i, text row i) from states computed apart
        (SemVLPModel.two_stream_image / two_stream_text): equal to scoring forward(mode="two")."""
        return self.score(self.itm_logits(self.semvlp.two_stream_pairs(image, text).pooled))

    @staticmethod
    def score(logits: torch.Tensor) -> torch.Tensor:
        """Log-odds of "matched": monotone in the matched probability, so it ranks pairs."""
        return logits[:, 1] - logits[:, 0]
