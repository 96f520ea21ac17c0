"""The training run's configuration: a frozen dataclass, filled from the command line.

Every field is a `--flag`; a flag's type is the field's type, and an unknown flag is an error; a
field made with `option(default, doc)` has `doc` as its `--help` text, followed by the default.
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
from semvlp.data.config import DataConfig

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
# inductor generates the kernels; the others run the captured graphs eagerly, to tell a capture
# problem from a code-generation one (torch.compile's debugging backends)
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


def option(default, doc: str):
    """A config field with its `--help` text (the help shows the default after it)."""
    return dataclasses.field(default=default, metadata={"help": doc})


class ConfigError(ValueError):
    """A bad option, found before any expensive work."""


@dataclass(frozen=True)
class RunConfig:
    deepspeed_config: str = dataclasses.field(
        metadata={"help": "the DeepSpeed config: ds_configs/{v100,a100,h100,cpu}.json or your own"}
    )
    output_dir: str = option("runs/pretrain", "the run folder: metrics.jsonl, checkpoints/, export/, tensorboard/")
    preset: str = option("base", "model preset (semvlp.config.PRESETS) unless --model_config is given")
    model_config: str | None = option(None, "a SemVLPConfig config.json")
    init_from: str | None = option(None, "a local BERT folder (HF layout) or a SemVLP export")
    data: str | None = option(None, "a data.json (docs/data_format.md); default: the toy world, generated if absent")
    cross_attention_start_layer: int | None = option(
        None, "L_s: cross-attention in blocks L_s+1..L; default: the model config's"
    )
    kernel_backend: str = option("auto", "auto | eager | sdpa | triton (auto: per device and dtype, logged at start)")
    compile: bool = option(
        False,
        "torch.compile the model (DeepSpeed's engine.compile): fused elementwise ops and fewer launches; the first "
        "steps of each stream mode, and of train and eval, compile first",
    )
    compile_mode: str = option(
        "default",
        "torch.compile's mode with --compile: default | reduce-overhead (CUDA graphs) | max-autotune | "
        "max-autotune-no-cudagraphs",
    )
    compile_backend: str = option(
        "inductor",
        "torch.compile's backend with --compile: inductor | aot_eager | eager (debugging: no code generation)",
    )
    gradient_checkpointing: bool = option(
        False,
        "activation checkpointing (HF's): each encoder block's activations are recomputed in the backward instead "
        "of kept, ~1/3 more compute for larger micro-batches in the same memory",
    )
    max_steps: int = option(1000, "optimizer steps")
    warmup_ratio: float = option(0.05, "warmup_num_steps = ratio x max_steps where the ds_config says auto")
    log_every: int = option(10, "steps per metrics.jsonl line (losses averaged over them)")
    eval_every: int = option(200, "steps between held-out evaluations; 0: only at the end")
    eval_batches: int = option(20, "held-out batches per rank and mode, the same each time; 0: the whole split")
    checkpoint_every: int = option(500, "steps between checkpoints; 0: only at the end")
    keep_checkpoints: int = option(2, "newest complete checkpoints kept")
    seed: int = option(42, "seed of the model init, dropout, the data order and masks, and the stream schedule")
    num_workers: int = option(2, "DataLoader worker processes per rank")
    resume: bool = option(False, "continue from the newest complete checkpoint in --output_dir")
    exit_after_steps: int = option(
        0,
        "> 0: checkpoint and exit after this many steps of this invocation (for time-limited cluster jobs: the "
        "schedule still spans --max_steps; continue with --resume)",
    )
    profile_steps: int = option(
        0,
        "> 0: torch.profiler over this many steps after --profile_warmup: traces in OUTPUT_DIR/profile/ and a "
        "`profile` line in metrics.jsonl (ms per step, top operators; on CUDA the GPU's busy share)",
    )
    profile_warmup: int = option(10, "steps of this invocation before --profile_steps begins (compilation, autotuning)")

    def __post_init__(self):
        if self.model_config is None and self.preset not in PRESETS:
            raise ConfigError(f"--preset {self.preset!r} is unknown; known presets: {sorted(PRESETS)}")
        for name in ("max_steps", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "eval_batches", "checkpoint_every", "num_workers", "exit_after_steps",
                     "profile_steps", "profile_warmup"):  # fmt: skip
            if (getattr(self, name) or 0) < 0:  # None: chosen later (fine-tuning's --eval_every)
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"--compile_mode {self.compile_mode!r}: expected one of {COMPILE_MODES}")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ConfigError(f"--compile_backend {self.compile_backend!r}: expected one of {COMPILE_BACKENDS}")
        for name, default in (("compile_mode", "default"), ("compile_backend", "inductor")):
            if getattr(self, name) != default and not self.compile:
                raise ConfigError(f"--{name} {getattr(self, name)} needs --compile")
        if self.compile_mode != "default" and self.compile_backend != "inductor":
            raise ConfigError(
                f"--compile_mode {self.compile_mode} is inductor's; --compile_backend is {self.compile_backend}"
            )
        steps_here = min(self.max_steps, self.exit_after_steps or self.max_steps)
        if self.profile_steps and self.profile_warmup >= steps_here:
            raise ConfigError(
                f"--profile_warmup {self.profile_warmup} leaves no step to profile in the {steps_here} steps this "
                "run does (--max_steps, --exit_after_steps)"
            )
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for name in ("deepspeed_config", "model_config", "init_from", "data"):
            value = getattr(self, name)
            if value is not None and not Path(value).exists():
                raise FileNotFoundError(f"--{name} {value}: no such file or folder")
        if self.init_from is not None and not Path(self.init_from).is_dir():
            raise ConfigError(
                f"--init_from {self.init_from} is a file; expected a model folder: a SemVLP export (semvlp.export) "
                "or a BERT checkpoint folder (config.json, weights, vocab.txt)"
            )
        if self.data is not None:
            DataConfig.check_path(self.data)

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> typing.Self:
        parser = argparse.ArgumentParser(
            description=cls.__doc__, allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            required = f.default is dataclasses.MISSING
            doc = _help(cls, f.name)
            if kind is bool:
                parser.add_argument(f"--{f.name}", action="store_true", help=doc)
                continue
            base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
            default = argparse.SUPPRESS if required else f.default  # a required flag shows no default
            parser.add_argument(f"--{f.name}", type=base, required=required, default=default, help=doc)
        parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by deepspeed
        args = vars(parser.parse_args(argv))
        args.pop("local_rank")
        return cls(**args)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")


def _help(cls: type, name: str) -> str | None:
    """A field's --help text; a subclass that only changes the default keeps its base class's text."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and "help" in f.metadata:
            return f.metadata["help"]
    return None
