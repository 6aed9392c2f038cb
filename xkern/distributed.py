"""``torch.distributed`` as xkern uses it: the process group under ``torchrun``, contiguous shards of a
list, and gathering per-rank results back into one array in the original order.

No launcher or transport of its own: ``torchrun`` starts the processes, gloo (CPU) or NCCL (GPUs)
carries the data.
"""

from __future__ import annotations

import atexit
import os

import numpy as np
import torch
import torch.distributed as dist

from xkern.errors import InputError


def dist_setup() -> tuple[int, int]:
    """(rank, world size); starts the process group under ``torchrun`` (gloo on CPU, nccl on GPUs) and has it
    destroyed at interpreter exit (:func:`dist_teardown`), whoever called: the command line or a script."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(dist_teardown)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def dist_teardown() -> None:
    """Destroy the process group, if one was started, once the work is done: left to interpreter exit, gloo's
    worker threads can outlive Python and abort the process (SIGABRT) after a run that succeeded. Not on an
    error: another rank may still wait in a collective."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_range(n: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous share of ``n`` items; the first ``n % world`` ranks take one more."""
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"rank {rank} is not in a world of {world}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def gather_rows(local: np.ndarray, world: int) -> np.ndarray:
    """Every rank's rows concatenated in rank order (on every rank); ``local`` itself when ``world == 1``."""
    if world == 1:
        return local
    parts: list[np.ndarray | None] = [None] * world
    dist.all_gather_object(parts, local)
    return np.concatenate([p for p in parts if p is not None], axis=0)


def sum_over_ranks(values: list[int], world: int) -> list[int]:
    """Elementwise sum of per-rank counts (on every rank); ``values`` itself when ``world == 1``."""
    if world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t)
    return [int(v) for v in t]
