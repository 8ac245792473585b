"""Multi-process runs on ``torch.distributed`` (started by ``torchrun``); nothing here replaces it.

fastunlearn never starts processes or communicates on its own: a script run by ``torchrun`` initializes
the default process group (:func:`init_from_env` does it from torchrun's environment), and every function
that accepts a process group uses the default one when it is initialized:

- :func:`fastunlearn.empirical_fisher`: each rank runs its share of the batches, then the sums and counts
  are reduced (the sums are compensated, so the result has the bits of a one-process run);
- :func:`fastunlearn.weighted_lowrank_grouped` / :func:`fastunlearn.fila_init`: each rank factors its share
  of the layer batches, then each result is broadcast from the rank that computed it;
- :func:`fastunlearn.unlearn`: DDP or FSDP2 (``fully_shard``) training, data sharded by micro-batch,
  evaluation sharded by sequence and gathered, files written by rank 0.

The helpers below are what those share: who this process is, how to split work, and collectives that do
nothing in a one-process run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Process:
    """This process's place in the run: ``rank`` of ``world_size`` (0 of 1 without a process group)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def current() -> Process:
    """The default process group's rank and size; ``Process(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return Process(dist.get_rank(), dist.get_world_size())
    return Process()


def init_from_env(backend: str | None = None) -> torch.device:
    """Initialize the default process group from torchrun's variables (WORLD_SIZE, RANK, LOCAL_RANK, ...)
    when WORLD_SIZE > 1, and return this process's device: ``cuda:LOCAL_RANK`` (made current) when CUDA is
    available, else the CPU. ``backend``: "nccl" on CUDA, "gloo" on the CPU by default. Idempotent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
    return device


def resolve(distributed: bool | None) -> Process:
    """The process to work as for a ``distributed`` argument: None follows the default process group, False
    works alone even inside one, True requires one of 2+ processes (ValueError otherwise)."""
    process = current() if distributed is not False else Process()
    if distributed and not process.distributed:
        raise ValueError("distributed=True needs an initialized torch.distributed process group of 2+ processes")
    return process


def comm_device() -> torch.device:
    """Where collectives' buffers live: the current CUDA device for NCCL, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def owned(n_items: int, process: Process) -> list[int]:
    """Indices of ``n_items`` work items this rank takes: round robin (rank, rank + world_size, ...)."""
    return list(range(process.rank, n_items, process.world_size))


def balanced_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each item: the largest items first, each to the least loaded rank (ties: lowest rank).
    Deterministic, so every rank computes the same assignment."""
    load = [0.0] * world_size
    owners = [0] * len(costs)
    for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[k], load[rank] = rank, load[rank] + costs[k]
    return owners


def all_reduce_sum(values: Sequence[int]) -> list[int]:
    """Integers summed over the ranks (returned as given without a process group)."""
    process = current()
    if not process.distributed:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.int64, device=comm_device())
    dist.all_reduce(t)
    return t.tolist()


def gather_rows(local: Tensor, index: Tensor, n_total: int) -> Tensor:
    """Every rank's ``local`` rows (N_r, ...) put back at their ``index`` (N_r,) positions of an (n_total, ...)
    tensor on every rank; the indices of all ranks together must cover 0..n_total - 1 once."""
    process = current()
    if not process.distributed:
        out = local.new_empty((n_total, *local.shape[1:]))
        out[index.to(local.device)] = local
        return out
    device = comm_device()
    width = -(-n_total // process.world_size)  # every rank sends the same number of rows
    padded = local.new_zeros((width, *local.shape[1:]), device=device)
    padded[: len(local)] = local.to(device)
    padded_index = torch.full((width,), -1, dtype=torch.int64, device=device)
    padded_index[: len(index)] = index.to(device)
    rows = [torch.empty_like(padded) for _ in range(process.world_size)]
    indices = [torch.empty_like(padded_index) for _ in range(process.world_size)]
    dist.all_gather(rows, padded)
    dist.all_gather(indices, padded_index)
    rows, indices = torch.cat(rows), torch.cat(indices)
    keep = indices >= 0
    out = local.new_empty((n_total, *local.shape[1:]), device=device)
    out[indices[keep]] = rows[keep]
    return out.to(local.device)


def raise_together(error: BaseException | None) -> None:
    """Raise on EVERY rank when any rank failed (one rank raising alone would leave the others waiting in
    their next collective): the failing rank re-raises its own error, the others a RuntimeError naming it."""
    process = current()
    if not process.distributed:
        if error is not None:
            raise error
        return
    failed = torch.tensor([process.rank if error is not None else process.world_size], device=comm_device())
    dist.all_reduce(failed, op=dist.ReduceOp.MIN)  # the lowest failing rank, world_size if none
    first = int(failed)
    if error is not None:
        raise error
    if first < process.world_size:
        raise RuntimeError(f"rank {first} failed (see its error); stopping rank {process.rank} too")


def barrier() -> None:
    if current().distributed:
        dist.barrier()
