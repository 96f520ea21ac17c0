"""python -m semvlp.data.from_lxmert: LXMERT's data folder to feature stores and a checked data.json."""

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _lxmert_tsv import D, raw_image, tsv_line

from semvlp.data.config import DataConfig
from semvlp.data.from_lxmert import main
from semvlp.data.store import FeatureStore
from semvlp.data.tokenizer import load_tokenizer
from semvlp.data.toy import ToySpec, ensure_toy_world

REPO = Path(__file__).resolve().parents[1]

# A toy-world file, where LXMERT keeps it, and how many of its records to keep (None: all).
LAYOUT = {
    "pretrain_train.json": ("lxmert/mscoco_train.json", 24),
    "pretrain_valid.json": ("lxmert/mscoco_minival.json", 8),
    "all_ans.json": ("lxmert/all_ans.json", None),
    "vqa_train.json": ("vqa/train.json", 16),
    "vqa_valid.json": ("vqa/minival.json", 8),
    "vqa_test.json": ("vqa/test.json", 8),
    "vqa_ans2label.json": ("vqa/trainval_ans2label.json", None),
    "vqa_label2ans.json": ("vqa/trainval_label2ans.json", None),
    "gqa_train.json": ("gqa/train.json", 16),
    "gqa_testdev.json": ("gqa/testdev.json", 8),
    "gqa_ans2label.json": ("gqa/trainval_ans2label.json", None),
    "gqa_label2ans.json": ("gqa/trainval_label2ans.json", None),
    "nlvr2_train.json": ("nlvr2/train.json", 6),
    "nlvr2_valid.json": ("nlvr2/valid.json", 4),
}
# LXMERT's files this folder lacks, as the command lists them
LEFT_OUT = (
    "lxmert/mscoco_nominival.json, lxmert/vgnococo.json, vqa/nominival.json, gqa/valid.json, gqa/submit.json, "
    "nlvr2/test.json"
)


@pytest.fixture
def lxmert_folder(tmp_path_factory, tmp_path) -> Path:
    """LXMERT's layout, from a few records of each toy-world file, with a 36-box TSV line per image:
    COCO's for the pre-training, VQA and GQA images, NLVR2's (ids of their own, as LXMERT's) train
    split plain and its valid split gzipped."""
    toy = Path(ensure_toy_world(tmp_path_factory.getbasetemp() / "toy_small", spec=ToySpec.small())).parent
    root = tmp_path / "lxmert_data"
    images: dict[str, list[str]] = {"mscoco_imgfeat/train2014_obj36.tsv": [], "nlvr2_imgfeat/train_obj36.tsv": [],
                                    "nlvr2_imgfeat/valid_obj36.tsv.gz": []}  # fmt: skip
    for name, (target, keep) in LAYOUT.items():
        records = json.loads((toy / name).read_text())
        records = records[:keep] if keep is not None else records
        if name.startswith("nlvr2_"):  # NLVR2's images have ids of their own (LXMERT's "train-10171-0-img0")
            records = [{**r, "img0": f"nlvr2-{r['img0']}", "img1": f"nlvr2-{r['img1']}"} for r in records]
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        (root / target).write_text(json.dumps(records))
        if name.startswith("nlvr2_"):
            tsv = f"nlvr2_imgfeat/{name.removeprefix('nlvr2_').removesuffix('.json')}_obj36.tsv"
            images[tsv + ".gz" if "valid" in name else tsv] += [r[key] for r in records for key in ("img0", "img1")]
        elif keep is not None:
            images["mscoco_imgfeat/train2014_obj36.tsv"] += [r["img_id"] for r in records]
    rng = np.random.default_rng(0)
    for tsv, ids in images.items():
        text = "".join(tsv_line(raw_image(rng, image_id, 36)) + "\n" for image_id in dict.fromkeys(ids))
        (root / tsv).parent.mkdir(parents=True, exist_ok=True)
        if tsv.endswith(".gz"):
            (root / tsv).write_bytes(gzip.compress(text.encode()))
        else:
            (root / tsv).write_text(text)
    (root / "vocab.txt").write_text((toy / "vocab.txt").read_text())
    return root


def run(root: Path, out: Path, *options: str) -> int:
    return main([str(root), "--vocab", str(root / "vocab.txt"), "--out", str(out), "--feature-dim", str(D), "--quiet",
                 *options])  # fmt: skip


def test_an_lxmert_folder_becomes_stores_and_a_data_json_in_lxmerts_splits(lxmert_folder, tmp_path, capsys):
    out = tmp_path / "semvlp"
    assert run(lxmert_folder, out) == 0
    printed = capsys.readouterr().out
    assert f"not in {lxmert_folder} (left out): {LEFT_OUT}" in printed
    assert f"{out / 'data.json'}: no problems found" in printed  # the check ran

    cfg = DataConfig.load(out / "data.json")
    stores = [out / "features" / f for f in ("mscoco_imgfeat/train2014_obj36.h5", "nlvr2_imgfeat/train_obj36.h5",
                                             "nlvr2_imgfeat/valid_obj36.h5")]  # fmt: skip
    assert cfg.stores == tuple(map(str, stores))
    for store in stores:
        opened = FeatureStore(store)
        assert opened.num_objects == 36 and opened.feature_dim == D and len(opened) > 0

    def files(*names: str) -> tuple[str, ...]:
        return tuple(str(lxmert_folder / name) for name in names)

    assert cfg.pretrain.train == files("lxmert/mscoco_train.json")
    assert cfg.pretrain.valid == files("lxmert/mscoco_minival.json")
    assert cfg.pretrain.answer_table == str(lxmert_folder / "lxmert/all_ans.json")
    assert (cfg.vqa.train, cfg.vqa.valid, cfg.vqa.test) == (files("vqa/train.json"), files("vqa/minival.json"),
                                                            files("vqa/test.json"))  # fmt: skip
    assert cfg.vqa.label2ans == str(lxmert_folder / "vqa/trainval_label2ans.json")
    assert (cfg.gqa.train, cfg.gqa.valid, cfg.gqa.test) == (files("gqa/train.json"), files("gqa/testdev.json"), ())
    assert (cfg.nlvr2.train, cfg.nlvr2.valid, cfg.nlvr2.test) == (files("nlvr2/train.json"),
                                                                  files("nlvr2/valid.json"), ())  # fmt: skip
    assert cfg.flickr30k is None and cfg.vocab == str(lxmert_folder / "vocab.txt")

    # Run again: the stores are kept, the same data.json is written and checked.
    written = [store.stat().st_mtime_ns for store in stores]
    assert run(lxmert_folder, out) == 0
    assert f"{stores[0]}: there already" in capsys.readouterr().out
    assert [store.stat().st_mtime_ns for store in stores] == written

    # A data.json that says something else is kept, unless --overwrite; the error says what differs
    # (it said "names other files" for an edited setting too).
    data_json = out / "data.json"
    written = json.loads(data_json.read_text())
    for edit, differences in [
        ({"max_text_len": 30}, "max_text_len is 30 (this run writes 20)"),
        (
            {"stores": written["stores"][:1], "vqa": None, "pretrain": {**written["pretrain"], "sources": ["vg"]}},
            'stores names other files; pretrain.sources is ["vg"] (this run writes ["mscoco", "vg", "vqa", "gqa", '
            '"visual7w"]); it has no vqa section (this run writes one)',
        ),
    ]:
        data_json.write_text(json.dumps(written | edit))
        kept = data_json.read_bytes()
        assert run(lxmert_folder, out) == 1
        assert capsys.readouterr().err == (
            f"error: {data_json} exists and differs from the one this run writes: {differences}; --overwrite "
            "replaces it\n"
        )
        assert data_json.read_bytes() == kept
    data_json.write_text('{"stores": ')
    assert run(lxmert_folder, out) == 1
    assert capsys.readouterr().err == (
        f"error: {data_json} exists and is not a readable data configuration (invalid JSON at line 1: Expecting "
        "value); --overwrite replaces it\n"
    )
    assert run(lxmert_folder, out, "--overwrite") == 0
    assert DataConfig.load(data_json) == cfg


def test_a_bad_feature_record_stops_the_command_and_a_second_run_resumes(lxmert_folder, tmp_path, capsys):
    nlvr2 = lxmert_folder / "nlvr2_imgfeat/train_obj36.tsv"
    good = nlvr2.read_text()
    lines = good.splitlines(keepends=True)
    nlvr2.write_text(lines[0] + "toy_broken\t480\n" + "".join(lines[1:]))
    out = tmp_path / "semvlp"
    assert run(lxmert_folder, out) == 1
    err = capsys.readouterr().err
    assert f"error: {nlvr2}, line 2 (image toy_broken): " in err
    assert (out / "features/mscoco_imgfeat/train2014_obj36.h5").is_file()  # converted before it: kept
    assert not (out / "features/nlvr2_imgfeat/train_obj36.h5").exists() and not (out / "data.json").exists()

    nlvr2.write_text(good)
    assert run(lxmert_folder, out) == 0
    assert f"{out / 'features/mscoco_imgfeat/train2014_obj36.h5'}: there already" in capsys.readouterr().out


@pytest.mark.parametrize(
    "remove, message",
    [
        (("mscoco_imgfeat", "nlvr2_imgfeat"), "no feature TSV (*.tsv, *.tsv.gz) in it or in mscoco_imgfeat, "),
        (("lxmert", "vqa", "gqa", "nlvr2"), "none of LXMERT's annotation files, e.g. lxmert/mscoco_train.json"),
        (("vocab.txt",), "--vocab {root}/vocab.txt: vocab file not found"),
    ],
)
def test_a_folder_it_cannot_use_is_named_before_any_conversion(lxmert_folder, tmp_path, capsys, remove, message):
    for name in remove:
        if (lxmert_folder / name).is_dir():
            shutil.rmtree(lxmert_folder / name)
        else:
            (lxmert_folder / name).unlink()
    with pytest.raises(SystemExit) as exited:
        run(lxmert_folder, tmp_path / "semvlp")
    assert exited.value.code == 2
    assert message.format(root=lxmert_folder) in capsys.readouterr().err
    assert not (tmp_path / "semvlp").exists()


def test_stores_of_another_k_stop_the_command_before_any_conversion(lxmert_folder, tmp_path, capsys):
    """Stores converted with K = 36, then a run asking for 20: the kept stores used to pass the check
    ("no problems found") and train with 36 objects."""
    out = tmp_path / "semvlp"
    assert run(lxmert_folder, out) == 0
    kept, removed = out / "features/mscoco_imgfeat/train2014_obj36.h5", out / "features/nlvr2_imgfeat/train_obj36.h5"
    removed.unlink()
    written = kept.stat().st_mtime_ns
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run(lxmert_folder, out, "--num-objects", "20")
    assert exited.value.code == 2
    assert (
        f"error: the existing store {kept} holds K=36 objects per image, not --num-objects 20: choose a new --out, "
        f"or delete the store to convert {lxmert_folder / 'mscoco_imgfeat/train2014_obj36.tsv'} again\n"
    ) in capsys.readouterr().err
    assert kept.stat().st_mtime_ns == written and not removed.exists()  # nothing converted


def test_a_vocab_with_a_repeated_token_is_named_and_a_byte_order_mark_is_not_a_token(lxmert_folder, tmp_path, capsys):
    """A repeated token passed the check and failed training at its first step (IndexError in the
    embedding: ids are line numbers, so the last one is past the tokenizer's size); a vocab saved with
    a byte-order mark was said to lack [PAD]."""
    vocab = lxmert_folder / "vocab.txt"
    tokens = vocab.read_text().splitlines()  # [PAD] first
    n = len(tokens)
    vocab.write_text("\ufeff" + "\n".join([*tokens, tokens[-1], tokens[7]]) + "\n")
    with pytest.raises(SystemExit) as exited:
        run(lxmert_folder, tmp_path / "semvlp")
    assert exited.value.code == 2
    assert (
        f"--vocab {vocab}: vocab {vocab} repeats tokens (each must be on one line only): {tokens[7]!r} on lines 8, "
        f"{n + 2}; {tokens[-1]!r} on lines {n}, {n + 1}\n"
    ) in capsys.readouterr().err
    assert not (tmp_path / "semvlp").exists()
    vocab.write_text("\ufeff" + "\n".join(tokens) + "\n")
    tokenizer = load_tokenizer(vocab)
    assert len(tokenizer) == n and tokenizer.convert_tokens_to_ids(tokens[:2]) == [0, 1]


def test_a_launcher_trains_on_what_it_writes(lxmert_folder, tmp_path):
    """NLVR2 fine-tuning (one process) on the stores' K = 36 objects of 16-d features: the model takes
    its visual_feat_dim from the stores (as pre-training does), and predicts the splits with files."""
    from semvlp.data.pretrain_dataset import pretraining_model_fields

    out = tmp_path / "semvlp"
    assert run(lxmert_folder, out) == 0
    fields = pretraining_model_fields(DataConfig.load(out / "data.json"))
    assert (fields["visual_feat_dim"], fields["num_objects"]) == (D, 36)
    cmd = [sys.executable, str(REPO / "launch/finetune_nlvr2.py"), "--deepspeed_config",
           str(REPO / "ds_configs/cpu.json"), "--preset", "tiny", "--data", str(out / "data.json"), "--output_dir",
           str(tmp_path / "nlvr2"), "--epochs", "0", "--max_steps", "2", "--eval_every", "2", "--batch_size", "4",
           "--num_workers", "0"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    exported = json.loads((tmp_path / "nlvr2/export/config.json").read_text())
    assert (exported["visual_feat_dim"], exported["num_objects"]) == (D, 36)  # the export records its data
    results = json.loads((tmp_path / "nlvr2/results.json").read_text())
    assert list(results["splits"]) == ["valid"]  # LXMERT's folder here has no nlvr2/test.json
    assert 0 <= results["splits"]["valid"]["accuracy"] <= 1
