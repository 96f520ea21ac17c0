"""What the fine-tuning tasks share: their options, the Task base class and the launcher body.

A fine-tuning run (launch/finetune_*.py calls `run_finetuning`):
1. reads the task's annotation files and stores (before the process group exists, so that the
   number of training examples can set --max_steps from --epochs);
2. starts like pre-training (semvlp.runner): run directory, resolved ds_config with the task's
   --lr and --batch_size, model from --init_from (a SemVLP export or a BERT folder);
3. trains with the one loop (semvlp.train), evaluating on the dev split after every epoch; the
   loop keeps the best evaluation's weights in OUTPUT_DIR/best (task.best_metric);
4. restores the best weights, exports them to OUTPUT_DIR/export, and writes prediction files
   for --predict_splits into OUTPUT_DIR/predictions/ (metrics only for splits with labels);
   OUTPUT_DIR/results.json gathers the best dev metrics, the per-split metrics and the
   answer-table coverage.
With --predict_only, step 3 is skipped and --init_from must be an export holding the task's head: a
fine-tuned one, or for retrieval also a pre-training export (its ITM head: zero-shot retrieval).

Evaluation is sharded: rank r scores examples r, r + W, ... of a split; the predictions are
gathered so every rank computes the same metrics (the loop relies on that to pick the best
checkpoint on all ranks together).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from semvlp import checkpoint, dist, runner
from semvlp.data.annotations import check_images, require_labels
from semvlp.data.config import TRAINING_SPLITS, DataConfig, require_files
from semvlp.data.loader import KeyedBatchDataset, ResumableLoader
from semvlp.data.store import FeatureStoreSet, open_stores
from semvlp.data.tokenizer import load_tokenizer
from semvlp.flops import training_step_flops
from semvlp.model.modeling import MODES
from semvlp.run_config import ConfigError, RunConfig, option
from semvlp.train import resolve_ds_config, to_device, train

SPLITS = ("train", "valid", "test")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "visual_feats", "visual_pos", "visual_attention_mask")


@dataclass(frozen=True)
class FinetuneConfig(RunConfig):
    """Options shared by every fine-tuning launcher (each subclass sets its task's defaults)."""

    output_dir: str = "runs/finetune"
    mode: str = option("single", "single | two: the stream mode to fine-tune and predict in (paper Table 5)")
    epochs: float = option(
        4.0, "training length; a dev evaluation per epoch unless --eval_every is set. 0: train --max_steps steps"
    )
    # None until resolve_length: a value given equal to the base default (200) is kept, not taken as unset.
    eval_every: int | None = option(
        None, "steps between dev evaluations; default: one per epoch (200 with --epochs 0); 0: only at the end"
    )
    lr: float = option(5e-5, "peak lr; replaces the ds_config's optimizer lr and scheduler warmup_max_lr")
    batch_size: int = option(32, "global batch; replaces the ds_config's train_batch_size")
    warmup_ratio: float = 0.1  # LXMERT's BertAdam warmup
    eval_batches: int = option(0, "dev evaluation: batches per rank, the same ones each time; 0: the whole dev split")
    eval_batch_size: int = option(0, "evaluation batch per rank; 0: twice the training micro-batch")
    predict_splits: str = option("valid,test", "comma-separated; predicted with the best weights at the end")
    predict_only: bool = option(False, "no training: --init_from an export with the task's head; predict splits")
    skip_missing: bool = option(False, "drop examples whose images no store holds (reported) instead of failing")

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in MODES:
            raise ConfigError(f"--mode {self.mode!r}; expected one of {MODES}")
        if self.epochs < 0 or self.lr <= 0 or self.batch_size < 1 or self.eval_batch_size < 0:
            raise ConfigError("--epochs must be >= 0, --lr > 0, --batch_size >= 1 and --eval_batch_size >= 0")
        unknown = set(self.prediction_splits) - set(SPLITS)
        if unknown or not self.prediction_splits:
            raise ConfigError(f"--predict_splits {self.predict_splits!r}: use a comma-separated subset of {SPLITS}")
        if self.predict_only and self.init_from is None:
            raise ConfigError("--predict_only needs --init_from, a fine-tuned export (OUTPUT_DIR/export)")

    @property
    def prediction_splits(self) -> tuple[str, ...]:
        return tuple(s for s in self.predict_splits.split(",") if s)


def resolve_length(run: FinetuneConfig, num_train: int, world: int) -> FinetuneConfig:
    """--epochs -> --max_steps and, unless --eval_every is given, a dev evaluation per epoch, in
    optimizer steps (a step takes gradient_accumulation_steps micro-batches on every rank)."""
    default_steps = RunConfig.__dataclass_fields__["max_steps"].default
    if run.epochs > 0 and run.max_steps != default_steps:
        raise ConfigError(f"--max_steps {run.max_steps} and --epochs {run.epochs:g} both set the training length; "
                          "add --epochs 0 to train a fixed number of steps")  # fmt: skip
    ds_config = resolve_ds_config(run, world, Path(run.output_dir), run.lr, run.batch_size)
    micro, accumulation = ds_config["train_micro_batch_size_per_gpu"], ds_config.get("gradient_accumulation_steps", 1)
    steps_per_epoch = (num_train // world) // micro // accumulation  # the loader drops each rank's last partial batch
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{num_train} training examples give no step of {micro} x {accumulation} (micro-batch x accumulation) "
            f"on each of {world} processes"
        )
    if run.epochs == 0:
        eval_every = RunConfig.__dataclass_fields__["eval_every"].default if run.eval_every is None else run.eval_every
        return dataclasses.replace(run, eval_every=eval_every)
    eval_every = steps_per_epoch if run.eval_every is None else run.eval_every
    return dataclasses.replace(run, max_steps=max(1, round(run.epochs * steps_per_epoch)), eval_every=eval_every)


# --------------------------------------------------------------------------- data helpers


# What --skip_missing costs, said wherever it drops examples
SKIPPED = "absent from its metrics and its predictions file (an evaluation server rejects a submission without them)"


def image_rows(
    image_ids: list[str], stores: FeatureStoreSet, what: str, skip_missing: bool, files: list[str]
) -> np.ndarray:
    """Global store rows of `image_ids`, -1 for images dropped by --skip_missing (else an error
    naming the annotation files, `files[i]` the one `image_ids[i]` comes from)."""
    check_images(image_ids, stores, what, skip_missing, files=files)
    return stores.rows(image_ids)


def model_inputs(batch: dict, prefix: str = "") -> dict:
    return {k: batch[prefix + k] for k in MODEL_INPUTS if prefix + k in batch}


# --------------------------------------------------------------------------- the Task base


def labelled_splits(
    run: FinetuneConfig, section: object, name: str, splits: tuple[str, ...], load: Callable, noun: str, notes: list
) -> Iterator[tuple[str, str, list]]:
    """(split, "<name> <split>", examples) for each split whose files `section` lists, read by `load`.
    The splits a run trains on (train and valid, unless --predict_only) must list files and label
    every example (else the first step or evaluation fails, mid-run); another split without files
    is skipped, with a note appended to `notes`."""
    for split in splits:
        what = f"{name} {split}"
        files = getattr(section, split)
        trained_on = split in TRAINING_SPLITS and not run.predict_only
        if trained_on:
            require_files(files, what)
        if not files:
            notes.append(f"{what}: no files listed, skipped")
            continue
        examples = load(files)
        if trained_on:
            require_labels(examples, what, noun)
        yield split, what, examples


class FinetuneTask:
    """A fine-tuning task for semvlp.train: fixed stream mode, dev evaluation, prediction files.

    Subclasses set `model_class`, `metric` (the dev metric that picks the best checkpoint) and
    implement `loss`, `predictions(engine, split, limit)`, `metrics(split, predictions)` and
    `write_predictions(split, predictions, out_dir)`. `datasets[split]` holds what each split
    needs; training batches carry `index` [B], the examples they were built from.
    """

    model_class: type
    metric: str
    pairs_per_sample = 1  # (text, image) pairs the encoder runs per training example, for FLOPs

    def __init__(self, run: FinetuneConfig, datasets: dict):
        self.run = run
        self.datasets = datasets
        self.best_metric = f"{run.mode}/{self.metric}" if "valid" in datasets else None
        self.train_loader = None
        self._eval_loaders: dict[str, ResumableLoader] = {}
        self.notes: list[str] = []  # data reports (answer coverage, skipped images), printed by rank 0

    # -- set-up
    def model_fields(self) -> dict:
        """Model config fields the task decides: the number of answers and their names (QA, from the
        data), or the names of the classifier's outputs (`id2label`, as HuggingFace names them)."""
        return {}

    def num_train_examples(self) -> int:
        return len(self.datasets["train"])

    def initialize(self, model) -> None:
        """The new model's weights from --init_from, if given (runner.initialize_model)."""
        runner.initialize_model(model, self.run)

    def attach(self, config, micro_batch: int, eval_batch_size: int) -> None:
        """Called once the model config and the ds_config are known."""
        self.config = config
        self.micro_batch = micro_batch
        self.eval_batch_size = eval_batch_size
        if "train" in self.datasets:
            self.train_loader = ResumableLoader(  # the training loop holds one batch at a time
                self.datasets["train"], micro_batch, dist.rank(), dist.world_size(), self.run.seed,
                self.run.num_workers, shuffle=True, drop_last=True, reuse_buffers=True,
            )  # fmt: skip

    def eval_loader(self, split: str) -> ResumableLoader:
        if split not in self._eval_loaders:
            self._eval_loaders[split] = ResumableLoader(
                self.datasets[split], self.eval_batch_size, dist.rank(), dist.world_size(), self.run.seed,
                self.run.num_workers, shuffle=False, drop_last=False, repeatable=True,
            )  # fmt: skip
        return self._eval_loaders[split]

    # -- the loop's Task protocol
    def mode(self, step: int) -> str:
        return self.run.mode

    def batch_samples(self, batch: dict) -> int:
        return batch["index"].shape[0]

    def batch_flops(self, batch: dict, mode: str) -> float:
        """The encoder's FLOPs (semvlp.flops; the task heads are small), from the host copy: the mean
        cost of the batch's text rows times the (text, image) pairs the step runs."""
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        rows = training_step_flops(self.config, lengths, mode, num_objects=batch["visual_feats"].shape[-2])
        return rows / len(lengths) * self.batch_samples(batch) * self.pairs_per_sample

    def evaluate(self, engine) -> dict[str, float]:
        predictions = self.predictions(engine, "valid", self.run.eval_batches)
        return {f"{self.run.mode}/{k}": v for k, v in self.metrics("valid", predictions).items()}

    # -- prediction files
    def labeled(self, split: str) -> bool:
        return bool(getattr(self.datasets[split], "labeled", True))

    def predict(self, engine, split: str, out_dir: Path) -> dict[str, float]:
        """Write `split`'s prediction file (rank 0); its metrics when the split has labels, else {}."""
        engine.eval()
        with torch.no_grad():
            predictions = self.predictions(engine, split, 0)
        if dist.is_main():
            out_dir.mkdir(parents=True, exist_ok=True)
            path = self.write_predictions(split, predictions, out_dir)
            print(f"{split}: predictions in {path}", flush=True)
        dist.barrier()
        return self.metrics(split, predictions) if self.labeled(split) else {}

    # -- per task
    def loss(self, engine, batch: dict, mode: str, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def predictions(self, engine, split: str, limit: int):
        raise NotImplementedError

    def metrics(self, split: str, predictions) -> dict[str, float]:
        raise NotImplementedError

    def write_predictions(self, split: str, predictions, out_dir: Path) -> Path:
        raise NotImplementedError

    # -- shared by the classification tasks
    def classify(self, engine, split: str, limit: int, predict: Callable[[dict], list]) -> dict[int, object]:
        """{example index: predict(batch)[row]} over a split (or `limit` batches per rank), all ranks."""
        indices: list[int] = []
        values: list = []
        for i, batch in enumerate(self.eval_loader(split)):
            if limit and i == limit:
                break
            batch = to_device(batch, engine.device)
            indices += batch["index"].tolist()
            values += predict(batch)
        merged: dict[int, object] = {}
        for part_indices, part_values in dist.all_gather_object((indices, values)):
            merged.update(zip(part_indices, part_values, strict=True))
        return dict(sorted(merged.items()))


# --------------------------------------------------------------------------- the launcher body


def load_data(run: FinetuneConfig) -> tuple[DataConfig, object, FeatureStoreSet]:
    """The data configuration, tokenizer and stores (before the process group exists)."""
    data = DataConfig.load(runner.resolve_data(run))
    return data, load_tokenizer(data.vocab), open_stores(data.stores)


def run_finetuning(run: FinetuneConfig, make_task: Callable[[FinetuneConfig, DataConfig, object, FeatureStoreSet,
                                                             tuple[str, ...]], FinetuneTask]) -> None:  # fmt: skip
    """Fine-tune (or, with --predict_only, predict) with the task `make_task` builds; see the module docstring."""
    # before a data load that can take minutes
    micro = runner.check_options(run, lr=run.lr, train_batch_size=run.batch_size)["train_micro_batch_size_per_gpu"]
    eval_batch_size = run.eval_batch_size or 2 * micro
    data, tokenizer, stores = load_data(run)
    splits = run.prediction_splits
    if not run.predict_only:
        splits = tuple(dict.fromkeys(("train", "valid", *splits)))
    task = make_task(run, data, tokenizer, stores, splits)
    predicted = [split for split in run.prediction_splits if split in task.datasets]  # others: no files (a note)
    if run.predict_only and not predicted:
        raise ConfigError(f"--predict_splits {run.predict_splits}: the data configuration lists no files for them")
    if not run.predict_only:
        run = resolve_length(run, task.num_train_examples(), runner.world_size_from_env())
        task.run = run
    fields = dict(
        vocab_size=len(tokenizer),
        visual_feat_dim=stores.feature_dim,
        num_objects=stores.num_objects,
        **task.model_fields(),
    )
    config = runner.build_model_config(run, **fields)
    runner.check_model_fits_data(config, data, tokenizer, fields)
    eval_datasets = [d for split, d in task.datasets.items() if split != "train" and isinstance(d, KeyedBatchDataset)]
    runner.check_shared_memory(run, task.datasets.get("train"), micro, eval_datasets, eval_batch_size)
    if run.predict_only:
        runner.check_complete_export(task.model_class, config, run.init_from, "--predict_only")
        if "num_qa_labels" in fields:  # an answer table from the data
            _check_same_labels(run.init_from, fields["id2label"])
    train_examples = None if run.predict_only else task.num_train_examples()
    run_dir, ds_config = runner.start(run, config, run.lr, run.batch_size, train_examples)
    if dist.is_main():
        for note in task.notes:
            print(note, flush=True)
    task.attach(config, micro, eval_batch_size)
    model = task.model_class(config)
    task.initialize(model)
    engine = runner.build_engine(model, ds_config, run)
    runner.record_run(run, run_dir, ds_config)

    results: dict = {"mode": run.mode, "notes": task.notes}
    if not run.predict_only:
        result = train(engine, task, run, run_dir, ds_config, data.vocab)
        if not result.finished:
            if dist.is_main():
                print(f"stopped at step {result.step} of {run.max_steps}; continue with --resume")
            return
        results["best"] = result.best
        best_dir = run_dir / "best"
        checkpoint.load_latest(engine, best_dir)  # the best dev evaluation's weights
        results["export"] = str(runner.export(run_dir, best_dir))
    results["splits"] = {}
    for split in predicted:
        results["splits"][split] = task.predict(engine, split, run_dir / "predictions")
    if dist.is_main():
        (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        _print_summary(run, results)


def _check_same_labels(folder: str, id2label: dict[int, str]) -> None:
    """--predict_only must name each class as fine-tuning did: an answer table reordered or regenerated
    since then would turn every prediction into another answer, silently."""
    saved = json.loads((Path(folder) / "config.json").read_text()).get("id2label")
    if saved is None:
        return
    saved = {int(k): v for k, v in saved.items()}
    if saved == {i: f"LABEL_{i}" for i in saved}:  # HuggingFace's placeholder: the export keeps no names
        return
    if saved != id2label:
        first = min(i for i in saved.keys() | id2label.keys() if saved.get(i) != id2label.get(i))
        raise ConfigError(
            f"--predict_only: {folder} was fine-tuned with class {first} = {saved.get(first)!r}, but the data's "
            f"answer table has {id2label.get(first)!r} there: use the table it was fine-tuned with"
        )


def _print_summary(run: FinetuneConfig, results: dict) -> None:
    best = results.get("best")
    if best is not None:
        print(f"\nbest dev {best['metric']} = {best['value']:.4f} at step {best['step']} of {run.max_steps}")
    for split, metrics in results["splits"].items():
        shown = "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        print(f"  {split:>5} ({run.mode}-stream): {shown or 'no labels: predictions only'}")
