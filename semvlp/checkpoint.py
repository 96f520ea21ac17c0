"""DeepSpeed checkpoints whose `latest` pointer moves only after a complete save.

Layout of a checkpoint folder:
    latest                  tag of the newest complete checkpoint (written atomically, last)
    step00001000/           DeepSpeed's files (model, ZeRO optimizer shards, scheduler, loss scaler,
                            client_state) + rng_rank{r}.pt per rank + config.json (the model's config
                            and class) + vocab.txt + COMPLETE
      universal/            while a --resume on another number of processes loads it: the same
                            checkpoint in DeepSpeed's universal format (load_latest)
A crash while writing step N leaves `latest` naming step N-k, which is intact: resume uses it.
DeepSpeed's own `latest` is disabled (save_latest=False) because it is written without a rename.
config.json and vocab.txt make each complete checkpoint exportable on its own (semvlp.export).
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from semvlp import dist
from semvlp.data.tokenizer import vocab_file

if TYPE_CHECKING:
    from transformers import PretrainedConfig

POINTER = "latest"
COMPLETE = "COMPLETE"
CONFIG = "config.json"
VOCAB = "vocab.txt"
WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # what from_pretrained reads, in its order
UNIVERSAL = "universal"


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved (a full disk, a lost file system); the previous one is intact."""


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, directory: str | Path, step: int, client_state: dict, keep_last: int, vocab: str | Path) -> Path:
    """Save on every rank (DeepSpeed requires it), then move the pointer and prune old checkpoints.

    `vocab`: the run's WordPiece vocab.txt (or a folder holding one), kept with the weights.
    """
    directory = Path(directory)
    tag = tag_for_step(step)
    if dist.is_main() and (directory / tag).exists() and _pointer(directory) != tag:
        # A save of this step killed before COMPLETE, or a run rolled back past it: its files, maybe of
        # another number of processes (rng_rank*.pt, optimizer shards), must not mix with this save's.
        shutil.rmtree(directory / tag)
    dist.barrier()
    try:
        engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)
        _write_atomically(directory / tag / f"rng_rank{dist.rank()}.pt", lambda p: torch.save(rng_state(), p))
        if dist.is_main():
            _save_model_description(engine.module, vocab, directory / tag)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(directory / tag, ignore_errors=True)  # never complete: `latest` cannot name it
        last = _pointer(directory)
        kept = f"{directory / POINTER} still names {last}" if last else "none is kept"
        raise CheckpointError(
            f"saving checkpoint {directory / tag} failed on rank {dist.rank()} (is the disk full?): {e}. "
            f"The last complete checkpoint is untouched: {kept}"
        ) from e
    dist.barrier()  # every rank's shards are on disk
    if dist.is_main():
        _write_atomically(directory / tag / COMPLETE, lambda p: p.write_text(f"{step}\n"))
        _write_atomically(directory / POINTER, lambda p: p.write_text(tag))
        _prune(directory, step, keep_last)
    dist.barrier()
    return directory / tag


def _save_model_description(model: torch.nn.Module, vocab: str | Path, folder: Path) -> None:
    """config.json naming the model class (as save_pretrained writes it) and vocab.txt."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    _write_atomically(folder / CONFIG, lambda p: p.write_text(config.to_json_string()))
    _write_atomically(folder / VOCAB, lambda p: shutil.copyfile(vocab_file(vocab), p))


def _prune(directory: Path, step: int, keep_last: int) -> None:
    """Keep the checkpoint of `step`, just saved, and the `keep_last - 1` complete ones before it.
    Later ones (a run rolled back to an earlier checkpoint, a stale best/) are not this run's to prune."""
    earlier = sorted(p for p in directory.glob("step*") if (p / COMPLETE).is_file() and p.name < tag_for_step(step))
    for old in earlier[: max(0, len(earlier) - (keep_last - 1))] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _pointer(directory: Path) -> str | None:
    pointer = directory / POINTER
    return pointer.read_text().strip() if pointer.is_file() else None


def latest_tag(directory: str | Path) -> str | None:
    """The newest complete checkpoint's tag, or None when there is none; ValueError for a damaged pointer."""
    tag = _pointer(Path(directory))
    if tag is not None and not (Path(directory) / tag / COMPLETE).is_file():
        complete = sorted(p.name for p in Path(directory).glob("step*") if (p / COMPLETE).is_file())
        raise ValueError(
            f"{Path(directory) / POINTER} names {tag!r}, which has no {COMPLETE} marker: the checkpoint folder is "
            f"damaged. Its complete checkpoints: {', '.join(complete) or 'none'}; write the name of one into "
            f"{Path(directory) / POINTER} to resume from it"
        )
    return tag


def check_shards(folder: Path) -> None:
    """Every torch file of checkpoint `folder` is whole (check_torch_file), before DeepSpeed reads them."""
    for shard in sorted(folder.glob("*.pt")):
        check_torch_file(shard)


def check_torch_file(path: Path) -> None:
    """ValueError naming `path` unless it is a whole torch.save archive: a zip, whose directory at
    its end a truncated file lacks. torch.load's own errors name no file."""
    try:
        with zipfile.ZipFile(path):
            pass
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path}: not a readable torch file (truncated or damaged: {e})") from e


def weights_file(folder: str | Path) -> Path:
    """A model folder's weights (model.safetensors, else pytorch_model.bin), checked readable, so a
    damaged or missing file is named before a run writes anything; ValueError otherwise."""
    folder = Path(folder)
    found = [folder / name for name in WEIGHTS if (folder / name).is_file()]
    if not found:
        raise ValueError(f"{folder}: no weights ({' or '.join(WEIGHTS)})")
    path = found[0]
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt"):  # reads the header, which names every tensor's bytes
                pass
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a readable safetensors file (truncated or damaged: {e})") from e
    else:
        with open(path, "rb") as f:
            zipped = f.read(2) == b"PK"  # torch.save's zip format; older files are plain pickles
        if zipped:
            check_torch_file(path)
    return path


def read_weights(folder: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of a model folder whose names start with `prefix`, named without it: read alone
    from model.safetensors (pytorch_model.bin is read whole)."""
    path = weights_file(folder)
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            names = [name for name in f.keys() if name.startswith(prefix)]  # noqa: SIM118 (not a dict)
            return {name[len(prefix) :]: f.get_tensor(name) for name in names}
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {name[len(prefix) :]: tensor for name, tensor in state.items() if name.startswith(prefix)}


def check_loadable(folder: Path, config: PretrainedConfig, optimizer_groups: int) -> None:
    """ValueError unless checkpoint `folder` holds the model of `config` (check_same_config) in whole
    shards (check_shards), saved with `optimizer_groups` parameter groups: what DeepSpeed would fail
    on, or read wrongly, named first."""
    if (folder / CONFIG).is_file():
        check_same_config(folder, config)
    check_shards(folder)
    saved = len(_model_states(folder)["param_shapes"])  # one entry per optimizer group
    if saved != optimizer_groups:
        # Same world size: DeepSpeed fails on the shards' layout. Another: its universal loader pairs the
        # groups in order and leaves the others at their initialization, without a word.
        raise ValueError(
            f"--resume: {folder} was saved with {saved} optimizer parameter group(s) and this version of semvlp "
            f"trains {optimizer_groups} (the cross-attention sub-layers have a group of their own). Resume it with "
            "the version that saved it (the run folder's versions.json names its git commit), or export it "
            f"(python -m semvlp.export {folder} --out DIR) and start a new run with --init_from DIR"
        )


def check_same_config(folder: Path, config: PretrainedConfig) -> None:
    """ValueError naming the fields where `config` differs from the one saved in checkpoint `folder`,
    before DeepSpeed fails on the weights they shape: the fields its config class defines and the
    labels; not the kernel backend, which may change, nor K (num_objects), which shapes no weight."""
    saved = json.loads((folder / CONFIG).read_text())
    ours = json.loads(config.to_json_string())
    fields = [*inspect.signature(type(config).__init__).parameters, "id2label"]
    free = ("self", "kwargs", "kernel_backend", "num_objects")
    differ = [k for k in fields if k not in free and saved.get(k) != ours.get(k)]
    if differ:
        values = ", ".join(f"{k}={saved.get(k)!r} (this run: {ours.get(k)!r})" for k in differ[:5])
        raise ValueError(
            f"--resume: {folder} holds a model with {values}{' ...' if len(differ) > 5 else ''}. Resume with the "
            "options it was saved with, or export it and start a new run with --init_from"
        )


# The options that shape what the rest of a run does: its learning-rate schedule, data order, masks
# and stream modes. A resume continues the saved run, so they must stay (the global batch: runner).
SCHEDULE_OPTIONS = ("max_steps", "warmup_ratio", "lr", "seed", "stream_schedule", "qa_from_step")


def check_same_schedule(folder: Path, run_options: dict, ds_config: dict, train_examples: int | None = None) -> None:
    """ValueError naming the SCHEDULE_OPTIONS, and the ds_config's optimizer and scheduler sections,
    in which this run differs from the one that saved checkpoint `folder`: DeepSpeed would take the
    new values without a word (its scheduler keeps only the step), and the result would be neither
    the saved run continued nor a new one. So does a training split of another size
    (`train_examples`, this run's): the saved data position would not be one in it."""
    states = _model_states(folder)
    saved = states.get("run", {})
    differ = [
        f"--{name} {saved[name]!r} (this run: {run_options[name]!r})"
        for name in SCHEDULE_OPTIONS
        if name in saved and name in run_options and saved[name] != run_options[name]
    ]
    saved_examples = states.get("loader", {}).get("num_examples")
    if train_examples is not None and saved_examples is not None and saved_examples != train_examples:
        differ.append(f"a training split of {saved_examples} examples (this run's --data: {train_examples})")
    for section in ("optimizer", "scheduler"):
        before, now = states["ds_config"].get(section), ds_config.get(section)
        if before != now:
            differ.append(f"the ds_config's {section} {json.dumps(before)} (this run: {json.dumps(now)})")
    if differ:
        raise ValueError(
            f"--resume: {folder} was trained with {'; '.join(differ)}. A resumed run continues the saved one: resume "
            "with the options it was saved with (the run folder's hparams.json), or export it (python -m "
            f"semvlp.export {folder} --out DIR) and start a new run with --init_from DIR"
        )


def saved_world_size(folder: Path) -> int:
    """How many processes saved the checkpoint in `folder` (one RNG state each)."""
    return len(list(folder.glob("rng_rank*.pt")))


def _model_states(folder: Path) -> dict:
    """DeepSpeed's model states of checkpoint `folder` (memory-mapped: the weights are not read)."""
    states = sorted(folder.glob("*model_states.pt"))
    if not states:
        raise ValueError(f"{folder}: no DeepSpeed model states (*model_states.pt): the checkpoint is damaged")
    check_torch_file(states[0])
    return torch.load(states[0], map_location="cpu", mmap=True, weights_only=False)


def saved_train_batch_size(folder: Path) -> int:
    """The global batch (train_batch_size) of the run that saved checkpoint `folder`: DeepSpeed keeps
    the run's ds_config in its model states."""
    return int(_model_states(folder)["ds_config"]["train_batch_size"])


def load_latest(engine, directory: str | Path) -> dict | None:
    """Restore model, optimizer, scheduler, loss scaler and this rank's RNG; return client_state.

    A checkpoint saved by another number of processes, whose ZeRO optimizer shards split the state
    otherwise, is loaded through DeepSpeed's universal format: rank 0 converts it into a subfolder,
    removed once loaded. The RNG states then start afresh (they are per rank). Which way is decided
    per checkpoint: a fine-tuning run's checkpoints/ and best/ may each have been saved by another
    number of processes.
    """
    tag = latest_tag(directory)
    if tag is None:
        return None
    folder = Path(directory) / tag
    check_loadable(folder, engine.module.config, len(engine.optimizer.param_groups))
    elastic = saved_world_size(folder) != dist.world_size()
    load_dir, load_tag = directory, tag
    if elastic:
        load_dir, load_tag = folder, _to_universal(folder).name
    # DeepSpeed reads its config's load_universal_checkpoint at each load (never while building the
    # engine), so it is set for this checkpoint alone.
    config = engine._config
    universal_before, config.load_universal_checkpoint = config.load_universal_checkpoint, elastic
    try:
        path, client_state = engine.load_checkpoint(
            str(load_dir), tag=load_tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    finally:
        config.load_universal_checkpoint = universal_before
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {folder}")
    if elastic:
        dist.barrier()  # every rank has read it
        if dist.is_main():
            shutil.rmtree(folder / UNIVERSAL)
    else:
        set_rng_state(torch.load(folder / f"rng_rank{dist.rank()}.pt", weights_only=False))
    return client_state


def _to_universal(folder: Path) -> Path:
    """`folder`'s checkpoint in DeepSpeed's universal format, in `folder/universal` (made by rank 0
    with DeepSpeed's converter; the checkpoint itself is left as it is)."""
    out = folder / UNIVERSAL
    if dist.is_main():
        # The converter also writes a `latest_universal` beside its output: both go to a scratch folder.
        scratch = folder / f".{UNIVERSAL}.tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)  # a previous resume's, not removed: converted again
        command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(folder),
                   "--output_folder", str(scratch / UNIVERSAL), "--inject_missing_state",
                   "--num_extract_workers", "2", "--num_merge_workers", "1"]  # fmt: skip
        saved = saved_world_size(folder)
        print(f"{folder} was saved by {saved} process{'es' * (saved > 1)} and this run has {dist.world_size()}: "
              "converting it to DeepSpeed's universal checkpoint format", flush=True)  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(scratch, ignore_errors=True)
            raise CheckpointError(
                f"{folder}: DeepSpeed's universal checkpoint converter failed, so it cannot be resumed on "
                f"{dist.world_size()} processes (resume it on {saved}, or export it and start a new run with "
                f"--init_from):\n{done.stderr[-2000:]}"
            )
        os.replace(scratch / UNIVERSAL, out)
        shutil.rmtree(scratch)
    dist.barrier()
    return out


def is_checkpoint(path: str | Path) -> bool:
    """A step folder (complete or not) or a folder of checkpoints."""
    path = Path(path)
    return (path / POINTER).is_file() or (path / COMPLETE).is_file() or any(path.glob("mp_rank_*_model_states.pt"))


def find_complete(path: str | Path) -> Path:
    """The checkpoint `path` names: a step folder, which must be complete, or a folder of checkpoints
    (`OUTPUT_DIR/checkpoints`, a fine-tuning run's `OUTPUT_DIR/best`), whose newest complete one is taken.

    Raises ValueError naming the path and what is wrong with it.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: no such checkpoint folder")
    if (path / POINTER).is_file():
        return path / latest_tag(path)
    if (path / COMPLETE).is_file():
        return path
    if is_checkpoint(path):
        raise ValueError(f"{path}: incomplete checkpoint (no {COMPLETE} marker): its save did not finish")
    inside = sorted(p.name for p in path.glob("*") if (p / POINTER).is_file())
    hint = f"; it holds the checkpoint folder(s) {', '.join(inside)}" if inside else ""
    raise ValueError(f"{path}: not a checkpoint (a step folder with {COMPLETE}, or a folder with {POINTER}){hint}")
