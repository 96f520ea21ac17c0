"""Fine-tuning batches: VQA/GQA soft targets, NLVR2 image pairs, retrieval pairs, missing images."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from semvlp.data import build_finetune_dataset, build_finetune_loader, ensure_toy_world
from semvlp.data.annotations import MissingImagesError, load_flickr30k, load_nlvr2, load_vqa
from semvlp.data.config import DataConfig
from semvlp.data.finetune_dataset import NLVR2Dataset, QADataset, RetrievalEvalDataset, RetrievalTrainDataset
from semvlp.data.loader import ResumableLoader
from semvlp.data.store import FeatureStore, open_stores
from semvlp.data.tokenizer import load_tokenizer
from semvlp.data.toy import ToySpec


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return ensure_toy_world(tmp_path_factory.getbasetemp() / "toy_small", spec=ToySpec.small())


@pytest.fixture(scope="module")
def cfg(toy):
    return DataConfig.load(toy)


@pytest.fixture(scope="module")
def store(cfg):
    return FeatureStore(cfg.stores[0])


def test_vqa_batches(cfg, store):
    loader = build_finetune_loader(cfg, "vqa", "valid", batch_size=16)
    ds = loader.dataset
    assert isinstance(ds, QADataset) and len(ds) == len(load_vqa(cfg.vqa.valid))
    batch = next(iter(loader))
    table = ds.answer_table
    assert batch["answer_targets"].shape == (16, len(table)) and batch["answer_targets"].dtype == torch.float32
    assert len(batch["question_ids"]) == 16 and batch["visual_feats"].shape == (16, 100, 2048)
    for j in range(16):
        ex = ds.examples[j]  # valid batches keep the file order
        assert batch["question_ids"][j] == ex.question_id
        expected = torch.zeros(len(table))
        for ans, score in ex.label.items():  # the label values are the soft scores, used as given
            expected[table.ans2id(ans)] = score
        assert torch.equal(batch["answer_targets"][j], expected)
        assert torch.equal(batch["visual_feats"][j], torch.from_numpy(store.read(ex.img_id).features))
    assert (batch["answer_targets"] == 0.3).any()  # the toy world has annotator disagreement
    test = next(iter(build_finetune_loader(cfg, "vqa", "test", batch_size=4)))
    assert "answer_targets" not in test and len(test["question_ids"]) == 4
    gqa = next(iter(build_finetune_loader(cfg, "gqa", "train", batch_size=8, seed=1)))
    assert gqa["answer_targets"].sum(1).tolist() == [1.0] * 8
    assert isinstance(gqa["question_ids"][0], str)


def test_nlvr2_batches(cfg, store):
    loader = build_finetune_loader(cfg, "nlvr2", "valid", batch_size=6)
    ds = loader.dataset
    assert isinstance(ds, NLVR2Dataset)
    batch = next(iter(loader))
    assert batch["visual_feats"].shape == (6, 2, 100, 2048) and batch["visual_pos"].shape == (6, 2, 100, 4)
    assert batch["labels"].dtype == torch.int64
    for j in range(6):
        ex = ds.examples[j]
        assert batch["identifiers"][j] == ex.identifier and batch["labels"][j] == ex.label
        assert torch.equal(batch["visual_feats"][j, 0], torch.from_numpy(store.read(ex.img0).features))
        assert torch.equal(batch["visual_pos"][j, 1], torch.from_numpy(store.read(ex.img1).boxes))
    labels = [e.label for e in load_nlvr2(cfg.nlvr2.train)]
    assert abs(np.mean(labels) - 0.5) < 0.15  # balanced statements


def test_retrieval_eval_enumerates_every_pair_once(cfg):
    full = build_finetune_dataset(cfg, "flickr30k", "test")
    assert isinstance(full, RetrievalEvalDataset)
    assert len(full.split.captions) == 5 * len(full.split.image_ids)
    assert len(full) == len(full.split.image_ids) * len(full.split.captions)
    # 7 images x 35 captions keep the test fast; batches of 17 straddle images.
    split = full.split.select_images(np.arange(len(full.split.image_ids)) < 7)
    ds = RetrievalEvalDataset(split, open_stores(cfg.stores), load_tokenizer(cfg.vocab))
    n_img, n_cap = 7, 35
    loader = ResumableLoader(ds, 17, shuffle=False, drop_last=False, repeatable=True)
    scores = torch.full((n_img, n_cap), -1.0)
    store = FeatureStore(cfg.stores[0])
    for batch in loader:
        i, c = batch["image_index"], batch["caption_index"]
        assert (scores[i, c] == -1).all()
        scores[i, c] = 1.0
        j = len(i) // 2
        img = store.read(ds.split.image_ids[int(i[j])])
        assert torch.equal(batch["visual_feats"][j], torch.from_numpy(img.features))
    assert (scores == 1).all()


def test_retrieval_train_pairs(cfg):
    ds = build_finetune_dataset(cfg, "flickr30k", "train")
    assert isinstance(ds, RetrievalTrainDataset)
    batch = ds.make_batch(np.arange(200), np.random.default_rng(0))
    own = torch.from_numpy(ds.split.caption_image[:200])
    matched = batch["itm_labels"].bool()
    assert torch.equal(batch["caption_index"], torch.arange(200))
    assert (batch["image_index"][matched] == own[matched]).all()
    assert (batch["image_index"][~matched] != own[~matched]).all()
    assert 0.35 < matched.float().mean() < 0.65
    hard = ds.pair_batch(np.array([3, 3, 0]), np.array([0, 1, 2]), np.array([1, 0, 0]))
    assert torch.equal(hard["visual_feats"][0], hard["visual_feats"][1])
    assert hard["itm_labels"].tolist() == [1, 0, 0]


def test_missing_images_in_finetuning(cfg, tmp_path):
    tok = load_tokenizer(cfg.vocab)
    stores = open_stores(cfg.stores)
    examples = load_vqa(cfg.vqa.valid)[:10]
    examples[2].img_id = "missing_a"
    examples[7].img_id = "missing_b"
    table = build_finetune_dataset(cfg, "vqa", "valid").answer_table
    with pytest.raises(MissingImagesError, match=r"2 images missing.*\['missing_a', 'missing_b'\]"):
        QADataset(examples, stores, tok, table)
    ds = QADataset(examples, stores, tok, table, skip_missing=True)
    assert len(ds) == 8 and ds.num_skipped == 2
    nl = load_nlvr2(cfg.nlvr2.valid)[:5]
    nl[1].img1 = "missing_c"
    ds = NLVR2Dataset(nl, stores, tok, skip_missing=True)
    assert len(ds) == 4 and [e.identifier for e in ds.examples] == [nl[i].identifier for i in (0, 2, 3, 4)]
    data = json.loads(Path(cfg.flickr30k.annotations).read_text())
    data["images"][-1]["filename"] = "missing_d.jpg"
    path = tmp_path / "k.json"
    path.write_text(json.dumps(data))
    split = load_flickr30k(path, "test")
    with pytest.raises(MissingImagesError, match="missing_d"):
        RetrievalEvalDataset(split, stores, tok)
    ds = RetrievalEvalDataset(split, stores, tok, skip_missing=True)
    assert len(ds.split.image_ids) == len(split.image_ids) - 1
    assert len(ds.split.captions) == len(split.captions) - 5
