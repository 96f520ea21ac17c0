"""SemVLP pre-training under DeepSpeed (paper section 3.3).

    # one node, 4 GPUs, the paper's setup (fp16 on V100; 40 epochs of LXMERT's 9.18M pairs):
    deepspeed launch/pretrain.py --deepspeed_config ds_configs/v100.json \
        --data /data/lxmert/data.json --init_from /models/bert-base-uncased --max_steps 1434375
    # several nodes: the same command with DeepSpeed's hostfile
    deepspeed --hostfile hostfile launch/pretrain.py --deepspeed_config ds_configs/a100.json ...
    # CPU, 2 processes, the toy world (what `make demo` runs):
    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 launch/pretrain.py --deepspeed_config ds_configs/cpu.json --preset tiny

Every option: `python launch/pretrain.py --help`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from semvlp import dist, runner
from semvlp.data.config import DataConfig
from semvlp.data.pretrain_dataset import (
    build_pretrain_dataset,
    pretrain_loader,
    pretraining_model_fields,
    unlabeled_store_notes,
)
from semvlp.data.tokenizer import load_tokenizer
from semvlp.model import SemVLPForPreTraining
from semvlp.run_config import ConfigError, RunConfig, option
from semvlp.schedule import STREAM_SCHEDULES
from semvlp.tasks.pretraining import PretrainTask
from semvlp.train import train


@dataclass(frozen=True)
class PretrainConfig(RunConfig):
    """SemVLP pre-training: masked LM, masked-object regression and labels, image-text matching and
    image QA, one stream mode per step (paper section 3.3)."""

    stream_schedule: str = option(
        "alternate",
        "alternate (the paper: each step single- or two-stream with probability 1/2) | single | two (ablations)",
    )
    packed_text: bool = option(
        False,
        "run the text without padding (PackedText) through the varlen attention; the losses are those of padded "
        "text (equal without dropout; dropout draws differ). Meant to pay on GPUs with --kernel_backend triton "
        "(the Triton varlen kernel); other backends pad inside attention, and on CPU there is no gain",
    )
    qa_from_step: int = option(
        0,
        "train the image-QA loss after this many steps (0: from the first step, as the paper's equal weights read "
        "literally). LXMERT, whose QA task the paper follows, added it only for the last 10 of 20 epochs. On the "
        "toy world QA from the start holds image-text matching at chance for over 1,000 steps, and a later start "
        "costs grounding that GQA fine-tuning shows (docs/data_format.md section 6). The QA loss is logged either way",
    )

    eval_only: bool = option(
        False,
        "no training: evaluate --init_from, a pre-training export (semvlp.export makes one of any checkpoint), on "
        "the held-out split as a run's evaluations do (--eval_batches per rank and mode); OUTPUT_DIR/results.json",
    )

    def __post_init__(self):
        super().__post_init__()
        if self.eval_only and self.init_from is None:
            raise ConfigError("--eval_only needs --init_from, a pre-training export")
        if self.stream_schedule not in STREAM_SCHEDULES:
            raise ConfigError(f"--stream_schedule {self.stream_schedule!r}; expected one of {STREAM_SCHEDULES}")
        if not 0 <= self.qa_from_step < self.max_steps:
            raise ConfigError(
                f"--qa_from_step {self.qa_from_step} must be in 0..max_steps-1={self.max_steps - 1} "
                "(at or after --max_steps the QA head would never be trained)"
            )


def main(argv: list[str] | None = None) -> None:
    run = PretrainConfig.from_args(argv)
    # Options first, then the data (minutes for the paper's 9M sentences), then the engine, then the run
    # folder's record: a bad option, data file or ds_config stops the run before anything is written.
    micro_batch = runner.check_options(run)["train_micro_batch_size_per_gpu"]
    data = DataConfig.load(runner.resolve_data(run))
    tokenizer = load_tokenizer(data.vocab)
    fields = pretraining_model_fields(data, tokenizer)
    config = runner.build_model_config(run, **fields)
    runner.check_model_fits_data(config, data, tokenizer, fields)
    splits = ("valid",) if run.eval_only else ("train", "valid")
    datasets = {split: build_pretrain_dataset(data, tokenizer, split) for split in splits}
    if run.packed_text and run.stream_schedule != "two" and datasets["valid"].stores.padded:
        raise ConfigError(
            "--packed_text: the feature stores are padded (visual_attention_mask), which single-stream packed "
            "text cannot mask; use padded text (no --packed_text) or --stream_schedule two"
        )
    runner.check_shared_memory(run, datasets.get("train"), micro_batch, [datasets["valid"]], micro_batch)
    if run.eval_only:
        runner.check_complete_export(SemVLPForPreTraining, config, run.init_from, "--eval_only")

    train_examples = len(datasets["train"]) if "train" in datasets else None
    run_dir, ds_config = runner.start(run, config, train_examples=train_examples)
    if dist.is_main() and not run.eval_only:
        for note in unlabeled_store_notes(datasets["valid"].stores):
            print(note, flush=True)
    loaders = {  # the training loop holds one batch at a time: its workers may reuse their buffers
        split: pretrain_loader(
            dataset,
            split,
            micro_batch,
            dist.rank(),
            dist.world_size(),
            run.seed,
            run.num_workers,
            reuse_buffers=split == "train",
        )
        for split, dataset in datasets.items()
    }
    model = SemVLPForPreTraining(config)
    runner.initialize_model(model, run)
    engine = runner.build_engine(model, ds_config, run)
    runner.record_run(run, run_dir, ds_config)
    task = PretrainTask(
        config,
        loaders.get("train"),
        loaders["valid"],
        run.stream_schedule,
        run.seed,
        run.eval_batches,
        run.packed_text,
        run.qa_from_step,
    )
    if run.eval_only:
        engine.eval()
        with torch.no_grad():
            metrics = task.evaluate(engine)
        if dist.is_main():
            results = {"init_from": run.init_from, "eval_batches": run.eval_batches, "metrics": metrics}
            (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            print_metrics(f"held-out metrics of {run.init_from}:", task.eval_modes, metrics)
        return
    result = train(engine, task, run, run_dir, ds_config, data.vocab)
    if not result.finished:
        if dist.is_main():
            print(f"stopped at step {result.step} of {run.max_steps}; continue with --resume")
        return
    export_dir = runner.export(run_dir)
    if dist.is_main():
        print_metrics(f"held-out metrics after {run.max_steps} steps (export: {export_dir}):", task.eval_modes,
                      result.metrics)  # fmt: skip


def print_metrics(title: str, modes: tuple[str, ...], metrics: dict[str, float]) -> None:
    print(f"\n{title}")
    for mode in modes:
        row = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{mode}/")}
        print(f"  {mode:>6}-stream  " + "  ".join(f"{k}={v:.3f}" for k, v in sorted(row.items())))


if __name__ == "__main__":
    runner.run_main(main)
