"""The packed training forward of every supported model family, to the final hidden states.

R-4B / LLaVA-OneVision: :func:`r4b.models.packed_hidden_states` (positions [N], ``pixel_values`` +
``image_sizes``). Qwen2.5-VL / Qwen3-VL: :func:`r4b.models.mrope.packed_vl_forward` (mRoPE positions
[3, N], ``pixel_values`` + ``image_grid_thw``). The model's config decides. The losses take the result
with ``model.lm_head.weight``; no logits are built.
"""

from __future__ import annotations

import torch

from .attention import ATTENTION_NAME
from .mrope import packed_vl_forward, use_varlen_attention
from .packed import packed_hidden_states
from .qwen_vl import is_qwen_vl


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
) -> torch.Tensor:
    """Final hidden states [N, H] of one packed row (``segment_ids``: shared-prefix responses)."""
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
    extra = {"segment_ids": segment_ids} if segment_ids is not None else {}
    out = packed_vl_forward(
        model,
        input_ids,
        position_ids,
        cu_seqlens,
        int(max_seqlen),
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        **extra,
    )
    return out.last_hidden_state[0]
