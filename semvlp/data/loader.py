"""Deterministic, sharded, resumable batch loading shared by pre-training and fine-tuning.

The unit of work is a whole batch. A `BatchKey` names it: (seed, epoch, global batch number,
example indices). A dataset item *is* a batch: `dataset[key]` builds it with a random
generator seeded from the key alone, so the batch does not depend on the number of
DataLoader workers, on which worker built it, or on what came before. That gives:

- determinism from (seed, epoch, rank, world_size);
- exact mid-epoch resume: the loader's state is just (epoch, batches consumed), and a
  resumed run regenerates the same keys and therefore the same batches;
- fewer copies: one worker reads each image's features straight into the batch tensor,
  allocated in shared memory, instead of per-sample arrays that a collate function stacks
  and the worker queue then copies again;
- with `reuse_buffers=True` (the trainer's training loaders), each worker writes its batches into
  a few shared-memory buffers it keeps, instead of fresh shared memory per batch, whose pages
  cost more to fault in than the batch costs to read (see `_WorkerBuffers`). A batch's tensors
  are then valid only until the consumer asks for the next batch: it must not keep batches.

Sharding follows torch's DistributedSampler: one permutation of all examples per (seed,
epoch), rank r takes positions r, r + W, r + 2W, ... In training every rank gets the same
number of full batches (the remainder is dropped); in evaluation nothing is dropped or
repeated, so ranks may get one batch more or less.
"""

from __future__ import annotations

import functools
import mmap
import multiprocessing.util
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

PREFETCH_FACTOR = 2  # batches each DataLoader worker prepares ahead (torch's default)


@dataclass(frozen=True)
class BatchKey:
    """Everything that determines one batch."""

    seed: int
    epoch: int
    batch: int  # global batch number: local batch * world_size + rank
    indices: tuple[int, ...]  # example indices into the dataset

    def rng(self) -> np.random.Generator:
        # Tag 1 separates batch streams from the permutation stream (tag 0).
        return np.random.default_rng([self.seed, self.epoch, 1, self.batch])


class KeyedBatchDataset(Dataset):
    """Base class: `dataset[key]` is the batch named by a BatchKey (see the module docstring)."""

    def __getitem__(self, key: BatchKey) -> dict:
        if _worker_buffers is not None:
            _worker_buffers.start_batch(key)
        return self.make_batch(np.asarray(key.indices, dtype=np.int64), key.rng())

    def make_batch(self, indices: np.ndarray, rng: np.random.Generator) -> dict:
        raise NotImplementedError


class ShardedBatchSampler:
    """The BatchKeys of one rank for any epoch."""

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size={world_size})")
        if drop_last and num_examples // world_size < batch_size:
            raise ValueError(
                f"{num_examples} examples give no full batch of {batch_size} on each of {world_size} ranks"
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last

    def _rank_examples(self) -> int:
        if self.drop_last:
            return (self.num_examples // self.world_size) // self.batch_size * self.batch_size
        return len(range(self.rank, self.num_examples, self.world_size))

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        n = self._rank_examples()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """This rank's example indices for an epoch, in order."""
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch, 0, 0]).permutation(self.num_examples)
        else:
            perm = np.arange(self.num_examples)
        return perm[self.rank :: self.world_size][: self._rank_examples()]

    def keys(self, epoch: int, start: int = 0) -> Iterator[BatchKey]:
        """Batches `start`, `start + 1`, ... of an epoch."""
        order = self.order(epoch)
        b = self.batch_size
        for i in range(start, len(self)):
            yield BatchKey(
                self.seed, epoch, i * self.world_size + self.rank, tuple(order[i * b : (i + 1) * b].tolist())
            )


@dataclass
class _Cursor:
    epoch: int = 0
    position: int = 0  # batches of `epoch` already handed out
    repeatable: bool = False


class _CursorSampler(Sampler):
    """Yields the keys from the cursor's position (read when an iteration starts).

    It holds the cursor, not the ResumableLoader: a reference cycle through the DataLoader
    would leave worker shutdown to the garbage collector, which then waits 5 s per worker.
    """

    def __init__(self, sampler: ShardedBatchSampler, cursor: _Cursor):
        self.sampler, self.cursor = sampler, cursor

    def __iter__(self) -> Iterator[BatchKey]:
        c = self.cursor
        return self.sampler.keys(0, 0) if c.repeatable else self.sampler.keys(c.epoch, c.position)

    def __len__(self) -> int:
        return len(self.sampler)


class _WorkerBuffers:
    """A DataLoader worker's batch buffers in shared memory, reused batch after batch.

    Fresh shared memory per batch costs its page faults on every batch: filling a fresh 100 MB
    batch took ~60 ms against ~15 ms for one already mapped (2-core Intel Xeon), and one worker
    loaded 2,923 samples/s against 9,356 reusing (benchmarks/dataloader.py, batch 256). So the
    worker keeps `depth` slots; each batch takes the next slot, and its i-th `allocate` call gets
    the slot's i-th buffer back when shape and dtype match (else a fresh one, kept in its place:
    the last, smaller batch of an epoch).

    When a slot may be rewritten: DataLoader keeps at most W * prefetch_factor tasks outstanding
    (W workers), so it sends the task of batch n only once the consumer has taken batch
    n - W * prefetch_factor; a batch m <= n - W * prefetch_factor - 1 of the same iteration is then
    done with (the consumer has asked for a later one), and so is every batch of an earlier
    iteration (the consumer has started a new one). Batches that wait in the DataLoader for their
    turn, or in its pin-memory thread, are all later than the consumer's. In order (DataLoader's
    default) it sends batch n to worker n mod W, so with depth = prefetch_factor + 1 a slot comes
    back after W * (prefetch_factor + 1) batches, and always meets that bound. `start_batch` checks
    it all the same, from the batches' keys, and builds a batch that would not in fresh memory. A
    worker's batch numbers rise within an iteration, so one that does not rise starts a new one.
    """

    def __init__(self, depth: int, num_workers: int, world_size: int):
        self.slots: list[list[torch.Tensor]] = [[] for _ in range(depth)]
        self.held: list[tuple[int, int] | None] = [None] * depth  # (epoch, batch number) in each slot
        self.min_gap = num_workers * (depth - 1) + 1  # depth - 1 = prefetch_factor
        self.world_size = world_size
        self.last: tuple[int, int] | None = None  # (epoch, batch number) of the last batch built
        self.batches = 0
        self.slot: list[torch.Tensor] | None = None  # the current batch's; None: fresh memory
        self.used = 0

    def start_batch(self, key: BatchKey) -> None:
        turn = self.batches % len(self.slots)
        self.batches += 1
        self.used = 0
        epoch, number = key.epoch, key.batch // self.world_size  # this rank's batch number in the epoch
        if self.last is not None and (epoch, number) <= self.last:  # a new iteration: every batch is done
            self.held = [None] * len(self.held)
        self.last = (epoch, number)
        held = self.held[turn]
        if held is not None and held[0] == epoch and held[1] < number < held[1] + self.min_gap:
            self.slot = None  # the consumer may still hold batch held[1]
            return
        self.held[turn] = (epoch, number)
        self.slot = self.slots[turn]

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        slot, i = self.slot, self.used
        self.used += 1
        if i < len(slot) and slot[i].shape == shape and slot[i].dtype == dtype:
            return slot[i]
        buffer = torch.empty(shape, dtype=dtype).share_memory_()
        if i < len(slot):
            slot[i] = buffer
        else:
            slot.append(buffer)
        return buffer


# Set in a worker of a loader with reuse_buffers=True, by its worker_init_fn.
_worker_buffers: _WorkerBuffers | None = None


def allocate(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized tensor; in a DataLoader worker, directly in shared memory.

    A worker must hand its tensors to the main process through shared memory; allocating
    there from the start avoids a full copy of the 400 KB/sample features on the way out.
    """
    if get_worker_info() is not None:
        if _worker_buffers is not None and _worker_buffers.slot is not None:
            return _worker_buffers.take(tuple(shape), dtype)
        return torch.empty(shape, dtype=dtype).share_memory_()
    # In the main process, memory from numpy: first-touch page faults on a fresh 100 MB batch
    # cost ~13 ms this way against ~40 ms for torch.empty (measured, torch 2.13 CPU build).
    return torch.from_numpy(np.empty(shape, dtype=torch.empty((), dtype=dtype).numpy().dtype))


def shared_memory_bound(
    dataset: KeyedBatchDataset, batch_size: int, num_workers: int, prefetch_factor: int = PREFETCH_FACTOR
) -> int:
    """The most shared memory (bytes) a loader's workers hold at once, from a batch built here.

    Each worker holds at most prefetch_factor + 1 batches: with reuse_buffers its slots; without,
    the batches in flight (DataLoader keeps at most W * prefetch_factor outstanding) and the one the
    consumer holds. Each tensor takes whole pages. Text is padded per batch, so other batches differ
    from this one by a few KB; the image features, the same in every batch, are nearly all of it.
    """
    batch = dataset.make_batch(np.arange(min(batch_size, len(dataset))), np.random.default_rng(0))
    pages = sum(-(-t.nbytes // mmap.PAGESIZE) for t in batch.values() if isinstance(t, torch.Tensor))
    return num_workers * (prefetch_factor + 1) * pages * mmap.PAGESIZE


def _init_worker(worker_id: int, buffer_depth: int, world_size: int) -> None:
    # SIGTERM and SIGUSR1 are the training process's to handle (semvlp.train.StopSignal: it
    # checkpoints, then stops); a worker that died of one first would fail the steps before the
    # checkpoint. So they are stopped as _stop_workers does, never by SIGTERM.
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    global _worker_buffers
    num_workers = get_worker_info().num_workers
    _worker_buffers = _WorkerBuffers(buffer_depth, num_workers, world_size) if buffer_depth else None


def _stop_workers(loader: DataLoader) -> None:
    """Stop a DataLoader's persistent workers as its iterator does when deleted: tell each to finish,
    join it. (DataLoader has no public call for this.)

    Registered as a multiprocessing finalizer: it runs when the ResumableLoader is collected, or at
    exit if it is still alive then (torch.compile's caches keep it).
    Its exit priority puts it first: multiprocessing's exit handling then closes the index queues
    (priority 10), which would lose the message to finish, and then SIGTERMs the daemonic workers and
    waits for them, forever, since they ignore SIGTERM.
    """
    iterator, loader._iterator = loader._iterator, None
    if iterator is not None:
        iterator._shutdown_workers()


class ResumableLoader:
    """Iterates one rank's batches; a cursor over (epoch, batch) that can be saved and restored.

    `for batch in loader` yields the rest of the current epoch, then moves to the next epoch.
    `state_dict()` is the position after the last batch handed out: load it into a fresh
    loader (same dataset, batch size, seed, world size) and iteration continues with exactly
    the batches an uninterrupted run would have produced. With `repeatable=True` (evaluation)
    every iteration yields the same batches from the start and the state never moves.
    Only one iteration may be active at a time. With `reuse_buffers=True` and workers, a batch's
    tensors may be overwritten once the consumer asks for the next batch (`_WorkerBuffers`): for
    consumers that hold one batch at a time, as the training loop does.
    """

    def __init__(
        self,
        dataset: KeyedBatchDataset,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        repeatable: bool = False,
        pin_memory: bool | None = None,
        prefetch_factor: int = PREFETCH_FACTOR,
        reuse_buffers: bool = False,
    ):
        self.dataset = dataset
        self.sampler = ShardedBatchSampler(
            len(dataset), batch_size, rank, world_size, seed, shuffle=shuffle, drop_last=drop_last
        )
        self.repeatable = repeatable
        self._cursor = _Cursor(repeatable=repeatable)
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        extra = {}
        if num_workers:
            buffer_depth = prefetch_factor + 1 if reuse_buffers else 0
            extra = {
                "prefetch_factor": prefetch_factor,
                "persistent_workers": True,
                "worker_init_fn": functools.partial(_init_worker, buffer_depth=buffer_depth, world_size=world_size),
            }
        # Each new iterator draws a worker base seed; from its own generator, not the global
        # RNG, so that starting an iteration (as a resumed run does) never shifts dropout masks.
        # Batches do not depend on it: they are built from their BatchKey alone.
        self._loader = DataLoader(
            dataset,
            batch_size=None,
            sampler=_CursorSampler(self.sampler, self._cursor),
            num_workers=num_workers,
            pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(seed),
            **extra,
        )
        if num_workers:
            multiprocessing.util.Finalize(self, _stop_workers, args=(self._loader,), exitpriority=100)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.sampler)

    @property
    def epoch(self) -> int:
        return self._cursor.epoch

    @property
    def position(self) -> int:
        """Batches of the current epoch already handed out."""
        return self._cursor.position

    def __iter__(self) -> Iterator[dict]:
        if self.repeatable:
            yield from self._loader
            return
        c = self._cursor
        for batch in self._loader:
            c.position += 1
            yield batch
        c.epoch += 1
        c.position = 0

    def state_dict(self) -> dict:
        s = self.sampler
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": s.seed,
            "world_size": s.world_size,
            "rank": s.rank,
            "batch_size": s.batch_size,
            "num_examples": s.num_examples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position: the same batches follow when the state was saved by as many
        ranks with the same batch size (the rank may differ: each rank restores its own position).

        Saved by another number of ranks or batch size (an elastic resume), the epoch continues with
        the examples it has not handed out yet: micro-batch i of the W ranks together holds the
        epoch order's examples [i*W*b, (i+1)*W*b), so a position covers a prefix of the order, and
        the position here that covers the same prefix is taken. Which rank gets which example, and
        so the batches, differ from those of an uninterrupted run.
        """
        s = self.sampler
        for key in ("seed", "num_examples"):
            if state[key] != getattr(s, key):
                raise ValueError(
                    f"loader state has {key}={state[key]} but this loader has "
                    f"{key}={getattr(s, key)}; the resumed batches would differ"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        saved_step, step = state["world_size"] * state["batch_size"], s.world_size * s.batch_size
        if saved_step != step:
            handed_out = position * saved_step
            if handed_out % step:
                raise ValueError(
                    f"loader state was saved by {state['world_size']} ranks x batch {state['batch_size']} after "
                    f"{handed_out} examples of epoch {epoch}, not a whole number of this loader's "
                    f"{s.world_size} ranks x batch {s.batch_size}"
                )
            position = handed_out // step
            if position >= len(s):  # this sharding drops a longer tail: the epoch is over
                epoch, position = epoch + 1, 0
        if not 0 <= position <= len(s):
            raise ValueError(f"loader state position {position} outside 0..{len(s)}")
        self._cursor.epoch = epoch
        self._cursor.position = position
