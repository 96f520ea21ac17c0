"""python -m semvlp.predict: one (image, text) example through a real export, store and vocab; its
answers equal the model's own on the same inputs, for each kind of export."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from semvlp import SemVLPForNLVR2, SemVLPForPreTraining, SemVLPForQuestionAnswering, SemVLPModel
from semvlp.config import config_from_preset
from semvlp.data.store import FeatureStore, FeatureStoreWriter
from semvlp.data.tokenizer import load_tokenizer
from semvlp.data.toy import ToySpec, ensure_toy_world
from semvlp.model import SemVLPForRetrieval
from semvlp.predict import main

REPO = Path(__file__).resolve().parents[1]
ANSWERS = ["red", "blue", "yes", "no", "2", "3"]
TEXT = "by the wall , what color is the dog ?"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A small toy world and one tiny export of each kind, random weights, with the world's vocab."""
    root = tmp_path_factory.mktemp("predict")
    toy = Path(ensure_toy_world(root / "toy", spec=ToySpec.small())).parent
    config = config_from_preset("tiny", vocab_size=len(load_tokenizer(toy / "vocab.txt")))
    exports = {}
    for name, model_class, extra in [
        ("pretraining", SemVLPForPreTraining, {"num_qa_labels": 6, "id2label": dict(enumerate(ANSWERS))}),
        ("pretraining_without_qa", SemVLPForPreTraining, {}),
        ("vqa", SemVLPForQuestionAnswering, {"num_qa_labels": 6, "id2label": dict(enumerate(ANSWERS))}),
        ("nlvr2", SemVLPForNLVR2, {}),
        ("encoder", SemVLPModel, {}),
    ]:
        torch.manual_seed(0)
        exports[name] = root / name
        model_class(config_from_preset("tiny", vocab_size=config.vocab_size, **extra)).save_pretrained(exports[name])
        shutil.copyfile(toy / "vocab.txt", exports[name] / "vocab.txt")
    store = FeatureStore(toy / "features.h5")
    image_ids = store.image_ids[:2]
    store.close()
    exports["not_an_export"] = root / "not_an_export"  # a folder without config.json
    exports["not_an_export"].mkdir()
    return {"store": toy / "features.h5", "image_ids": image_ids, "exports": exports}


def _args(world: dict, export: str, *extra: str, images: int = 1) -> list[str]:
    return [str(world["exports"][export]), "--store", str(world["store"]), "--image_id",
            *world["image_ids"][:images], "--text", TEXT, *extra]  # fmt: skip


def _inputs(world: dict, images: int = 1) -> dict[str, torch.Tensor]:
    """The example as the model takes it, read here without semvlp.example."""
    ids = torch.tensor([load_tokenizer(world["exports"]["vqa"])(TEXT)["input_ids"]])
    store = FeatureStore(world["store"])
    read = [store.read(image_id) for image_id in world["image_ids"][:images]]
    feats = torch.stack([torch.from_numpy(r.features).float() for r in read])
    boxes = torch.stack([torch.from_numpy(r.boxes).float() for r in read])
    if images == 2:  # NLVR2: one example, its two images
        feats, boxes = feats[None], boxes[None]
    return {"input_ids": ids, "visual_feats": feats, "visual_pos": boxes}


def _model_logits(world: dict, export: str, model_class, mode: str, images: int = 1) -> torch.Tensor:
    model = model_class.from_pretrained(world["exports"][export]).eval()
    with torch.no_grad():
        return model(**_inputs(world, images), mode=mode).logits[0]


@pytest.mark.parametrize("mode", ["single", "two"])
def test_a_pretraining_export_scores_the_match_and_answers_with_its_itm_and_qa_heads(world, mode, tmp_path):
    out = tmp_path / "predictions" / "prediction.json"  # its folder is made
    assert main(_args(world, "pretraining", "--mode", mode, "--top", "2", "--out", str(out))) == 0
    record = json.loads(out.read_text())
    # the ITM head, as zero-shot retrieval scores pairs (SemVLPForRetrieval loads it from the export)
    expected = torch.softmax(_model_logits(world, "pretraining", SemVLPForRetrieval, mode), -1)[1]
    assert record["match"] == pytest.approx(float(expected), abs=1e-6)
    # the image-QA head, by the softmax its cross-entropy trains
    model = SemVLPForPreTraining.from_pretrained(world["exports"]["pretraining"]).eval()
    with torch.no_grad():
        top = torch.softmax(model.qa_head(model.semvlp(**_inputs(world), mode=mode).pooled)[0], -1).topk(2)
    assert [a["answer"] for a in record["answers"]] == [ANSWERS[i] for i in top.indices.tolist()]
    assert [a["score"] for a in record["answers"]] == pytest.approx(top.values.tolist(), abs=1e-6)


def test_a_pretraining_export_without_an_answer_table_scores_the_match_only(world, capsys):
    assert main(_args(world, "pretraining_without_qa")) == 0
    expected = torch.softmax(_model_logits(world, "pretraining_without_qa", SemVLPForRetrieval, "single"), -1)[1]
    assert capsys.readouterr().out.splitlines() == [f"P(match) = {expected:.3f}"]


def test_a_vqa_export_names_its_top_answers_with_their_sigmoid_scores(world, tmp_path):
    out = tmp_path / "prediction.json"
    result = subprocess.run(
        [sys.executable, "-m", "semvlp.predict", *_args(world, "vqa", "--top", "3", "--out", str(out))],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    scores = torch.sigmoid(_model_logits(world, "vqa", SemVLPForQuestionAnswering, "single"))
    top = scores.topk(3)
    record = json.loads(out.read_text())
    assert (record["task"], record["text"], record["image_ids"]) == ("answers", TEXT, world["image_ids"][:1])
    assert [a["answer"] for a in record["answers"]] == [ANSWERS[i] for i in top.indices.tolist()]
    assert [a["score"] for a in record["answers"]] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert result.stdout.splitlines()[0] == f"{top.values[0]:.3f}  {ANSWERS[top.indices[0]]}"


def test_an_nlvr2_export_takes_two_images(world, capsys):
    assert main(_args(world, "nlvr2", images=2)) == 0
    expected = torch.softmax(_model_logits(world, "nlvr2", SemVLPForNLVR2, "single", images=2), -1)[1]
    assert capsys.readouterr().out.splitlines()[0] == f"P(true) = {expected:.3f}"


@pytest.mark.parametrize(
    "export, extra, message",
    [
        ("nlvr2", [], "--image_id: 1 given; a nlvr2 export takes 2"),
        ("vqa", ["--top", "0"], "--top 0: expected a count >= 1"),
        ("vqa", ["--text", " "], "--text is empty"),
        ("vqa", ["--text", "\u200b"], "--text is empty"),
        ("vqa", ["--text", "a " * 70], "--text is 72 tokens with [CLS] and [SEP]; the model has 64 positions"),
        ("vqa", ["--out", "."], "--out . is a folder; name a file"),
        ("vqa", ["--image_id", "no_such_image"], "image 'no_such_image' is not in"),
        ("encoder", [], "names ['SemVLPModel']; semvlp.predict answers for"),
        ("not_an_export", [], "not_an_export: not a SemVLP export (no config.json of model_type 'semvlp')"),
    ],
)  # fmt: skip
def test_bad_input_exits_2_naming_the_option(world, export, extra, message, capsys):
    assert main(_args(world, export, *extra)) == 2  # a repeated option: argparse takes the last
    assert message in capsys.readouterr().err


def test_an_image_with_values_the_converters_refuse_is_named(world, tmp_path, capsys):
    """A store made by other means, with a NaN feature: the prediction was NaN, exit status 0."""
    store = tmp_path / "features.h5"
    shutil.copyfile(world["store"], store)
    with h5py.File(store, "r+") as f:
        row = [i.decode() for i in f["image_ids"][:]].index(world["image_ids"][0])
        f["features"][row, 3, 5] = np.nan
    assert main([*_args(world, "vqa"), "--store", str(store)]) == 2
    message = f"error: {store}: image {world['image_ids'][0]!r}: field 'features': contains NaN or infinite values"
    assert message in capsys.readouterr().err


def test_a_text_longer_than_training_texts_is_read_with_a_note(world, capsys):
    """Training cuts texts to data.json's max_text_len (20 by default); the model has more positions."""
    assert main(_args(world, "vqa", "--text", "a " * 25)) == 0
    assert "note: --text is 27 tokens with [CLS] and [SEP]; training cuts texts to data.json's max_text_len (20" in (
        capsys.readouterr().out
    )


def test_out_is_written_in_a_new_folder_and_a_file_as_its_folder_is_named(world, tmp_path, capsys):
    out = tmp_path / "new" / "folder" / "prediction.json"
    assert main(_args(world, "vqa", "--out", str(out))) == 0
    assert json.loads(out.read_text())["task"] == "answers"
    assert main(_args(world, "vqa", "--out", str(out / "below_a_file.json"))) == 2
    assert f"--out {out / 'below_a_file.json'}: {out} is a file, not a folder" in capsys.readouterr().err


def test_a_store_of_another_feature_size_than_the_model_is_named(world, tmp_path, capsys):
    store = tmp_path / "features_16d.h5"
    source = FeatureStore(world["store"])
    image = source.read(world["image_ids"][0])
    source.close()
    with FeatureStoreWriter(store, num_objects=len(image.boxes), feature_dim=16) as writer:
        writer.add(image.image_id, image.features[:, :16], image.boxes, image.img_h, image.img_w, image.obj_ids,
                   image.obj_confs, image.attr_ids, image.attr_confs)  # fmt: skip
    assert main([*_args(world, "vqa"), "--store", str(store)]) == 2
    expected = f"--store {store} holds 16-d features; the export {world['exports']['vqa']} takes 2048-d"
    assert expected in capsys.readouterr().err


def test_a_vocab_of_another_size_than_the_model_is_named(world, tmp_path, capsys):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text((world["exports"]["vqa"] / "vocab.txt").read_text() + "an_extra_token\n")
    assert main(_args(world, "vqa", "--vocab", str(vocab), "--text", "an_extra_token")) == 2
    size = SemVLPForQuestionAnswering.config_class.from_pretrained(world["exports"]["vqa"]).vocab_size
    assert f"--vocab {vocab} holds {size + 1} tokens, but the export's model has vocab_size={size}" in (
        capsys.readouterr().err
    )
