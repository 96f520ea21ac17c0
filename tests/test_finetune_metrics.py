"""semvlp.metrics against hand-computed values on small fixtures (ties, answers outside the table)."""

from __future__ import annotations

import math

import pytest
import torch

from semvlp.metrics import (
    answer_coverage,
    exact_match,
    nlvr2_metrics,
    nlvr2_statement,
    predicted_answers,
    rankings,
    retrieval_metrics,
    vqa_score,
)


def test_vqa_soft_score_by_hand():
    labels = [
        {"2": 1.0, "3": 0.3},  # predicted "3": 0.3
        {"red": 0.6, "blue": 0.6},  # tied annotators, predicted "blue": 0.6
        {"yes": 1.0},  # predicted "no": 0
        {},  # no label answers at all: 0
    ]
    assert vqa_score(["3", "blue", "no", "yes"], labels) == pytest.approx((0.3 + 0.6 + 0 + 0) / 4)
    assert vqa_score([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1 labels"):
        vqa_score(["a", "b"], [{}])


def test_gqa_exact_match_by_hand():
    labels = [{"pipe": 1.0}, {"left": 1.0}, {"red": 1.0, "blue": 1.0}, {"yes": 0.3, "no": 1.0}]
    # right, wrong, a tied gold answer (accepted), a non-top answer (rejected)
    assert exact_match(["pipe", "right", "blue", "yes"], labels) == pytest.approx(2 / 4)
    assert exact_match(["x"], [{"x": 0.0}]) == 0.0  # a zero-score label accepts nothing


def test_answer_coverage_counts_outside_answers_and_the_cap_they_imply():
    table = {"yes", "no", "2"}
    labels = [
        {"yes": 1.0},  # fully answerable: 1.0
        {"two": 0.9, "2": 0.3},  # "two" is outside: best reachable 0.3
        {"maybe": 1.0},  # unanswerable: 0
        {"no": 0.6, "nope": 0.3},  # "nope" outside but "no" is the best anyway: 0.6
        {"yes": 0.3, "no": 0.9},  # two table answers: the better, 0.9
    ]
    soft = answer_coverage(labels, table, soft=True)
    assert (soft.questions, soft.questions_with_outside_answers, soft.unanswerable, soft.outside_answers) == (
        5,
        3,
        1,
        3,
    )
    assert soft.score_cap == pytest.approx((1.0 + 0.3 + 0.0 + 0.6 + 0.9) / 5)
    exact = answer_coverage(labels, table, soft=False)
    # exact match needs the top answer in the table: rows 1, 4 and 5 only
    assert exact.unanswerable == 2 and exact.score_cap == pytest.approx(3 / 5)
    # the cap is a real bound: an oracle predicting the best table answer reaches it exactly
    oracle = [max((a for a in lab if a in table), key=lab.get, default="yes") for lab in labels]
    assert vqa_score(oracle, labels) == pytest.approx(soft.score_cap)


def test_predicted_answer_ties_go_to_the_lowest_id():
    logits = torch.tensor([[0.1, 2.0, 2.0, -1.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 1.0]])
    assert predicted_answers(logits).tolist() == [1, 0, 3]


def test_nlvr2_accuracy_and_consistency_by_hand():
    ids = ["dev-1-0-0", "dev-1-1-0", "dev-1-2-0", "dev-1-0-1", "dev-2-0-0", "dev-2-1-0"]
    # statements: dev-1--0 (3 pairs), dev-1--1 (1 pair), dev-2--0 (2 pairs)
    assert nlvr2_statement("dev-1-2-0") == "dev-1--0"
    labels = [1, 0, 1, 0, 1, 1]
    preds = [1, 0, 0, 0, 1, 1]  # one error, in statement dev-1--0
    out = nlvr2_metrics(ids, preds, labels)
    assert out["accuracy"] == pytest.approx(5 / 6)
    assert out["consistency"] == pytest.approx(2 / 3)
    # every statement alone: no consistency reported
    assert nlvr2_metrics(["a-1-0-0", "a-2-0-0"], [1, 0], [1, 1]) == {"accuracy": 0.5}


def test_retrieval_recalls_by_hand():
    # 3 images, 4 captions: captions 0, 1 describe image 0; caption 2 image 1; caption 3 image 2.
    caption_image = torch.tensor([0, 0, 1, 2])
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.0],  # image 0
            [0.2, 0.8, 0.7, 0.3],  # image 1
            [0.1, 0.3, 0.6, 0.2],  # image 2
        ]
    )
    out = retrieval_metrics(scores, caption_image)
    # Image retrieval, rank of the true image per caption (column): c0 -> image 0 first (rank 0);
    # c1 -> 0.1 vs 0.8, 0.3: rank 2; c2 -> 0.7 is the best: rank 0; c3 -> 0.2 vs 0.0, 0.3: rank 1.
    assert out["image_r1"] == pytest.approx(2 / 4)
    assert out["image_r5"] == out["image_r10"] == 1.0
    # Text retrieval, per image, best true caption vs other images' captions:
    # image 0: best true 0.9 > 0.5, 0.0: rank 0; image 1: true 0.7 < 0.8 (caption 1): rank 1;
    # image 2: true 0.2 < 0.3, 0.6 and > 0.1: rank 2.
    assert out["text_r1"] == pytest.approx(1 / 3)
    assert out["text_r5"] == 1.0
    assert out["r_mean"] == pytest.approx((2 / 4 + 1 + 1 + 1 / 3 + 1 + 1) / 6)


def test_retrieval_ties_count_against_the_true_item():
    caption_image = torch.arange(12)
    constant = retrieval_metrics(torch.zeros(12, 12), caption_image)
    # every other candidate ties with the true one: rank 11, outside even the top 10
    assert constant["image_r1"] == constant["text_r10"] == 0.0
    scores = torch.eye(12)
    scores[0, 1] = 1.0  # caption 1 ties its true image 1 with image 0; image 0 ties caption 0 with 1
    out = retrieval_metrics(scores, caption_image)
    assert out["image_r1"] == pytest.approx(11 / 12) and out["text_r1"] == pytest.approx(11 / 12)
    assert out["image_r5"] == 1.0


def test_retrieval_images_without_captions_are_not_text_queries():
    scores = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])  # image 2 has no caption
    out = retrieval_metrics(scores, torch.tensor([0, 1]))
    assert out["text_r1"] == 1.0  # over images 0 and 1 only
    assert out["image_r1"] == 0.0  # image 2 outscores the true image for both captions
    assert not math.isnan(out["r_mean"])


def test_retrieval_nan_scores_are_never_hits():
    caption_image = torch.arange(12)
    broken = retrieval_metrics(torch.full((12, 12), float("nan")), caption_image)
    assert broken["r_mean"] == 0.0  # comparisons with NaN are False: without care every rank is 0
    scores = torch.eye(12)
    scores[3, 3] = float("nan")  # one true pair's score overflowed
    out = retrieval_metrics(scores, caption_image)
    assert out["image_r1"] == pytest.approx(11 / 12) and out["text_r1"] == pytest.approx(11 / 12)
    assert out["image_r10"] == pytest.approx(11 / 12)  # ranks below all 11 others
    by_caption, by_image = rankings(scores, k=12)
    assert by_caption[3].tolist()[-1] == 3 and by_image[3].tolist()[-1] == 3


def test_rankings_are_stable_on_ties():
    scores = torch.tensor([[1.0, 1.0, 0.0], [1.0, 2.0, 1.0]])  # 2 images x 3 captions
    by_caption, by_image = rankings(scores, k=2)
    assert by_caption.tolist() == [[0, 1], [1, 0], [1, 0]]
    assert by_image.tolist() == [[0, 1], [1, 0]]
