"""Device time of a callable: the GPU's own kernel time, apart from the host's.

Wall-clock timings (CUDA events around a call, triton.testing.do_bench) count every gap in which the
GPU waits for the host to launch the next kernel. When an op's host cost (Python, autograd, the
dispatcher, a Triton launcher) exceeds its GPU time, those timings measure the host. The device time
here is the sum of the durations of the kernels, memcpys and memsets that CUPTI records (through
torch.profiler) while the callable runs: what the calls cost the GPU, whatever the host did around
them. Inside a training step, where enough GPU work is queued ahead, that is what an op costs; a
step whose device time is well below its wall time is host-bound (launch-bound or stalled at syncs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def device_ms(fn: Callable[[], object], device: torch.device, calls: int = 5) -> float | None:
    """Milliseconds of device activity per call of `fn` (None off CUDA). `fn` should be warm."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(device)
    # As the profiler's own "Self CUDA time total": device-side events, user annotations excluded.
    total_us = sum(
        event.self_device_time_total
        for event in prof.events()
        if event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)
    )
    if total_us <= 0:
        raise RuntimeError("the profiler recorded no device activity (CUPTI unavailable?)")
    return total_us / calls / 1e3
