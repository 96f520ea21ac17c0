"""Fine-tuning metrics, computed the way the field reports them (DESIGN.md section 3).

- VQA: the soft score of the predicted answer, averaged over questions. LXMERT's label values
  are already the soft scores (1 annotator 0.3, 2 -> 0.6, 3 -> 0.9, >= 4 -> 1.0), so a question
  scores `label.get(prediction, 0)` (`airsplay/lxmert src/tasks/vqa_data.py`, `VQAEvaluator`).
- GQA: exact match of the predicted answer string with the gold answer.
- NLVR2: accuracy; consistency (the official `lil-lab/nlvr nlvr2/eval/metrics.py`) is the share of
  statements whose every image pair is predicted correctly, a statement being the identifier
  `split-set-pair-sentence` with its pair field blanked.
- Retrieval: image retrieval (each caption ranks all images) and text retrieval (each image ranks
  all captions; the best-ranked true caption counts) R@1/5/10 over the full score matrix, and
  their mean, as UNITER's `utils/itm_eval.py`. Ties count against the true item: its rank is the
  number of *other* candidates scoring at least as high, so a constant scorer gets R@1 = 0 rather
  than whatever a sort happens to do with equal values.

Answers missing from the answer table cannot be predicted: `answer_coverage` counts them and
gives the best score any classifier over that table could reach (the cap they imply).

Every function is pure (no ranks, no files): the tasks gather predictions first.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Container, Sequence
from dataclasses import dataclass

import torch

# --------------------------------------------------------------------------- VQA / GQA


def vqa_score(predictions: Sequence[str], labels: Sequence[dict[str, float]]) -> float:
    """Mean soft score of the predicted answers; `labels[i]` is {answer: soft score}."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        return 0.0
    return sum(label.get(p, 0.0) for p, label in zip(predictions, labels, strict=True)) / len(labels)


def gold_answers(label: dict[str, float]) -> set[str]:
    """The answers with the highest score of a label (GQA labels hold exactly one, score 1.0)."""
    if not label:
        return set()
    top = max(label.values())
    return {a for a, s in label.items() if s == top} if top > 0 else set()


def exact_match(predictions: Sequence[str], labels: Sequence[dict[str, float]]) -> float:
    """Share of questions whose prediction is a gold answer (GQA accuracy). A label with tied
    top answers accepts any of them; a label with no positive answer accepts nothing."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        return 0.0
    return sum(p in gold_answers(label) for p, label in zip(predictions, labels, strict=True)) / len(labels)


@dataclass
class AnswerCoverage:
    """How much of a labelled split an answer table can express."""

    questions: int
    questions_with_outside_answers: int  # a label names at least one answer not in the table
    unanswerable: int  # no answer the metric rewards is in the table: the question scores 0
    outside_answers: int  # distinct answers outside the table
    score_cap: float  # the best mean score reachable by predicting only table answers


def answer_coverage(labels: Sequence[dict[str, float]], table: Container[str], soft: bool) -> AnswerCoverage:
    """Count label answers missing from `table` and the score cap they imply.

    soft=True (VQA): a question's best reachable score is its highest soft score among table
    answers. soft=False (GQA exact match): 1 if any gold answer is in the table, else 0.
    """
    outside: set[str] = set()
    with_outside = unanswerable = 0
    total = 0.0
    for label in labels:
        missing = {a for a, s in label.items() if s > 0 and a not in table}
        outside |= missing
        with_outside += bool(missing)
        if soft:
            best = max((s for a, s in label.items() if a in table), default=0.0)
        else:
            best = float(any(a in table for a in gold_answers(label)))
        unanswerable += best <= 0
        total += best
    n = len(labels)
    return AnswerCoverage(n, with_outside, unanswerable, len(outside), total / n if n else 0.0)


def predicted_answers(logits: torch.Tensor) -> torch.Tensor:
    """Answer ids from classifier logits [B, A]; a tie goes to the lowest id (torch.argmax's rule)."""
    return logits.argmax(dim=-1)


# --------------------------------------------------------------------------- NLVR2


def nlvr2_statement(identifier: str) -> str:
    """The statement an NLVR2 identifier belongs to: `dev-850-2-0` -> `dev-850--0` (official)."""
    parts = identifier.split("-")
    if len(parts) >= 4:
        parts[2] = ""
    return "-".join(parts)


def nlvr2_metrics(identifiers: Sequence[str], predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """accuracy, and consistency when at least one statement has several image pairs."""
    if not len(identifiers) == len(predictions) == len(labels):
        raise ValueError(f"{len(identifiers)} identifiers, {len(predictions)} predictions, {len(labels)} labels")
    if not labels:
        return {"accuracy": 0.0}
    correct = [int(p) == int(y) for p, y in zip(predictions, labels, strict=True)]
    out = {"accuracy": sum(correct) / len(correct)}
    groups: dict[str, bool] = defaultdict(lambda: True)
    sizes: dict[str, int] = defaultdict(int)
    for ident, ok in zip(identifiers, correct, strict=True):
        key = nlvr2_statement(ident)
        groups[key] &= ok
        sizes[key] += 1
    if max(sizes.values()) > 1:
        out["consistency"] = sum(groups.values()) / len(groups)
    return out


# --------------------------------------------------------------------------- retrieval


def retrieval_metrics(scores: torch.Tensor, caption_image: torch.Tensor) -> dict[str, float]:
    """R@1/5/10 of image retrieval and text retrieval, and their mean (r_mean).

    Args:
        scores: [num_images, num_captions], higher = more likely matched.
        caption_image: [num_captions] the index of each caption's image.
    Returns:
        image_r{1,5,10} (per caption, is the true image within the top k),
        text_r{1,5,10} (per image with captions, is any true caption within the top k), r_mean.
    A NaN score (a model whose outputs overflowed) ranks below every number: it is never a hit.
    """
    scores = _nan_last(scores)
    num_images, num_captions = scores.shape
    caption_image = caption_image.to(scores.device).long()
    if caption_image.shape != (num_captions,):
        raise ValueError(f"caption_image has shape {tuple(caption_image.shape)}; expected ({num_captions},)")
    own = caption_image[None, :] == torch.arange(num_images, device=scores.device)[:, None]  # [I, C]
    # Image retrieval: images other than the true one scoring >= the true pair.
    true = scores.gather(0, caption_image[None, :])  # [1, C]
    image_rank = ((scores >= true) & ~own).sum(0)  # [C]
    # Text retrieval: captions of other images scoring >= the image's best true caption.
    has_caption = own.any(1)
    best = scores.masked_fill(~own, float("-inf")).max(1, keepdim=True).values  # [I, 1]
    text_rank = ((scores >= best) & ~own).sum(1)[has_caption]
    out = {}
    for k in (1, 5, 10):
        out[f"image_r{k}"] = (image_rank < k).float().mean().item()
        out[f"text_r{k}"] = (text_rank < k).float().mean().item()
    out["r_mean"] = sum(out.values()) / 6
    return out


def rankings(scores: torch.Tensor, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k images of each caption [C, k] and captions of each image [I, k]; ties keep index order,
    NaN scores come last."""
    scores = _nan_last(scores)
    by_caption = torch.sort(scores.t(), dim=1, descending=True, stable=True).indices[:, :k]
    by_image = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return by_caption, by_image


def _nan_last(scores: torch.Tensor) -> torch.Tensor:
    """fp32 scores with NaN as -inf. Every comparison with NaN is False and sorting puts NaN first, so
    a NaN true pair would otherwise rank first: a model with NaN outputs would score R@1 = 1."""
    scores = scores.float()
    return scores.masked_fill(scores.isnan(), float("-inf"))
