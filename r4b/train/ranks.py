"""Rank helpers that work with and without torch.distributed: the one place checkpointing and the run
lifecycle (r4b.train.checkpoint, r4b.train.runtime) ask "which rank am I" and "wait for the others".
Imports torch.distributed only, so any training module can use it without import cycles."""

from __future__ import annotations

import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if _distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank() -> int:
    """This process's rank; 0 outside torch.distributed."""
    return world()[0]


def barrier() -> None:
    """Wait for every rank; a no-op outside torch.distributed."""
    if _distributed():
        dist.barrier()
