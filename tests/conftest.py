"""Set once for the whole suite, before any test module imports `semvlp`.

TRITON_INTERPRET must be set before any `@triton.jit` function is defined (triton reads it at
decoration time), so the kernels can run on CPU tensors; only on machines without CUDA, where the
kernels are compiled instead.
"""

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """The data.json of a toy world of the default size, what `make demo` trains on (made once)."""
    from semvlp.data.toy import ensure_toy_world

    return Path(ensure_toy_world(tmp_path_factory.mktemp("toy")))


# The demo run (tests/test_demo.py) is the largest part of the suite's time on 2 cores. It starts in
# the background before the first test, and its tests go last: the rest of the suite runs meanwhile.
# Before them go the tests marked `ranks`, whose launches run 2 processes: they keep both cores busy
# after the demo is done, where a test run in this process or in one more would leave one idle.


def uses_the_demo_run(item: pytest.Item) -> bool:
    return "demo_run" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # stable: the order within each part is kept
    items.sort(key=lambda item: (uses_the_demo_run(item), item.get_closest_marker("ranks") is not None))


@pytest.fixture(scope="session")
def demo_run_started(toy_data, tmp_path_factory):
    """What `make demo` runs (the Makefile's options, on a toy world of the same size): 2 processes,
    1,500 steps (7-8 minutes on 2 cores), started in the background; (the run, its output folder)."""
    from _launch import BackgroundRun, make_demo_arguments

    run_dir = tmp_path_factory.mktemp("demo")
    args = make_demo_arguments(data=str(toy_data), output_dir=str(run_dir), log_every="100")
    run = BackgroundRun(args, log_dir=tmp_path_factory.mktemp("demo_logs"), timeout=2400)
    yield run, run_dir
    run.stop()


@pytest.fixture(scope="session", autouse=True)
def start_the_demo_run_first(request) -> None:
    if any(map(uses_the_demo_run, request.session.items)):
        request.getfixturevalue("demo_run_started")
        # One intra-op thread here: with the demo's ranks on the cores, OpenMP threads waiting for
        # each other at every op's barrier made this process's training tests 40-60x slower.
        torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_process_group():
    """A gloo process group of this one process, for the module's in-process DeepSpeed engines.
    init_distributed fills RANK, WORLD_SIZE, MASTER_PORT...: the environment is restored afterwards
    so that later tests' launcher subprocesses do not inherit this group's rendezvous port."""
    import deepspeed.comm

    from semvlp import runner

    saved_env = dict(os.environ)
    runner.init_distributed()
    yield
    deepspeed.comm.destroy_process_group()  # and DeepSpeed's references to it, for the next module's group
    os.environ.clear()
    os.environ.update(saved_env)


@pytest.fixture
def sigterm_received():
    """SIGTERMs this process receives in the test, recorded instead of ending pytest (e.g. a batch
    scheduler ending a tool: `os.kill(os.getpid(), signal.SIGTERM)`). A tool that catches SIGTERM must
    put this handler back when done."""
    received = []

    def record(signum, frame):
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, record)
    try:
        yield received
        assert signal.getsignal(signal.SIGTERM) is record, "the tool did not restore the SIGTERM handler"
    finally:
        signal.signal(signal.SIGTERM, previous)


LAUNCH = Path(__file__).resolve().parents[1] / "launch"


@pytest.fixture
def load_launcher(monkeypatch):
    """launch/<script> as a module (the launchers are scripts, not a package), for in-process tests."""

    def load(script: str):
        spec = importlib.util.spec_from_file_location(f"launch_{script.removesuffix('.py')}", LAUNCH / script)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look the module up while decorating
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def small_dev_shm():
    """Wraps a command so that it runs with a /dev/shm of the given size (a private tmpfs mounted in a
    new mount namespace), as in a container: Docker gives 64 MB. Needs root (CAP_SYS_ADMIN)."""
    probe = ["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"]
    if shutil.which("unshare") is None or subprocess.run(probe, capture_output=True).returncode != 0:
        pytest.skip("mounting a small /dev/shm needs unshare and root (CAP_SYS_ADMIN)")

    def wrap(command: list[str], size: str) -> list[str]:
        mount = f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$@"'
        return ["unshare", "--mount", "sh", "-c", mount, "sh", *command]

    return wrap
