"""Fine-tuning batches as the launchers build them (semvlp/tasks): VQA/GQA soft targets, NLVR2
image pairs, retrieval training pairs with negatives, retrieval evaluation over every pair,
hard-negative selection, and images missing from the stores."""

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from semvlp.data.annotations import (
    AnnotationError,
    AnswerTable,
    MissingImagesError,
    QAExample,
    load_flickr30k,
    load_nlvr2,
    load_vqa,
)
from semvlp.data.config import DataConfig
from semvlp.data.store import FeatureStore, open_stores
from semvlp.data.tokenizer import load_tokenizer
from semvlp.data.toy import ToySpec, ensure_toy_world
from semvlp.run_config import ConfigError
from semvlp.tasks.finetune import FinetuneConfig
from semvlp.tasks.nlvr2 import NLVR2Dataset, NLVR2Task
from semvlp.tasks.qa import GQA, VQA, QAConfig, QADataset, QATask
from semvlp.tasks.retrieval import RetrievalConfig, RetrievalTask

CPU_CONFIG = Path(__file__).resolve().parents[1] / "ds_configs" / "cpu.json"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return ensure_toy_world(tmp_path_factory.getbasetemp() / "toy_small", spec=ToySpec.small())


@pytest.fixture(scope="module")
def cfg(toy):
    return DataConfig.load(toy)


@pytest.fixture(scope="module")
def store(cfg):
    return FeatureStore(cfg.stores[0])


@pytest.fixture(scope="module")
def tok(cfg):
    return load_tokenizer(cfg.vocab)


@pytest.fixture(scope="module")
def stores(cfg):
    return open_stores(cfg.stores)


def run_config(toy, cls=FinetuneConfig, **kw):
    """Task options as a launcher parses them; batches built in-process."""
    return cls(deepspeed_config=str(CPU_CONFIG), preset="tiny", data=str(toy), num_workers=0, **kw)


def features(store, img_id: str) -> torch.Tensor:
    return torch.from_numpy(store.read(img_id).features)


def digest(feats: torch.Tensor) -> bytes:
    return hashlib.blake2b(feats.contiguous().numpy().tobytes(), digest_size=16).digest()


def image_index(split, store) -> dict[bytes, int]:
    """The split's image index of each image's features (the toy images' features are distinct)."""
    index = {digest(features(store, i)): n for n, i in enumerate(split.image_ids)}
    assert len(index) == len(split.image_ids)
    return index


def tokens(batch: dict, row: int) -> tuple[int, ...]:
    return tuple(batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist())


def caption_tokens(ids: np.ndarray, offsets: np.ndarray, c: int) -> tuple[int, ...]:
    return tuple(ids[offsets[c] : offsets[c + 1]].tolist())


def test_vqa_batches_carry_the_labels_soft_scores(toy, cfg, store, tok, stores):
    task = QATask(run_config(toy, QAConfig), VQA, cfg, tok, stores, ("train", "valid", "test"))
    task.attach(None, 8, 16)
    ds = task.datasets["valid"]
    examples = load_vqa(cfg.vqa.valid)
    assert len(ds) == len(examples) and ds.labeled
    batch = next(iter(task.eval_loader("valid")))
    assert batch["index"].tolist() == list(range(16))  # evaluation batches keep the file order
    targets = batch["answer_targets"]
    assert targets.shape == (16, len(task.table)) and targets.dtype == torch.float32
    assert batch["visual_feats"].shape == (16, 100, 2048)
    for j in range(16):
        ex = examples[j]
        assert ds.examples[j].question_id == ex.question_id
        expected = torch.zeros(len(task.table))
        for ans, score in ex.label.items():  # the label values are the soft scores, used as given
            expected[task.table.ans2id(ans)] = score
        assert torch.equal(targets[j], expected)
        assert torch.equal(batch["visual_feats"][j], features(store, ex.img_id))
    assert (targets == 0.3).any()  # the toy world has annotator disagreement
    # Answers are looked up as written (LXMERT's fine-tuning): "Two" is not the table's "2".
    img = examples[0].img_id
    written = [
        QAExample(1, img, "how many ?", {"Two": 0.6, "yes": 0.3}, "f"),
        QAExample(2, img, "and ?", {"2": 0.9}, "f"),
    ]
    table = AnswerTable(["yes", "2"])
    targets = QADataset(written, stores, tok, table, 20, False, "vqa x").make_batch(np.arange(2), None)[
        "answer_targets"
    ]
    assert targets.tolist() == [[pytest.approx(0.3), 0.0], [0.0, pytest.approx(0.9)]]
    # the toy VQA test split has no labels: batches without targets, predictions only
    test = next(iter(task.eval_loader("test")))
    assert not task.labeled("test") and "answer_targets" not in test
    assert test["index"].tolist() == list(range(16))
    gqa = QATask(run_config(toy, QAConfig), GQA, cfg, tok, stores, ("train", "valid"))
    gqa.attach(None, 8, 16)
    batch = next(iter(gqa.train_loader))
    assert batch["answer_targets"].sum(1).tolist() == [1.0] * 8  # one answer per GQA question
    assert all(isinstance(gqa.datasets["train"].examples[i].question_id, str) for i in batch["index"].tolist())


def test_nlvr2_batches_pair_the_statement_with_both_images(toy, cfg, store, tok, stores):
    task = NLVR2Task(run_config(toy), cfg, tok, stores, ("valid",))
    task.attach(None, 8, 6)
    ds = task.datasets["valid"]
    examples = load_nlvr2(cfg.nlvr2.valid)
    batch = next(iter(task.eval_loader("valid")))
    assert batch["visual_feats"].shape == (6, 2, 100, 2048) and batch["visual_pos"].shape == (6, 2, 100, 4)
    assert batch["labels"].dtype == torch.int64 and batch["index"].tolist() == list(range(6))
    for j in range(6):
        ex = examples[j]
        assert ds.examples[j].identifier == ex.identifier and batch["labels"][j] == ex.label
        assert torch.equal(batch["visual_feats"][j, 0], features(store, ex.img0))
        assert torch.equal(batch["visual_pos"][j, 1], torch.from_numpy(store.read(ex.img1).boxes))
    labels = [e.label for e in load_nlvr2(cfg.nlvr2.train)]
    assert abs(np.mean(labels) - 0.5) < 0.15  # balanced statements


class PairScorer:
    """Stands in for the engine: identifies each (caption, image) pair of its inputs by content,
    records it, and scores it `score(image, caption)` (logits whose ITM log-odds is that score).
    Captions are identified by their first index with the same tokens (the toy world repeats some)."""

    device = torch.device("cpu")

    def __init__(self, images: dict[bytes, int], ids: np.ndarray, offsets: np.ndarray, score):
        self.images, self.score = images, score
        self.captions: dict[tuple, int] = {}
        for c in range(len(offsets) - 1):
            self.captions.setdefault(caption_tokens(ids, offsets, c), c)
        self.calls: list[tuple[list[tuple[int, int]], torch.Tensor | None]] = []

    def eval(self):
        pass

    def train(self):
        pass

    def __call__(self, *, mode, labels=None, **batch):
        pairs = [(self.captions[tokens(batch, r)], self.images[digest(batch["visual_feats"][r])])
                 for r in range(batch["input_ids"].shape[0])]  # fmt: skip
        self.calls.append((pairs, labels))
        scores = torch.tensor([float(self.score(i, c)) for c, i in pairs])
        return SimpleNamespace(logits=torch.stack([torch.zeros_like(scores), scores], 1), loss=scores.sum())


def test_retrieval_evaluation_scores_every_pair_once(toy, cfg, store, tok, stores):
    full = load_flickr30k(cfg.flickr30k.annotations, cfg.flickr30k.test_splits)
    assert len(full.captions) == 5 * len(full.image_ids)
    # 7 images x 35 captions keep the test fast; chunks of 17 captions leave a partial one.
    task = RetrievalTask(run_config(toy, RetrievalConfig, eval_images=7), cfg, tok, stores, ("test",))
    task.attach(None, 8, 17)
    ev = task.datasets["test"]
    n_img, n_cap = 7, 35
    assert ev.split.image_ids == full.image_ids[:n_img] and len(ev.split.captions) == n_cap
    assert (ev.split.caption_image == np.repeat(np.arange(n_img), 5)).all()
    engine = PairScorer(image_index(ev.split, store), ev.token_ids, ev.token_offsets, lambda i, c: 1000 * i + c)
    scores = task.predictions(engine, "test", 0)
    # every pair was scored exactly once, with the cell's own image and caption
    assert sorted(p for pairs, _ in engine.calls for p in pairs) == sorted(
        (engine.captions[caption_tokens(ev.token_ids, ev.token_offsets, c)], i)
        for i in range(n_img) for c in range(n_cap)
    )  # fmt: skip
    canonical = [engine.captions[caption_tokens(ev.token_ids, ev.token_offsets, c)] for c in range(n_cap)]
    expected = torch.tensor([[1000.0 * i + canonical[c] for c in range(n_cap)] for i in range(n_img)])
    assert torch.equal(scores, expected)
    assert task.metrics("test", scores)["captions"] == n_cap


def test_two_stream_retrieval_evaluation_equals_scoring_every_pair(toy, cfg, tok, stores):
    """Two-stream evaluation encodes each caption and image once (SemVLPForRetrieval.score_pairs);
    its matrix equals forward(mode="two") on every (image, caption) pair, chunk edges included."""
    from semvlp import runner
    from semvlp.data.batching import gather_tokens, text_batch, visual_batch
    from semvlp.model import SemVLPForRetrieval

    run = run_config(toy, RetrievalConfig, eval_images=4, mode="two")
    task = RetrievalTask(run, cfg, tok, stores, ("test",))
    task.attach(None, 8, 7)  # 20 captions in chunks of 7: a partial chunk last
    torch.manual_seed(0)
    model = SemVLPForRetrieval(runner.build_model_config(run, vocab_size=len(tok), **task.model_fields())).eval()
    with torch.no_grad():
        scores = task.predictions(SimpleNamespace(module=model, device=torch.device("cpu")), "test", 0)
        ev = task.datasets["test"]
        text = text_batch(*gather_tokens(ev.token_ids, ev.token_offsets, np.arange(20)))
        text = {k: text[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        expected = torch.stack([
            SemVLPForRetrieval.score(model(**text, **{k: v.expand(20, *v.shape[1:]) for k, v in image.items()},
                                           mode="two").logits)
            for image in (visual_batch(stores, ev.rows[i : i + 1]) for i in range(4))
        ])  # fmt: skip
    assert scores.shape == (4, 20)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    assert scores.std() > 0  # a real score matrix, not a constant


def test_retrieval_training_pairs_each_caption_with_other_images_and_captions(toy, cfg, store, tok, stores):
    task = RetrievalTask(run_config(toy, RetrievalConfig, negatives=3), cfg, tok, stores, ("train",))
    ds = task.datasets["train"]
    split, m = ds.split, 4  # the positive and 3 negatives per direction
    images = image_index(split, store)
    batch = ds.make_batch(np.arange(200), np.random.default_rng(0))
    assert batch["index"].tolist() == list(range(200))
    assert batch["visual_feats"].shape == (200, m, 100, 2048) and batch["input_ids"].shape[0] == 200 * m
    of_image: dict[tuple, set[int]] = {}  # the images that have a caption with these tokens
    for c in range(len(split.captions)):
        of_image.setdefault(caption_tokens(ds.token_ids, ds.token_offsets, c), set()).add(split.caption_image[c])
    neg_images, neg_captions = set(), set()
    for b in range(200):
        own = split.caption_image[b]
        assert tokens(batch, b * m) == caption_tokens(ds.token_ids, ds.token_offsets, b)  # the positive
        assert images[digest(batch["visual_feats"][b, 0])] == own
        row_images = [images[digest(batch["visual_feats"][b, k])] for k in range(1, m)]
        assert own not in row_images and len(set(row_images)) == m - 1  # distinct, as UNITER samples them
        neg_images.update(row_images)
        for k in range(1, m):
            caption = tokens(batch, b * m + k)
            assert of_image[caption] - {own}  # a caption of another image
            neg_captions.add(caption)
    # sampled uniformly: 600 draws of each kind reach nearly every image and caption
    assert len(neg_images) >= 0.9 * len(split.image_ids)
    assert len(neg_captions) >= 0.6 * len(of_image)


def test_negatives_are_distinct_and_never_the_positives_own():
    from semvlp.tasks.retrieval import _draw_others

    rng = np.random.default_rng(0)
    excluded = np.array([0, 3, 4, 9])
    counts = np.zeros(10, dtype=int)
    for _ in range(2000):
        drawn = _draw_others(rng, 10, 6, excluded)  # all 6 of the indices left, in random order
        assert sorted(drawn.tolist()) == [1, 2, 5, 6, 7, 8]
        counts[_draw_others(rng, 10, 1, excluded)] += 1
    assert counts[excluded].sum() == 0 and counts[[1, 2, 5, 6, 7, 8]].min() > 2000 / 6 * 0.8  # uniform


def test_more_negatives_than_the_split_has_are_refused(toy, cfg, tok, stores):
    task = RetrievalTask(run_config(toy, RetrievalConfig), cfg, tok, stores, ("train",))
    split = task.datasets["train"].split
    most = len(split.image_ids) - 1
    with pytest.raises(ConfigError, match=f"--negatives {most + 1}: flickr30k train .* so at most {most} distinct"):
        RetrievalTask(run_config(toy, RetrievalConfig, negatives=most + 1), cfg, tok, stores, ("train",))


def test_hard_negatives_are_the_highest_scoring_candidates(toy, cfg, store, tok, stores):
    task = RetrievalTask(run_config(toy, RetrievalConfig, negatives=3, hard_negatives=1), cfg, tok, stores,
                         ("train",))  # fmt: skip
    task.attach(None, 8, 5)  # the pool is scored in chunks of 5 pairs
    ds = task.datasets["train"]
    batch = ds.make_batch(np.arange(8), np.random.default_rng(1))
    engine = PairScorer(image_index(ds.split, store), ds.token_ids, ds.token_offsets, lambda i, c: i + c / 1000)
    task.loss(engine, batch, "single", 0)
    *pool, (trained, labels) = engine.calls
    assert sum(len(p) for p, _ in pool) == 8 * 2 * 3 and all(lab is None for _, lab in pool)
    assert labels.tolist() == [1, 0, 0] * 8  # the positive, the hardest image, the hardest caption
    for b in range(8):
        (cap, img), (neg_cap, neg_img) = trained[3 * b], trained[3 * b + 2]
        assert (cap, img) == (engine.captions[caption_tokens(ds.token_ids, ds.token_offsets, b)],
                              ds.split.caption_image[b])  # fmt: skip
        candidates = [engine.images[digest(batch["visual_feats"][b, k])] for k in (1, 2, 3)]
        assert trained[3 * b + 1] == (cap, max(candidates))  # image negatives score i + c/1000
        captions = [engine.captions[tokens(batch, 4 * b + k)] for k in (1, 2, 3)]
        assert (neg_cap, neg_img) == (max(captions), img)


def test_missing_images_fail_naming_them_or_are_skipped(toy, cfg, store, tok, stores, tmp_path):
    examples = load_vqa(cfg.vqa.valid)[:10]
    examples[2].img_id = "missing_a"
    examples[7].img_id = "missing_b"
    table = QATask(run_config(toy, QAConfig), VQA, cfg, tok, stores, ("valid",)).table
    with pytest.raises(MissingImagesError, match=r"vqa valid \(.*/vqa_valid.json\): 2 images missing.*\['missing_a', "
                                                 r"'missing_b'\]"):  # fmt: skip
        QADataset(examples, stores, tok, table, cfg.max_text_len, False, "vqa valid")
    ds = QADataset(examples, stores, tok, table, cfg.max_text_len, True, "vqa valid")
    assert len(ds) == 8 and ds.num_skipped == 2
    kept = [examples[i] for i in (0, 1, 3, 4, 5, 6, 8, 9)]
    assert [e.question_id for e in ds.examples] == [e.question_id for e in kept]
    batch = ds.make_batch(np.arange(8), np.random.default_rng(0))
    for j, e in enumerate(kept):  # the kept questions keep their own images
        assert torch.equal(batch["visual_feats"][j], features(store, e.img_id))

    nl = load_nlvr2(cfg.nlvr2.valid)[:5]
    nl[1].img1 = "missing_c"
    with pytest.raises(MissingImagesError, match=r"nlvr2 valid \(.*/nlvr2_valid.json\): 1 images missing.*missing_c"):
        NLVR2Dataset(nl, stores, tok, cfg.max_text_len, False, "nlvr2 valid")
    ds = NLVR2Dataset(nl, stores, tok, cfg.max_text_len, True, "nlvr2 valid")
    assert len(ds) == 4 and [e.identifier for e in ds.examples] == [nl[i].identifier for i in (0, 2, 3, 4)]
    batch = ds.make_batch(np.arange(4), np.random.default_rng(0))
    assert torch.equal(batch["visual_feats"][1, 1], features(store, nl[2].img1))

    data = json.loads(Path(cfg.flickr30k.annotations).read_text())
    data["images"][-1]["filename"] = "missing_d.jpg"
    path = tmp_path / "k.json"
    path.write_text(json.dumps(data))
    raw = cfg.to_dict()
    edited = DataConfig.from_dict({**raw, "flickr30k": {**raw["flickr30k"], "annotations": str(path)}})
    split = load_flickr30k(path, "test")
    with pytest.raises(MissingImagesError, match=rf"flickr30k test \({path}\): 1 images missing.*missing_d"):
        RetrievalTask(run_config(toy, RetrievalConfig), edited, tok, stores, ("test",))
    task = RetrievalTask(run_config(toy, RetrievalConfig, skip_missing=True), edited, tok, stores, ("test",))
    ev = task.datasets["test"]
    assert ev.split.image_ids == split.image_ids[:-1]  # the missing image was the last
    assert len(ev.split.captions) == len(split.captions) - 5
    assert (ev.rows == stores.rows(ev.split.image_ids)).all()
    assert f"flickr30k test: {len(split.image_ids) - 1} images, {len(split.captions) - 5} captions, " \
           "1 images skipped (in no store)" in task.notes  # fmt: skip


def test_a_dev_file_with_an_image_in_no_store_is_named_by_the_launcher(toy, tmp_path, capsys, load_launcher):
    """data.json lists a VQA dev file with a question on an image that no store holds: the launcher
    stops (exit 2) naming that file, not the train files, and --skip_missing, before the run folder."""
    from semvlp.runner import run_main

    raw = DataConfig.load(toy).to_dict()
    questions = json.loads(Path(raw["vqa"]["valid"][0]).read_text())
    questions[4]["img_id"] = "not_in_any_store"
    dev = tmp_path / "vqa_dev.json"
    dev.write_text(json.dumps(questions))
    DataConfig.from_dict({**raw, "vqa": {**raw["vqa"], "valid": [str(dev)]}}).save(tmp_path / "data.json")
    argv = ["--deepspeed_config", str(CPU_CONFIG), "--preset", "tiny", "--data", str(tmp_path / "data.json"),
            "--output_dir", str(tmp_path / "run")]  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        run_main(load_launcher("finetune_vqa.py").main, argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"error: vqa valid ({dev}): 1 images missing from the feature stores" in err
    assert "['not_in_any_store'] (pass --skip_missing (skip_missing=True in code) to drop them)" in err
    assert all(train not in err for train in raw["vqa"]["train"])
    assert not (tmp_path / "run").exists()


def without_labels(annotations: str, out: Path) -> Path:
    """A copy of a VQA, GQA or NLVR2 file without its labels, as a test file comes."""
    records = json.loads(Path(annotations).read_text())
    out.write_text(json.dumps([{k: v for k, v in r.items() if k != "label"} for r in records]))
    return out


def test_a_train_or_dev_split_without_labels_stops_before_the_run_folder(toy, tmp_path, capsys, load_launcher):
    """A GQA dev file without labels trained, then failed at the first dev evaluation (KeyError 'valid');
    a VQA train file without them at the first step (KeyError 'answer_targets'), an NLVR2 dev file at
    its accuracy (TypeError). The task now refuses them where the launcher builds it (exit 2, no run
    folder). A test split needs no labels, nor does a --predict_only run's dev split; a test split
    mixing files with and without labels is predicted only."""
    from semvlp.runner import run_main

    raw = DataConfig.load(toy).to_dict()
    dev = without_labels(raw["gqa"]["valid"][0], tmp_path / "gqa_dev.json")
    DataConfig.from_dict({**raw, "gqa": {**raw["gqa"], "valid": [str(dev)]}}).save(tmp_path / "data.json")
    argv = ["--deepspeed_config", str(CPU_CONFIG), "--preset", "tiny", "--data", str(tmp_path / "data.json"),
            "--output_dir", str(tmp_path / "run"), "--epochs", "0", "--max_steps", "2"]  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        run_main(load_launcher("finetune_gqa.py").main, argv)
    assert exited.value.code == 2
    assert capsys.readouterr().err == (f"error: gqa valid ({dev}): no question has a label; train and dev files "
                                       "need them (only test files may have none)\n")  # fmt: skip
    assert not (tmp_path / "run").exists()

    vqa = raw["vqa"]  # the toy VQA test file has no labels
    cfg = DataConfig.from_dict({**raw, "vqa": {**vqa, "train": vqa["test"], "test": vqa["valid"] + vqa["test"]}})
    tok, stores = load_tokenizer(cfg.vocab), open_stores(cfg.stores)
    with pytest.raises(AnnotationError, match=rf"^vqa train \({vqa['test'][0]}\): no question has a label"):
        QATask(run_config(toy, QAConfig), VQA, cfg, tok, stores, ("train", "valid"))
    task = QATask(run_config(toy, QAConfig), VQA, cfg, tok, stores, ("valid", "test"))
    assert not task.labeled("test") and "answer_targets" not in task.datasets["test"].make_batch(np.arange(2), None)
    assert "vqa test: 240 questions, 120 of them without labels (predictions only)" in task.notes

    dev = without_labels(raw["nlvr2"]["valid"][0], tmp_path / "nlvr2_dev.json")
    cfg = DataConfig.from_dict({**raw, "nlvr2": {**raw["nlvr2"], "valid": [str(dev)]}})
    with pytest.raises(AnnotationError, match=rf"^nlvr2 valid \({dev}\): no statement has a label"):
        NLVR2Task(run_config(toy), cfg, tok, stores, ("train", "valid"))
    task = NLVR2Task(run_config(toy, predict_only=True, init_from=str(tmp_path)), cfg, tok, stores, ("valid",))
    assert not task.labeled("valid") and task.notes == ["nlvr2 valid: 20 statements without labels"]
