"""DeepSpeed checkpoints whose `latest` pointer moves only after a complete save.

Layout of a checkpoint folder:
    latest                  tag of the newest complete checkpoint (written atomically, last)
    step00001000/           DeepSpeed's files (model, ZeRO optimizer shards, scheduler, loss scaler,
                            client_state) + rng_rank{r}.pt per rank + config.json (the model's config
                            and class) + vocab.txt + COMPLETE
A crash while writing step N leaves `latest` naming step N-k, which is intact: resume uses it.
DeepSpeed's own `latest` is disabled (save_latest=False) because it is written without a rename.
config.json and vocab.txt make each complete checkpoint exportable on its own (semvlp.export).
"""

from __future__ import annotations

import copy
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from semvlp import dist
from semvlp.data.tokenizer import vocab_file

POINTER = "latest"
COMPLETE = "COMPLETE"
CONFIG = "config.json"
VOCAB = "vocab.txt"


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
    engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)
    _write_atomically(directory / tag / f"rng_rank{dist.rank()}.pt", lambda p: torch.save(rng_state(), p))
    if dist.is_main():
        _save_model_description(engine.module, vocab, directory / tag)
    dist.barrier()  # every rank's shards are on disk
    if dist.is_main():
        _write_atomically(directory / tag / COMPLETE, lambda p: p.write_text(f"{step}\n"))
        _write_atomically(directory / POINTER, lambda p: p.write_text(tag))
        _prune(directory, keep_last)
    dist.barrier()
    return directory / tag


def _save_model_description(model: torch.nn.Module, vocab: str | Path, folder: Path) -> None:
    """config.json naming the model class (as save_pretrained writes it) and vocab.txt."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    _write_atomically(folder / CONFIG, lambda p: p.write_text(config.to_json_string()))
    _write_atomically(folder / VOCAB, lambda p: shutil.copyfile(vocab_file(vocab), p))


def _prune(directory: Path, keep_last: int) -> None:
    complete = sorted(p for p in directory.glob("step*") if (p / COMPLETE).is_file())
    for old in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest_tag(directory: str | Path) -> str | None:
    """The newest complete checkpoint's tag, or None when there is none."""
    pointer = Path(directory) / POINTER
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (Path(directory) / tag / COMPLETE).is_file():
        raise RuntimeError(f"{pointer} names {tag!r}, which has no {COMPLETE} marker: the checkpoint folder is damaged")
    return tag


def load_latest(engine, directory: str | Path) -> dict | None:
    """Restore model, optimizer, scheduler, loss scaler and this rank's RNG; return client_state."""
    tag = latest_tag(directory)
    if tag is None:
        return None
    folder = Path(directory) / tag
    saved, world = len(list(folder.glob("rng_rank*.pt"))), dist.world_size()
    if saved != world:  # before DeepSpeed, whose error comes as a traceback after a partial load
        raise ValueError(
            f"--resume: {folder} was saved by {saved} processes and this run has {world}; ZeRO's optimizer "
            f"shards cannot be split anew. Resume with {saved} processes, or export the weights "
            f"(`python -m semvlp.export {folder} --out DIR`) and start a new run with --init_from DIR "
            f"(optimizer state, lr schedule and data position then start afresh)"
        )
    path, client_state = engine.load_checkpoint(
        str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {folder}")
    set_rng_state(torch.load(folder / f"rng_rank{dist.rank()}.pt", weights_only=False))
    return client_state


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
        try:
            return path / latest_tag(path)
        except RuntimeError as e:  # a damaged pointer
            raise ValueError(str(e)) from e
    if (path / COMPLETE).is_file():
        return path
    if is_checkpoint(path):
        raise ValueError(f"{path}: incomplete checkpoint (no {COMPLETE} marker): its save did not finish")
    inside = sorted(p.name for p in path.glob("*") if (p / POINTER).is_file())
    hint = f"; it holds the checkpoint folder(s) {', '.join(inside)}" if inside else ""
    raise ValueError(f"{path}: not a checkpoint (a step folder with {COMPLETE}, or a folder with {POINTER}){hint}")
