"""Rank 0's full state dict on every rank, one tensor at a time (how sharded trainers refresh rollout copies)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

__all__ = ["broadcast_state_dict"]


def broadcast_state_dict(
    state: dict[str, torch.Tensor] | None, device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """``state`` (given on rank 0, None elsewhere) on every rank as ``(name, tensor)`` pairs on ``device``, one
    tensor at a time: a consumer that loads each pair before taking the next (``RolloutEngine.load_weights``)
    never holds more than one extra tensor. Every rank must consume all pairs (each is a collective).

    Names, shapes and dtypes go as one small object broadcast; the data go tensor by tensor with
    ``dist.broadcast`` (NCCL on GPUs), never as one pickled blob of the whole model.
    """
    main = dist.get_rank() == 0
    if main and state is None:
        raise ValueError("rank 0 must hold the state dict to broadcast")
    layout = [[(name, tuple(t.shape), t.dtype) for name, t in state.items()] if main else None]  # type: ignore[union-attr]
    dist.broadcast_object_list(layout, src=0)
    for name, shape, dtype in layout[0]:
        if main:
            tensor = state[name].to(device=device, dtype=dtype).contiguous()  # type: ignore[index]
        else:
            tensor = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(tensor, src=0)
        yield name, tensor
