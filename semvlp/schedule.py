"""Which mode each pre-training step runs in (paper 3.3.2).

`alternate`: each mini-batch is single-stream or two-stream with probability 1/2. The draw is a
pure function of (seed, step), so every rank picks the same mode for the same step without
communicating, and a resumed run continues the same sequence.
"""

from __future__ import annotations

import random

STREAM_SCHEDULES = ("alternate", "single", "two")


def mode_for_step(schedule: str, step: int, seed: int) -> str:
    if schedule == "single" or schedule == "two":
        return schedule
    if schedule != "alternate":
        raise ValueError(f"stream_schedule={schedule!r}; expected one of {STREAM_SCHEDULES}")
    return "single" if random.Random(f"{seed}:{step}").random() < 0.5 else "two"
