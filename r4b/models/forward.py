"""The packed training forward of every supported model family, to the final hidden states.

R-4B / LLaVA-OneVision: :func:`r4b.models.packed_hidden_states` (positions [N], ``pixel_values`` +
``image_sizes``). Qwen2.5-VL / Qwen3-VL: :func:`r4b.models.mrope.packed_vl_forward` (mRoPE positions
[3, N], ``pixel_values`` + ``image_grid_thw``). The model's config decides. The losses take the result
with ``model.lm_head.weight``; no logits are built.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .attention import ATTENTION_NAME
from .mrope import packed_vl_forward, use_varlen_attention
from .packed import packed_hidden_states
from .qwen_vl import is_qwen_vl
from .vision import vision_dtype, vision_dummy_term


def lm_head_operands(model: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden, lm_head.weight)`` in the dtype the lm_head matmul computes in, for r4b's fused losses.

    Under autocast that is autocast's dtype (as autocast would cast both for ``model.lm_head``: the final norm
    returns fp32 hidden states there); otherwise the weight's dtype (bf16 under FSDP2 / DeepSpeed bf16).
    The losses themselves are fp32 whatever the operands' dtype.
    """
    weight = model.lm_head.weight
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    return hidden.to(dtype), weight.to(dtype)


def packed_final_hidden(
    model: torch.nn.Module,
    *,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    pixel_values: torch.Tensor | None = None,
    image_sizes: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    vision_every_step: bool = False,
    cu_seqlens_host: Sequence[int] | None = None,
) -> torch.Tensor:
    """Final hidden states [N, H] of one packed row (``segment_ids``: shared-prefix responses; ``cu_seqlens_host``:
    ``cu_seqlens``' values on the host, which a :class:`~r4b.packed_row.PackedRow` carries: no device read).

    ``pixel_values`` are cast to the vision tower's dtype here (sharded engines do not cast forward inputs:
    the RL inputs beside them must stay fp32). ``vision_every_step``: a row without images runs the vision
    tower on a blank image contributing exactly zero (:func:`vision_dummy_term`; the trainers set it with
    more than one rank)."""
    if not is_qwen_vl(model):
        if image_grid_thw is not None:
            raise ValueError("image_grid_thw is for Qwen2.5-VL / Qwen3-VL; an R-4B model takes image_sizes")
        return packed_hidden_states(
            model,
            input_ids=input_ids,
            position_ids=position_ids,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            segment_ids=segment_ids,
            vision_every_step=vision_every_step,
            cu_seqlens_host=cu_seqlens_host,
        )
    if image_sizes is not None:
        raise ValueError("image_sizes is for R-4B; a Qwen2.5-VL / Qwen3-VL model takes image_grid_thw")
    if (pixel_values is None) != (image_grid_thw is None):
        raise ValueError("pixel_values and image_grid_thw come together (the Qwen-VL image processor's outputs)")
    if position_ids.ndim != 2:
        raise ValueError(
            f"a Qwen2.5-VL / Qwen3-VL model takes mRoPE position_ids [3, N] (or [4, N]), got "
            f"{tuple(position_ids.shape)}: collate with the model's QwenVLImageProcessor"
        )
    # Language model and vision tower on r4b_varlen; persistent, so activation checkpointing recomputes alike.
    if model.config.text_config._attn_implementation != ATTENTION_NAME:
        use_varlen_attention(model)
    dummy = None
    if pixel_values is not None:
        pixel_values = pixel_values.to(vision_dtype(model.model))
    elif vision_every_step:
        dummy = vision_dummy_term(model, input_ids.device)  # before the language model, as real images run
    out = packed_vl_forward(
        model,
        input_ids,
        position_ids,
        cu_seqlens,
        int(max_seqlen),
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        segment_ids=segment_ids,
        cu_seqlens_host=cu_seqlens_host,
    )
    hidden = out.last_hidden_state[0]
    return hidden if dummy is None else hidden + dummy.to(hidden.dtype)
