"""launch/finetune_*.py end to end: real DeepSpeed engines in 2 CPU processes (gloo) on a small toy world.

A session fixture builds the world (K=36 objects and fewer images than the bundled one, so a
step costs ~0.13 s on 2 cores). Each launcher fine-tunes the tiny model from random init and
predicts its valid and test splits; the tests check the prediction files against the split
files, the reported metrics against the files, and the best-checkpoint selection.

What the budget can show. From random init, in 150 steps, the tiny model learns the language
prior of the toy questions but no cross-modal grounding. Hence VQA, where the prior is worth ~+0.10
over the majority answer, must beat it by a clear margin (single-stream: the demo-export tests below
fine-tune GQA, the same QA task, and NLVR2 two-stream). GQA, whose prior is worth only ~+0.03, and
NLVR2 and retrieval, whose labels the text alone does not give away, run a shorter schedule and are
checked for complete, well-formed predictions and metrics only (GQA's learning: tests/test_demo.py;
GQA starts from a randomly initialized pre-training export, through --answer_head_from_qa). Grounding
comes from pre-training: fine-tuned from the export of a demo-length pre-training run, NLVR2 reaches
~0.82-0.86 and GQA ~0.47 (its color questions 0.34 against chance 1/8), and the export ranks retrieval
pairs at image R@5 ~0.7 with no fine-tuning at all (tests/test_demo.py).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from _launch import CPU_CONFIG, REPO, pretrain_command, records


def launch(
    script: str, args: list[str], processes: int = 2, timeout: int = 600, wrap=None
) -> subprocess.CompletedProcess:
    """launch/<script> on ds_configs/cpu.json (the launchers set the batch from --batch_size), one
    loader worker; `wrap` may wrap its command line (small_dev_shm)."""
    cmd, env = pretrain_command(["--num_workers", "1", *args], processes, script, ds_config=CPU_CONFIG)
    if wrap is not None:
        cmd = wrap(cmd)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def toy(tmp_path_factory) -> Path:
    from semvlp.data.toy import ToySpec, ensure_toy_world

    spec = ToySpec(
        train_images=800, valid_images=100, test_images=100, num_objects=36,
        nlvr2_train=2000, nlvr2_eval=200, flickr_train_images=400,
    )  # fmt: skip
    return Path(ensure_toy_world(tmp_path_factory.mktemp("toy") / "world", spec=spec))


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text())


# 150 steps of 16 (8 per process), dev evaluation at steps 75 and 150 on 3 batches per process.
TRAIN = ["--epochs", "0", "--max_steps", "150", "--batch_size", "16", "--lr", "1e-3", "--eval_every", "75",
         "--eval_batches", "3", "--log_every", "25"]  # fmt: skip
# GQA, NLVR2 and retrieval show nothing more in this budget (module docstring): a shorter run checks the pipeline.
SHORT_SCHEDULE = ["--epochs", "0", "--max_steps", "40", "--batch_size", "16", "--lr", "1e-3", "--eval_every", "20",
                  "--log_every", "10"]  # fmt: skip
SHORT = [*SHORT_SCHEDULE, "--eval_batches", "3"]  # retrieval evaluates fewer images instead (--eval_images)


def majority_baseline(toy: Path, task: str, score) -> float:
    """The score of always answering the most frequent training answer, on the valid split."""
    train = load(toy.parent / f"{task}_train.json")
    valid = load(toy.parent / f"{task}_valid.json")
    top = Counter(max(q["label"], key=q["label"].get) for q in train).most_common(1)[0][0]
    return score([top] * len(valid), [q["label"] for q in valid])


_runs: dict[tuple, tuple[Path, dict]] = {}


@pytest.fixture(scope="session")
def finetuned(toy, tmp_path_factory):
    """finetuned(script, *args) -> (run_dir, results.json); each distinct run happens once per session.
    With `stop_at`, the run stops there (--exit_after_steps) and a second launch continues it (--resume)."""

    def run(script: str, *args: str, stop_at: int | None = None) -> tuple[Path, dict]:
        key = (script, *args, stop_at)
        if key not in _runs:
            out = tmp_path_factory.mktemp(Path(script).stem)
            common = ["--data", str(toy), "--output_dir", str(out), *args]
            pieces = [[*common, "--exit_after_steps", str(stop_at)], [*common, "--resume"]] if stop_at else [common]
            for piece in pieces:
                result = launch(script, piece)
                assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
                with open(out / "launcher_stdout.txt", "a") as log:
                    log.write(result.stdout)
            _runs[key] = (out, json.loads((out / "results.json").read_text()))
        return _runs[key]

    return run


@pytest.fixture(scope="session")
def pretraining_export(toy, tmp_path_factory) -> Path:
    """A pre-training export of the toy world's vocab, randomly initialized, whose QA answer table
    (config.id2label) holds GQA's answers in reverse order after one that GQA's table lacks."""
    from semvlp.config import config_from_preset
    from semvlp.data.tokenizer import load_tokenizer
    from semvlp.model import SemVLPForPreTraining

    answers = ["zebra", *reversed(load(toy.parent / "gqa_label2ans.json"))]
    vocab_size = len(load_tokenizer(toy.parent / "vocab.txt"))
    config = config_from_preset(
        "tiny", vocab_size=vocab_size, num_qa_labels=len(answers), id2label=dict(enumerate(answers))
    )
    folder = tmp_path_factory.mktemp("pretraining_export")
    SemVLPForPreTraining(config).save_pretrained(folder)
    shutil.copyfile(toy.parent / "vocab.txt", folder / "vocab.txt")
    return folder


def check_best_checkpoint(out: Path, results: dict, metric: str, steps: tuple[int, int] = (75, 150)) -> None:
    """The loop kept the best of the dev evaluations, and the export holds its weights."""
    evals = records(out, "eval")
    assert [e["step"] for e in evals] == list(steps)
    best = results["best"]
    assert best["metric"] == metric and best["value"] == max(e[metric] for e in evals)
    assert best["step"] == max(evals, key=lambda e: e[metric])["step"]  # the first of equals
    assert (out / "best" / "latest").read_text() == f"step{best['step']:08d}"
    assert (out / "export" / "model.safetensors").is_file() and (out / "export" / "vocab.txt").is_file()


@pytest.mark.ranks
def test_vqa_beats_the_majority_answer(toy, finetuned):
    from semvlp.metrics import vqa_score

    mode = "single"
    out, results = finetuned("finetune_vqa.py", "--mode", mode, *TRAIN, stop_at=100)
    assert results["mode"] == mode
    # Fine-tuned in two pieces: the best of the first (step 75) is carried through the resume.
    assert [r["step"] for r in records(out, "resume")] == [100]
    valid = results["splits"]["valid"]
    baseline = majority_baseline(toy, "vqa", vqa_score)  # "no": 0.29 on this world
    assert valid["score"] >= baseline + 0.06, (valid, baseline)
    assert valid["questions"] == len(load(toy.parent / "vqa_valid.json")) and valid["score_cap"] == 1.0
    assert results["splits"]["test"] == {}  # the toy VQA test split has no labels: predictions only
    check_best_checkpoint(out, results, f"{mode}/score")


@pytest.mark.ranks
def test_vqa_prediction_files_have_one_answer_per_question(toy, finetuned):
    out, _ = finetuned("finetune_vqa.py", "--mode", "single", *TRAIN, stop_at=100)
    answers = set(load(toy.parent / "vqa_label2ans.json"))
    for split in ("valid", "test"):
        questions = load(toy.parent / f"vqa_{split}.json")
        predictions = load(out / "predictions" / f"vqa_{split}.json")
        assert all(set(p) == {"question_id", "answer"} for p in predictions)
        assert sorted(p["question_id"] for p in predictions) == sorted(q["question_id"] for q in questions)
        assert {p["answer"] for p in predictions} <= answers


@pytest.mark.ranks
def test_predict_only_reproduces_the_predictions_from_the_export(toy, finetuned, tmp_path):
    out, _ = finetuned("finetune_vqa.py", "--mode", "single", *TRAIN, stop_at=100)
    result = launch(
        "finetune_vqa.py",
        ["--data", str(toy), "--output_dir", str(tmp_path), "--init_from", str(out / "export"), "--predict_only",
         "--predict_splits", "test"],
        processes=1,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test (single-stream): no labels: predictions only" in result.stdout
    assert not (tmp_path / "checkpoints").exists()
    assert load(tmp_path / "predictions" / "vqa_test.json") == load(out / "predictions" / "vqa_test.json")


@pytest.mark.ranks
def test_the_export_names_its_answers_and_predict_only_refuses_another_table(toy, finetuned, tmp_path):
    """The answer table travels in the export (config.id2label), so predicting with a table reordered
    since fine-tuning stops instead of naming other answers."""
    from semvlp import SemVLPForQuestionAnswering

    out, _ = finetuned("finetune_vqa.py", "--mode", "single", *TRAIN, stop_at=100)
    answers = load(toy.parent / "vqa_label2ans.json")
    config = SemVLPForQuestionAnswering.config_class.from_pretrained(out / "export")
    assert [config.id2label[i] for i in range(len(answers))] == answers and len(config.id2label) == len(answers)

    data = load(toy)
    data["vqa"]["label2ans"] = "vqa_label2ans_reordered.json"
    data["vqa"]["ans2label"] = None
    (toy.parent / data["vqa"]["label2ans"]).write_text(json.dumps([answers[1], answers[0], *answers[2:]]))
    reordered = toy.parent / "data_reordered.json"
    reordered.write_text(json.dumps(data))
    result = launch(
        "finetune_vqa.py",
        ["--data", str(reordered), "--output_dir", str(tmp_path / "run"), "--init_from", str(out / "export"),
         "--predict_only", "--predict_splits", "test"],
        processes=1,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert (f"was fine-tuned with class 0 = {answers[0]!r}, but the data's answer table has {answers[1]!r} there"
            in result.stderr)  # fmt: skip
    assert not (tmp_path / "run").exists()


@pytest.mark.ranks
def test_gqa_predictions_and_exact_match(toy, finetuned, pretraining_export):
    from semvlp.metrics import exact_match

    out, results = finetuned("finetune_gqa.py", *SHORT, "--init_from", str(pretraining_export), "--answer_head_from_qa")
    gqa_answers = len(load(toy.parent / "gqa_label2ans.json"))
    assert (  # the 1 of the export's answers that GQA lacks is left out
        f"--answer_head_from_qa: the answer head's transform, and its rows of the {gqa_answers} of {gqa_answers} "
        f"answers that the {gqa_answers + 1}-answer QA table holds, are now those of the QA head of "
        f"{pretraining_export}"
    ) in (out / "launcher_stdout.txt").read_text()
    check_best_checkpoint(out, results, "single/accuracy", steps=(20, 40))
    for split, file in (("valid", "gqa_valid.json"), ("test", "gqa_testdev.json")):
        questions = load(toy.parent / file)
        predictions = load(out / "predictions" / f"gqa_{split}.json")
        assert all(set(p) == {"questionId", "prediction"} and isinstance(p["questionId"], str) for p in predictions)
        assert sorted(p["questionId"] for p in predictions) == sorted(q["question_id"] for q in questions)
        # the reported accuracy is the exact match of the file's answers (testdev has labels in the toy world)
        by_id = {p["questionId"]: p["prediction"] for p in predictions}
        expected = exact_match([by_id[q["question_id"]] for q in questions], [q["label"] for q in questions])
        assert results["splits"][split]["accuracy"] == pytest.approx(expected)


@pytest.mark.ranks
def test_nlvr2_csv_has_one_line_per_statement(toy, finetuned):
    out, results = finetuned("finetune_nlvr2.py", "--mode", "two", *SHORT)
    check_best_checkpoint(out, results, "two/accuracy", steps=(20, 40))
    assert json.loads((out / "export" / "config.json").read_text())["id2label"] == {"0": "false", "1": "true"}
    for split in ("valid", "test"):
        statements = load(toy.parent / f"nlvr2_{split}.json")
        with open(out / "predictions" / f"nlvr2_{split}.csv", newline="") as f:
            rows = list(csv.reader(f))
        assert sorted(r[0] for r in rows) == sorted(s["identifier"] for s in statements)
        assert {r[1] for r in rows} <= {"True", "False"} and all(len(r) == 2 for r in rows)
        truth = {s["identifier"]: s["label"] == 1 for s in statements}
        accuracy = sum((r[1] == "True") == truth[r[0]] for r in rows) / len(rows)
        assert results["splits"][split]["accuracy"] == pytest.approx(accuracy)
        assert results["splits"][split]["statements"] == len(statements)


@pytest.mark.ranks
def test_retrieval_with_hard_negatives_ranks_every_caption_and_image(toy, finetuned):
    out, results = finetuned(
        "finetune_retrieval.py", "--eval_images", "12", "--negatives", "2", "--hard_negatives", "1", *SHORT_SCHEDULE
    )
    check_best_checkpoint(out, results, "single/r_mean", steps=(20, 40))
    assert json.loads((out / "export" / "config.json").read_text())["id2label"] == {"0": "mismatched", "1": "matched"}
    rankings = load(out / "predictions" / "retrieval_test.json")
    assert len(rankings["text_retrieval"]) == 12 and len(rankings["image_retrieval"]) == 60
    images = {r["image_id"] for r in rankings["text_retrieval"]}
    for r in rankings["image_retrieval"]:
        assert len(r["ranked_image_ids"]) == 10 and set(r["ranked_image_ids"]) <= images and r["image_id"] in images
    for r in rankings["text_retrieval"]:
        assert len(r["ranked_caption_indices"]) == 10 and len(r["true_caption_indices"]) == 5
    test = results["splits"]["test"]
    assert (test["images"], test["captions"]) == (12, 60)
    # R@1 from the file's rankings agrees with the reported metric (ties, counted against the true
    # image by the metric, can only put it first in the file's stable order)
    r1 = sum(r["ranked_image_ids"][0] == r["image_id"] for r in rankings["image_retrieval"]) / 60
    assert test["image_r1"] - 1e-6 <= r1 <= test["image_r1"] + 2 / 60
    assert 0.0 <= test["r_mean"] <= 1.0


class TableScorer:
    """A stand-in engine: the matched log-odds of (caption, image) is table[caption id, image id], the
    ids read from input_ids[:, 0] and visual_feats[:, 0, 0]. Records each call's pairs and labels."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def eval(self):
        pass

    def train(self):
        pass

    def __call__(self, input_ids, visual_feats, labels=None, mode=None, **_):
        import torch
        import torch.nn.functional as F

        caption, image = input_ids[:, 0], visual_feats[:, 0, 0].long()
        self.calls.append((caption, image, labels))
        scores = self.table[caption, image]
        logits = torch.stack([torch.zeros_like(scores), scores], 1)
        return SimpleNamespace(logits=logits, loss=None if labels is None else F.cross_entropy(logits, labels))


@pytest.mark.parametrize("loss, hard", [("rank", 0), ("itm", 0), ("rank", 2)])
def test_retrieval_trains_on_the_pairs_and_losses_of_its_definition(loss, hard):
    """Per positive (caption b, its image): its caption with N other images, its image with N other
    captions; with --hard_negatives H the H highest-scoring of each kind. Rank loss: max(0, margin +
    sigmoid(s_neg) - sigmoid(s_pos)) averaged (UNITER); itm: cross-entropy, the positive labelled 1."""
    import torch
    import torch.nn.functional as F

    from semvlp.tasks.retrieval import RetrievalConfig, RetrievalTask

    batch_size, n, k = 3, 4, 2
    g = torch.Generator().manual_seed(0)
    engine = TableScorer(torch.randn(50, 20, generator=g))
    captions, images = (
        torch.randint(50, (batch_size, 1 + n), generator=g),
        torch.randint(20, (batch_size, 1 + n), generator=g),
    )
    batch = {
        "input_ids": captions.reshape(-1, 1).repeat(1, 3), "attention_mask": torch.ones(batch_size * (1 + n), 3),
        "token_type_ids": torch.zeros(batch_size * (1 + n), 3, dtype=torch.long),
        "visual_feats": images[..., None, None].float().expand(batch_size, 1 + n, k, 8),
        "visual_pos": torch.zeros(batch_size, 1 + n, k, 4),
    }  # fmt: skip
    task = object.__new__(RetrievalTask)  # loss() needs its options and the scoring chunk size only
    task.run = RetrievalConfig(deepspeed_config=str(CPU_CONFIG), loss=loss, negatives=n, hard_negatives=hard)
    task.eval_batch_size = 5
    value, _ = task.loss(engine, batch, "single", step=1)

    caption, image, labels = engine.calls[-1]
    caption, image = caption.view(batch_size, -1), image.view(batch_size, -1)
    for b in range(batch_size):
        own_caption, own_image = captions[b, 0].item(), images[b, 0].item()
        other_images, other_captions = images[b, 1:].tolist(), captions[b, 1:].tolist()
        if hard:
            other_images = sorted(other_images, key=lambda i: -engine.table[own_caption, i])[:hard]
            other_captions = sorted(other_captions, key=lambda c: -engine.table[c, own_image])[:hard]
        kept = len(other_images)
        assert (caption[b, 0].item(), image[b, 0].item()) == (own_caption, own_image)
        assert caption[b, 1 : 1 + kept].tolist() == [own_caption] * kept
        assert sorted(image[b, 1 : 1 + kept].tolist()) == sorted(other_images)
        assert sorted(caption[b, 1 + kept :].tolist()) == sorted(other_captions)
        assert image[b, 1 + kept :].tolist() == [own_image] * kept
    scores = engine.table[caption, image]
    if loss == "rank":
        expected = F.relu(task.run.margin + torch.sigmoid(scores[:, 1:]) - torch.sigmoid(scores[:, :1])).mean()
    else:
        assert labels.view(batch_size, -1).tolist() == [[1] + [0] * 2 * n] * batch_size
        expected = F.cross_entropy(torch.stack([torch.zeros_like(scores), scores], -1).view(-1, 2), labels)
    torch.testing.assert_close(value, expected)


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("finetune_vqa.py", ["--max_steps", "10"], "--max_steps 10 and --epochs 4 both set the training length"),
        ("finetune_retrieval.py", ["--negatives", "2", "--hard_negatives", "2"], "--hard_negatives 2 must be below"),
        ("finetune_retrieval.py", ["--eval_batches", "3"], "--eval_batches 3: retrieval scores all pairs"),
        ("finetune_nlvr2.py", ["--cross_attention_start_layer", "9"],
         "--cross_attention_start_layer: cross_attention_start_layer=9 must be in 0..num_hidden_layers=4"),
        ("finetune_vqa.py", ["--epochs", "0", "--answer_head_from_qa"],
         "--answer_head_from_qa starts training from --init_from, a pre-training export"),
        ("finetune_gqa.py", ["--data", str(REPO / "ds_configs")],
         f"{REPO / 'ds_configs'} is a folder; the data configuration (--data) must be a data.json file"),
    ],
)  # fmt: skip
def test_option_errors_name_the_option(toy, tmp_path, capsys, load_launcher, script, args, message):
    from semvlp.runner import run_main

    argv = ["--deepspeed_config", str(CPU_CONFIG), "--preset", "tiny", "--data", str(toy),
            "--output_dir", str(tmp_path / "run"), *args]  # fmt: skip
    with pytest.raises(SystemExit) as exited:  # what the launcher does: run_main(main)
        run_main(load_launcher(script).main, argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fault", ["model", "ds_config"])
def test_options_are_checked_before_the_data_is_read(toy, tmp_path, capsys, load_launcher, fault):
    """A bad model option or ds_config must not wait for a data load (minutes for VQA's 600K
    questions): here the data configuration's files do not exist (a copy elsewhere: its relative
    paths point nowhere), and the option error comes first."""
    from semvlp.runner import run_main

    shutil.copy(toy, tmp_path / "data.json")
    ds_config, args = CPU_CONFIG, ["--cross_attention_start_layer", "5"]
    message = "cross_attention_start_layer=5 must be in 0..num_hidden_layers=4"
    if fault == "ds_config":
        ds_config, args = tmp_path / "ds.json", []
        ds_config.write_text(json.dumps({k: v for k, v in load(CPU_CONFIG).items() if k != "gradient_clipping"}))
        message = f"{ds_config}: set gradient_clipping explicitly"
    argv = ["--deepspeed_config", str(ds_config), "--preset", "tiny", "--data", str(tmp_path / "data.json"),
            "--output_dir", str(tmp_path / "run"), *args]  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        run_main(load_launcher("finetune_vqa.py").main, argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_loader_workers_that_would_overfill_dev_shm_stop_before_the_run_folder(toy, tmp_path, small_dev_shm):
    """The fine-tuning launchers check /dev/shm as pre-training does (tests/test_pretrain.py), here
    with NLVR2's two images per example: one worker's 3 training batches alone exceed 8 MB."""
    out = tmp_path / "run"
    args = ["--data", str(toy), "--output_dir", str(out)]
    result = launch("finetune_nlvr2.py", args, processes=1, wrap=lambda cmd: small_dev_shm(cmd, "8m"))
    assert result.returncode == 2
    assert "--num_workers 1: the loader workers of 1 rank(s) on this machine hold up to" in result.stderr
    assert "MB of batches in /dev/shm, which has 8 MB free" in result.stderr
    assert not out.exists()


# --------------------------------------------------------------------------- in-process pieces


def test_answers_outside_the_table_are_counted_with_the_cap_they_imply(toy, tmp_path):
    from semvlp.data.config import DataConfig
    from semvlp.data.store import open_stores
    from semvlp.data.tokenizer import load_tokenizer
    from semvlp.tasks.qa import VQA, QAConfig, QATask

    valid = load(toy.parent / "vqa_valid.json")[:40]
    for q in valid[:10]:
        q["label"] = {"purple-ish": 1.0}  # outside the table: unanswerable
    for q in valid[10:15]:
        q["label"] = {"maybe": 0.9, "yes": 0.3}  # best reachable: 0.3
    (tmp_path / "valid.json").write_text(json.dumps(valid))
    data = DataConfig.load(toy)
    data = DataConfig.from_dict(
        {**data.to_dict(), "vqa": {**data.to_dict()["vqa"], "valid": [str(tmp_path / "valid.json")]}}
    )
    run = QAConfig(deepspeed_config=str(CPU_CONFIG), preset="tiny", data=str(toy), predict_only=True,
                         init_from=str(toy.parent))  # fmt: skip
    task = QATask(run, VQA, data, load_tokenizer(data.vocab), open_stores(data.stores), ("valid", "test"))
    cap = (25 * 1.0 + 5 * 0.3) / 40
    assert any("15 with answers outside the 13-answer table (2 distinct), 10 unanswerable" in n for n in task.notes)
    assert any(f"capped at {cap:.4f}" in n for n in task.notes)
    assert any("vqa test: 400 questions without labels" in n for n in task.notes)
    oracle = {i: max((a for a in q["label"] if a in task.table), key=q["label"].get, default="yes")
              for i, q in enumerate(valid)}  # fmt: skip
    assert task.metrics("valid", oracle)["score"] == pytest.approx(cap)
    assert task.metrics("valid", oracle)["score_cap"] == pytest.approx(cap)
    # a partial evaluation (--eval_batches) is capped over the questions it scored
    first_twenty = {i: oracle[i] for i in range(20)}
    assert task.metrics("valid", first_twenty)["score_cap"] == pytest.approx((5 * 1.0 + 5 * 0.3) / 20)


def test_batch_and_lr_overrides_keep_the_batch_arithmetic():
    from semvlp.run_config import ConfigError
    from semvlp.train import override_batch_and_lr

    cfg = json.loads(CPU_CONFIG.read_text())  # micro-batch 16
    override_batch_and_lr(cfg, world_size=2, lr=1e-5, train_batch_size=32)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (
        32, 16, 1)  # fmt: skip
    assert cfg["optimizer"]["params"]["lr"] == cfg["scheduler"]["params"]["warmup_max_lr"] == 1e-5
    override_batch_and_lr(cfg, world_size=1, lr=None, train_batch_size=48)  # 48 = 16 x 3
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (16, 3)
    override_batch_and_lr(cfg, world_size=4, lr=None, train_batch_size=40)  # 10 per process: micro 10
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (10, 1)
    with pytest.raises(ConfigError, match="--batch_size 30: not a positive multiple of 4 processes"):
        override_batch_and_lr(cfg, world_size=4, lr=None, train_batch_size=30)


def test_epochs_set_the_steps_and_a_dev_evaluation_per_epoch(toy):
    from semvlp.run_config import ConfigError
    from semvlp.tasks.finetune import FinetuneConfig, resolve_length

    run = FinetuneConfig(deepspeed_config=str(CPU_CONFIG), preset="tiny", data=str(toy), epochs=2.5, batch_size=32)
    resolved = resolve_length(run, num_train=1000, world=2)  # 500 per process / 16 = 31 steps per epoch
    assert (resolved.max_steps, resolved.eval_every) == (78, 31)
    # one process: batch 32 = micro-batch 16 x 2 accumulated, so 1000 / 16 = 62 micro-batches make 31 steps
    resolved = resolve_length(run, num_train=1000, world=1)
    assert (resolved.max_steps, resolved.eval_every) == (78, 31)
    # a given --eval_every is kept (evaluations within an epoch, e.g. on a large VQA epoch)
    often = resolve_length(dataclasses.replace(run, eval_every=10), num_train=1000, world=2)
    assert (often.max_steps, often.eval_every) == (78, 10)
    # ... also when it equals the pre-training default (200), which used to count as not given
    args = ["--deepspeed_config", str(CPU_CONFIG), "--preset", "tiny", "--data", str(toy), "--epochs", "2.5",
            "--batch_size", "32"]  # fmt: skip
    given = resolve_length(FinetuneConfig.from_args([*args, "--eval_every", "200"]), num_train=1000, world=2)
    assert (given.max_steps, given.eval_every) == (78, 200)
    assert resolve_length(FinetuneConfig.from_args(args), num_train=1000, world=2).eval_every == 31
    with pytest.raises(ConfigError, match="20 training examples give no step of 16 x 2"):
        resolve_length(run, num_train=20, world=1)
    fixed = FinetuneConfig(deepspeed_config=str(CPU_CONFIG), data=str(toy), epochs=0, max_steps=7, eval_every=3)
    assert resolve_length(fixed, num_train=1000, world=2) == fixed
    steps = dataclasses.replace(fixed, eval_every=None)  # --epochs 0 without --eval_every: every 200 steps
    assert resolve_length(steps, num_train=1000, world=2).eval_every == 200


def test_questions_on_missing_images_fail_or_are_skipped_and_reported(toy, tmp_path):
    from semvlp.data.annotations import MissingImagesError
    from semvlp.data.config import DataConfig
    from semvlp.data.store import open_stores
    from semvlp.data.tokenizer import load_tokenizer
    from semvlp.tasks.finetune import FinetuneConfig
    from semvlp.tasks.nlvr2 import NLVR2Task

    valid = load(toy.parent / "nlvr2_valid.json")[:20]
    valid[3]["img1"] = "not_in_any_store"
    (tmp_path / "valid.json").write_text(json.dumps(valid))
    raw = DataConfig.load(toy).to_dict()
    data = DataConfig.from_dict({**raw, "nlvr2": {**raw["nlvr2"], "valid": [str(tmp_path / "valid.json")]}})
    tokenizer, stores = load_tokenizer(data.vocab), open_stores(data.stores)
    common = dict(deepspeed_config=str(CPU_CONFIG), data=str(toy), predict_only=True, init_from=str(toy.parent))
    with pytest.raises(MissingImagesError, match="1 images missing"):
        NLVR2Task(FinetuneConfig(**common), data, tokenizer, stores, ("valid",))
    task = NLVR2Task(FinetuneConfig(**common, skip_missing=True), data, tokenizer, stores, ("valid",))
    assert len(task.datasets["valid"]) == 19
    assert ("nlvr2 valid: 19 statements, 1 skipped (an image in no store): absent from its metrics and its "
            "predictions file (an evaluation server rejects a submission without them)") in task.notes  # fmt: skip


def test_a_task_model_from_a_pretraining_export_loads_the_encoder_and_names_the_new_head(tmp_path, capsys):
    import torch

    from semvlp import runner
    from semvlp.config import config_from_preset
    from semvlp.model import SemVLPForPreTraining
    from semvlp.model.finetuning import SemVLPForQuestionAnswering
    from semvlp.run_config import RunConfig

    config = config_from_preset("tiny", vocab_size=50, num_qa_labels=5)
    pretrained = SemVLPForPreTraining(config)
    pretrained.save_pretrained(tmp_path / "export")
    model = SemVLPForQuestionAnswering(config)
    initialized = {k: v.clone() for k, v in model.state_dict().items()}
    runner.initialize_model(model, RunConfig(deepspeed_config=str(CPU_CONFIG), init_from=str(tmp_path / "export")))

    head = sorted(k for k in model.state_dict() if k.startswith("answer_head."))
    printed = capsys.readouterr()
    assert f"new tensors: {head}" in printed.out
    # transformers' LOAD REPORT table and its progress bar would say it again, at length
    assert "LOAD REPORT" not in printed.err and "Loading weights" not in printed.err, printed.err
    for name in head:  # the model's own (seeded) initialization, not one from_pretrained drew
        assert torch.equal(model.state_dict()[name], initialized[name]), name
    exported = pretrained.state_dict()
    for name, tensor in model.state_dict().items():
        if not name.startswith("answer_head."):
            assert torch.equal(tensor, exported[name]), name


def test_answer_head_from_qa_takes_the_transform_and_the_rows_of_the_answers_both_tables_hold(
    toy, pretraining_export, tmp_path
):
    """LXMERT's fine-tuning start (--loadLXMERTQA), row by row: the tables order their answers differently."""
    import torch

    from semvlp.config import SemVLPConfig
    from semvlp.model import SemVLPModel
    from semvlp.model.finetuning import SemVLPForQuestionAnswering
    from semvlp.run_config import ConfigError
    from semvlp.tasks.qa import pretraining_qa_head

    qa_head, answers = pretraining_qa_head(str(pretraining_export))
    assert answers[0] == "zebra" and qa_head["classifier.weight"].shape[0] == len(answers)
    table = ["zebra-less", *answers[:0:-1]]  # GQA's answers in their own order, after one the export lacks
    config = SemVLPConfig.from_pretrained(pretraining_export, num_qa_labels=len(table), id2label=dict(enumerate(table)))
    model = SemVLPForQuestionAnswering(config)
    initialized = model.answer_head.classifier.weight.detach().clone()
    assert model.start_from_qa_head(qa_head, answers) == len(table) - 1
    head = model.answer_head
    for row, answer in enumerate(table):
        expected = qa_head["classifier.weight"][answers.index(answer)] if answer in answers else initialized[row]
        assert torch.equal(head.classifier.weight[row], expected), answer
    for name, tensor in head.transform.state_dict().items():
        assert torch.equal(tensor, qa_head[f"transform.{name}"]), name

    SemVLPModel(config).save_pretrained(tmp_path / "encoder")  # an export without a QA head
    with pytest.raises(ConfigError, match="holds no pre-training QA head with its answer table"):
        pretraining_qa_head(str(tmp_path / "encoder"))


SECTIONS = [("finetune_gqa.py", "gqa"), ("finetune_nlvr2.py", "nlvr2"), ("finetune_retrieval.py", "flickr30k")]


@pytest.mark.parametrize("script, section", SECTIONS)
def test_a_data_json_without_the_tasks_section_is_named(toy, tmp_path, capsys, load_launcher, script, section):
    from semvlp.data.config import DataConfig
    from semvlp.runner import run_main

    raw = DataConfig.load(toy).to_dict()
    del raw[section]
    DataConfig.from_dict(raw).save(tmp_path / "data.json")
    argv = ["--deepspeed_config", str(CPU_CONFIG), "--preset", "tiny", "--data", str(tmp_path / "data.json"),
            "--output_dir", str(tmp_path / "run")]  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        run_main(load_launcher(script).main, argv)
    assert exited.value.code == 2
    assert f"error: --data {tmp_path / 'data.json'}: no '{section}' section" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_prediction_splits_without_files_are_skipped_and_predicting_none_of_them_is_named(
    toy, tmp_path, capsys, load_launcher
):
    """A data.json without an NLVR2 test split: training predicts the dev split only (tests/
    test_data_from_lxmert.py trains so); --predict_only on the test split alone has nothing to do."""
    from semvlp.config import config_from_preset
    from semvlp.data.config import DataConfig
    from semvlp.model import SemVLPModel
    from semvlp.runner import run_main

    raw = DataConfig.load(toy).to_dict()
    raw["nlvr2"]["test"] = []
    DataConfig.from_dict(raw).save(tmp_path / "data.json")
    SemVLPModel(config_from_preset("tiny")).save_pretrained(tmp_path / "export")  # stops before they are loaded
    argv = ["--deepspeed_config", str(CPU_CONFIG), "--preset", "tiny", "--data", str(tmp_path / "data.json"),
            "--output_dir", str(tmp_path / "run"), "--predict_only", "--init_from", str(tmp_path / "export"),
            "--predict_splits", "test"]  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        run_main(load_launcher("finetune_nlvr2.py").main, argv)
    assert exited.value.code == 2
    message = "error: --predict_splits test: the data configuration lists no files for them"
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
