"""Rank helpers over torch.distributed (NCCL on GPUs, gloo on CPU); all work without a process group."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (returns a new tensor)."""
    values = values.clone()
    if is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def host_group() -> dist.ProcessGroup | None:
    """A gloo group of every rank (None without a process group): its collectives take host tensors
    and never wait for a GPU stream, as the default group's (NCCL's on GPUs) would. On clusters where
    gloo picks the wrong network interface, GLOO_SOCKET_IFNAME names the right one."""
    return dist.new_group(backend="gloo") if is_initialized() else None


def start_all_reduce_sum(values: torch.Tensor, group: dist.ProcessGroup | None) -> dist.Work | None:
    """Start summing `values` over the ranks of `group`, in place; the work to wait for (None
    without a process group: `values` is already the sum)."""
    if not is_initialized():
        return None
    return dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group, async_op=True)


def all_gather_object(obj) -> list:
    if not is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
