"""Device time of a callable: the GPU's own kernel time, apart from the host's.

Wall-clock timings (CUDA events around a call, triton.testing.do_bench) count every gap in which the
GPU waits for the host to launch the next kernel. When an op's host cost (Python, autograd, the
dispatcher, a Triton launcher) exceeds its GPU time, those timings measure the host. The device time
here is the sum of the durations of the kernels, memcpys and memsets that CUPTI records (through
torch.profiler) while the callable runs: what the calls cost the GPU, whatever the host did around
them. Inside a training step, where enough GPU work is queued ahead, that is what an op costs; a
step whose device time is well below its wall time is host-bound (launch-bound or stalled at syncs).
A training run measures the same for its own steps with --profile_steps (semvlp/profiling.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from semvlp.profiling import device_time_us


def device_ms(fn: Callable[[], object], device: torch.device, calls: int = 5) -> float | None:
    """Milliseconds of device activity per call of `fn` (None off CUDA). `fn` should be warm."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(device)
    total_us = device_time_us(prof)
    if total_us <= 0:
        raise RuntimeError("the profiler recorded no device activity (CUPTI unavailable?)")
    return total_us / calls / 1e3
