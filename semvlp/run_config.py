"""The training run's configuration: a frozen dataclass, filled from the command line.

Every field is a `--flag`; a flag's type is the field's type, and an unknown flag is an error; a
field's `metadata={"help": ...}` is its `--help` text.
`launch/*.py` add their task's fields by subclassing `RunConfig`. The resolved config is saved
as `hparams.json` in the run directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path

from semvlp.config import PRESETS


@dataclass(frozen=True)
class RunConfig:
    deepspeed_config: str  # a ds_configs/*.json
    output_dir: str = "runs/pretrain"
    preset: str = "base"  # model preset (semvlp.config.PRESETS) unless --model_config is given
    model_config: str | None = None  # a SemVLPConfig config.json
    init_from: str | None = None  # a local BERT folder (HF layout) or a SemVLP export
    data: str | None = None  # a data.json (semvlp.data.config); default: the toy world, generated if absent
    cross_attention_start_layer: int | None = None  # L_s; default: the model config's
    kernel_backend: str = "auto"  # auto | eager | sdpa | triton
    max_steps: int = 1000
    warmup_ratio: float = 0.05  # fills the ds_config scheduler's "auto" warmup_num_steps
    log_every: int = 10
    eval_every: int = 200  # 0: only at the end
    eval_batches: int = 20  # per rank and per mode; 0: the whole held-out split
    checkpoint_every: int = 500  # 0: only at the end
    keep_checkpoints: int = 2
    seed: int = 42
    num_workers: int = 2  # DataLoader worker processes per rank
    resume: bool = False  # continue from the newest complete checkpoint in output_dir
    exit_after_steps: int = 0  # >0: checkpoint and exit after this many steps of this invocation
    # (for time-limited cluster jobs: the schedule still spans --max_steps; continue with --resume)

    def __post_init__(self):
        if self.model_config is None and self.preset not in PRESETS:
            raise ValueError(f"--preset {self.preset!r} is unknown; known presets: {sorted(PRESETS)}")
        for name in ("max_steps", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "eval_batches", "checkpoint_every", "num_workers", "exit_after_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for name in ("deepspeed_config", "model_config", "init_from", "data"):
            value = getattr(self, name)
            if value is not None and not Path(value).exists():
                raise FileNotFoundError(f"--{name} {value}: no such file or folder")

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> typing.Self:
        parser = argparse.ArgumentParser(description=cls.__doc__, allow_abbrev=False)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            required = f.default is dataclasses.MISSING
            doc = f.metadata.get("help")
            if kind is bool:
                parser.add_argument(f"--{f.name}", action="store_true", help=doc)
                continue
            base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
            default = None if required else f.default
            parser.add_argument(f"--{f.name}", type=base, required=required, default=default, help=doc)
        parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by deepspeed
        args = vars(parser.parse_args(argv))
        args.pop("local_rank")
        return cls(**args)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
