"""How a trainer refreshes its rollout engine's weights: :func:`sync_rollout_weights` streams the training engine's
full tensors into the rollout engine, cast on the training device to the dtype the rollout engine keeps; engines
that gather on rank 0 send them with :func:`broadcast_state_dict` (rank 0's full state dict on every rank, one tensor
at a time)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["broadcast_state_dict", "rollout_weights_dtype", "sync_rollout_weights"]


def rollout_weights_dtype(rollout_engine: Any) -> torch.dtype | None:
    """The dtype the rollout engine keeps its weights in (the synced tensors are cast to it on the training
    device, never gathered in fp32 to one rank's CPU): its ``weights_dtype`` if it says, a transformers engine's
    model's, else None (the training dtype; the engine's loader casts)."""
    dtype = getattr(rollout_engine, "weights_dtype", None)
    model = getattr(rollout_engine, "model", None)
    if dtype is None and isinstance(model, torch.nn.Module):
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return dtype


def sync_rollout_weights(engine: Any, rollout_engine: Any, prefix: str = "model.") -> None:
    """Load the training ``engine``'s current weights into ``rollout_engine`` (``RolloutEngine.load_weights``), one
    tensor at a time as ``engine.full_tensors`` streams them (a collective: every rank calls it), names without
    ``prefix`` (the objective's attribute holding the model). A model with LoRA adapters streams merged weights,
    base + alpha/rank x BA under the base names (r4b.models.lora.merged_tensors: vLLM cannot apply LoRA to vision
    towers, and the rollout model is the base's class)."""
    from r4b.models.lora import lora_scale, merged_tensors

    dtype = rollout_weights_dtype(rollout_engine)
    module = getattr(engine, "unwrapped_module", None)
    scale = lora_scale(module) if module is not None else None
    if scale is None:
        pairs = engine.full_tensors(dtype=dtype)
    else:  # merged in fp32 from the weights as trained, then cast
        pairs = merged_tensors(engine.full_tensors(dtype=None), scale, dtype)
    rollout_engine.load_weights((name.removeprefix(prefix), tensor) for name, tensor in pairs)


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
