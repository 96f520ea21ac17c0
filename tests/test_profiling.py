"""StepProfiler (--profile_steps): which steps it records, what it writes, and that it always stops.

The launchers' use of it, on a real DeepSpeed run, is in tests/test_pretrain.py."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from semvlp.profiling import StepProfiler

CPU = torch.device("cpu")


def _step() -> None:
    """A small training step's worth of operators."""
    weight = torch.randn(64, 64, requires_grad=True)
    loss = torch.nn.functional.gelu(torch.randn(32, 64) @ weight).sum()
    loss.backward()


def _run(profiler: StepProfiler, steps: int, closing_at: set[int] = frozenset()) -> list[dict]:
    """The training loop's calls, over `steps` steps; the records the profiler returned."""
    records = []
    with profiler:
        for done in range(steps):
            profiler.step_begins(done, done)
            _step()
            record = profiler.step_ended(done + 1, closing=done + 1 in closing_at or done + 1 == steps)
            if record is not None:
                records.append(record)
    return records


def test_profiles_the_steps_after_the_warmup_and_writes_trace_summary_and_record(tmp_path):
    records = _run(StepProfiler(steps=3, warmup=2, out_dir=tmp_path, device=CPU, rank=0), steps=8)
    assert len(records) == 1
    record = records[0]
    assert (record["kind"], record["first_step"], record["step"], record["steps"]) == ("profile", 3, 5, 3)
    assert record["wall_ms_per_step"] > 0
    assert "gpu_busy_pct" not in record and "device_ms_per_step" not in record  # no GPU here
    names = [op["name"] for op in record["top_ops"]]
    assert "aten::mm" in names and len(names) <= 15
    mm = next(op for op in record["top_ops"] if op["name"] == "aten::mm")
    assert mm["calls_per_step"] == 2 and mm["self_ms_per_step"] > 0  # forward, and the weight's gradient
    with gzip.open(record["trace"]) as f:
        trace = json.load(f)
    assert record["trace"] == str(tmp_path / "rank0_steps3-5.pt.trace.json.gz")
    assert any(event.get("name") == "aten::mm" for event in trace["traceEvents"])
    assert "aten::mm" in (tmp_path / "summary_steps3-5.txt").read_text()
    assert not torch.autograd.profiler._is_profiler_enabled


def test_an_evaluation_or_checkpoint_closes_the_window_early_and_it_never_reopens(tmp_path):
    records = _run(StepProfiler(steps=5, warmup=1, out_dir=tmp_path, device=CPU, rank=0), steps=9, closing_at={3})
    assert [(r["first_step"], r["step"], r["steps"]) for r in records] == [(2, 3, 2)]


def test_other_ranks_write_their_trace_only(tmp_path):
    records = _run(StepProfiler(steps=1, warmup=0, out_dir=tmp_path, device=CPU, rank=1), steps=2)
    assert [r["first_step"] for r in records] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank1_steps1-1.pt.trace.json.gz"]


def test_off_by_default_and_an_exception_stops_an_open_window(tmp_path):
    assert _run(StepProfiler(steps=0, warmup=0, out_dir=tmp_path, device=CPU, rank=0), steps=3) == []
    profiler = StepProfiler(steps=4, warmup=0, out_dir=tmp_path, device=CPU, rank=0)
    with pytest.raises(RuntimeError, match="step failed"), profiler:
        profiler.step_begins(0, 0)
        assert torch.autograd.profiler._is_profiler_enabled
        raise RuntimeError("step failed")
    assert not torch.autograd.profiler._is_profiler_enabled
    assert list(tmp_path.iterdir()) == []  # nothing written for an aborted window


def test_the_collectives_left_running_settle_before_the_profiler_starts_and_before_it_stops(tmp_path):
    """The loop's StopSignal.settle runs just before the window opens and just before it closes:
    torch.profiler toggled while a gloo thread runs a collective corrupts the heap (StepProfiler)."""
    profiler_on_at_settle = []
    profiler = StepProfiler(
        steps=2,
        warmup=1,
        out_dir=tmp_path,
        device=CPU,
        rank=0,
        settle=lambda: profiler_on_at_settle.append(torch.autograd.profiler._is_profiler_enabled),
    )
    assert len(_run(profiler, steps=5)) == 1
    assert profiler_on_at_settle == [False, True]


def test_a_failure_to_write_is_a_record_not_an_exception(tmp_path):
    blocked = tmp_path / "profile"
    blocked.write_text("a file where the folder should go")
    records = _run(StepProfiler(steps=1, warmup=0, out_dir=blocked, device=CPU, rank=0), steps=1)
    assert len(records) == 1 and records[0]["step"] == 1 and "FileExistsError" in records[0]["error"]


class _Event:
    def __init__(self, key: str, count: int, host_us: float, device_us: float, on_device: bool = False):
        from torch.autograd import DeviceType

        self.key, self.count = key, count
        self.self_cpu_time_total, self.self_device_time_total = host_us, device_us
        self.device_type = DeviceType.CUDA if on_device else DeviceType.CPU


class _Averages(list):
    def table(self, sort_by: str, row_limit: int, max_name_column_width: int) -> str:
        return "\n".join(e.key for e in sorted(self, key=lambda e: getattr(e, sort_by), reverse=True))


class _CudaProfile:
    """What torch.profiler gives on a GPU, as far as StepProfiler reads it."""

    def __init__(self, kernels_us: list[float]):
        launches = [_Event("cudaLaunchKernel", 40, host_us=900.0, device_us=0.0)]
        self._kernels = [
            _Event(f"kernel{i}", 2, host_us=0.0, device_us=us, on_device=True) for i, us in enumerate(kernels_us)
        ]
        self._averages = _Averages(launches + self._kernels)

    def events(self):
        return self._kernels

    def key_averages(self):
        return self._averages

    def export_chrome_trace(self, path: str) -> None:
        with gzip.open(path, "wt") as f:
            json.dump({"traceEvents": []}, f)


def test_on_a_gpu_the_record_has_the_gpus_busy_share_and_both_rankings(tmp_path):
    """The CUDA branch, on a stand-in for the profiler's results (this machine has no GPU)."""
    profiler = StepProfiler(steps=2, warmup=0, out_dir=tmp_path, device=torch.device("cuda"), rank=0)
    profiler._first_step, profiler._profiled = 3, 2
    record = profiler._write(_CudaProfile([6000.0, 14000.0]), last_step=4, wall_s=0.05)  # 20 ms of kernels in 50
    assert record["wall_ms_per_step"] == pytest.approx(25.0) and record["device_ms_per_step"] == pytest.approx(10.0)
    assert record["gpu_busy_pct"] == pytest.approx(40.0) and record["kernels_per_step"] == 1
    assert [op["name"] for op in record["top_ops"][:2]] == ["kernel1", "kernel0"]  # by GPU time
    assert record["top_ops"][0]["self_ms_per_step"] == pytest.approx(7.0)
    assert record["top_host_ops"][0] == {"name": "cudaLaunchKernel", "self_ms_per_step": 0.45, "calls_per_step": 20}
    summary = (tmp_path / "summary_steps3-4.txt").read_text()
    assert "operators by self_device_time_total:\nkernel1" in summary
    assert "operators by self_cpu_time_total:\ncudaLaunchKernel" in summary
    record = profiler._write(_CudaProfile([]), last_step=4, wall_s=0.05)
    assert "gpu_busy_pct" not in record and "CUPTI" in record["device_note"]
