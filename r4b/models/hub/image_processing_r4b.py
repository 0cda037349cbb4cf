"""R-4B's image processor and its ``<image>`` token count.

Pixels: LLaVA-OneVision's PIL + numpy image processor (the base tile, the whole image resized to one tile, then the
AnyRes tiles of the best grid pinpoint), pinned so that every install gives the same pixels (no torchvision
backend). :func:`image_token_count` replays LLaVA-OneVision's ``pack_image_features`` on shapes alone (grid
choice, unpadding, ``anyres_max_N`` downscale, one newline per row).

Remote code for ``trust_remote_code=True``: this file is copied into every R-4B-family export made by r4b and
imports only torch and transformers, so the export loads without r4b. r4b's own image processor uses it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape, unpad_image


def max_num_patches(vision_aspect_ratio: str) -> int:
    """N of ``anyres_max_N``."""
    if not (vision_aspect_ratio.startswith("anyres_max_") and vision_aspect_ratio[11:].isdigit()):
        raise ValueError(f"vision_aspect_ratio must look like 'anyres_max_9', got {vision_aspect_ratio!r}")
    return int(vision_aspect_ratio[11:])


def image_token_count(
    height: int,
    width: int,
    *,
    image_size: int,
    patch_size: int,
    image_grid_pinpoints: Sequence[Sequence[int]],
    vision_aspect_ratio: str,
) -> int:
    """The number of features (= ``<image>`` tokens) LLaVA-OneVision's ``pack_image_features`` makes of an image
    of ``height`` x ``width`` pixels (all patch features, "full")."""
    side = image_size // patch_size  # patches per tile side
    rows, cols = get_anyres_image_grid_shape([height, width], [list(p) for p in image_grid_pinpoints], image_size)
    grid = torch.empty(0, rows * side, cols * side)
    _, cur_h, cur_w = unpad_image(grid, [height, width]).shape
    ratio = math.sqrt(cur_h * cur_w / (max_num_patches(vision_aspect_ratio) * side**2))
    if ratio > 1.1:
        cur_h, cur_w = int(cur_h // ratio), int(cur_w // ratio)
    return side * side + cur_h * (cur_w + 1)  # base tile + unpadded grid with one newline per row


class RImageProcessorPil(LlavaOnevisionImageProcessorPil):
    """LLaVA-OneVision's PIL image processor under R-4B's name (same pixels as r4b's training and rollouts)."""


__all__ = ["RImageProcessorPil", "image_token_count", "max_num_patches"]
