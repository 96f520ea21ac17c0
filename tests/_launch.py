"""Running the launchers (launch/*.py) from tests as users run them: real DeepSpeed engines in CPU
processes (gloo) on ds_configs/cpu.json with the tiny preset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = Path(sys.executable).with_name("deepspeed")
CPU_CONFIG = REPO / "ds_configs" / "cpu.json"

# One master port per pytest process, so concurrent sessions do not collide
LAUNCH_PORT = str(29600 + os.getpid() % 300)


def one_process_ds_config() -> Path:
    """ds_configs/cpu.json with a global batch of 16, what one process runs (a fresh temporary file)."""
    single = json.loads(CPU_CONFIG.read_text())
    single["train_batch_size"] = single["train_micro_batch_size_per_gpu"]
    config = Path(tempfile.mkdtemp()) / "cpu_1proc.json"
    config.write_text(json.dumps(single))
    return config


def pretrain_command(
    args: list[str], processes: int = 2, script: str = "pretrain.py", ds_config: Path | None = None
) -> tuple[list[str], dict]:
    """launch/<script> on `ds_config`, by default ds_configs/cpu.json (2 ranks x 16) or, in one process,
    the same with a global batch of 16."""
    launcher = REPO / "launch" / script
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if processes == 1:
        cmd = [sys.executable, str(launcher)]
        ds_config = ds_config or one_process_ds_config()
    else:
        cmd = [str(DEEPSPEED), "--num_gpus", str(processes), "--master_port", LAUNCH_PORT, str(launcher)]
    return [*cmd, "--deepspeed_config", str(ds_config or CPU_CONFIG), "--preset", "tiny", *args], env


def run_pretrain(
    args: list[str], processes: int = 2, timeout: int = 600, script: str = "pretrain.py", ds_config: Path | None = None
) -> subprocess.CompletedProcess:
    cmd, env = pretrain_command(args, processes, script, ds_config)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def records(run_dir: Path, kind: str) -> list[dict]:
    """The records of one kind ("train", "eval", ...) in a run's metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]
