"""Pre-training batches: layout, masking statistics, ITM/QA targets, determinism, resume, sharding."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from semvlp import runner
from semvlp.data import build_pretrain_loader
from semvlp.data import loader as loader_module
from semvlp.data.annotations import LXMERT_SOURCES, AnnotationError, AnswerTable, MissingImagesError, PretrainCorpus
from semvlp.data.batching import gather_tokens
from semvlp.data.config import DataConfig
from semvlp.data.convert import RawImage, convert
from semvlp.data.loader import BatchKey, KeyedBatchDataset, ResumableLoader, ShardedBatchSampler, _WorkerBuffers
from semvlp.data.pretrain_dataset import (
    MaskingConfig,
    PretrainDataset,
    build_pretrain_dataset,
    pretrain_loader,
    pretraining_model_fields,
)
from semvlp.data.store import FeatureStore, FeatureStoreWriter, open_stores
from semvlp.data.tokenizer import load_tokenizer
from semvlp.data.toy import ToySpec, ensure_toy_world


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    # Shared by the data test files through the session's base temp folder.
    return ensure_toy_world(tmp_path_factory.getbasetemp() / "toy_small", spec=ToySpec.small())


@pytest.fixture(scope="module")
def light(toy, tmp_path_factory):
    """The toy world with 16-d uncompressed features: same annotations, ~50x cheaper reads, for the
    tests that draw thousands of examples."""
    cfg = DataConfig.load(toy)
    src = FeatureStore(cfg.stores[0])
    path = tmp_path_factory.mktemp("light") / "light.h5"
    with FeatureStoreWriter(path, src.num_objects, 16) as w:
        for row in range(len(src)):
            img = src.read(row)
            w.add(
                img.image_id,
                img.features[:, :16],
                img.boxes,
                img.img_h,
                img.img_w,
                img.obj_ids,
                img.obj_confs,
                img.attr_ids,
                img.attr_confs,
            )
    return DataConfig.from_dict({**cfg.to_dict(), "stores": [str(path)]})


@pytest.fixture(scope="module")
def dataset(light):
    return build_pretrain_dataset(light)


def batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_batch_layout(toy):
    loader = build_pretrain_loader(toy, batch_size=8, seed=3)
    dataset = loader.dataset
    key = next(loader.sampler.keys(0))
    batch = next(iter(loader))
    b, k = 8, 100
    lengths = batch["attention_mask"].sum(1)
    t = int(lengths.max())
    assert batch["input_ids"].shape == (b, t) and t <= 20  # padded to the longest text only
    for name, dtype, shape in [
        ("input_ids", torch.int64, (b, t)),
        ("attention_mask", torch.int64, (b, t)),
        ("token_type_ids", torch.int64, (b, t)),
        ("mlm_labels", torch.int64, (b, t)),
        ("visual_feats", torch.float16, (b, k, 2048)),
        ("visual_pos", torch.float32, (b, k, 4)),
        ("obj_mask", torch.bool, (b, k)),
        ("obj_labels", torch.int64, (b, k)),
        ("obj_confs", torch.float32, (b, k)),
        ("attr_labels", torch.int64, (b, k)),
        ("attr_confs", torch.float32, (b, k)),
        ("itm_labels", torch.int64, (b,)),
        ("qa_labels", torch.int64, (b,)),
        ("cu_seqlens", torch.int32, (b + 1,)),
    ]:
        assert batch[name].dtype == dtype and tuple(batch[name].shape) == shape, name
    assert "visual_attention_mask" not in batch  # the toy store has no padding
    assert not batch["token_type_ids"].any()
    assert batch["attention_mask"][torch.arange(b), lengths - 1].all()
    # Packed form = the real tokens of every row, concatenated.
    mask = batch["attention_mask"].bool()
    assert batch["cu_seqlens"].tolist() == [0] + lengths.cumsum(0).tolist() and batch["max_seqlen"] == t
    assert torch.equal(batch["packed_input_ids"], batch["input_ids"][mask])
    assert torch.equal(batch["packed_mlm_labels"], batch["mlm_labels"][mask])
    assert batch["packed_token_type_ids"].shape == batch["packed_input_ids"].shape
    # Visual tensors are the example's own image, unmodified (never zeroed).
    store = FeatureStore(DataConfig.load(toy).stores[0])
    for j, i in enumerate(key.indices):
        img = store.read(int(dataset.sent_image_row[i]))
        assert torch.equal(batch["visual_feats"][j], torch.from_numpy(img.features))
        assert torch.equal(batch["visual_pos"][j], torch.from_numpy(img.boxes))
        assert torch.equal(batch["obj_labels"][j], torch.from_numpy(img.obj_ids))
        assert torch.equal(batch["attr_confs"][j], torch.from_numpy(img.attr_confs))


def test_masking_statistics(dataset):
    counts = dict(
        maskable=0,
        masked=0,
        as_mask=0,
        as_random=0,
        kept=0,
        obj=0,
        obj_masked=0,
        mis_maskable=0,
        mis_mask_tokens=0,
        mis_obj=0,
        mis_obj_masked=0,
        n=0,
        matched=0,
    )
    rng = np.random.default_rng(0)
    for _ in range(12):
        indices = rng.choice(len(dataset), 256, replace=False)
        batch = dataset.make_batch(indices, np.random.default_rng(rng.integers(1 << 30)))
        ids, labels, am = batch["input_ids"].numpy(), batch["mlm_labels"].numpy(), batch["attention_mask"].numpy()
        matched = batch["itm_labels"].numpy().astype(bool)
        lengths = am.sum(1)
        col = np.arange(ids.shape[1])[None]
        maskable = (col >= 1) & (col < lengths[:, None] - 1)
        assert ids[:, 0].tolist() == [dataset.cls_id] * 256  # [CLS]/[SEP] never touched
        assert (ids[np.arange(256), lengths - 1] == dataset.sep_id).all()
        assert (labels[~maskable] == -100).all()
        # Matched rows: labels hold the original ids; unlabelled positions are untouched.
        orig, _ = gather_tokens(dataset.token_ids, dataset.token_offsets, indices)
        m = matched[:, None] & maskable
        lab = m & (labels != -100)
        np.testing.assert_array_equal(labels[lab], orig[lab])
        np.testing.assert_array_equal(ids[m & ~lab], orig[m & ~lab])
        counts["maskable"] += m.sum()
        counts["masked"] += lab.sum()
        counts["as_mask"] += (lab & (ids == dataset.mask_id)).sum()
        counts["as_random"] += (lab & (ids != dataset.mask_id) & (ids != orig)).sum()
        replaced = ids[lab & (ids != dataset.mask_id) & (ids != orig)]  # never a special or [unused] token
        assert np.isin(replaced, dataset.replacement_ids).all()
        counts["kept"] += (lab & (ids == orig)).sum()
        obj_mask = batch["obj_mask"].numpy()
        counts["obj"] += matched.sum() * 100
        counts["obj_masked"] += obj_mask[matched].sum()
        # Mismatched rows: no targets at all, but the same corruption (else it would leak the label).
        assert (labels[~matched] == -100).all() and (batch["qa_labels"].numpy()[~matched] == -100).all()
        counts["mis_maskable"] += (maskable & ~matched[:, None]).sum()
        counts["mis_mask_tokens"] += ((ids == dataset.mask_id) & ~matched[:, None]).sum()
        counts["mis_obj"] += (~matched).sum() * 100
        counts["mis_obj_masked"] += obj_mask[~matched].sum()
        counts["n"] += 256
        counts["matched"] += matched.sum()
    c = {k: float(v) for k, v in counts.items()}
    assert c["maskable"] > 10_000
    assert abs(c["masked"] / c["maskable"] - 0.15) < 0.012
    assert abs(c["as_mask"] / c["masked"] - 0.8) < 0.03
    # A random replacement can draw the original token (1 / vocab); it then counts as kept.
    assert abs(c["as_random"] / c["masked"] - 0.1) < 0.025
    assert abs(c["kept"] / c["masked"] - 0.1) < 0.025
    assert abs(c["obj_masked"] / c["obj"] - 0.15) < 0.005
    assert abs(c["matched"] / c["n"] - 0.5) < 0.035
    assert abs(c["mis_mask_tokens"] / c["mis_maskable"] - 0.15 * 0.8) < 0.015
    assert abs(c["mis_obj_masked"] / c["mis_obj"] - 0.15) < 0.005


def test_negatives_come_from_other_images(dataset):
    rng = np.random.default_rng(1)
    indices = rng.choice(len(dataset), 2000)
    neg = dataset._negatives(indices, rng)
    assert (dataset.sent_image_row[neg] != dataset.sent_image_row[indices]).all()
    assert len(np.unique(neg)) > 1000  # spread over the corpus, not one fixed sentence
    # Uniform over every sentence of another image, the first and the last included.
    own = next(i for i in range(len(dataset)) if dataset.sent_image_row[i] not in dataset.sent_image_row[[0, -1]])
    drawn = np.bincount(dataset._negatives(np.full(40 * len(dataset), own), rng), minlength=len(dataset))
    others = dataset.sent_image_row != dataset.sent_image_row[own]
    assert (drawn[~others] == 0).all() and drawn[others].min() > 10 and drawn[others].max() < 80  # mean 40


def test_qa_labels(light, dataset):
    rng = np.random.default_rng(2)
    indices = rng.choice(len(dataset), 512, replace=False)
    batch = dataset.make_batch(indices, np.random.default_rng(5))
    matched = batch["itm_labels"].bool().numpy()
    qa = batch["qa_labels"].numpy()
    for j, i in enumerate(indices):
        a, z = dataset.qa_offsets[i], dataset.qa_offsets[i + 1]
        if matched[j] and z > a:
            assert qa[j] in dataset.qa_answers[a:z]
        else:
            assert qa[j] == -100
    assert (qa >= 0).sum() > 100  # the toy world has many questions

    # Several answers: drawn in proportion to their scores (LXMERT).
    cfg = light
    stores = open_stores(cfg.stores)
    table = AnswerTable(["red", "blue", "green"])
    corpus = PretrainCorpus(
        sources=("vqa",),
        image_ids=stores.image_ids[:2],
        sent_image=np.array([0, 1]),
        sent_source=np.zeros(2, np.int8),
        sent_index=np.zeros(2, np.int32),
        texts=["what color is the car ?", "a dog ."],
        qa_offsets=np.array([0, 2, 2]),
        qa_answers=np.array([0, 1], np.int32),
        qa_scores=np.array([0.6, 0.3], np.float32),
    )
    ds = PretrainDataset(corpus, stores, load_tokenizer(cfg.vocab), table, MaskingConfig(mismatch_prob=0.0))
    assert ds.make_batch(np.array([0, 1]), np.random.default_rng(0))["qa_labels"].tolist()[1] == -100
    # Only the QA draw: reading 3000 images would test nothing more.
    labels = ds._qa_labels(np.zeros(3000, np.int64), np.ones(3000, bool), np.random.default_rng(0))
    assert set(labels.tolist()) == {0, 1} and abs((labels == 0).mean() - 2 / 3) < 0.03


def collect(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_determinism_and_workers(light):
    a = collect(build_pretrain_loader(light, batch_size=16, seed=7), 3)
    b = collect(build_pretrain_loader(light, batch_size=16, seed=7, num_workers=2), 3)
    for x, y in zip(a, b, strict=True):
        batches_equal(x, y)  # same batches whatever the number of worker processes
    c = collect(build_pretrain_loader(light, batch_size=16, seed=8), 1)
    assert not torch.equal(a[0]["visual_feats"], c[0]["visual_feats"])
    assert all(x["visual_feats"].is_shared() for x in b)  # workers handed their tensors over in shared memory


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch(light, num_workers):
    full = build_pretrain_loader(light, batch_size=128, seed=1)
    per_epoch = len(full)
    assert 5 < per_epoch < 20
    reference = []
    for _ in range(2):  # two whole epochs, uninterrupted
        reference += list(full)
    assert full.state_dict()["epoch"] == 2
    assert not torch.equal(reference[0]["input_ids"][:, :3], reference[per_epoch]["input_ids"][:, :3])

    k = per_epoch - 3
    first = build_pretrain_loader(light, batch_size=128, seed=1, num_workers=num_workers)
    assert len(collect(first, k)) == k
    state = first.state_dict()
    assert (state["epoch"], state["position"]) == (0, k)
    resumed = build_pretrain_loader(light, batch_size=128, seed=1, num_workers=num_workers)
    resumed.load_state_dict(state)
    got = list(resumed)  # the rest of epoch 0 ...
    got += collect(resumed, 2)  # ... then epoch 1 begins
    assert len(got) == 5
    for x, y in zip(got, reference[k : k + 5], strict=True):
        batches_equal(x, y)
    other = build_pretrain_loader(light, batch_size=128, seed=2)
    with pytest.raises(ValueError, match="seed=1 but this loader has seed=2"):
        other.load_state_dict(state)


class ExampleIndices(KeyedBatchDataset):
    """Batches that are their examples' indices: which examples a loader hands out, and when."""

    def __len__(self) -> int:
        return 1000

    def make_batch(self, indices: np.ndarray, rng: np.random.Generator) -> dict:
        return {"indices": torch.from_numpy(indices)}


@pytest.mark.parametrize("saved, resumed", [((2, 8), (1, 16)), ((2, 8), (4, 2)), ((4, 3), (3, 2)), ((1, 12), (2, 3))])
def test_a_position_saved_by_other_ranks_continues_with_the_examples_not_yet_seen(saved, resumed):
    """An elastic --resume: the state of (ranks, batch) = `saved` after 5 batches, loaded into loaders
    of `resumed`; together they hand out each example of the epoch once, then begin the next epoch."""
    (world, batch), (new_world, new_batch) = saved, resumed
    dataset = ExampleIndices()
    ranks = [ResumableLoader(dataset, batch, rank, world, seed=3) for rank in range(world)]
    seen = [i for loader in ranks for b in collect(loader, 5) for i in b["indices"].tolist()]
    state = ranks[0].state_dict()
    rest = []
    for rank in range(new_world):
        loader = ResumableLoader(dataset, new_batch, rank, new_world, seed=3)
        loader.load_state_dict(state)
        rest += [i for b in loader for i in b["indices"].tolist()]  # the rest of epoch 0
        assert loader.epoch == 1 and next(iter(loader))["indices"].numel() == new_batch
    assert len(seen + rest) == len(set(seen + rest)) and len(seen) == 5 * world * batch
    assert len(dataset) - len(seen + rest) < new_world * new_batch  # only the last partial step is dropped


def test_a_position_that_other_ranks_cannot_reach_is_refused():
    state = ResumableLoader(ExampleIndices(), 8, 0, 2, seed=3).state_dict() | {"position": 3}  # 48 examples
    with pytest.raises(ValueError, match="after 48 examples of epoch 0, not a whole number of this loader's 5 ranks"):
        ResumableLoader(ExampleIndices(), 2, 0, 5, seed=3).load_state_dict(state)


@pytest.mark.parametrize("num_workers", [1, 2])
def test_workers_that_reuse_their_buffers_give_the_batches_of_fresh_memory(light, num_workers):
    """reuse_buffers=True (the training loops'): each worker writes its batches into
    prefetch_factor + 1 = 3 shared-memory slots, over and over. A consumer that holds one batch at
    a time still gets exactly the in-process loader's batches, through an epoch's end, an iteration
    left early and the next one. On a CUDA machine the batches pass through the DataLoader's
    pin-memory thread (benchmarks/gpu_check.sh runs this there)."""
    dataset = build_pretrain_dataset(light)
    fresh = pretrain_loader(dataset, "train", 128, 0, 1, 1, 0)
    reused = pretrain_loader(dataset, "train", 128, 0, 1, 1, num_workers, reuse_buffers=True)
    shared_memory = set()  # the shared-memory objects (inodes) the batches' features live in

    def compare(limit: int | None = None) -> int:
        count = 0
        for got, expected in zip(reused, fresh, strict=True):
            fd, _ = got["visual_feats"].untyped_storage()._share_fd_cpu_()
            shared_memory.add(os.fstat(fd).st_ino)
            batches_equal(got, expected)
            count += 1
            if count == limit:
                break
        return count

    per_epoch = compare()  # epoch 0
    assert compare(limit=2) == 2  # epoch 1, left after two batches
    assert compare() == per_epoch - 2  # its rest
    assert (reused.epoch, fresh.epoch) == (2, 2)
    assert per_epoch > 3 * num_workers
    assert len(shared_memory) == 3 * num_workers


# Iterates loaders (workers, "reuse" or "fresh") in a private /dev/shm, one after the other, and prints
# the most of it each one's batches used at once, next to shared_memory_bound: what the launchers check.
PEAK_SHARED_MEMORY = """
import json, os, sys
from semvlp.data.loader import shared_memory_bound
from semvlp.data.pretrain_dataset import build_pretrain_dataset, pretrain_loader

def used():
    fs = os.statvfs("/dev/shm")
    return (fs.f_blocks - fs.f_bfree) * fs.f_frsize

dataset = build_pretrain_dataset(sys.argv[1])
for workers, kind in zip(sys.argv[2::2], sys.argv[3::2]):
    workers = int(workers)
    loader = pretrain_loader(dataset, "train", 16, 0, 1, 0, workers, reuse_buffers=kind == "reuse")
    before, peak = used(), 0
    for i, batch in enumerate(loader):
        peak = max(peak, used() - before)
        if i == 8 * workers:
            break
    del loader, batch  # its workers stop, its shared memory is freed
    bound = shared_memory_bound(dataset, 16, workers)
    print(json.dumps({"workers": workers, "kind": kind, "peak": peak, "bound": bound}))
"""


def test_the_shared_memory_bound_holds_what_the_workers_hold(toy, small_dev_shm):
    """shared_memory_bound, which the launchers check /dev/shm against, is what reusing workers hold
    (their 3 slots each, to the page) and at least what workers taking fresh memory hold."""
    cmd = [sys.executable, "-c", PEAK_SHARED_MEMORY, str(toy), "2", "reuse", "2", "fresh"]
    result = subprocess.run(small_dev_shm(cmd, "512m"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    reuse, fresh = (json.loads(line) for line in result.stdout.splitlines()[-2:])
    assert (reuse["kind"], fresh["kind"]) == ("reuse", "fresh")
    assert 0.99 * reuse["bound"] <= reuse["peak"] <= reuse["bound"]
    assert 0 < fresh["peak"] <= fresh["bound"]


def test_a_worker_reuses_a_slot_only_once_the_consumer_is_done_with_its_batch(monkeypatch):
    """A worker's _WorkerBuffers with 2 workers and prefetch_factor 2 (3 slots): batch n may take
    the slot of batch m only if n >= m + 5 (DataLoader sends batch n once the consumer has taken
    n - 4). Round robin gives a worker every other batch, so its slots come back 6 batches later;
    batches handed to it closer than that get fresh memory, and a new iteration frees every slot."""
    monkeypatch.setattr(loader_module, "get_worker_info", lambda: object())  # allocate() as in a worker

    def build(buffers: _WorkerBuffers, numbers: list[int], world_size: int = 1, rank: int = 0) -> list:
        monkeypatch.setattr(loader_module, "_worker_buffers", buffers)
        features = []
        for n in numbers:
            buffers.start_batch(BatchKey(seed=0, epoch=0, batch=n * world_size + rank, indices=()))
            features.append(loader_module.allocate((4, 3), torch.float16))
        return features  # kept alive: distinct tensors keep distinct ids

    round_robin = build(_WorkerBuffers(3, num_workers=2, world_size=2), [1, 3, 5, 7, 9, 11], 2, 1)
    assert [later is earlier for earlier, later in zip(round_robin[:3], round_robin[3:], strict=True)] == [True] * 3
    too_close = build(_WorkerBuffers(3, num_workers=2, world_size=1), [0, 1, 2, 3, 4, 5])
    assert len({id(t) for t in too_close}) == 6
    restarted = build(_WorkerBuffers(3, num_workers=2, world_size=1), [0, 2, 4, 2])  # 2 again: a new iteration
    assert restarted[3] is restarted[0]


def test_sharding():
    n = 1003
    train = [ShardedBatchSampler(n, 10, rank=r, world_size=3, seed=0) for r in range(3)]
    assert len({len(s) for s in train}) == 1 and len(train[0]) == 33  # same batch count on every rank
    seen = [set(s.order(4).tolist()) for s in train]
    assert all(len(a & b) == 0 for a in seen for b in seen if a is not b)
    assert sum(map(len, seen)) == 990
    keys = [list(s.keys(4)) for s in train]
    assert sorted(k.batch for ks in keys for k in ks) == list(range(99))  # distinct random streams
    assert train[0].order(4).tolist() != train[0].order(5).tolist()
    evals = [ShardedBatchSampler(n, 10, rank=r, world_size=3, shuffle=False, drop_last=False) for r in range(3)]
    assert sorted(i for s in evals for k in s.keys(0) for i in k.indices) == list(range(n))  # all, once
    with pytest.raises(ValueError, match="rank 3"):
        ShardedBatchSampler(n, 10, rank=3, world_size=3)


def test_valid_split_is_repeatable(light):
    loader = build_pretrain_loader(light, batch_size=100, split="valid", seed=0)
    first, second = list(loader), list(loader)
    assert len(first) == len(loader) == -(-len(loader.dataset) // 100)
    assert sum(len(b["itm_labels"]) for b in first) == len(loader.dataset)
    for x, y in zip(first, second, strict=True):
        batches_equal(x, y)
    assert loader.state_dict()["position"] == 0


def test_padded_store_masks(tmp_path, toy):
    """A store built with --pad: visual_attention_mask appears and padding is never masked."""
    cfg = DataConfig.load(toy)
    src = FeatureStore(cfg.stores[0])

    def records():
        for i in range(40):
            img = src.read(i)
            n = 30 + i % 50  # fewer than K=100 boxes: padded
            boxes = img.boxes[:n] * np.array([img.img_w, img.img_h] * 2, np.float32)
            raw = RawImage(
                img.image_id,
                img.img_h,
                img.img_w,
                boxes,
                img.features[:n].astype(np.float32),
                img.obj_ids[:n],
                img.obj_confs[:n],
                img.attr_ids[:n],
                img.attr_confs[:n],
            )
            yield img.image_id, img.image_id, lambda raw=raw: raw

    convert(records(), tmp_path / "padded.h5", num_objects=100, pad=True, progress=False)
    table = AnswerTable(["yes"])
    stores = open_stores([tmp_path / "padded.h5"])
    corpus = PretrainCorpus(
        sources=("mscoco",),
        image_ids=stores.image_ids,
        sent_image=np.arange(40),
        sent_source=np.zeros(40, np.int8),
        sent_index=np.zeros(40, np.int32),
        texts=["a red car ."] * 40,
        qa_offsets=np.zeros(41, np.int64),
        qa_answers=np.zeros(0, np.int32),
        qa_scores=np.zeros(0, np.float32),
    )
    ds = PretrainDataset(corpus, stores, load_tokenizer(cfg.vocab), table)
    batch = ds.make_batch(np.arange(40), np.random.default_rng(0))
    vmask = batch["visual_attention_mask"]
    assert vmask.dtype == torch.int64 and vmask.sum(1).tolist() == [30 + i % 50 for i in range(40)]
    assert not (batch["obj_mask"] & (vmask == 0)).any() and batch["obj_mask"].any()


def test_missing_images_in_pretraining(light, tmp_path):
    cfg = light
    records = json.loads(Path(cfg.pretrain.valid[0]).read_text())
    records[3]["img_id"] = "nowhere_1"
    records[5]["img_id"] = "nowhere_2"
    path = tmp_path / "p.json"
    path.write_text(json.dumps(records))
    bad = DataConfig.from_dict({**cfg.to_dict(), "pretrain": {**cfg.to_dict()["pretrain"], "valid": [str(path)]}})
    with pytest.raises(MissingImagesError, match=rf"annotations \({path}\): 2 images missing.*'nowhere_1', 'nowhere_2'"
                                                 r".*launch/pretrain.py has no option to skip them"):  # fmt: skip
        build_pretrain_dataset(bad, split="valid")
    ds = build_pretrain_dataset(bad, split="valid", skip_missing=True)
    full = build_pretrain_dataset(cfg, split="valid")
    per_image = len(full) // len(records)
    assert ds.num_skipped == 2 * per_image and len(ds) == len(full) - 2 * per_image


def _nan_features(f):
    f["features"][...] = np.nan


def _infinite_features(f):
    f["features"][..., 7] = -np.inf


def _boxes_in_pixels(f):
    f["boxes"][...] = f["boxes"][...] * 640


def _inverted_boxes(f):
    f["boxes"][...] = f["boxes"][...][..., [2, 1, 0, 3]]  # x1 and x2 swapped, still within [0, 1]


NOT_FINITE = "features are not finite in float16 (NaN, inf or beyond 65504)"


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize(
    "damage, problem",
    [
        (_nan_features, NOT_FINITE),
        pytest.param(_infinite_features, NOT_FINITE, id="inf"),
        (_boxes_in_pixels, "boxes are not normalized to [0, 1]"),
        (_inverted_boxes, "a box has x2 < x1 or y2 < y1"),
    ],
)
def test_a_batch_of_an_image_the_converters_would_refuse_stops_the_run_naming_it(
    light, tmp_path, capsys, num_workers, damage, problem
):
    """A store made by other means: NaN features trained to a non-finite loss that named no image (and
    evaluated to answer 0 without a word), pixel boxes stopped the model naming neither image nor
    store, and under --compile ran. From a worker, the error is still the launcher's one line."""
    bad = tmp_path / "bad.h5"
    shutil.copyfile(light.stores[0], bad)
    with h5py.File(bad, "r+") as f:
        ids = [i.decode() for i in f["image_ids"][:]]
        damage(f)
    loader = build_pretrain_loader(
        DataConfig.from_dict({**light.to_dict(), "stores": [str(bad)]}), batch_size=16, num_workers=num_workers
    )
    with pytest.raises(SystemExit) as stopped:
        runner.run_main(lambda argv: next(iter(loader)), [])
    assert stopped.value.code == 2
    said = re.fullmatch(  # the last line: INFO lines a launcher shows may come before it
        rf"error \(rank 0\): {re.escape(str(bad))}, image '(.+)' \(row (\d+)\): {re.escape(problem)}; "
        r"`python -m semvlp.data.check DATA_JSON` lists every such image",
        capsys.readouterr().err.splitlines()[-1],
    )
    assert said and ids[int(said[2])] == said[1]


def test_label_counts_must_cover_the_stores_label_ids(light):
    """A store label id >= num_object_labels fails the object-label loss at step 1, an IndexError deep in
    the model: it is found when data.json's counts become the model's fields."""
    store = FeatureStore(light.stores[0])
    images = [store.read(row) for row in range(len(store))]
    top_obj = max(int(img.obj_ids.max()) for img in images)
    top_attr = max(int(img.attr_ids.max()) for img in images)
    tok = load_tokenizer(light.vocab)
    assert pretraining_model_fields(light, tok)["num_object_labels"] == light.num_object_labels  # the toy fits
    too_few = dataclasses.replace(light, num_object_labels=top_obj)
    with pytest.raises(ValueError, match=rf"num_object_labels is {top_obj}, but .*light.h5 holds object label id "
                                         rf"{top_obj} \(image \w+\)"):  # fmt: skip
        pretraining_model_fields(too_few, tok)
    too_few = dataclasses.replace(light, num_attribute_labels=top_attr)
    with pytest.raises(ValueError, match=rf"num_attribute_labels is {top_attr}, but .*light.h5 holds attribute"):
        pretraining_model_fields(too_few, tok)


def test_config_values_that_would_drop_data_are_errors(light, tmp_path):
    """A typo in pretrain.sources or answer_dsets silently dropped a source or all QA targets."""
    raw = light.to_dict()

    def edited(**pretrain):
        return DataConfig.from_dict({**raw, "pretrain": {**raw["pretrain"], **pretrain}})

    typo = r"pretrain.sources lists \['gq'\], which no record of the train files \(.*pretrain_train.json\) has"
    with pytest.raises(ValueError, match=typo + r"; sources found: \['gqa', 'mscoco', 'vqa'\]"):
        build_pretrain_dataset(edited(sources=["mscoco", "vqa", "gq"]))
    typo = r"all_ans.json: answer_dsets \['vqa2'\] match no answer's 'dsets'"
    with pytest.raises(AnnotationError, match=typo + r"; dsets found: \['gqa', 'vqa'\]"):
        build_pretrain_dataset(edited(answer_dsets=["vqa", "vqa2"]))
    empty = tmp_path / "all_ans.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match=rf"pretrain.answer_table {empty} holds no answers"):
        build_pretrain_dataset(edited(answer_table=str(empty)))
    with pytest.raises(ValueError, match=r"no sentence of the train files .* has an answer in pretrain.answer_table"):
        build_pretrain_dataset(edited(sources=["mscoco"]))
    # The default, LXMERT's five sources, takes those the files hold (the toy world has no vg, visual7w).
    assert build_pretrain_dataset(edited(sources=list(LXMERT_SOURCES))).corpus_sources == LXMERT_SOURCES


def test_a_loader_alive_at_exit_stops_its_workers(toy, tmp_path):
    """Workers ignore SIGTERM (a stop signal is the training process's); so multiprocessing's exit
    handling, which SIGTERMs daemonic workers and waits, must find them stopped already, even when
    the loader outlives the program (torch.compile's caches keep it, so would a global)."""
    script = tmp_path / "exit.py"
    script.write_text(
        "from semvlp.data import build_pretrain_loader\n"
        f"loader = build_pretrain_loader({str(toy)!r}, batch_size=8, num_workers=2)\n"
        "iterator = iter(loader)\n"
        "next(iterator)\n"
        "print('exiting', flush=True)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "exiting\n"


def test_iterating_leaves_the_global_rng_alone(light):
    """A resumed run starts one more iteration than an uninterrupted one; that must not shift the
    model's dropout masks (DataLoader would otherwise draw its worker seed from the global RNG)."""
    loader = build_pretrain_loader(light, batch_size=16, seed=0, num_workers=1)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    collect(loader, 2)
    assert torch.equal(torch.rand(3), expected)
