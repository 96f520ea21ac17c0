"""python -m semvlp.attention_map: one block's attention from an image's objects to a caption's
tokens (paper section 4.5, Figure 4), read from a real export, store and vocab."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from semvlp import SemVLPForPreTraining, SemVLPForQuestionAnswering
from semvlp.attention_map import main
from semvlp.config import config_from_preset
from semvlp.data.store import FeatureStore, FeatureStoreWriter
from semvlp.data.tokenizer import load_tokenizer
from semvlp.data.toy import BACKGROUNDS, OBJECTS, ToySpec, ensure_toy_world
from semvlp.example import load_export

REPO = Path(__file__).resolve().parents[1]
CAPTION = "a red dog and two cups on the grass ."


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A small toy world, a tiny pre-training export with its vocab, and the id of an image."""
    root = tmp_path_factory.mktemp("attention_map")
    toy = Path(ensure_toy_world(root / "toy", spec=ToySpec.small())).parent
    vocab_size = len(load_tokenizer(toy / "vocab.txt"))
    torch.manual_seed(0)
    config = config_from_preset("tiny", vocab_size=vocab_size, num_object_labels=40, num_attribute_labels=12)
    export = root / "export"
    SemVLPForPreTraining(config).save_pretrained(export)
    shutil.copyfile(toy / "vocab.txt", export / "vocab.txt")
    store = FeatureStore(toy / "features.h5")
    image_id = store.image_ids[0]
    store.close()
    return {"toy": toy, "export": export, "store": toy / "features.h5", "image_id": image_id}


def _args(world: dict[str, Path], *extra: str) -> list[str]:
    return [str(world["export"]), "--store", str(world["store"]), "--image_id", world["image_id"],
            "--caption", CAPTION, *extra]  # fmt: skip


def _model_attentions(world: dict[str, Path], mode: str, visual_mask: torch.Tensor | None = None, store=None):
    model = load_export(world["export"])
    ids = load_tokenizer(world["export"])(CAPTION)["input_ids"]
    store = store or FeatureStore(world["store"])
    image = store.read(world["image_id"])
    with torch.no_grad():
        out = model(
            torch.tensor([ids]),
            visual_feats=torch.from_numpy(image.features).float()[None],
            visual_pos=torch.from_numpy(image.boxes).float()[None],
            visual_attention_mask=visual_mask,
            mode=mode,
            output_attentions=True,
        )
    return out, image, len(ids)


def test_single_stream_map_is_the_blocks_object_to_text_attention(world, tmp_path):
    out_file = tmp_path / "map.json"
    names = world["toy"] / "objects_vocab.txt"
    result = subprocess.run(
        [sys.executable, "-m", "semvlp.attention_map", *_args(world, "--layer", "2", "--head", "3",
         "--object_names", str(names), "--objects", "4", "--out", str(out_file))],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = json.loads(out_file.read_text())
    out, image, m = _model_attentions(world, "single")
    expected = out.attentions[1][0, 2, 1:101, 101:].numpy()  # block 2, head 3: object rows, text columns
    assert record["tokens"] == ["[CLS]", *CAPTION.split(), "[SEP]"]
    assert (record["mode"], record["layer"], record["head"]) == ("single", 2, 3)
    assert [o["slot"] for o in record["objects"]] == list(range(100))
    got = np.array([o["attention"] for o in record["objects"]])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    shares = np.array([o["text_share"] for o in record["objects"]])
    np.testing.assert_allclose(shares, expected.sum(axis=1), rtol=1e-5)
    assert ((shares > 0) & (shares < 1)).all()  # the rest of each row goes to the image tokens
    labels = OBJECTS + BACKGROUNDS  # the toy detector's label ids, as objects_vocab.txt lists them
    assert [o["label"] for o in record["objects"]] == [labels[i] for i in image.obj_ids]

    lines = result.stdout.splitlines()
    assert lines[0] == "single-stream block 2, head 3 (self-attention, object rows, text columns)"
    printed = [line for line in lines if line.startswith("object ")]
    assert len(printed) == 4
    confident = np.argsort(-image.obj_confs, kind="stable")[:4]
    for line, slot in zip(printed, confident, strict=True):
        assert line.split(":")[0].split() == ["object", str(slot), labels[image.obj_ids[slot]], "conf"] + [
            f"{image.obj_confs[slot]:.2f}"
        ]


def test_two_stream_map_is_the_last_cross_attention_averaged_over_heads(world, tmp_path, capsys):
    out_file = tmp_path / "map.json"
    assert main(_args(world, "--mode", "two", "--out", str(out_file))) == 0
    record = json.loads(out_file.read_text())
    out, _, _ = _model_attentions(world, "two")
    assert (record["layer"], record["head"]) == (4, "mean")  # the tiny preset's last block
    got = np.array([o["attention"] for o in record["objects"]])
    np.testing.assert_allclose(got, out.cross_attentions[-1][0, :, 1:].mean(0).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose([o["text_share"] for o in record["objects"]], 1, rtol=1e-5)
    printed = capsys.readouterr().out
    assert printed.startswith("two-stream block 4, mean over heads (cross-attention)")
    assert "not in the vocab" not in printed

    args = _args(world, "--mode", "two")
    args[args.index("--caption") + 1] = "a red zebra on the grass ."  # the toy vocab has no zebra
    assert main(args) == 0
    assert "note: 1 word(s) of --caption are not in the vocab and read as [UNK]" in capsys.readouterr().out


def test_a_padded_store_lists_only_its_real_objects(world, tmp_path):
    image = FeatureStore(world["store"]).read(world["image_id"])
    valid = np.arange(100) < 60
    with FeatureStoreWriter(tmp_path / "padded.h5", 100, image.features.shape[1], padded=True) as writer:
        writer.add(image.image_id, image.features, image.boxes, image.img_h, image.img_w, image.obj_ids,
                   image.obj_confs, image.attr_ids, image.attr_confs, valid_mask=valid)  # fmt: skip
    out_file = tmp_path / "maps" / "map.json"  # its folder is created
    padded = dict(world, store=tmp_path / "padded.h5")
    assert main(_args(padded, "--out", str(out_file))) == 0
    record = json.loads(out_file.read_text())
    assert [o["slot"] for o in record["objects"]] == list(range(60))
    mask = torch.from_numpy(valid)[None].long()
    out, _, _ = _model_attentions(padded, "single", mask, FeatureStore(padded["store"]))
    expected = out.attentions[-1][0, :, 1:61, 101:].mean(0).numpy()
    np.testing.assert_allclose([o["attention"] for o in record["objects"]], expected, rtol=1e-5, atol=1e-7)


def test_a_finetuned_export_gives_its_encoder(world, tmp_path):
    pretrained = load_export(world["export"])
    config = pretrained.config
    config.num_labels = 5
    finetuned = SemVLPForQuestionAnswering(config)
    finetuned.semvlp.load_state_dict(pretrained.state_dict())
    finetuned.save_pretrained(tmp_path / "vqa")
    loaded = load_export(tmp_path / "vqa")
    for name, tensor in pretrained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize(
    "change, message",
    [
        (("--mode", "two", "--layer", "2"), "--layer 2: expected 3..4 (two-stream: the blocks with cross-attention"),
        (("--layer", "5"), "--layer 5: expected 1..4"),
        (("--layer", "0"), "--layer 0: expected 1..4"),
        (("--objects", "-1"), "--objects -1: expected a count >= 0"),
        (("--caption", "  "), "--caption is empty"),
        (("--head", "5"), "--head 5: expected 1..4, or 'mean'"),
        (("--caption", "a dog " * 40), "--caption is 82 tokens with [CLS] and [SEP]; the model has 64 positions"),
        (("--image_id", "no_such_image"), "image 'no_such_image' is not in "),
        (("--object_names", "SHORT_NAMES"), "--object_names SHORT_NAMES: 3 names, but the image has label id"),
        (("--object_names", "NOT_UTF8"), "--object_names NOT_UTF8: not UTF-8 text"),
        (("--object_names", "missing.txt"), "--object_names missing.txt: No such file or directory"),
        (("--store", "missing.h5"), "feature store not found: missing.h5"),
        (("--out", "."), "--out . is a folder; name a file"),
        (("--out", "SHORT_NAMES/map.json"), "--out SHORT_NAMES/map.json: SHORT_NAMES is a file, not a folder"),
    ],
)
def test_bad_arguments_exit_2_naming_the_option(world, tmp_path, monkeypatch, capsys, change, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "SHORT_NAMES").write_text("car\ndog\ncat\n")
    (tmp_path / "NOT_UTF8").write_bytes(b"\x89HDF\r\n")
    args = _args(world)
    for option, value in zip(change[::2], change[1::2], strict=True):
        if option in args:
            args[args.index(option) + 1] = value
        else:
            args += [option, value]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_a_folder_that_is_not_an_export_is_named(world, tmp_path, capsys):
    assert main([str(tmp_path), *_args(world)[1:]]) == 2
    assert f"{tmp_path}: not a SemVLP export (no config.json of model_type 'semvlp')" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))  # a BERT folder
    assert main([str(tmp_path), *_args(world)[1:]]) == 2
    assert f"{tmp_path}: not a SemVLP export" in capsys.readouterr().err
    (tmp_path / "config.json").write_text((world["export"] / "config.json").read_text())
    assert main([str(tmp_path), *_args(world)[1:]]) == 2
    assert f"{tmp_path}: no weights (model.safetensors or pytorch_model.bin)" in capsys.readouterr().err
