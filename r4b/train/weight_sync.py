"""Rank 0's full state dict on every rank, one tensor at a time (how sharded trainers refresh rollout copies)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

__all__ = ["broadcast_state_dict"]


def broadcast_state_dict(
    state: dict[str, torch.Tensor] | None, device: torch.device, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """``state`` (given on rank 0, None elsewhere) on every rank as ``(name, tensor)`` pairs on ``device``, one
    tensor at a time: a consumer that loads each pair before taking the next (``RolloutEngine.load_weights``)
    never holds more than one extra tensor. Every rank must consume all pairs (each is a collective).
    ``dtype``: floating-point tensors are sent in it (e.g. the rollout engine's), others as they are.

    Names, shapes and dtypes go as one small object broadcast; the data go tensor by tensor with
    ``dist.broadcast`` (NCCL on GPUs), never as one pickled blob of the whole model.
    """
    main = dist.get_rank() == 0
    if main and state is None:
        raise ValueError("rank 0 must hold the state dict to broadcast")
    cast = lambda t: dtype if dtype is not None and t.is_floating_point() else t.dtype
    layout = [[(name, tuple(t.shape), cast(t)) for name, t in state.items()] if main else None]  # type: ignore[union-attr]
    dist.broadcast_object_list(layout, src=0)
    for name, shape, sent in layout[0]:
        if main:
            tensor = state[name].to(device=device, dtype=sent).contiguous()  # type: ignore[index]
        else:
            tensor = torch.empty(shape, dtype=sent, device=device)
        dist.broadcast(tensor, src=0)
        yield name, tensor
