"""Profile a few steps of a real run (--profile_steps): where a training step's time goes.

torch.profiler records `steps` optimizer steps once `warmup` steps of this invocation have run
(by then compilation, Triton's autotuning and the allocator's first rounds are over). Every rank
writes a Chrome trace, `OUTPUT_DIR/profile/rank<r>_steps<a>-<b>.pt.trace.json.gz` (ui.perfetto.dev
or chrome://tracing open it). Rank 0 also writes the operator tables
(`profile/summary_steps<a>-<b>.txt`) and a `profile` record in metrics.jsonl: wall milliseconds per
step, the operators that take the most time (`top_ops`; on CUDA ranked by GPU time, with
`top_host_ops` ranked by host time beside them) and, on CUDA, the GPU's own kernel time per step,
its share of the wall time (`gpu_busy_pct`) and the kernels a step launches. Well below 100% the
step is host-bound: the GPU waits for Python, kernel launches or host syncs, and fewer, larger
kernels (--compile, CUDA graphs) pay more than faster ones.

Evaluations and checkpoints are not steps: the window closes before one, with fewer steps if need be.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

TOP_OPS = 15  # operators listed in the metrics record (summary.txt has more)
HOST, DEVICE = "self_cpu_time_total", "self_device_time_total"  # what the operators are ranked by


def device_events(prof: profile) -> list:
    """The device activity (kernels, memcpys, memsets) that `prof` recorded: device-side events,
    user annotations excluded, as the profiler's own "Self CUDA time total" counts them."""
    return [
        event
        for event in prof.events()
        if event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)
    ]


def device_time_us(prof: profile) -> float:
    """Microseconds of device activity that `prof` recorded."""
    return sum(event.self_device_time_total for event in device_events(prof))


class StepProfiler:
    """Opens a torch.profiler window over training steps; see the module docstring.

    Used as a context manager around the loop, which calls `step_begins` before each optimizer
    step and `step_ended` after it; the latter returns the rank's record when the window closes.
    `settle` runs before the profiler starts and before it stops: the loop passes one that waits
    for the collective it leaves running between steps (StopSignal.settle). torch.profiler started
    or stopped while a gloo thread ran it corrupted the heap: 9 of 33 profiled runs on 2 CPU ranks
    aborted at exit ("tcache_thread_shutdown(): unaligned tcache chunk detected"), none of 36 since.
    """

    def __init__(
        self,
        steps: int,
        warmup: int,
        out_dir: Path,
        device: torch.device,
        rank: int,
        settle: Callable[[], None] = lambda: None,
    ):
        self.steps, self.warmup = steps, warmup
        self.out_dir, self.device, self.rank = out_dir, device, rank
        self.settle = settle
        self._prof: profile | None = None
        self._first_step = 0
        self._profiled = 0
        self._start = 0.0
        self.done = steps == 0  # nothing to do, or the window is over

    def step_begins(self, done: int, step: int) -> None:
        """`done`: steps of this invocation so far; `step`: the run's steps so far."""
        if self.done or self._prof is not None or done < self.warmup:
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.settle()
        self._sync()  # the window's wall time starts with an empty queue
        self._prof = profile(activities=activities)
        self._prof.__enter__()
        self._first_step, self._profiled, self._start = step + 1, 0, time.perf_counter()

    def step_ended(self, step: int, closing: bool) -> dict | None:
        """After optimizer step `step` (1-based): the record when this closes the window, else None."""
        if self._prof is None:
            return None
        self._profiled += 1
        if self._profiled < self.steps and not closing:
            return None
        self._sync()  # the queued kernels belong to the window
        wall_s = time.perf_counter() - self._start
        self.settle()
        prof, self._prof, self.done = self._prof, None, True
        try:
            prof.__exit__(None, None, None)
            return self._write(prof, step, wall_s)
        except Exception as exc:  # noqa: BLE001 - a diagnostic: its failure must not cost the run
            return {"kind": "profile", "step": step, "error": f"{type(exc).__name__}: {exc}"[:500]}

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, *exc) -> None:
        """Stops a window that an exception left open; nothing is written."""
        if self._prof is not None:
            prof, self._prof, self.done = self._prof, None, True
            prof.__exit__(None, None, None)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _write(self, prof: profile, last_step: int, wall_s: float) -> dict:
        steps = self._profiled
        name = f"steps{self._first_step}-{last_step}"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / f"rank{self.rank}_{name}.pt.trace.json.gz"
        prof.export_chrome_trace(str(trace))
        on_gpu = self.device.type == "cuda"
        events = prof.key_averages()
        rankings = {"top_ops": DEVICE, "top_host_ops": HOST} if on_gpu else {"top_ops": HOST}
        record = {
            "kind": "profile",
            "step": last_step,
            "first_step": self._first_step,
            "steps": steps,
            "wall_ms_per_step": 1e3 * wall_s / steps,
            "trace": str(trace),
        }
        if on_gpu:
            activity = device_events(prof)
            device_us = sum(event.self_device_time_total for event in activity)
            if device_us > 0:
                record["device_ms_per_step"] = device_us / 1e3 / steps
                record["gpu_busy_pct"] = 100 * record["device_ms_per_step"] / record["wall_ms_per_step"]
                record["kernels_per_step"] = len(activity) / steps  # launches: what CUDA graphs would save
            else:
                record["device_note"] = "the profiler recorded no GPU activity (CUPTI unavailable?)"
        for field, time_total in rankings.items():
            top = sorted(events, key=lambda e: getattr(e, time_total), reverse=True)[:TOP_OPS]
            record[field] = [_op_record(e, time_total, steps) for e in top]
        if self.rank == 0:
            tables = [
                f"operators by {time_total}:\n"
                + events.table(sort_by=time_total, row_limit=40, max_name_column_width=80)
                for time_total in rankings.values()
            ]
            (self.out_dir / f"summary_{name}.txt").write_text("\n\n".join(tables) + "\n")
        return record


def _op_record(event, time_total: str, steps: int) -> dict:
    return {
        "name": event.key,
        "self_ms_per_step": getattr(event, time_total) / 1e3 / steps,
        "calls_per_step": event.count / steps,
    }
