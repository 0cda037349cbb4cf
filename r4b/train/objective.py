"""The training forward as one module, so sharded engines see every parameter used inside it.

FSDP2 and ZeRO-3 gather a module's parameters in its forward hooks. r4b's loss needs the final
hidden states *and* ``lm_head.weight`` (the fused loss never builds the logits), so the whole
computation - packed forward to hidden states, then the fused cross-entropy - runs inside the
``forward`` of this wrapper, which the engine wraps.

Both model families (R-4B, Qwen2.5-VL / Qwen3-VL) through :func:`r4b.models.forward.packed_final_hidden`.
"""

from __future__ import annotations

import torch
from torch import nn

from r4b.kernels import fused_linear_cross_entropy
from r4b.models.forward import lm_head_operands, packed_final_hidden


class PackedSFTObjective(nn.Module):
    """``forward(**packed batch) -> sum of token cross-entropies`` (fp32) over the labelled tokens."""

    def __init__(self, model: nn.Module, *, vision_every_step: bool = False) -> None:
        super().__init__()
        self.model = model
        # with several ranks, a micro-batch without images still runs the vision tower (see packed_final_hidden)
        self.vision_every_step = vision_every_step

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
        cu_seqlens_host: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        hidden = packed_final_hidden(
            self.model,
            input_ids=input_ids,
            position_ids=position_ids,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            image_grid_thw=image_grid_thw,
            vision_every_step=self.vision_every_step,
            cu_seqlens_host=cu_seqlens_host,
        )
        hidden, weight = lm_head_operands(self.model, hidden)
        return fused_linear_cross_entropy(hidden, weight, targets, reduction="sum")
