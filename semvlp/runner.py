"""What every launcher does around the training loop: distributed start, config checks,
model construction and initialization, the DeepSpeed engine, and the final export.

Errors in options surface here, before any expensive work, as `ConfigError`s that
`run_main` turns into one message and a non-zero exit.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import deepspeed
import torch

from semvlp import checkpoint, dist
from semvlp.config import SemVLPConfig, config_from_preset, is_semvlp_export, read_config_json
from semvlp.data.config import DataConfig
from semvlp.data.loader import KeyedBatchDataset, shared_memory_bound
from semvlp.data.store import ImageValueError
from semvlp.export import export_checkpoint
from semvlp.model import enable_activation_checkpointing
from semvlp.model.bert_init import config_from_bert, init_from_bert
from semvlp.model.modeling import quiet_transformers
from semvlp.paths import nearest_existing
from semvlp.run_config import ConfigError, RunConfig
from semvlp.train import (
    NonFiniteLossError,
    optimizer_group_count,
    optimizer_groups,
    resolve_ds_config,
    versions,
)

TOY_WORLD_DIR = Path("data/toy")
SHARED_MEMORY = Path("/dev/shm")  # where DataLoader workers' tensors live (torch's shared-memory files)


def run_main(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a launcher's main; option and data errors print one line and exit 2 (1 for a non-finite loss,
    a failed checkpoint save, another OS error such as a folder it may not write, or a GPU out of
    memory, with the options that lower its use)."""
    with info_messages_shown():
        try:
            discover_launcher_ranks()
            main(argv)
        except ImageValueError as e:  # found by the rank that read the image: the others know nothing of it
            print(f"error (rank {dist.rank()}): {own_message(e)}", file=sys.stderr, flush=True)
            sys.exit(2)
        except (ConfigError, FileNotFoundError, ValueError) as e:
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"error: {own_message(e)}", file=sys.stderr, flush=True)
            sys.exit(2)
        except (NonFiniteLossError, checkpoint.CheckpointError, OSError) as e:  # OSError names its file
            print(f"error (rank {dist.rank()}): {own_message(e)}", file=sys.stderr, flush=True)
            sys.exit(1)
        except torch.cuda.OutOfMemoryError as e:
            print(
                f"error (rank {dist.rank()}): out of GPU memory ({str(e).splitlines()[0]}). Lower the ds_config's "
                "train_micro_batch_size_per_gpu (with gradient_accumulation_steps raised to keep the global batch) or "
                "add --gradient_checkpointing; when fine-tuning runs out while evaluating, lower --eval_batch_size. "
                "The checkpoints written so far are complete: continue with --resume.",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(1)


class _ToStderr(logging.Handler):
    """Writes to the sys.stderr of the moment (a redirect or a test's capture made after it was set)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr, flush=True)


@contextmanager
def info_messages_shown() -> Iterator[None]:
    """The package logs what a run is made of (the data's sizes, the kernel backend chosen, what an
    --init_from BERT loaded) at INFO, which Python drops unless the program asks: within this block
    they show on rank 0's stderr. Warnings show on every rank (Python's default)."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    handler, packages = _ToStderr(), [logging.getLogger(name) for name in ("semvlp", "semvlp_kernels")]
    levels = [package.level for package in packages]
    for package in packages:
        package.addHandler(handler)
        package.setLevel(logging.INFO)
    try:
        yield
    finally:
        for package, level in zip(packages, levels, strict=True):
            package.removeHandler(handler)
            package.setLevel(level)


def own_message(error: BaseException) -> str:
    """The error's message. DataLoader raises a worker's error again in the training process with
    the worker's whole traceback for its message; the error's own message is what follows its name
    on the traceback's last line."""
    text = str(error)
    if text.startswith(f"Caught {type(error).__name__} in DataLoader worker process"):
        cls = type(error)
        name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
        text = text.rsplit(f"\n{name}: ", 1)[-1].rstrip("\n")
    return text


# How many ranks an MPI or SLURM launcher started, where it does not set torch's RANK / WORLD_SIZE /
# LOCAL_RANK: DeepSpeed's openmpi, mvapich and slurm runners (mpirun, srun), which leave the ranks to
# find each other through mpi4py (DeepSpeed's MPI discovery). srun's step variable, not SLURM_NTASKS:
# a batch script's own environment has that too, and a plain `python launch/...` in it is one process.
LAUNCHER_WORLD_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS")


def discover_launcher_ranks() -> None:
    """Under an MPI or SLURM launcher that does not name the ranks (LAUNCHER_WORLD_SIZE_VARIABLES),
    set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (default 29500) by DeepSpeed's MPI
    discovery, before the options are checked against the number of processes: left to
    `init_distributed`'s one-process defaults, every rank would train alone as rank 0 on GPU 0."""
    if "RANK" in os.environ:
        return
    started = [(name, os.environ[name]) for name in LAUNCHER_WORLD_SIZE_VARIABLES if name in os.environ]
    if not started or int(started[0][1]) <= 1:
        return
    try:
        import mpi4py  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"started by an MPI or SLURM launcher ({started[0][0]}={started[0][1]}) that does not set RANK: the "
            "ranks find each other through mpi4py (DeepSpeed's MPI discovery), which is not installed: "
            "pip install mpi4py, or launch with `deepspeed` (its default launcher, pdsh for several nodes)"
        ) from e
    from deepspeed.comm.comm import mpi_discovery

    mpi_discovery(distributed_port=int(os.environ.get("MASTER_PORT", "29500")), verbose=False)


def init_distributed() -> None:
    """NCCL on GPUs, gloo on CPU; one process without a launcher works too."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:  # one process without a launcher: any free port will do
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
    if not torch.cuda.is_available():
        # DeepSpeed's CPU backend would JIT-compile a shared-memory all-reduce (a C++ compiler, ~30 s
        # the first time) that only its inference path calls, and map a 66 MB /dev/shm buffer per
        # rank that it never removes (a later run on the same port maps the stale flags: a hang).
        # Training reduces through gloo; marked incompatible, the op is neither built nor loaded.
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# What each launcher calls the number of ranks it started on a machine: DeepSpeed's own (LOCAL_SIZE, also
# under its MPICH and Intel MPI runners), torchrun, Open MPI's mpirun (DeepSpeed's openmpi runner),
# MPICH's and Intel MPI's mpiexec.
LOCAL_WORLD_SIZE_VARIABLES = ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")


def local_world_size_from_env() -> int:
    """Ranks on this machine, as the launcher says (LOCAL_WORLD_SIZE_VARIABLES). SLURM's srun (DeepSpeed's
    slurm runner) gives the step's ranks on every machine, e.g. "4(x2),3": the most on any one counts,
    the machine that runs out first. 1 without a launcher."""
    for name in LOCAL_WORLD_SIZE_VARIABLES:
        if name in os.environ:
            return int(os.environ[name])
    per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE")
    if per_node:
        return max(int(count.split("(")[0]) for count in per_node.split(","))
    return 1


def check_shared_memory(
    run: RunConfig,
    train_dataset: KeyedBatchDataset | None,
    micro_batch: int,
    eval_datasets: list[KeyedBatchDataset],
    eval_batch_size: int,
) -> None:
    """The batches the loader workers hold fit in /dev/shm. Workers hand batches over in shared memory;
    when it runs out, the run fails in its first steps with torch's "unable to allocate shared memory".
    A container's default is 64 MB (Docker), less than one worker's three batches at 64 x K=100.
    The training workers keep their batches for the whole run; evaluation adds one loader's at a
    time. Checked before the run folder, on every rank, each counting the ranks of its machine.
    """
    if not run.num_workers or not SHARED_MEMORY.is_dir():
        return
    per_rank = max((shared_memory_bound(d, eval_batch_size, run.num_workers) for d in eval_datasets), default=0)
    if train_dataset is not None:
        per_rank += shared_memory_bound(train_dataset, micro_batch, run.num_workers)
    ranks = local_world_size_from_env()
    fs = os.statvfs(SHARED_MEMORY)
    free = fs.f_bavail * fs.f_frsize
    if ranks * per_rank > free:
        raise ConfigError(
            f"--num_workers {run.num_workers}: the loader workers of {ranks} rank(s) on this machine hold up to "
            f"{ranks * per_rank / 2**20:,.0f} MB of batches in {SHARED_MEMORY}, which has "
            f"{free / 2**20:,.0f} MB free. Use fewer workers (--num_workers 0 builds batches in the training "
            f"process, without shared memory) or give {SHARED_MEMORY} more room (docker run --shm-size 8g)"
        )


def resolve_data(run: RunConfig) -> Path:
    """--data, or the toy world (generated once by rank 0 when absent)."""
    if run.data is not None:
        return Path(run.data)
    from semvlp.data.toy import ensure_toy_world

    if dist.is_main():
        path = ensure_toy_world(TOY_WORLD_DIR)
    dist.barrier()
    if not dist.is_main():
        path = ensure_toy_world(TOY_WORLD_DIR)  # exists now: returns its data.json
    return Path(path)


def check_complete_export(model_class: type[torch.nn.Module], config: SemVLPConfig, folder: str, option: str) -> None:
    """Runs without training (`option`) must not start from freshly initialized heads: every tensor
    of the `model_class` model must come from the SemVLP export `folder`."""
    from safetensors import safe_open

    with torch.device("meta"):  # shapes only: no memory, no draw from the random generator
        model = model_class(config)

    if not is_semvlp_export(folder):
        raise ConfigError(f"{option}: --init_from {folder} is not a SemVLP export")
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise ConfigError(f"{option}: {path} not found")
    with safe_open(str(path), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    missing = [k for k, v in model.state_dict().items() if shapes.get(k) != tuple(v.shape)]
    if missing:
        raise ConfigError(f"{option}: {folder} lacks (or has other shapes for) {missing[:5]}"
                          f"{' ...' if len(missing) > 5 else ''}: is it an export of this task?")  # fmt: skip


# The config fields that shape weights an --init_from brings (word embeddings, visual projection), and
# what the data says of each when they differ.
_DATA_SAYS = {
    "vocab_size": "the data's vocab holds {} tokens: data.json's 'vocab' must be the vocab it was trained with "
    "({vocab})",
    "visual_feat_dim": "the data's feature stores hold {}-dimensional features: its visual projection takes the "
    "features of the detector it was trained with",
}


def _check_init_fits_data(init_from: Path, fields: dict) -> None:
    """An --init_from whose word embeddings or visual projection the data cannot use is named, not
    silently replaced by new weights (a BERT folder has no visual_feat_dim: its projection is new)."""
    theirs = read_config_json(init_from / "config.json")
    for name, says in _DATA_SAYS.items():
        if name in fields and theirs.get(name) not in (None, fields[name]):
            raise ConfigError(
                f"--init_from {init_from} has {name}={theirs[name]}, but "
                + says.format(fields[name], vocab=init_from / "vocab.txt")
            )


def build_model_config(run: RunConfig, **fields) -> SemVLPConfig:
    """The model's config from --model_config, an --init_from folder or --preset, with `fields` set.

    `fields` come from the data (vocab size, label counts); L_s and the kernel backend from the run.
    """
    if run.init_from is not None and checkpoint.is_checkpoint(run.init_from):
        raise ConfigError(
            f"--init_from {run.init_from} is a training checkpoint (DeepSpeed shards): export it first with "
            f"`python -m semvlp.export {run.init_from} --out DIR` and pass --init_from DIR"
        )
    if run.init_from is not None and fields.keys() & _DATA_SAYS.keys():
        _check_init_fits_data(Path(run.init_from), fields)
    overrides = dict(fields, kernel_backend=run.kernel_backend)
    if run.cross_attention_start_layer is not None:
        overrides["cross_attention_start_layer"] = run.cross_attention_start_layer
    try:
        if run.model_config is not None:
            base = SemVLPConfig.from_json_file(run.model_config).to_dict()
            base = {k: v for k, v in base.items() if k in SemVLPConfig().to_dict()}
            config = SemVLPConfig(**{**base, **overrides})
        elif run.init_from is not None and is_semvlp_export(run.init_from):
            config = SemVLPConfig.from_pretrained(run.init_from, **overrides)
            config.validate()
        elif run.init_from is not None:
            config = config_from_bert(run.init_from, **overrides)
        else:
            config = config_from_preset(run.preset, **overrides)
    except ValueError as e:
        option = "--cross_attention_start_layer" if "cross_attention_start_layer" in str(e) else "model config"
        raise ConfigError(f"{option}: {e}") from e
    if run.init_from is not None:
        try:  # a missing or damaged weights file, named before any work
            checkpoint.weights_file(run.init_from)
        except ValueError as e:
            raise ConfigError(f"--init_from {e}") from e
    return config


def check_model_fits_data(config: SemVLPConfig, data: DataConfig, tokenizer, fields: dict) -> None:
    """The model the options build can take this data: its vocabulary, its longest text, and the
    config `fields` the data decides (label counts, answers). Raises ConfigError naming both sides."""
    if config.vocab_size != len(tokenizer):
        raise ConfigError(f"the model's vocab_size={config.vocab_size} but {data.vocab} holds {len(tokenizer)} tokens")
    if data.max_text_len > config.max_position_embeddings:
        raise ConfigError(
            f"the data's max_text_len={data.max_text_len} (data.json) exceeds the model's "
            f"max_position_embeddings={config.max_position_embeddings}: lower max_text_len or use a model with more "
            "positions (a text longer than that would fail mid-run, at the first batch that holds one)"
        )
    for name, value in fields.items():
        if getattr(config, name) != value:
            raise ConfigError(f"the model's {name}={getattr(config, name)} but the data needs {value}")


def initialize_model(model: torch.nn.Module, run: RunConfig) -> None:
    """Load --init_from: a SemVLP export (matching tensors) or a BERT folder."""
    if run.init_from is None:
        return
    if is_semvlp_export(run.init_from):
        with quiet_transformers():  # the line printed below names the tensors the export lacks
            source, loading = type(model).from_pretrained(run.init_from, config=model.config, output_loading_info=True)
        ours, lacking = model.state_dict(), set(loading["missing_keys"])
        # what the export lacks (a task head) keeps the model's own (seeded) initialization
        matching = {
            k: v for k, v in source.state_dict().items() if k in ours and k not in lacking and v.shape == ours[k].shape
        }
        model.load_state_dict(matching, strict=False)
        new = sorted(set(ours) - set(matching))
        if dist.is_main():
            print(f"initialized from SemVLP export {run.init_from}; new tensors: {new}", flush=True)
    else:
        init_from_bert(model, run.init_from)  # which logs what it loaded (info_messages_shown)


def check_options(run: RunConfig, lr: float | None = None, train_batch_size: int | None = None) -> dict:
    """The run's own options checked, the model's and the ds_config's (batch arithmetic included), and
    the resolved ds_config: launchers call it before reading data that can take minutes, and `start`
    calls it again, since a fine-tuning run's length comes from its data.

    `lr` / `train_batch_size` replace the ds_config's (train.override_batch_and_lr). With --resume the
    newest checkpoint must have been trained with this global batch; one saved by another number of
    processes is loaded through DeepSpeed's universal format (checkpoint.load_latest).
    """
    # What SemVLPConfig.validate checks comes from the run's options alone (the data adds only the
    # vocabulary and label counts), so the config they make can be checked first.
    build_model_config(run)
    run_dir = Path(run.output_dir)
    _check_writable(run_dir, "--output_dir")
    if not run.resume and (run_dir / "checkpoints" / checkpoint.POINTER).exists():
        raise ConfigError(
            f"--output_dir {run_dir} already holds a run with checkpoints: pass --resume to continue it "
            "or choose another --output_dir"
        )
    if not run.resume and (left := [name for name in ("metrics.jsonl", "best") if (run_dir / name).exists()]):
        # A run stopped before its first checkpoint: its log would mix with this run's, its best/ outrank it.
        raise ConfigError(
            f"--output_dir {run_dir} holds {' and '.join(left)} of a run that left no checkpoint to resume: "
            "delete them or choose another --output_dir"
        )
    ds_config = resolve_ds_config(run, world_size_from_env(), run_dir, lr, train_batch_size)
    if run.resume:
        tag = checkpoint.latest_tag(run_dir / "checkpoints")
        if tag is None:
            raise ConfigError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}")
        folder = run_dir / "checkpoints" / tag
        # A step is as many examples as before, whatever the number of processes: the schedule's steps
        # keep their size, and the data position maps onto the new sharding (ResumableLoader).
        saved_batch, batch = checkpoint.saved_train_batch_size(folder), ds_config["train_batch_size"]
        if saved_batch != batch:
            option = "--batch_size" if train_batch_size is not None else f"--deepspeed_config {run.deepspeed_config}"
            raise ConfigError(
                f"--resume: {folder} was trained with a global batch (train_batch_size) of {saved_batch}, this run "
                f"has {batch} ({option}). Resume with {saved_batch}, or export the checkpoint (python -m semvlp.export "
                f"{folder} --out DIR) and start a new run with --init_from DIR"
            )
    return ds_config


def _check_writable(folder: Path, option: str) -> None:
    """`folder` is, or can be made, a folder this process may write in."""
    existing = nearest_existing(folder.absolute())
    if not existing.is_dir():
        raise ConfigError(f"{option} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {folder}: {existing} is not writable (permissions, or a read-only file system)")


def start(
    run: RunConfig,
    config: SemVLPConfig,
    lr: float | None = None,
    train_batch_size: int | None = None,
    train_examples: int | None = None,
) -> tuple[Path, dict]:
    """Check the options (`check_options`) and, with --resume, that the newest checkpoint holds the
    model of `config`, is whole and was trained on the schedule of these options and on a training
    split of `train_examples` (`checkpoint.check_same_schedule`); then start the process group.

    Launchers read and check their data before this, and record the run in its folder
    (`record_run`) once the engine is built: a bad option, data file or ds_config, or a refused
    resume, leaves --output_dir as it was.
    """
    ds_config = check_options(run, lr, train_batch_size)
    run_dir = Path(run.output_dir)
    if run.resume:
        ckpt_dir = run_dir / "checkpoints"
        folder = ckpt_dir / checkpoint.latest_tag(ckpt_dir)
        try:
            checkpoint.check_loadable(folder, config, optimizer_group_count(config))
            checkpoint.check_same_schedule(folder, run.__dict__, ds_config, train_examples)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    init_distributed()
    torch.manual_seed(run.seed + dist.rank())  # nanoGPT's seed offset: dropout differs per rank
    return run_dir, ds_config


def record_run(run: RunConfig, run_dir: Path, ds_config: dict) -> None:
    """Write how the run was made into its folder (rank 0): its options, ds_config, versions, git state."""
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        run.save(run_dir / "hparams.json")
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
        (run_dir / "versions.json").write_text(json.dumps(versions(), indent=2) + "\n")
        repo = Path(__file__).resolve().parents[1]
        for name, cmd in (("githash.log", ["git", "rev-parse", "HEAD"]), ("gitdiff.log", ["git", "diff", "HEAD"])):
            try:
                out = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=30).stdout
            except (OSError, subprocess.TimeoutExpired):
                out = "unavailable\n"
            (run_dir / name).write_text(out)
    dist.barrier()


def build_engine(model: torch.nn.Module, ds_config: dict, run: RunConfig):
    """The DeepSpeed engine; with --gradient_checkpointing the model recomputes its blocks in the
    backward, and with --compile its module is compiled in place (state-dict names unchanged)."""
    if run.gradient_checkpointing:
        enable_activation_checkpointing(model)
    # DeepSpeed's monitors make their folders (by default in the run folder) before it builds the
    # optimizer: those a rejected ds_config made are removed
    outputs = [Path(m["output_path"]) for m in ds_config.values() if isinstance(m, dict) and "output_path" in m]
    made = [path for path in (Path(run.output_dir), *outputs) if not path.exists()]
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=optimizer_groups(model), config=ds_config)
    except (TypeError, AssertionError, KeyError) as e:  # e.g. an optimizer or scheduler parameter it lacks
        if dist.is_main():
            for path in made:
                shutil.rmtree(path, ignore_errors=True)
        message = f"{type(e).__name__}: {e}"
        raise ConfigError(f"--deepspeed_config {run.deepspeed_config}: DeepSpeed rejects it: {message}") from e
    # The fused ops for the engine's device and precision, chosen (and shown: info_messages_shown) now,
    # not in the middle of the first step's progress bar.
    engine.module.kernel_ops(next(engine.module.parameters()))
    if run.compile:
        mode = {} if run.compile_mode == "default" else {"mode": run.compile_mode}
        engine.compile(backend=run.compile_backend, compile_kwargs=mode)
    return engine


def export(run_dir: Path, ckpt_dir: Path | None = None) -> Path:
    """Export the newest checkpoint in `ckpt_dir` (default run_dir/checkpoints) to run_dir/export, on
    rank 0 (semvlp.export: fp32 weights via save_pretrained, plus the tokenizer's files)."""
    out = run_dir / "export"
    if dist.is_main():
        export_checkpoint(ckpt_dir if ckpt_dir is not None else run_dir / "checkpoints", out, overwrite=True)
    dist.barrier()
    return out
