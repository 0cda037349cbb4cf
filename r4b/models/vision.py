"""The vision tower's compute dtype and its zero-contribution pass, shared by every family's packed forward.

:func:`vision_dummy_term` runs the vision tower and projector on a blank image times 0, so that a micro-batch without
images still runs every vision parameter (:func:`r4b.models.packed.packed_hidden_states` for R-4B,
:func:`r4b.models.forward.packed_final_hidden` for Qwen-VL, with ``vision_every_step``).
"""

from __future__ import annotations

import torch

from .qwen_vl import is_qwen_vl


def vision_dtype(base: torch.nn.Module) -> torch.dtype:
    """The dtype the vision tower computes in: its first parameter's as its forward sees it (bf16 once FSDP2 has
    gathered it: that parameter, the patch embedding, belongs to the root unit, gathered before any forward)."""
    for name in ("visual", "vision_tower"):
        tower = getattr(base, name, None)
        if tower is not None:
            return next(p for p in tower.parameters() if p.is_floating_point()).dtype
    return torch.float32


def vision_dummy_term(model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """``0 * sum(features)`` of one blank image through the model's vision tower and projector: a scalar zero
    that runs every vision parameter forward and backward (zero gradients). Added to a micro-batch without
    images, it keeps sharded engines' per-module parameter gathers (FSDP2, ZeRO-3) and gradient reductions
    paired across ranks: a rank that skipped the vision tower while another ran it would hang on NCCL."""
    if is_qwen_vl(model):
        base = model.model
        vision = base.config.vision_config
        merge = int(getattr(vision, "spatial_merge_size", 2))
        patch = int(vision.patch_size)
        channels = int(getattr(vision, "in_channels", getattr(vision, "in_chans", 3)))
        temporal = int(getattr(vision, "temporal_patch_size", 2))
        grid = torch.tensor([[1, merge, merge]], dtype=torch.long, device=device)
        pixels = torch.zeros(merge * merge, channels * temporal * patch * patch, device=device)
        out = base.get_image_features(pixels.to(vision_dtype(base)), grid, return_dict=True)
    else:
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        base = model.model if hasattr(model, "lm_head") and hasattr(model, "model") else model
        config = base.config
        size = int(config.vision_config.image_size)
        tiles = image_size_to_num_patches((size, size), config.image_grid_pinpoints, size)
        pixels = torch.zeros(1, tiles, 3, size, size, device=device, dtype=vision_dtype(base))
        sizes = torch.tensor([[size, size]], dtype=torch.long, device=device)
        out = base.get_image_features(pixels, sizes, return_dict=True)
    # exactly what the real path consumes (its features; Qwen3-VL's deepstack features too): a tensor that the
    # real path leaves without gradient (e.g. a final norm's output) must stay so, or the gradient reductions differ
    used = [out.pooler_output, getattr(out, "deepstack_features", None)]
    floats = [t for t in _leaves(used) if t.is_floating_point()]
    return sum(t.float().sum() for t in floats) * 0.0


def _leaves(value) -> list[torch.Tensor]:
    """The tensors in a model output (a ModelOutput, dict, list or tuple of them, nested)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):  # ModelOutput included
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [t for v in value for t in _leaves(v)]
    return []
