"""Images -> R-4B inputs without torchvision, and the exact number of ``<image>`` tokens each image becomes.

Pixels come from transformers' own ``LlavaOnevisionImageProcessorPil`` (PIL + numpy backend): the base tile
(the whole image resized to one tile) followed by the AnyRes tiles of the best grid pinpoint. Every image is
tiled, as LLaVA-OneVision does for a single image (``batch_num_images`` is never passed to the model).
:meth:`RImageProcessor.num_image_tokens` replays LLaVA-OneVision's ``pack_image_features`` on shapes alone
(grid choice, unpadding, ``anyres_max_N`` downscale, one newline per row): the count of
:mod:`r4b.models.hub.image_processing_r4b`, the export's remote code, so r4b and a user without r4b expand
``<image>`` alike.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape

from .hub import PROCESSOR_AUTO_MAP
from .hub.image_processing_r4b import image_token_count, max_num_patches

# SigLIP's normalisation (R-4B's vision tower is SigLIP2-so400m).
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


class RImageProcessor:
    """AnyRes tiling for LLaVA-OneVision-style models: ``preprocess`` for pixels, ``num_image_tokens`` for counts."""

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        image_grid_pinpoints: Sequence[Sequence[int]],
        vision_aspect_ratio: str = "anyres_max_9",
        image_mean: Sequence[float] = SIGLIP_MEAN,
        image_std: Sequence[float] = SIGLIP_STD,
    ) -> None:
        for pin in image_grid_pinpoints:
            if len(pin) != 2 or pin[0] % image_size or pin[1] % image_size:
                raise ValueError(f"image_grid_pinpoints entry {pin} is not a multiple of the tile size {image_size}")
        self.image_size, self.patch_size = image_size, patch_size
        self.image_grid_pinpoints = [list(p) for p in image_grid_pinpoints]
        self.vision_aspect_ratio = vision_aspect_ratio
        self.max_num_patches = max_num_patches(vision_aspect_ratio)
        self._pil = LlavaOnevisionImageProcessorPil(
            size={"height": image_size, "width": image_size},
            image_grid_pinpoints=self.image_grid_pinpoints,
            image_mean=list(image_mean),
            image_std=list(image_std),
        )

    @classmethod
    def from_config(cls, config, **kwargs) -> RImageProcessor:
        """The processor matching a LLaVA-OneVision / R-4B config (tile size, patch size, pinpoints, max tiles);
        keyword arguments override those or set ``image_mean`` / ``image_std``."""
        if config.vision_feature_select_strategy != "full":
            strategy = config.vision_feature_select_strategy
            raise ValueError(f"config.vision_feature_select_strategy={strategy!r}: only 'full' is supported")
        fields = {
            "image_size": config.vision_config.image_size,
            "patch_size": config.vision_config.patch_size,
            "image_grid_pinpoints": config.image_grid_pinpoints,
            "vision_aspect_ratio": config.vision_aspect_ratio,
        }
        return cls(**{**fields, **kwargs})

    @classmethod
    def from_pretrained(cls, directory: str | Path, config) -> RImageProcessor:
        """From a model directory: geometry from ``config``, normalisation from its preprocessor_config.json
        when there is one (SigLIP's 0.5 / 0.5 otherwise)."""
        path = Path(directory) / "preprocessor_config.json"
        saved = json.loads(path.read_text()) if path.exists() else {}
        stats = {k: saved[k] for k in ("image_mean", "image_std") if k in saved}
        return cls.from_config(config, **stats)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write preprocessor_config.json (transformers' LlavaOnevisionImageProcessor format) and
        processor_config.json, which makes ``AutoProcessor`` (what vLLM's ``rvl`` model loads) build a
        ``LlavaOnevisionProcessor`` with R-4B's token counts, and with ``trust_remote_code=True`` the export's own
        ``RProcessor`` (both files' ``auto_map``, :mod:`r4b.models.hub`). Written by hand: constructing the
        LLaVA-OneVision processor needs torchvision, which r4b does not."""
        self._pil.save_pretrained(str(directory))
        path = Path(directory) / "preprocessor_config.json"
        saved = json.loads(path.read_text())
        saved["auto_map"] = dict(PROCESSOR_AUTO_MAP)
        path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        side = self.image_size // self.patch_size
        processor = {
            "auto_map": dict(PROCESSOR_AUTO_MAP),
            "processor_class": "LlavaOnevisionProcessor",
            "num_image_tokens": side * side,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": self.vision_aspect_ratio,
            "image_token": "<image>",
            "video_token": "<video>",
        }
        (Path(directory) / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")

    def preprocess(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """``{"pixel_values": [num_images, max_tiles, 3, S, S] float32, "image_sizes": [num_images, 2] (H, W)}``.

        Images with fewer tiles than ``max_tiles`` are zero-padded; the model slices each by its ``image_sizes``.
        """
        if len(images) == 0:
            raise ValueError("preprocess needs at least one image")
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise TypeError(f"image {i} is a {type(image).__name__}, not a PIL.Image")
            if min(image.size) < 1:
                raise ValueError(f"image {i} has an empty size {image.size}")
        out = self._pil(list(images), return_tensors="pt")
        return {"pixel_values": out["pixel_values"].float(), "image_sizes": out["image_sizes"].long()}

    def num_tiles(self, height: int, width: int) -> int:
        """Tiles the vision tower sees for an image: the base tile plus the AnyRes grid."""
        rows, cols = get_anyres_image_grid_shape([height, width], self.image_grid_pinpoints, self.image_size)
        return 1 + rows * cols

    def num_image_tokens(self, height: int, width: int) -> int:
        """The number of features (= ``<image>`` tokens) LLaVA-OneVision's ``pack_image_features`` makes of an image."""
        return image_token_count(
            height,
            width,
            image_size=self.image_size,
            patch_size=self.patch_size,
            image_grid_pinpoints=self.image_grid_pinpoints,
            vision_aspect_ratio=self.vision_aspect_ratio,
        )
