"""The one training loop, shared by pre-training and every fine-tuning task.

DeepSpeed owns the step (HelloDeepSpeed): `engine.backward(loss)`, `engine.step()`; gradient
accumulation, clipping, loss scaling and ZeRO are ds_config entries. A `Task` supplies the
batches, the loss of a batch in a given mode, and its evaluation; the loop never branches on a
task name. Only rank 0 logs; every rank saves its checkpoint shards.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Iterator, KeysView
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import deepspeed
import torch
from tqdm import tqdm

from semvlp import checkpoint, dist
from semvlp.config import SemVLPConfig
from semvlp.peaks import peak_tflops
from semvlp.profiling import StepProfiler
from semvlp.run_config import ConfigError, RunConfig


class Task(Protocol):
    """What the loop needs from a pre-training or fine-tuning task."""

    train_loader: object  # a semvlp.data.loader.ResumableLoader

    def mode(self, step: int) -> str:
        """ "single" or "two" for this global step; identical on every rank."""

    def loss(self, engine, batch: dict, mode: str, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total loss of a batch at this global step (0-based) and its named terms (for logging and
        non-finite checks)."""

    def batch_samples(self, batch: dict) -> int: ...

    def batch_flops(self, batch: dict, mode: str) -> float:
        """Model FLOPs of forward + backward for this batch (semvlp.flops), from the host copy."""

    def evaluate(self, engine) -> dict[str, float]:
        """Held-out metrics, reduced over ranks, named "<mode>/<metric>"."""

    # Optional: `best_metric = "<mode>/<metric>"` (higher is better). The loop then copies the
    # weights of the best evaluation so far into run_dir/best (a checkpoint folder, see
    # semvlp.checkpoint) and returns that evaluation in TrainResult.best.


class NonFiniteLossError(RuntimeError):
    pass


# --------------------------------------------------------------------------- ds_config


def resolve_ds_config(
    run: RunConfig, world_size: int, run_dir: Path, lr: float | None = None, train_batch_size: int | None = None
) -> dict:
    """Load the ds_config, check it against this run, and fill its "auto" values.

    `lr` and `train_batch_size` (a launcher's own defaults, e.g. a fine-tuning task's) replace
    the file's values; see `override_batch_and_lr`. Raises ConfigError naming the option at fault.
    """
    path = Path(run.deepspeed_config)
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config {path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"--deepspeed_config {path}: expected a JSON object, found a {type(cfg).__name__}")
    override_batch_and_lr(cfg, world_size, lr, train_batch_size)
    micro = cfg.get("train_micro_batch_size_per_gpu")
    accum = cfg.get("gradient_accumulation_steps", 1)
    total = cfg.get("train_batch_size")
    if not isinstance(micro, int) or not isinstance(total, int):
        raise ConfigError(f"{path}: set train_batch_size and train_micro_batch_size_per_gpu explicitly")
    if micro < 1 or total < 1:
        raise ConfigError(f"{path}: train_batch_size={total} and train_micro_batch_size_per_gpu={micro} must be >= 1")
    if micro * accum * world_size != total:
        raise ConfigError(
            f"{path}: train_batch_size={total} != train_micro_batch_size_per_gpu={micro} x "
            f"gradient_accumulation_steps={accum} x world size {world_size} (= {micro * accum * world_size}). "
            f"Keep the global batch by setting gradient_accumulation_steps={total // (micro * world_size) or 1} "
            f"or change train_batch_size."
        )
    if "gradient_clipping" not in cfg:
        raise ConfigError(f"{path}: set gradient_clipping explicitly (DeepSpeed >= 0.19.3 defaults it to 1.0)")
    clipping = cfg["gradient_clipping"]
    if isinstance(clipping, bool) or not isinstance(clipping, (int, float)) or clipping < 0:
        raise ConfigError(f"{path}: gradient_clipping must be a number >= 0 (0: no clipping), got {clipping!r}")
    device_is_cuda = torch.cuda.is_available()
    if cfg.get("fp16", {}).get("enabled") and not device_is_cuda:
        raise ConfigError(f"{path}: fp16 needs a CUDA device; use ds_configs/cpu.json on CPU")
    # The capability, not torch.cuda.is_bf16_supported(): that says yes on a V100 or T4 (emulated bf16, slow)
    # and makes a tensor on GPU 0 from every rank, before each has chosen its own.
    local_gpu = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.get("bf16", {}).get("enabled") and device_is_cuda and torch.cuda.get_device_capability(local_gpu)[0] < 8:
        raise ConfigError(f"{path}: bf16 needs sm_80+ (A100/H100); use ds_configs/v100.json (fp16) here")
    check_schedule(cfg, path, run.max_steps, lr_given=lr is not None)
    params = cfg.get("scheduler", {}).get("params", {})
    if params.get("total_num_steps") == "auto":
        params["total_num_steps"] = run.max_steps
    if params.get("warmup_num_steps") == "auto":
        params["warmup_num_steps"] = max(1, round(run.warmup_ratio * run.max_steps))
    for monitor in ("tensorboard", "csv_monitor"):
        if cfg.get(monitor, {}).get("output_path") == "auto":
            cfg[monitor]["output_path"] = str(run_dir / monitor)
    check_deepspeed_reads(cfg, path, world_size)
    return cfg


def check_schedule(cfg: dict, path: Path, max_steps: int, lr_given: bool) -> None:
    """ConfigError for a learning-rate schedule that silently differs from what the ds_config seems to
    say: DeepSpeed's warmup schedulers set the lr from warmup_max_lr, never from the optimizer's lr
    (an edit of that alone does nothing), and a total_num_steps of its own overrides --max_steps."""
    params = cfg.get("scheduler", {}).get("params", {})
    optimizer_lr = cfg.get("optimizer", {}).get("params", {}).get("lr")
    peak = params.get("warmup_max_lr")
    if not lr_given and optimizer_lr is not None and peak is not None and optimizer_lr != peak:
        raise ConfigError(
            f"{path}: optimizer lr {optimizer_lr} and scheduler warmup_max_lr {peak} differ; the scheduler sets the lr "
            "from warmup_max_lr alone, so set both to the peak lr you mean"
        )
    total = params.get("total_num_steps")
    if total not in (None, "auto") and total != max_steps:
        raise ConfigError(
            f'{path}: scheduler total_num_steps {total} is not --max_steps {max_steps}; set it to "auto" (--max_steps) '
            "so that the lr decays to its end with the run"
        )
    warmup = params.get("warmup_num_steps")
    if isinstance(warmup, (int, float)) and not isinstance(warmup, bool) and warmup >= max_steps:
        raise ConfigError(
            f"{path}: scheduler warmup_num_steps {warmup} is not below --max_steps {max_steps}: the lr would never "
            'reach its peak; lower it or set it to "auto" (--warmup_ratio x --max_steps)'
        )


# The ZeRO stages the loop cannot run, and why (ds_configs/*.json run stage 1, the paper's setup: stage 2 works too).
UNSUPPORTED_ZERO_STAGES = {
    0: "without ZeRO a checkpoint holds no optimizer shards, which the export (zero_to_fp32) and a resume on "
    "another number of processes read",
    3: "stage 3 partitions the weights themselves, which the loop reads whole (check_finite_weights before each "
    "checkpoint)",
}


class _ReadKeys(dict):
    """A dict that records which keys are looked up (get, [], in, in .keys())."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def get(self, key, *default):
        self.read.add(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)

    def keys(self):
        return KeysView(self)  # `key in d.keys()` goes through __contains__


def check_deepspeed_reads(cfg: dict, path: Path, world_size: int) -> None:
    """DeepSpeed parses the ds_config as it will at the engine's start, here before any work: its own
    errors, a top-level key it never looks up (a misspelled "scheduler" silently trains at a constant
    lr) and a ZeRO stage the loop does not support are named. ConfigError otherwise."""
    from deepspeed.runtime.config import DeepSpeedConfig

    # Before the process group exists DeepSpeed takes the world size as 1: the global batch it checks is
    # this process's share (resolve_ds_config checked the whole).
    probe = _ReadKeys(cfg, train_batch_size=cfg["train_batch_size"] // world_size)
    try:
        parsed = DeepSpeedConfig(probe)
    except (ValueError, AssertionError, TypeError, KeyError) as e:
        raise ConfigError(f"--deepspeed_config {path}: DeepSpeed rejects it: {type(e).__name__}: {e}") from e
    unknown = sorted(cfg.keys() - probe.read)
    if unknown:
        named = []
        for key in unknown:
            close = difflib.get_close_matches(key, probe.read, n=1)
            named.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(
            f"--deepspeed_config {path}: DeepSpeed {deepspeed.__version__} does not know the key(s) "
            f"{', '.join(named)}; they would be ignored"
        )
    stage = parsed.zero_optimization_stage
    if stage in UNSUPPORTED_ZERO_STAGES:
        raise ConfigError(
            f"--deepspeed_config {path}: zero_optimization stage {stage}: {UNSUPPORTED_ZERO_STAGES[stage]}. Use "
            '"zero_optimization": {"stage": 1} (ZeRO-1, as ds_configs/*.json) or 2'
        )


def override_batch_and_lr(cfg: dict, world_size: int, lr: float | None, train_batch_size: int | None) -> None:
    """Set the global batch and the peak learning rate of a ds_config in place.

    The batch keeps the file's micro-batch when it divides the per-process share, else takes the
    largest micro-batch below it that does; accumulation makes up the rest. The lr sets the
    optimizer's lr and the scheduler's peak (`warmup_max_lr` of WarmupLR / WarmupDecayLR).
    """
    if train_batch_size is not None:
        if train_batch_size < 1 or train_batch_size % world_size:
            raise ConfigError(f"--batch_size {train_batch_size}: not a positive multiple of {world_size} processes")
        per_process = train_batch_size // world_size
        micro = min(cfg.get("train_micro_batch_size_per_gpu") or per_process, per_process)
        while per_process % micro:
            micro -= 1
        cfg["train_batch_size"] = train_batch_size
        cfg["train_micro_batch_size_per_gpu"] = micro
        cfg["gradient_accumulation_steps"] = per_process // micro
    if lr is not None:
        if "optimizer" not in cfg:
            raise ConfigError('--lr needs an "optimizer" section in the ds_config')
        cfg["optimizer"].setdefault("params", {})["lr"] = lr
        params = cfg.get("scheduler", {}).get("params", {})
        if "warmup_max_lr" in params:
            params["warmup_max_lr"] = lr
        elif params:
            raise ConfigError(f"--lr: don't know the peak lr of scheduler {cfg['scheduler'].get('type')!r}")


def precision(ds_config: dict) -> str:
    if ds_config.get("fp16", {}).get("enabled"):
        return "fp16"
    if ds_config.get("bf16", {}).get("enabled"):
        return "bf16"
    return "fp32"


# --------------------------------------------------------------------------- run directory


def versions() -> dict[str, str]:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }


# --------------------------------------------------------------------------- logging


class MetricsLog:
    """JSON lines (metrics.jsonl) and TensorBoard through DeepSpeed's monitor, rank 0 only."""

    def __init__(self, run_dir: Path, engine):
        self.path = run_dir / "metrics.jsonl"
        self.engine = engine

    def write(self, record: dict) -> None:
        if not dist.is_main():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        monitor = getattr(self.engine, "monitor", None)
        if monitor is not None and monitor.enabled:
            step = record["step"]
            events = [
                (f"{record['kind']}/{k}", v, step)
                for k, v in record.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"
            ]
            monitor.write_events(events)


@dataclass
class Window:
    """Sums since the last log line; tensors stay on the device until the log step."""

    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    modes: list[str] = field(default_factory=list)  # one per optimizer step
    micro_batches: int = 0
    samples: int = 0
    flops: float = 0.0
    data_wait: float = 0.0  # seconds this rank waited for the input pipeline
    start: float = field(default_factory=time.perf_counter)

    def add(self, terms: dict[str, torch.Tensor], samples: int, flops: float) -> None:
        for name, value in terms.items():
            value = value.detach().float()
            # A sum starts from a copy: under CUDA graphs (--compile_mode reduce-overhead) the next step's
            # replay overwrites this step's outputs in place, and .float() of an fp32 loss is the loss itself.
            self.terms[name] = self.terms[name] + value if name in self.terms else value.clone()
        self.micro_batches += 1
        self.samples += samples
        self.flops += flops


# --------------------------------------------------------------------------- the loop


class StopSignal:
    """SIGTERM asks the run to stop, as a batch scheduler's time limit or a spot instance's notice
    does (SLURM sends it to every task, then SIGKILL after KillWait, 30 s by default; DeepSpeed's
    per-node launcher passes a SIGTERM of its own on to the ranks and kills them 30 s later).
    SIGUSR1, which would otherwise kill the rank, does the same: an earlier notice where the ranks
    are the scheduler's tasks (SLURM's `--signal=USR1@120` with `deepspeed --launcher slurm`).

    The ranks must agree on the step to checkpoint (a ZeRO checkpoint is saved by all of them), so
    each calls `agreed` once a step: it starts summing the signals each rank has received over a
    gloo group and returns the sum it started the step before, which finished meanwhile. A step
    never waits for another rank or for the GPU, and every rank learns of a signal to any of them at
    the same step, at most two steps after it arrived; then all checkpoint that step and the run
    returns as with --exit_after_steps, to continue with --resume."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: str | None = None  # the name of the first signal this rank received
        self._previous: dict[int, object] = {}
        self._group = None
        self._in_flight: tuple[torch.Tensor, object] | None = None  # (the sum, its work)

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # handlers can be set there only
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        self._group = dist.host_group()
        return self

    def settle(self) -> None:
        """Wait for the exchange in flight, whose sum the next `agreed` still returns (StepProfiler
        starts and stops torch.profiler only with no collective running)."""
        if self._in_flight is not None and self._in_flight[1] is not None:
            self._in_flight[1].wait()

    def agreed(self) -> list[str]:
        """The names of the signals any rank had received by its previous call; every rank calls this
        once a step, and all get the same answer."""
        previous = self._in_flight
        counts = torch.tensor([int(self.received == s.name) for s in self.SIGNALS])
        self._in_flight = (counts, dist.start_all_reduce_sum(counts, self._group))
        if previous is None:
            return []
        counts, work = previous
        if work is not None:
            work.wait()
        return [s.name for s, n in zip(self.SIGNALS, counts.tolist(), strict=True) if n]

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.settle()  # every rank started it; none leaves a collective behind
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name


# The cross-attention sub-layers run in two-stream steps only. A single-stream step leaves their
# gradients None, but DeepSpeed's ZeRO optimizer steps flat partitions: it read them as zeros, and
# Adam moved them anyway (by its momentum, and by the decoupled weight decay) and decayed its moments
# of them, where a torch optimizer leaves a parameter without a gradient alone. So they have an
# optimizer group of their own, which a step of a mode that does not run them holds: learning rate
# 0, and the group's optimizer state (moments, step count) put back after the step.
CROSS_ATTENTION_GROUP = 1


def optimizer_groups(model: torch.nn.Module) -> list[dict]:
    """DeepSpeed's parameter groups: every parameter but the cross-attention sub-layers', then theirs
    (CROSS_ATTENTION_GROUP; absent from a model without them)."""
    named = list(model.named_parameters())
    cross = [p for name, p in named if ".cross_attention." in name]
    rest = [p for name, p in named if ".cross_attention." not in name]
    return [{"params": rest}, {"params": cross}] if cross else [{"params": rest}]


def optimizer_group_count(config: SemVLPConfig) -> int:
    """len(optimizer_groups(model)) for a model of `config`, without building it: the cross-attention
    sub-layers exist above L_s only."""
    return 2 if config.cross_attention_start_layer < config.num_hidden_layers else 1


@contextmanager
def cross_attention_held(engine, mode: str) -> Iterator[None]:
    """An optimizer step in `mode`: one that does not run the cross-attention sub-layers ("single")
    leaves them and their optimizer state as they were (learning rate 0 for their group, set back
    to the other group's, which the scheduler set, afterwards)."""
    groups = engine.optimizer.param_groups
    if mode != "single" or len(groups) <= CROSS_ATTENTION_GROUP:
        yield
        return
    # the torch optimizer (AdamW, FusedAdam) over DeepSpeed's flat fp32 partitions, keyed by them
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    held = groups[CROSS_ATTENTION_GROUP]["params"]
    before = [_copy_state(optimizer.state.get(p, {})) for p in held]
    groups[CROSS_ATTENTION_GROUP]["lr"] = 0.0
    try:
        yield
    finally:
        groups[CROSS_ATTENTION_GROUP]["lr"] = groups[0]["lr"]
        for p, state in zip(held, before, strict=True):
            _put_back_state(optimizer.state.get(p, {}), state)


def _copy_state(state: dict) -> dict:
    return {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in state.items()}


def _put_back_state(state: dict, before: dict) -> None:
    """In place (DeepSpeed links its parameter fragments to these tensors). State the step created
    goes back to a first step's: its step count 0, its zero-gradient moments zero."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and key in before:
            value.copy_(before[key])
        elif isinstance(value, torch.Tensor):
            value.zero_()
        else:
            state[key] = before.get(key, 0)


def _batches(loader) -> Iterator[dict]:
    while True:
        yield from loader


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to `device` (dtypes kept: cu_seqlens stays int32); everything else, such as the
    packed text's max_seqlen (a Python int), as it is."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _check_finite(loss: torch.Tensor, terms: dict[str, torch.Tensor], step: int) -> None:
    if torch.isfinite(loss):  # note: a host sync; it keeps a NaN out of the optimizer step
        return
    bad = [name for name, value in terms.items() if not torch.isfinite(value)]
    raise NonFiniteLossError(
        f"non-finite loss at step {step + 1} (term(s): {', '.join(bad) or 'total'}; "
        f"values: { {k: float(v) for k, v in terms.items()} }). Stopping; the last complete checkpoint is untouched. "
        "(Bad input? `python -m semvlp.data.check` lists the images of feature stores with non-finite values.)"
    )


def check_finite_weights(engine, step: int) -> None:
    """Before a checkpoint: the weights are finite on every rank, or the run stops. Under bf16 the
    ds_configs turn DeepSpeed's per-tensor overflow check off (`check_grad_overflow`: thousands of
    small kernels a step), so a non-finite gradient is applied, and the loss check sees it only at
    the next step: too late for a checkpoint at this one, which would replace the last good one."""
    bad = sum((~torch.isfinite(p)).sum() for p in engine.module.parameters())
    if dist.all_reduce_sum(torch.as_tensor(bad, dtype=torch.float32, device=engine.device)).item():
        raise NonFiniteLossError(
            f"non-finite weights after step {step} (a non-finite gradient was applied: bf16 steps are not checked "
            "for overflow); not checkpointing them. Stopping; the last complete checkpoint is untouched."
        )


@dataclass
class TrainResult:
    step: int  # global optimizer steps done
    finished: bool  # reached --max_steps (False: stopped by --exit_after_steps)
    metrics: dict[str, float]  # the final held-out metrics (empty when not finished)
    best: dict | None = None  # {"step", "metric", "value", "metrics"} of the best evaluation (task.best_metric)


def train(engine, task: Task, run: RunConfig, run_dir: Path, ds_config: dict, vocab: str | Path) -> TrainResult:
    """Run `run.max_steps` optimizer steps from the newest checkpoint (with --resume) or from scratch.

    Args:
        engine: the DeepSpeed engine wrapping the model.
        task: batches, loss and evaluation (see `Task`).
        run: the run configuration.
        run_dir: where metrics.jsonl, checkpoints/ and tensorboard/ go.
        ds_config: the resolved DeepSpeed config (for precision and batch arithmetic in logs).
        vocab: the WordPiece vocab.txt (or a folder holding one), saved with every checkpoint.
    Returns:
        Where the run stopped and, when it finished, the final held-out metrics.
    """
    log = MetricsLog(run_dir, engine)
    ckpt_dir = run_dir / "checkpoints"
    best_metric = getattr(task, "best_metric", None)
    best: dict | None = None
    step = resumed_at = 0
    evaluation_due = False  # a stop signal came at a step due to evaluate: the resumed run evaluates first
    if run.resume:
        state = checkpoint.load_latest(engine, ckpt_dir)
        if state is None:
            raise ConfigError(f"--resume: no complete checkpoint in {ckpt_dir}")
        step = resumed_at = state["step"]
        task.train_loader.load_state_dict(state["loader"])
        best = state.get("best")
        evaluation_due = state.get("evaluation_due", False)
        log.write({"kind": "resume", "step": step, "from": checkpoint.latest_tag(ckpt_dir)})
    mixed = precision(ds_config)
    # MFU where the device's dense peak for this precision is listed (semvlp/peaks.py), per process.
    peak = peak_tflops(torch.cuda.get_device_name(engine.device), mixed)[0] if engine.device.type == "cuda" else None

    def client_state(at_step: int) -> dict:
        loader = task.train_loader.state_dict()
        return {"step": at_step, "loader": loader, "run": run.__dict__, "best": best, "evaluation_due": evaluation_due}

    def save(at_step: int, directory: Path = ckpt_dir, keep_last: int = run.keep_checkpoints) -> None:
        check_finite_weights(engine, at_step)
        checkpoint.save(engine, directory, at_step, client_state(at_step), keep_last, vocab)

    def evaluate(at_step: int) -> dict[str, float]:
        nonlocal best
        engine.eval()
        with torch.no_grad():
            metrics = task.evaluate(engine)
        engine.train()
        log.write({"kind": "eval", "step": at_step, **metrics})
        if best_metric is not None:
            if best_metric not in metrics:
                raise KeyError(f"the task's best_metric {best_metric!r} is not among its metrics {sorted(metrics)}")
            # Every rank holds the same metrics (tasks reduce over ranks), so all take this branch together.
            if best is None or metrics[best_metric] > best["value"]:
                best = {"step": at_step, "metric": best_metric, "value": metrics[best_metric], "metrics": metrics}
                save(at_step, run_dir / "best", keep_last=1)
                log.write({"kind": "best", "step": at_step, best_metric: metrics[best_metric]})
        return metrics

    # On a terminal the bar redraws up to 10 times a second. In a log file (a batch job's stderr) every
    # redraw stays: one per step, ~150 MB over the paper's 1.4M steps; there it redraws every 30 s,
    # unless tqdm's own TQDM_MININTERVAL says otherwise.
    redraw = {} if sys.stderr.isatty() or "TQDM_MININTERVAL" in os.environ else {"mininterval": 30.0}
    progress = tqdm(total=run.max_steps, initial=step, disable=not dist.is_main(), dynamic_ncols=True, **redraw)
    window = Window()
    skipped_before = engine.skipped_steps if mixed == "fp16" else 0
    engine.train()
    batches = _batches(task.train_loader)
    stop_at = min(run.max_steps, step + run.exit_after_steps) if run.exit_after_steps else run.max_steps
    accumulation = engine.gradient_accumulation_steps()
    stop = StopSignal()
    profiler = StepProfiler(
        run.profile_steps, run.profile_warmup, run_dir / "profile", engine.device, dist.rank(), stop.settle
    )
    if evaluation_due:
        evaluate(step)
        evaluation_due = False
    with stop, profiler:
        while step < stop_at:
            profiler.step_begins(step - resumed_at, step)
            mode = task.mode(step)  # one mode for the whole mini-batch: every micro-batch, every rank
            with cross_attention_held(engine, mode):
                for _ in range(accumulation):
                    waited_from = time.perf_counter()
                    host_batch = next(batches)
                    window.data_wait += time.perf_counter() - waited_from
                    samples, flops = task.batch_samples(host_batch), task.batch_flops(host_batch, mode)
                    batch = to_device(host_batch, engine.device)
                    loss, terms = task.loss(engine, batch, mode, step)
                    if mixed != "fp16":  # fp16 overflow is the loss scaler's business: it skips the step
                        _check_finite(loss, terms, step)
                    engine.backward(loss)
                    engine.step()  # the optimizer steps at the accumulation boundary only
                    window.add({"loss": loss, **terms}, samples, flops)
            step += 1
            window.modes.append(mode)

            signals = stop.agreed()
            stopping = bool(signals) and step != stop_at
            if step % run.log_every == 0 or step == stop_at or stopping:
                record = _log_record(window, step, engine, mixed, skipped_before, peak)
                skipped_before = record.get("skipped_steps_total", 0)
                log.write(record)
                progress.set_postfix(
                    loss=f"{record['loss']:.3f}", samples_s=f"{record['samples_per_s']:.0f}", refresh=False
                )
                window = Window()
            if stopping:
                log.write({"kind": "stop", "step": step, "signals": signals})
                if dist.is_main():
                    print(f"\n{', '.join(signals)}: saving a checkpoint at step {step}, then stopping", flush=True)
            progress.update(1)
            evaluating = bool(run.eval_every) and step % run.eval_every == 0 and step != run.max_steps
            checkpointing = bool(run.checkpoint_every) and step % run.checkpoint_every == 0 and step != stop_at
            closing = stopping or evaluating or checkpointing or step == stop_at
            profiled = profiler.step_ended(step, closing)
            if profiled is not None:
                log.write(profiled)
                _print_profile(profiled)
            if stopping:  # the checkpoint first, while the scheduler's grace lasts; a due evaluation after --resume
                evaluation_due = evaluating
                break
            if evaluating:
                evaluate(step)
            if checkpointing:
                save(step)
        progress.close()
        if step != resumed_at:  # else its checkpoint exists: DeepSpeed rewrites files in place, a kill would damage it
            save(step)
    finished = step == run.max_steps
    metrics = evaluate(step) if finished else {}  # may update `best`
    return TrainResult(step, finished, metrics, best)


def _print_profile(record: dict) -> None:
    if not dist.is_main():
        return
    if "error" in record:
        print(f"\nprofiling failed (training goes on): {record['error']}", flush=True)
        return
    busy = f", GPU busy {record['gpu_busy_pct']:.0f}%" if "gpu_busy_pct" in record else ""
    top = ", ".join(f"{op['name']} {op['self_ms_per_step']:.2f}" for op in record["top_ops"][:3])
    print(
        f"\nprofile of steps {record['first_step']}-{record['step']}: {record['wall_ms_per_step']:.1f} ms/step{busy}; "
        f"most time (ms/step): {top}; trace {record['trace']}",
        flush=True,
    )


def _log_record(
    window: Window,
    step: int,
    engine,
    mixed: str,
    skipped_before: int,
    peak_tflops_per_device: float | None,
) -> dict:
    """The log line of the window."""
    elapsed = time.perf_counter() - window.start
    # One exchange per log step: the window's modes, which must agree across ranks (a mismatch would
    # silently train a mixture), and each rank's wait for its input pipeline.
    gathered = dist.all_gather_object((window.modes, window.data_wait))
    all_modes = [modes for modes, _ in gathered]
    if any(m != all_modes[0] for m in all_modes):
        raise RuntimeError(
            f"ranks disagree on the stream mode at steps {step - len(window.modes) + 1}..{step}: {all_modes}"
        )
    world = dist.world_size()
    record = {
        "kind": "train",
        "step": step,
        **{k: float(v) / window.micro_batches for k, v in window.terms.items()},
        "modes": window.modes,
        "lr": engine.get_lr()[0],
        "samples_per_s": window.samples * world / elapsed,
        "tflops_per_s": window.flops * world / elapsed / 1e12,
        "step_time_s": elapsed / len(window.modes),
        "data_wait_s": max(wait for _, wait in gathered) / len(window.modes),  # the slowest rank's wait
        "world_size": world,
    }
    if peak_tflops_per_device:
        record["mfu"] = record["tflops_per_s"] / (peak_tflops_per_device * world)
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None and math.isfinite(float(grad_norm)):
        record["grad_norm"] = float(grad_norm)
    if mixed == "fp16":
        record["loss_scale"] = engine.optimizer.cur_scale if hasattr(engine.optimizer, "cur_scale") else None
        record["skipped_steps_total"] = engine.skipped_steps
        record["skipped_steps"] = engine.skipped_steps - skipped_before  # fp16 overflow: step skipped
    if torch.cuda.is_available():
        record["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return record
