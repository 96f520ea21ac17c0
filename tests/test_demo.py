"""What `make demo` runs (2 processes, 1,500 steps of the tiny preset on the toy world), and what its
export is worth: learned matching, fine-tuning beyond chance, zero-shot retrieval, --eval_only.
About half of the suite's CPU time: conftest.py starts the run before the first test, and the rest
of the suite runs meanwhile.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from _launch import records, run_pretrain


@pytest.fixture(scope="module")
def demo_run(demo_run_started) -> Path:
    """The output folder of what `make demo` runs, once it is done (conftest.py started it first)."""
    run, run_dir = demo_run_started
    result = run.wait()
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_demo_length_run_learns_image_text_matching(demo_run):
    """Held-out two-stream image-text matching sits at chance at first, leaves it after ~500-1,000
    steps and ends above 0.9; masked-LM and object-label accuracy are learned in both modes.

    Not asserted: single-stream ITM (printed). It takes off only after two-stream, by a lag that
    moves with floating-point rounding, from ~1,250 steps to past 2,000 (docs/data_format.md
    section 6), so at step 1,500 it has usually not left chance: seed 42 ends at 0.556 on an AMD
    EPYC (at 2,000 steps, the demo's length until 2026-12-06, runs ended at 0.67-0.93). That the
    single-stream pooled vector can learn a label of the pair is checked in tests/test_model.py.
    Also not reached at this length: QA above its language prior (~0.38 on the toy world; the run
    ends at 0.34-0.45).
    """
    evaluations = records(demo_run, "eval")
    first, final = evaluations[0], evaluations[-1]
    assert (first["step"], final["step"]) == (500, 1500)
    print(f"single-stream ITM accuracy at step 1500: {final['single/itm_acc']:.3f}")
    for mode in ("single", "two"):
        assert first[f"{mode}/itm_acc"] < 0.6, first  # chance at first: what follows is learned
        assert final[f"{mode}/mlm_acc"] >= 0.75, final  # 0.82-0.85 measured; 1/vocab at init
        assert final[f"{mode}/obj_label_acc"] >= 0.85, final  # 0.94 measured
    assert final["two/itm_acc"] >= 0.8, (first, final)  # 0.90-0.94 in every run measured


def fine_tune_demo_export(demo_run: Path, toy_data: Path, out: Path, script: str, args: list[str]) -> dict:
    """launch/<script> (two-stream, batch 16) from the demo run's export; its results.json."""
    result = run_pretrain(
        ["--data", str(toy_data), "--init_from", str(demo_run / "export"), "--mode", "two", "--epochs", "0",
         "--batch_size", "16", "--output_dir", str(out), *args],
        script=script,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # The fresh task head is named once, by the launcher; transformers' warning table would repeat it.
    assert "initialized from SemVLP export" in result.stdout and "LOAD REPORT" not in result.stdout + result.stderr
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_demo_export_fine_tunes_nlvr2_well_above_chance(demo_run, toy_data, tmp_path):
    """The pre-trained export carries grounding: NLVR2 (balanced labels, the text alone gives nothing
    away) fine-tuned from it for 120 steps (measured 0.82 dev / 0.86 test; 0.75 / 0.80, 0.81 / 0.84
    and 0.84 / 0.84 on earlier exports of 2,000 steps). From random init it stays at chance (test_finetune.py)."""
    args = ["--max_steps", "120", "--eval_every", "120", "--lr", "1e-4"]
    results = fine_tune_demo_export(demo_run, toy_data, tmp_path / "nlvr2", "finetune_nlvr2.py", args)
    # the export names its classifier's outputs, not the pre-training export's QA answers
    assert json.loads((tmp_path / "nlvr2" / "export" / "config.json").read_text())["id2label"] == {
        "0": "false",
        "1": "true",
    }
    assert results["best"]["value"] >= 0.7, results["best"]  # dev accuracy; chance is 0.5
    assert results["splits"]["test"]["accuracy"] >= 0.7, results["splits"]["test"]


@pytest.mark.slow
def test_demo_export_fine_tunes_gqa_beyond_the_question_prior(demo_run, toy_data, tmp_path):
    """GQA fine-tuned from the export for 300 steps (1.2 epochs), scored on dev + test together (800
    questions: one split's 400 leave a standard error of ~0.025, as large as the margins). A toy
    question's words give away only its kind (semvlp/data/toy.py): text alone is worth ~0.38 here
    (majority answer 0.36), and "what color is the X ?" stays at chance (1/8) unless the model reads
    the image. Measured: accuracy 0.465, color questions 0.34 (from the 2,000-step export, seeds
    42 / 1 / 2: 0.46 / 0.47 / 0.44, color 0.33 / 0.36 / 0.36); the same 300 steps from random init:
    0.40 and 0.11. (One seed is not enough to set a bar: at lr 3e-4 seeds 42 and 1 gave 0.44 / 0.48
    and color 0.24 / 0.39.)
    """
    from semvlp.metrics import exact_match

    out = tmp_path / "gqa"
    args = ["--max_steps", "300", "--eval_every", "300", "--lr", "5e-4"]
    fine_tune_demo_export(demo_run, toy_data, out, "finetune_gqa.py", args)
    train = json.loads((toy_data.parent / "gqa_train.json").read_text())
    majority = Counter(max(q["label"], key=q["label"].get) for q in train).most_common(1)[0][0]
    questions, predictions = [], {}
    for split, predicted in (("valid", "gqa_valid.json"), ("testdev", "gqa_test.json")):
        questions += json.loads((toy_data.parent / f"gqa_{split}.json").read_text())
        rows = json.loads((out / "predictions" / predicted).read_text())
        predictions.update({str(p["questionId"]): p["prediction"] for p in rows})
    labels = [q["label"] for q in questions]
    accuracy = exact_match([predictions[str(q["question_id"])] for q in questions], labels)
    assert accuracy >= exact_match([majority] * len(questions), labels) + 0.05, accuracy  # 0.41
    color = [q for q in questions if " what color is the " in q["sent"]]
    assert len(color) > 200
    color_accuracy = exact_match([predictions[str(q["question_id"])] for q in color], [q["label"] for q in color])
    assert color_accuracy >= 0.22, color_accuracy


@pytest.mark.slow
def test_demo_export_retrieves_zero_shot(demo_run, toy_data, tmp_path):
    """--predict_only takes the pre-training export for retrieval: its ITM head ranks the pairs with no
    fine-tuning (measured on this export's 50 test images: image R@1/5/10 0.16 / 0.72 / 0.98, as
    high as 60 fine-tuning steps reached from an earlier export, 0.16 / 0.72 / 0.98; chance 0.02 /
    0.10 / 0.20). Fine-tuning retrieval itself is tested from random init in tests/test_finetune.py."""
    out = tmp_path / "zero_shot"
    result = run_pretrain(
        ["--data", str(toy_data), "--init_from", str(demo_run / "export"), "--mode", "two", "--predict_only",
         "--predict_splits", "test", "--eval_images", "50", "--output_dir", str(out)],
        script="finetune_retrieval.py",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    test = json.loads((out / "results.json").read_text())["splits"]["test"]
    assert (test["images"], test["captions"]) == (50, 250)
    assert test["image_r5"] >= 0.4 and test["image_r10"] >= 0.6, test
    assert test["r_mean"] >= 0.35, test  # chance ~0.1


@pytest.mark.slow
def test_eval_only_reproduces_the_runs_final_evaluation_from_its_export(demo_run, toy_data, tmp_path):
    """--eval_only evaluates an export as the run evaluated itself: the demo export gives its run's
    final held-out metrics, to the last digit (same batches, same masks, fp32 weights)."""
    out = tmp_path / "eval"
    result = run_pretrain(
        ["--data", str(toy_data), "--init_from", str(demo_run / "export"), "--eval_only", "--eval_batches", "10",
         "--num_workers", "0", "--output_dir", str(out)]
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    final = records(demo_run, "eval")[-1]
    assert set(metrics) == {k for k in final if "/" in k}
    assert metrics == pytest.approx({k: final[k] for k in metrics}, abs=1e-6)
    assert not (out / "checkpoints").exists() and not (out / "export").exists()
