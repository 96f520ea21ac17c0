"""Operators one DeepSpeed training step dispatches, per ds_config: the kernel launches a step costs.

    python benchmarks/step_ops.py                                   # ds_configs/cpu.json and h100.json, base preset
    python benchmarks/step_ops.py ds_configs/h100.json --override '{"bf16": {"check_grad_overflow": true}}'
    deepspeed --num_gpus 2 benchmarks/step_ops.py                   # each rank's step, ZeRO-1 partitioned

Why: a base-size step on an H100 is ~10 ms of GPU work, and every small operator is a kernel
launch, several microseconds of host time. What DeepSpeed's optimizer adds per parameter tensor is
paid ~230 times a step. This counts it on any device, the CPU included: one process (or each rank
under the deepspeed launcher), the pre-training model (`--preset`, micro-batch `--batch-size`,
20-token text, K = 100, single-stream), `--warmup` steps, then every aten operator dispatched in
`--steps` steps (a TorchDispatchMode), views excluded (they launch nothing). Each is counted by
phase (forward, backward, optimizer step) and by owner: the optimizer step is DeepSpeed's, and an
operator of the other phases is DeepSpeed's when DeepSpeed's code is the innermost of DeepSpeed,
semvlp and autograd on the Python stack (its gradient hooks). The ds_config's batch sizes
are replaced by the micro-batch; its precision, ZeRO and optimizer sections are used as they are
(`--override` merges a JSON object into them). fp16 needs CUDA. On a GPU, `--profile_steps` in the
launchers counts the kernels themselves (`kernels_per_step`).

Measured on the CPU (benchmarks/results/step_ops-*.json): in bf16, DeepSpeed's ZeRO-1 overflow check
(`bf16.check_grad_overflow`, on by default since DeepSpeed 0.19.3) dispatches ~13 operators per
tensor and step, ~3,000 of a base-size step's ~4,900. The A100/H100 configs therefore turn it off
(train.check_finite_weights keeps a non-finite update out of the checkpoints).

Output: benchmarks/results/step_ops-<device>-<preset>-<date>.json and a table.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path

import deepspeed
import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from throughput import device_info, git_commit, make_batch, versions  # noqa: E402

import semvlp  # noqa: E402
from semvlp.config import PRESETS, config_from_preset  # noqa: E402
from semvlp.model import SemVLPForPreTraining  # noqa: E402
from semvlp.runner import init_distributed  # noqa: E402
from semvlp.train import optimizer_groups  # noqa: E402

# Operators that make a view or ask about metadata: no kernel on any device.
VIEWS = frozenset((
    "view", "detach", "t", "transpose", "slice", "expand", "_unsafe_view", "as_strided", "narrow", "alias", "unsqueeze",
    "squeeze", "permute", "select", "split", "unbind", "split_with_sizes", "_reshape_alias", "view_as", "lift_fresh",
    "_has_compatible_shallow_copy_type", "resolve_conj", "resolve_neg", "is_same_size",
))  # fmt: skip

TEXT_LEN = 20  # the pre-training text length, [CLS] and [SEP] included


def _package_dir(module) -> str:
    return str(Path(module.__file__).resolve().parent) + os.sep


# Whose an operator is: the innermost frame on the Python stack from one of these packages. Autograd's
# backward runs under engine.backward, so DeepSpeed is somewhere up the stack; its gradient hooks are innermost.
OWNERS = (
    (_package_dir(deepspeed), "deepspeed"),
    (_package_dir(semvlp), "model"),
    (_package_dir(torch.autograd), "model"),
)


class OperatorCount(TorchDispatchMode):
    """Counts non-view aten operators by (phase, "deepspeed" | "model")."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] not in VIEWS:
            self.counts[(self.phase, self.owner())] += 1
        return func(*args, **(kwargs or {}))

    def owner(self) -> str:
        if self.phase == "step":
            return "deepspeed"  # torch.optim's operators included: DeepSpeed drives them
        for frame in reversed(traceback.extract_stack(limit=24)):
            for package, who in OWNERS:
                if _real_path(frame.filename).startswith(package):
                    return who
        return "model"


@functools.cache
def _real_path(filename: str) -> str:
    return os.path.realpath(filename)


def count_step_operators(ds_config: dict, preset: str, batch_size: int, warmup: int, steps: int) -> dict:
    """Operators per step of one DeepSpeed engine built from `ds_config` (needs a process group)."""
    world = int(os.environ["WORLD_SIZE"])
    ds_config = {**ds_config, "train_batch_size": batch_size * world, "train_micro_batch_size_per_gpu": batch_size}
    ds_config["gradient_accumulation_steps"] = 1
    ds_config.pop("tensorboard", None)
    scheduler = ds_config.get("scheduler", {}).get("params", {})
    for key in ("warmup_num_steps", "total_num_steps"):
        if scheduler.get(key) == "auto":
            scheduler[key] = 100
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
    dtype = torch.float16 if ds_config.get("fp16", {}).get("enabled") else dtype
    torch.manual_seed(0)
    config = config_from_preset(preset, vocab_size=1000, num_qa_labels=10)
    model = SemVLPForPreTraining(config).to(dtype)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=optimizer_groups(model), config=ds_config)
    batch = make_batch(config, [TEXT_LEN] * batch_size, TEXT_LEN, engine.device).inputs  # the model casts
    counter = OperatorCount()

    def step() -> None:
        counter.phase = "forward"
        loss = engine(**batch, mode="single").loss
        counter.phase = "backward"
        engine.backward(loss)
        counter.phase = "step"
        engine.step()

    for _ in range(warmup):
        step()
    with counter:
        for _ in range(steps):
            step()
    per_step = {f"{phase}/{who}": n / steps for (phase, who), n in sorted(counter.counts.items())}
    return {
        "optimizer": type(engine.optimizer).__name__,
        "parameter_tensors": sum(p.requires_grad for p in model.parameters()),
        "operators_per_step": sum(per_step.values()),
        "deepspeed_operators_per_step": sum(n for key, n in per_step.items() if key.endswith("/deepspeed")),
        "by_phase": per_step,
    }


def merge(base: dict, override: dict) -> dict:
    """`override` merged into `base`, recursively for objects."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="*", default=["ds_configs/cpu.json", "ds_configs/h100.json"], help="ds_configs")
    p.add_argument("--override", type=json.loads, default={}, help="a JSON object merged into every ds_config")
    p.add_argument("--preset", choices=sorted(PRESETS), default="base")
    p.add_argument("--batch-size", type=int, default=2, help="micro-batch (operator counts do not depend on it)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder for the JSON ('' for none)")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # One process of its own unless a launcher started several (`deepspeed --num_gpus N benchmarks/step_ops.py`:
    # with N ranks ZeRO-1 partitions the optimizer and reduces gradients, and each rank's step is counted).
    init_distributed()  # the launchers' process group
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runs = []
    for path in args.configs:
        ds_config = merge(json.loads(Path(path).read_text()), args.override)
        run = {"ds_config": path, "override": args.override or None}
        if ds_config.get("fp16", {}).get("enabled") and device.type != "cuda":
            run["skipped"] = "fp16 needs CUDA"
        else:
            run.update(count_step_operators(ds_config, args.preset, args.batch_size, args.warmup, args.steps))
        runs.append(run)
    result = {
        "benchmark": "step_ops",
        "device": device_info(device),
        "versions": versions(),
        "git": git_commit(),
        "preset": args.preset,
        "batch_size": args.batch_size,
        "world_size": int(os.environ["WORLD_SIZE"]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runs": runs,
    }
    if os.environ["RANK"] != "0":
        return result
    if args.out:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        name = "".join(c if c.isalnum() else "-" for c in result["device"]["name"].lower()).strip("-")
        ranks = f"-x{result['world_size']}ranks" if result["world_size"] > 1 else ""
        path = Path(args.out) / f"step_ops-{name}-{args.preset}{ranks}-{stamp}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    print(f"\n{'ds_config':28} {'override':40} {'optimizer':24} {'tensors':>7} {'ops/step':>9} {'deepspeed':>9}")
    for run in runs:
        override = json.dumps(run["override"]) if run["override"] else "-"
        if "skipped" in run:
            print(f"{run['ds_config']:28} {override:40} skipped: {run['skipped']}")
            continue
        print(f"{run['ds_config']:28} {override:40} {run['optimizer']:24} {run['parameter_tensors']:7d} "
              f"{run['operators_per_step']:9.0f} {run['deepspeed_operators_per_step']:9.0f}")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
