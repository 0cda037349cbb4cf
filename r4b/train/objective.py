"""The training forward as one module, so sharded engines see every parameter used inside it.

FSDP2 and ZeRO-3 gather a module's parameters in its forward hooks. r4b's loss needs the final
hidden states *and* ``lm_head.weight`` (the fused loss never builds the logits), so the whole
computation - packed forward to hidden states, then the fused cross-entropy - runs inside the
``forward`` of this wrapper, which the engine wraps.

Two model families: R-4B (LLaVA-OneVision layout: :func:`r4b.models.packed_hidden_states`, positions [N],
``pixel_values`` + ``image_sizes``) and Qwen2.5-VL / Qwen3-VL (:func:`r4b.models.mrope.packed_vl_forward`,
mRoPE positions [3, N], ``pixel_values`` + ``image_grid_thw``); the model's config decides.
"""

from __future__ import annotations

import torch
from torch import nn

from r4b.kernels import fused_linear_cross_entropy
from r4b.models import packed_hidden_states
from r4b.models.attention import ATTENTION_NAME
from r4b.models.mrope import packed_vl_forward, use_varlen_attention
from r4b.models.qwen_vl import is_qwen_vl


class PackedSFTObjective(nn.Module):
    """``forward(**packed batch) -> sum of token cross-entropies`` (fp32) over the labelled tokens."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.mrope = is_qwen_vl(model)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        targets: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.mrope:
            hidden = self._mrope_hidden_states(
                input_ids, position_ids, cu_seqlens, max_seqlen, pixel_values, image_sizes, image_grid_thw
            )
        else:
            if image_grid_thw is not None:
                raise ValueError("image_grid_thw is for Qwen2.5-VL / Qwen3-VL; an R-4B model takes image_sizes")
            hidden = packed_hidden_states(
                self.model,
                input_ids=input_ids,
                position_ids=position_ids,
                cu_seqlens=cu_seqlens,
                max_seqlen=max_seqlen,
                pixel_values=pixel_values,
                image_sizes=image_sizes,
            )
        weight = self.model.lm_head.weight
        return fused_linear_cross_entropy(hidden, weight.to(hidden.dtype), targets, reduction="sum")

    def _mrope_hidden_states(
        self, input_ids, position_ids, cu_seqlens, max_seqlen, pixel_values, image_sizes, image_grid_thw
    ) -> torch.Tensor:
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
        if self.model.config.text_config._attn_implementation != ATTENTION_NAME:
            use_varlen_attention(self.model)
        out = packed_vl_forward(
            self.model,
            input_ids,
            position_ids,
            cu_seqlens,
            int(max_seqlen),
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
        )
        return out.last_hidden_state[0]
