"""Autotuning that tests can pin: the config lists of every autotuned kernel go through `tuned`.

Triton's interpreter cannot time configs, and a test must know which config it ran (STYLE.md (e)),
so interpreted runs and SEMVLP_TRITON_AUTOTUNE=0 (set by the kernel tests' conftest) get each
list's first config only. That first config is the one each kernel was first written and measured
with; the others are the alternatives the GPU's autotuner times against it at the first call of
each tuning key (benchmarks/fused_ops.py records every config's time; benchmarks/kernel_resources.py
compiles them all offline for their registers and occupancy).
"""

from __future__ import annotations

import os

import triton

# Read when the kernel modules are imported, which is when Triton decides interpreted vs compiled.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def tuned(configs: list[triton.Config]) -> list[triton.Config]:
    """`configs` for the autotuner, or only the first where configs cannot or must not be timed."""
    if INTERPRETED or os.environ.get("SEMVLP_TRITON_AUTOTUNE", "1") == "0":
        return configs[:1]
    return configs
