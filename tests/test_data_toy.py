"""The toy world: deterministic, atomic, in the real formats, and only solvable by looking."""

import errno
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from semvlp.data import toy as toy_mod
from semvlp.data.annotations import AnswerTable, load_flickr30k, load_gqa, load_nlvr2, load_vqa
from semvlp.data.config import DataConfig
from semvlp.data.store import FeatureStore
from semvlp.data.toy import COLORS, OBJECTS, NotAToyWorldError, ToySpec, ensure_toy_world, generate_toy_world

SMALL = ToySpec.small()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return ensure_toy_world(tmp_path_factory.getbasetemp() / "toy_small", spec=SMALL)


def image_facts(store):
    """{image id: list of (class, color)} of the salient objects, read back from the store."""
    facts = {}
    for row, image_id in enumerate(store.image_ids):
        img = store.read(row)
        salient = img.obj_confs >= 0.7
        facts[image_id] = list(zip(img.obj_ids[salient].tolist(), img.attr_ids[salient].tolist(), strict=True))
    return facts


_WORD = {w: i for i, w in enumerate(OBJECTS)} | {w + "s": i for i, w in enumerate(OBJECTS)}


def question(sentence):
    """The question without its leading place ("on the road , what color is the car ?")."""
    return sentence.split(" , ", 1)[1]


def consistent(sentence, objects):
    """Does every object the sentence names (with its color, if given) exist in the image?"""
    asked = question(sentence).split()[3] if ", is there a " in sentence else None
    words = sentence.split()
    for i, w in enumerate(words):
        if w in _WORD:
            cls = _WORD[w]
            color = COLORS.index(words[i - 1]) if i and words[i - 1] in COLORS else None
            if not any(c == cls and (color is None or k == color) for c, k in objects):
                if w == asked and words[i - 1] == "a":  # "is there a dog ...": may be absent
                    continue
                return False
    return True


def test_formats_and_config(toy):
    cfg = DataConfig.load(toy)
    store = FeatureStore(cfg.stores[0])
    n_images = SMALL.train_images + SMALL.valid_images + SMALL.test_images
    assert len(store) == n_images and store.num_objects == 100 and store.feature_dim == 2048
    assert cfg.num_object_labels == len(OBJECTS) + 8 and cfg.pretrain.sources == ("mscoco", "vqa", "gqa")
    table = AnswerTable.from_all_ans(cfg.pretrain.answer_table)
    assert AnswerTable.from_label2ans(cfg.vqa.label2ans).answers == table.answers
    assert len(load_vqa(cfg.vqa.train)) == SMALL.train_images * SMALL.vqa_per_image
    assert all(q.label is None for q in load_vqa(cfg.vqa.test))
    assert len(load_gqa(cfg.gqa.test)) == SMALL.test_images * SMALL.gqa_per_image
    assert len(load_nlvr2(cfg.nlvr2.train)) == SMALL.nlvr2_train
    flickr = load_flickr30k(cfg.flickr30k.annotations, "test")
    assert len(flickr.image_ids) == SMALL.test_images and all(i in store for i in flickr.image_ids)
    vocab = Path(cfg.vocab).read_text().split("\n")
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and set(OBJECTS) <= set(vocab)
    saved = json.loads(Path(toy).read_text())
    assert saved["stores"] == ["features.h5"]  # relative: the folder can move


def test_text_matches_the_image_and_only_the_image(toy):
    cfg = DataConfig.load(toy)
    facts = image_facts(FeatureStore(cfg.stores[0]))
    records = json.loads(Path(cfg.pretrain.train[0]).read_text())
    ids = [r["img_id"] for r in records]
    rng = np.random.default_rng(0)
    true_pairs = other_pairs = other_consistent = 0
    answers: dict[str, Counter] = {}
    asked = set()
    for r in records:
        objects = facts[r["img_id"]]
        for sents in r["sentf"].values():
            for s in sents:
                assert consistent(s, objects), (r["img_id"], s, objects)
                true_pairs += 1
                other = ids[rng.integers(len(ids))]
                if other != r["img_id"]:
                    other_pairs += 1
                    other_consistent += consistent(s, facts[other])
        for s, label in zip(
            r["sentf"]["vqa"] + r["sentf"]["gqa"], r["labelf"]["vqa"] + r["labelf"]["gqa"], strict=True
        ):
            (ans,) = label
            s = question(s)
            if (r["img_id"], s) not in asked:  # an image may ask the same question twice
                asked.add((r["img_id"], s))
                answers.setdefault(" ".join(s.split()[:2]), Counter())[ans] += 1
            if s.startswith("what color is the "):  # the answer is the color of that object in the image
                cls = OBJECTS.index(s.split()[4])
                assert {COLORS[k] for c, k in objects if c == cls} == {ans}
            if s.startswith("how many "):
                cls = _WORD[s.split()[2]]
                assert sum(c == cls for c, _ in objects) == int(ans) * SMALL.detections_per_object
    # A caption from another image almost never fits this one: ITM can only be solved by looking.
    assert other_consistent / other_pairs < 0.08
    # The words of a question do not give its answer away: no answer dominates a question type.
    assert set(answers) >= {"what color", "how many", "is there", "is the"}
    for kind, counts in answers.items():
        n = sum(counts.values())
        chance = {"what color": 1 / 8, "how many": 1 / 3}.get(kind, 1 / 2)
        assert len(counts) == round(1 / chance), (kind, counts)
        # Balanced answers: the most frequent stays within 4 standard deviations of chance.
        assert max(counts.values()) / n < chance + 4 * (chance * (1 - chance) / n) ** 0.5, (kind, counts)


def test_features_carry_class_and_color(toy):
    store = FeatureStore(DataConfig.load(toy).stores[0])
    by_key, clutter = {}, []
    for row in range(40):
        img = store.read(row)
        norms = np.linalg.norm(img.features.astype(np.float32), axis=1)
        salient = img.obj_confs >= 0.7
        assert norms[salient].min() > 5 * norms[~salient].max()  # salient objects stand out
        for f, c, k in zip(img.features[salient], img.obj_ids[salient], img.attr_ids[salient], strict=True):
            by_key.setdefault((int(c), int(k)), []).append(f.astype(np.float32))
        clutter.append(img.features[~salient][0])

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    same = [cos(v[0], v[1]) for v in by_key.values() if len(v) > 1]
    keys = list(by_key)
    diff = [
        cos(by_key[a][0], by_key[b][0]) for a, b in zip(keys, keys[1:], strict=False) if a[0] != b[0] and a[1] != b[1]
    ]
    assert same and diff and min(same) > 0.9 and max(diff) < 0.2


def test_deterministic_from_the_seed(tmp_path):
    spec = ToySpec(train_images=12, valid_images=4, test_images=4, nlvr2_train=10, nlvr2_eval=4, flickr_train_images=6)
    a = generate_toy_world(tmp_path / "a", seed=5, spec=spec)
    b = generate_toy_world(tmp_path / "b", seed=5, spec=spec)
    c = generate_toy_world(tmp_path / "c", seed=6, spec=spec)
    for name in ("pretrain_train.json", "vqa_valid.json", "nlvr2_train.json", "dataset_flickr30k.json", "vocab.txt"):
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes(), name
    assert (a.parent / "pretrain_train.json").read_bytes() != (c.parent / "pretrain_train.json").read_bytes()
    sa, sb, sc = (FeatureStore(p.parent / "features.h5") for p in (a, b, c))
    for row in range(len(sa)):
        assert np.array_equal(sa.read(row).features, sb.read(row).features)
        assert np.array_equal(sa.read(row).boxes, sb.read(row).boxes)
    assert not np.array_equal(sa.read(0).features, sc.read(0).features)


def _ensure(folder, spec, q):
    q.put(str(ensure_toy_world(folder, seed=0, spec=spec)))


def test_ensure_is_atomic_and_reuses(tmp_path, monkeypatch):
    spec = ToySpec(train_images=12, valid_images=4, test_images=4, nlvr2_train=10, nlvr2_eval=4, flickr_train_images=6)
    folder = tmp_path / "world"
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ensure, args=(folder, spec, q)) for _ in range(2)]  # two ranks at once
    for p in procs:
        p.start()
    paths = {q.get(timeout=120) for _ in procs}
    for p in procs:
        p.join(timeout=60)
    assert paths == {str(folder / "data.json")}
    # No temp folders left. The lock file stays on purpose: deleting it would let a waiter that has
    # it open and a newcomer lock different files at once (see ensure_toy_world).
    assert sorted(p.name for p in tmp_path.iterdir()) == [".world.lock", "world"]
    stamp = (folder / "features.h5").stat().st_mtime_ns

    calls = []
    monkeypatch.setattr(toy_mod, "generate_toy_world", lambda *a, **k: calls.append(a))
    assert ensure_toy_world(folder, seed=0, spec=spec) == folder / "data.json" and calls == []  # reused
    monkeypatch.undo()
    assert (folder / "features.h5").stat().st_mtime_ns == stamp
    ensure_toy_world(folder, seed=1, spec=spec)  # another seed: regenerated in place
    assert json.loads((folder / "toy_world.json").read_text())["seed"] == 1
    assert DataConfig.load(folder / "data.json").pretrain is not None

    other = tmp_path / "not_a_world"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a toy world"):
        ensure_toy_world(other, spec=spec)
    assert (other / "mine.txt").read_text() == "keep me"
    (tmp_path / "a_file").write_text("keep me")
    with pytest.raises(NotAToyWorldError, match="is a file"):  # not moved aside as a stale world
        ensure_toy_world(tmp_path / "a_file", spec=spec)
    assert (tmp_path / "a_file").read_text() == "keep me"
    # Refused before taking the lock: nothing new beside them.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".world.lock", "a_file", "not_a_world", "world"]


def test_cli(tmp_path, capsys):
    toy_mod.main(["--out", str(tmp_path / "w"), "--small", "--seed", "3"])
    out = capsys.readouterr().out
    assert re.search(r"toy world in .*w \(\d+\.\d MB, \d+\.\ds\)", out)
    assert json.loads((tmp_path / "w" / "toy_world.json").read_text())["seed"] == 3

    (tmp_path / "file").write_text("keep me")
    with pytest.raises(SystemExit) as refused:
        toy_mod.main(["--out", str(tmp_path / "file"), "--small"])
    assert refused.value.code == 2
    assert f"--out {tmp_path / 'file'} is a file; expected a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "keep me"


def test_force_replaces_the_world_only_once_the_new_one_is_complete(toy, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "w"
    shutil.copytree(toy.parent, folder)
    manifest = (folder / "toy_world.json").read_text()

    def full_disk(out, seed, spec):
        (out / "features.h5").write_bytes(b"half a store")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(toy_mod, "generate_toy_world", full_disk)
    with pytest.raises(SystemExit) as failed:
        toy_mod.main(["--out", str(folder), "--small", "--force"])
    assert failed.value.code == 1 and "No space left on device" in capsys.readouterr().err
    # The world in place is whole and reusable, and no half-made one is left beside it.
    assert (folder / "toy_world.json").read_text() == manifest
    assert toy_mod._reuse_problem(folder, 0, SMALL) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".w.lock", "w"]

    monkeypatch.undo()
    store = (folder / "features.h5").stat().st_ino
    toy_mod.main(["--out", str(folder), "--small", "--force"])
    assert (folder / "features.h5").stat().st_ino != store  # regenerated, although it could be reused
    assert toy_mod._reuse_problem(folder, 0, SMALL) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".w.lock", "w"]


def test_sigterm_leaves_no_half_made_world(tmp_path, monkeypatch, capsys, sigterm_received):
    def killed(out, seed, spec):
        (out / "features.h5").write_bytes(b"half a store")
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. a batch scheduler ending the job

    monkeypatch.setattr(toy_mod, "generate_toy_world", killed)
    with pytest.raises(SystemExit) as stopped:
        toy_mod.main(["--out", str(tmp_path / "w"), "--small"])
    assert stopped.value.code == 128 + signal.SIGTERM and sigterm_received == []
    assert capsys.readouterr().err == "error: terminated (SIGTERM)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".w.lock"]  # no world, no temporary folder


def test_cli_refuses_a_folder_that_is_not_a_world(tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    done = subprocess.run(
        [sys.executable, "-m", "semvlp.data.toy", "--out", str(other), "--small"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"error: {other} exists and is not a toy world; choose another folder\n"
    assert (other / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no lock file, no temp folder


def test_cli_rejects_a_negative_seed(tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        toy_mod.main(["--out", str(tmp_path / "w"), "--small", "--seed", "-5"])
    assert refused.value.code == 2
    assert "error: --seed must be >= 0, got -5" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # checked before anything is written


def _same_size_edit(path):
    data = path.read_bytes()
    edited = data.replace(b'"yes"', b'"yep"', 1)
    assert edited != data and len(edited) == len(data)
    path.write_bytes(edited)


def _edit_manifest(path, **changes):
    """Drop the file list and apply `changes`: version=2 makes the previous generator's manifest."""
    manifest = json.loads(path.read_text())
    del manifest["files"]
    path.write_text(json.dumps(manifest | changes))


@pytest.mark.parametrize(
    "name, damage, reason",
    [
        ("vqa_train.json", Path.unlink, "vqa_train.json is missing"),
        ("data.json", Path.unlink, "data.json is missing"),
        ("features.h5", lambda p: p.write_text("garbage"), "features.h5 has changed"),
        ("vqa_train.json", _same_size_edit, "vqa_train.json has changed"),
        ("toy_world.json", lambda p: _edit_manifest(p, version=2), "made by another version of the generator"),
        ("toy_world.json", _edit_manifest, "toy_world.json lists no files"),
        ("toy_world.json", lambda p: p.write_text("{"), "toy_world.json is unreadable"),
    ],
)
def test_cli_regenerates_a_broken_world(toy, tmp_path, capsys, name, damage, reason):
    pristine = Path(toy).parent  # what --small --seed 0 makes
    world = tmp_path / "w"
    shutil.copytree(pristine, world)
    damage(world / name)

    toy_mod.main(["--out", str(world), "--small"])
    captured = capsys.readouterr()
    assert captured.err == f"note: the toy world in {world} cannot be reused ({reason}); regenerating it\n"
    assert "toy world in" in captured.out
    assert sorted(p.name for p in world.iterdir()) == sorted(p.name for p in pristine.iterdir())
    for p in pristine.iterdir():  # deterministic: the same bytes as before the damage
        assert (world / p.name).read_bytes() == p.read_bytes(), p.name

    toy_mod.main(["--out", str(world), "--small"])  # intact now: reused, silently
    assert capsys.readouterr().err == ""


def test_manifest_records_every_file(toy):
    folder = Path(toy).parent
    manifest = json.loads((folder / "toy_world.json").read_text())
    assert manifest["seed"] == 0 and manifest["spec"] == asdict(SMALL)
    assert set(manifest["files"]) == {p.name for p in folder.iterdir()} - {"toy_world.json"}
    assert manifest["files"]["features.h5"]["size"] == (folder / "features.h5").stat().st_size
