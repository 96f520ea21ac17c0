"""python -m semvlp.data.check: reads a data.json as the launchers do and lists every problem at once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from semvlp.data.check import main
from semvlp.data.toy import ToySpec, ensure_toy_world

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy(tmp_path) -> Path:
    return Path(ensure_toy_world(tmp_path / "toy", spec=ToySpec.small()))


def test_a_good_data_json_is_summarized_and_passes(toy):
    result = subprocess.run(
        [sys.executable, "-m", "semvlp.data.check", str(toy)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("stores: 180 images, K=100, D=2048: ")
    for expected in ("pretrain train: ", "vqa valid: ", "gqa test: ", "nlvr2 train: 60 statements",
                     "flickr30k test ['test']: 30 images, 150 captions"):  # fmt: skip
        assert any(line.startswith(expected) for line in lines), (expected, lines)
    assert lines[-1] == f"{toy}: no problems found"


def test_every_problem_is_listed_with_its_section_and_file(toy, capsys):
    data = json.loads(toy.read_text())
    data["num_object_labels"] = 5  # the store holds object ids up to 39
    data["gqa"]["label2ans"] = "no_such_table.json"
    questions = json.loads((toy.parent / "vqa_valid.json").read_text())
    questions.append({**questions[0], "question_id": 999999, "img_id": "not_an_image"})
    (toy.parent / "vqa_valid_extra.json").write_text(json.dumps(questions))
    data["vqa"]["valid"] = ["vqa_valid_extra.json"]
    broken = toy.parent / "broken.json"
    broken.write_text(json.dumps(data))

    assert main([str(broken)]) == 1
    out, err = capsys.readouterr()
    problems = err.strip().splitlines()
    assert problems[0] == "3 problem(s):", err
    assert any(p.startswith("  stores: ") and "num_object_labels" in p for p in problems), err
    assert any(p.startswith("  gqa answer table: ") and "no_such_table.json" in p for p in problems), err
    missing = f"  vqa valid ({toy.parent / 'vqa_valid_extra.json'}): 1 of 31 images are in no feature store, "
    assert any(p.startswith(missing) and "'not_an_image'" in p for p in problems), err
    # the other sections are still read and reported
    assert "nlvr2 valid: 20 statements" in out and "vqa valid: " in out


def test_a_data_json_that_does_not_parse_is_the_one_problem(tmp_path, capsys):
    broken = tmp_path / "data.json"
    broken.write_text('{"stores": [\n')
    assert main([str(broken)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "1 problem(s):",
        f"  data.json: {broken}: invalid JSON at line 2: Expecting value",
    ]


def test_values_the_converters_refuse_are_named_with_their_images(toy, capsys):
    """A store made by other means (edited, or written without FeatureStoreWriter): NaN features failed
    the first step with a non-finite loss naming no image, pixel boxes with a model error naming no
    store, and inverted boxes trained silently."""
    data = json.loads(toy.read_text())
    store = toy.parent / data["stores"][0]
    bad = toy.parent / "bad.h5"
    shutil.copyfile(store, bad)
    with h5py.File(bad, "r+") as f:
        ids = [i.decode() for i in f["image_ids"][:]]
        f["features"][3, 7, 11] = np.nan
        f["features"][150, 0, 0] = np.inf
        f["boxes"][5, 2] = [0.6, 0.1, 0.2, 0.9]  # x2 < x1
        f["boxes"][7, 0, 2] = 640.0  # pixels, not normalized
        f["obj_confs"][9, 4] = np.nan
    data["stores"] = [str(bad)]
    (toy.parent / "bad.json").write_text(json.dumps(data))
    assert main([str(toy.parent / "bad.json")]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "4 problem(s):",
        f"  {bad}: features are not finite in float16 (NaN, inf or beyond 65504), image {ids[3]!r} (row 3) and 1 more",
        f"  {bad}: boxes are not normalized to [0, 1], image {ids[7]!r} (row 7)",
        f"  {bad}: a box has x2 < x1 or y2 < y1, image {ids[5]!r} (row 5)",
        f"  {bad}: obj_confs hold non-finite values, image {ids[9]!r} (row 9)",
    ]


def test_a_store_without_detector_labels_is_noted_for_pre_training(toy, capsys):
    """bottom-up-attention's TSVs hold no labels: their stores carry id 0 with confidence 0, which
    pre-training reads as weight 0 for the masked-object label and attribute losses. Said, not refused
    (a run may mean it); a fine-tuning-only data.json reads no labels and gets no note."""
    data = json.loads(toy.read_text())
    unlabeled = toy.parent / "unlabeled.h5"
    shutil.copyfile(toy.parent / data["stores"][0], unlabeled)
    with h5py.File(unlabeled, "r+") as f:
        for name in ("obj_ids", "obj_confs", "attr_ids", "attr_confs"):
            f[name][...] = 0
    data["stores"] = [data["stores"][0], str(unlabeled)]  # the same images twice would be refused: split them
    with h5py.File(unlabeled, "r+") as f:
        f["image_ids"][...] = [b"unlabeled-" + i for i in f["image_ids"][:]]
    (toy.parent / "two.json").write_text(json.dumps(data))
    assert main([str(toy.parent / "two.json")]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == [
        f"note: {unlabeled} holds no detector labels (every object and attribute id is 0): its images train the "
        "masked-object label and attribute losses with weight 0 (docs/data_format.md section 2)"
    ]
    del data["pretrain"]
    (toy.parent / "finetune_only.json").write_text(json.dumps(data))
    assert main([str(toy.parent / "finetune_only.json")]) == 0
    assert "note:" not in capsys.readouterr().out


def test_what_a_training_run_stops_on_is_a_problem(toy, capsys):
    """A train or dev split with no files, without labels, without a question or statement, and a
    retrieval train split of one image: "no problems found", then the launchers refused the data or
    (no labels) failed mid-run. A test split without labels (the toy VQA test file) is no problem."""
    data = json.loads(toy.read_text())
    folder = toy.parent
    data["pretrain"]["train"] = []
    data["vqa"]["valid"] = []
    questions = json.loads((folder / "gqa_valid.json").read_text())
    (folder / "gqa_dev.json").write_text(json.dumps([{k: v for k, v in q.items() if k != "label"} for q in questions]))
    data["gqa"]["valid"] = ["gqa_dev.json"]
    (folder / "nlvr2_none.json").write_text("[]")
    data["nlvr2"]["train"] = ["nlvr2_none.json"]
    karpathy = json.loads((folder / data["flickr30k"]["annotations"]).read_text())
    train = [image for image in karpathy["images"] if image["split"] == "train"]
    for image in train[1:]:
        image["split"] = "restval"
    (folder / "karpathy.json").write_text(json.dumps(karpathy))
    data["flickr30k"]["annotations"] = "karpathy.json"
    broken = folder / "broken.json"
    broken.write_text(json.dumps(data))

    assert main([str(broken)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "5 problem(s):",
        "  pretrain train: the data configuration lists no pre-training train files",
        "  vqa valid: the data configuration lists no vqa valid files",
        f"  gqa valid ({folder / 'gqa_dev.json'}): no question has a label; train and dev files need them (only test "
        "files may have none)",
        f"  nlvr2 train ({folder / 'nlvr2_none.json'}): no statements",
        f"  flickr30k train ({folder / 'karpathy.json'}): 1 image(s); retrieval training needs at least two (a "
        "caption's negatives are the other images)",
    ]

    # A section with test files only is for --predict_only, which needs no train or dev split.
    predict_only = json.loads(toy.read_text())
    predict_only["vqa"].update(train=[], valid=[])
    (folder / "predict_only.json").write_text(json.dumps(predict_only))
    assert main([str(folder / "predict_only.json")]) == 0
    assert "vqa: test files only (predictions with --predict_only)" in capsys.readouterr().out
