"""Running the launchers (launch/*.py) from tests as users run them: real DeepSpeed engines in CPU
processes (gloo) on ds_configs/cpu.json with the tiny preset."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = Path(sys.executable).with_name("deepspeed")
CPU_CONFIG = REPO / "ds_configs" / "cpu.json"

# One master port per pytest process, so concurrent sessions do not collide; another for the run in
# the background (BackgroundRun), which the others overlap
LAUNCH_PORT = str(29600 + os.getpid() % 300)
BACKGROUND_PORT = str(29900 + os.getpid() % 300)


def one_process_ds_config() -> Path:
    """ds_configs/cpu.json with a global batch of 16, what one process runs (a fresh temporary file)."""
    single = json.loads(CPU_CONFIG.read_text())
    single["train_batch_size"] = single["train_micro_batch_size_per_gpu"]
    config = Path(tempfile.mkdtemp()) / "cpu_1proc.json"
    config.write_text(json.dumps(single))
    return config


def make_demo_command() -> list[str]:
    """The command line `make demo` runs, from the Makefile's recipe: its one copy."""
    makefile = (REPO / "Makefile").read_text().replace("\\\n", " ")  # continuation lines joined
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    (line,) = [line for line in recipe.splitlines() if "launch/pretrain.py" in line]
    return shlex.split(line)


def make_demo_arguments(**overrides: str) -> list[str]:
    """The options `make demo` gives launch/pretrain.py, `overrides` replacing or adding some, less
    what pretrain_command sets by default (checked to be the same: 2 processes, ds_configs/cpu.json,
    the tiny preset)."""
    command = make_demo_command()
    script = command.index("launch/pretrain.py")
    pairs = command[script + 1 :]
    options = dict(zip(pairs[::2], pairs[1::2], strict=True))  # every option takes a value
    assert command[script - 2 : script] == ["--num_gpus", "2"], command
    assert (options.pop("--deepspeed_config"), options.pop("--preset")) == ("ds_configs/cpu.json", "tiny"), command
    options |= {f"--{name}": value for name, value in overrides.items()}
    return [token for pair in options.items() for token in pair]


def pretrain_command(
    args: list[str],
    processes: int = 2,
    script: str = "pretrain.py",
    ds_config: Path | None = None,
    port: str = LAUNCH_PORT,
) -> tuple[list[str], dict]:
    """launch/<script> on `ds_config`, by default ds_configs/cpu.json (2 ranks x 16) or, in one process,
    the same with a global batch of 16."""
    launcher = REPO / "launch" / script
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if processes == 1:
        cmd = [sys.executable, str(launcher)]
        ds_config = ds_config or one_process_ds_config()
    else:
        cmd = [str(DEEPSPEED), "--num_gpus", str(processes), "--master_port", port, str(launcher)]
    return [*cmd, "--deepspeed_config", str(ds_config or CPU_CONFIG), "--preset", "tiny", *args], env


def run_pretrain(
    args: list[str], processes: int = 2, timeout: int = 600, script: str = "pretrain.py", ds_config: Path | None = None
) -> subprocess.CompletedProcess:
    cmd, env = pretrain_command(args, processes, script, ds_config)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


class BackgroundRun:
    """run_pretrain started now and waited for later, while other tests run. Its output goes to files
    in `log_dir` (a pipe nobody reads would fill and stall it); `wait` returns what run_pretrain does."""

    def __init__(self, args: list[str], log_dir: Path, timeout: int, **command):
        self.cmd, env = pretrain_command(args, port=BACKGROUND_PORT, **command)
        self.deadline = time.monotonic() + timeout
        self.logs = log_dir / "stdout.log", log_dir / "stderr.log"
        with open(self.logs[0], "w") as stdout, open(self.logs[1], "w") as stderr:
            # in pytest's process group, as run_pretrain's: a signal to the group reaches it too
            self.process = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdout=stdout, stderr=stderr)

    def wait(self) -> subprocess.CompletedProcess:
        try:
            returncode = self.process.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        stdout, stderr = (log.read_text() for log in self.logs)
        return subprocess.CompletedProcess(self.cmd, returncode, stdout, stderr)

    def stop(self) -> None:
        """Kills the run (the launcher and its ranks) if it is still running."""
        if self.process.poll() is None:
            launcher = psutil.Process(self.process.pid)
            for process in [*launcher.children(recursive=True), launcher]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            self.process.wait()


def records(run_dir: Path, kind: str) -> list[dict]:
    """The records of one kind ("train", "eval", ...) in a run's metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]
