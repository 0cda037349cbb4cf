"""Qwen2.5-VL and Qwen3-VL (transformers' own classes) as r4b training targets: load, prompt, images, export.

- Model: ``AutoModelForImageTextToText`` (``Qwen2_5_VLForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration``),
  unchanged; the packed forward is :func:`r4b.models.mrope.packed_vl_forward` with per-sample mRoPE positions.
- Prompt: r4b trains R-4B's prompt format on every model family, so the tokenizer's chat template is replaced by
  :data:`QWEN_VL_CHAT_TEMPLATE`: R-4B's ChatML template (``thinking_mode`` switch, mode suffix after
  ``<|im_start|>assistant\\n``) where an image (a ``{"type": "image"}`` part or a literal ``<image>`` in text) renders
  as Qwen's ``<|vision_start|><|image_pad|><|vision_end|>``. No default system prompt is added (Qwen2.5-VL's own
  template adds "You are a helpful assistant."). The exported tokenizer carries this template. The responses keep
  R-4B's text ``<think>\\n...\\n</think>\\n\\n{answer}``: Qwen3-VL's vocabulary has ``<think>`` / ``</think>`` tokens;
  Qwen2.5-VL's has not, so there they are ordinary text (several BPE tokens), which trains and decodes the same.
- Images: :class:`QwenVLImageProcessor`, transformers' ``Qwen2VLImageProcessorPil`` (PIL/numpy, no torchvision):
  ``smart_resize`` to multiples of ``patch_size * merge_size``, patches ``[P, C*T*p*p]`` and ``image_grid_thw``;
  each image is ``grid_t * grid_h * grid_w / merge_size**2`` ``<|image_pad|>`` tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, PretrainedConfig, PreTrainedModel
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

from .mrope import packed_mrope_position_ids
from .tokenizer import chat_template

QWEN_VL_MODEL_TYPES = ("qwen2_5_vl", "qwen3_vl")
IMAGE_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"
VISION_BLOCK = VISION_START + IMAGE_PAD + VISION_END

# The published checkpoints' preprocessing, used when a directory has no preprocessor_config.json.
DEFAULT_PREPROCESSING = {
    "qwen2_5_vl": {
        "min_pixels": 56 * 56,
        "max_pixels": 12845056,  # the published preprocessor_config.json (28 * 28 * 16384)
        "mean": OPENAI_CLIP_MEAN,
        "std": OPENAI_CLIP_STD,
    },
    "qwen3_vl": {"min_pixels": 256 * 256, "max_pixels": 4096 * 4096, "mean": (0.5,) * 3, "std": (0.5,) * 3},
}

QWEN_VL_CHAT_TEMPLATE = chat_template(VISION_BLOCK, f" | replace('<image>', '{VISION_BLOCK}')")


def model_type_of(path: str | Path | None) -> str | None:
    """``model_type`` of a model directory's config.json (None: no directory or no config.json)."""
    if path is None or not (Path(path) / "config.json").is_file():
        return None
    return json.loads((Path(path) / "config.json").read_text()).get("model_type")


def is_qwen_vl(model_or_config: Any) -> bool:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None) in QWEN_VL_MODEL_TYPES


class QwenVLImageProcessor:
    """r4b's :class:`~r4b.data.image.ImageProcessor` for Qwen2.5-VL / Qwen3-VL, plus the packed mRoPE positions.

    ``preprocess`` -> ``{"pixel_values": [P, C*T*p*p] float32, "image_grid_thw": [n, 3] int64}``;
    :meth:`packed_position_ids` gives the ``[3, N]`` positions of a packed row (the collate calls it), which is
    why the processor holds the model's config.
    """

    image_token = IMAGE_PAD

    def __init__(self, config: PretrainedConfig, pil: Qwen2VLImageProcessorPil) -> None:
        if not is_qwen_vl(config):
            raise ValueError(f"not a Qwen2.5-VL / Qwen3-VL config: model_type {config.model_type!r}")
        vision = config.vision_config
        expected = (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
        found = (pil.patch_size, pil.merge_size, pil.temporal_patch_size)
        if found != expected:
            raise ValueError(
                f"image processor (patch_size, merge_size, temporal_patch_size) {found} != the model's vision "
                f"config (patch_size, spatial_merge_size, temporal_patch_size) {expected}"
            )
        self.config = config
        self._pil = pil

    @classmethod
    def from_config(cls, config: PretrainedConfig, **kwargs: Any) -> QwenVLImageProcessor:
        """Geometry from the model config, pixel limits and normalisation from the published defaults (or kwargs:
        ``min_pixels``, ``max_pixels``, ``image_mean``, ``image_std``)."""
        vision, defaults = config.vision_config, DEFAULT_PREPROCESSING[config.model_type]
        fields = {
            "patch_size": vision.patch_size,
            "merge_size": vision.spatial_merge_size,
            "temporal_patch_size": vision.temporal_patch_size,
            "min_pixels": defaults["min_pixels"],
            "max_pixels": defaults["max_pixels"],
            "image_mean": list(defaults["mean"]),
            "image_std": list(defaults["std"]),
        }
        return cls(config, Qwen2VLImageProcessorPil(**{**fields, **kwargs}))

    @classmethod
    def from_pretrained(cls, directory: str | Path | None, config: PretrainedConfig) -> QwenVLImageProcessor:
        """The directory's preprocessor_config.json when it has one, else :meth:`from_config`."""
        if directory is not None and (Path(directory) / "preprocessor_config.json").is_file():
            return cls(config, Qwen2VLImageProcessorPil.from_pretrained(str(directory)))
        return cls.from_config(config)

    @classmethod
    def for_model(cls, model: PreTrainedModel) -> QwenVLImageProcessor:
        """The processor of the directory ``model`` was loaded from (``config._name_or_path``), else the defaults."""
        source = model.config._name_or_path
        return cls.from_pretrained(source if source and Path(source).is_dir() else None, model.config)

    def save_pretrained(self, directory: str | Path) -> None:
        """preprocessor_config.json, which ``AutoImageProcessor`` loads (``Qwen2VLImageProcessor``)."""
        self._pil.save_pretrained(str(directory))

    @property
    def merge_size(self) -> int:
        return self._pil.merge_size

    def grid_hw(self, height: int, width: int) -> tuple[int, int]:
        """``(grid_h, grid_w)`` in patches after ``smart_resize``, as ``preprocess`` makes them."""
        patch = self._pil.patch_size
        size = self._pil.size
        h, w = smart_resize(height, width, patch * self.merge_size, size["shortest_edge"], size["longest_edge"])
        return h // patch, w // patch

    def num_image_tokens(self, height: int, width: int) -> int:
        grid_h, grid_w = self.grid_hw(height, width)
        return grid_h * grid_w // self.merge_size**2

    def preprocess(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        out = self._pil(list(images), return_tensors="pt")
        return {"pixel_values": out["pixel_values"].float(), "image_grid_thw": out["image_grid_thw"].long()}

    def packed_position_ids(
        self, input_ids_per_sample: Sequence[torch.Tensor], image_grid_thw_per_sample: Sequence[torch.Tensor | None]
    ) -> torch.Tensor:
        """``[3, N]`` mRoPE positions of a packed row, each sample's own (restarting at 0)."""
        return packed_mrope_position_ids(self.config, input_ids_per_sample, image_grid_thw_per_sample)


def check_qwen_vl_tokenizer(tokenizer: Any, config: PretrainedConfig) -> None:
    """The tokenizer must fit the model: vocabulary size and the ids of the vision tokens."""
    vocab = config.text_config.vocab_size
    if len(tokenizer) > vocab:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size {vocab}")
    for token, name in ((IMAGE_PAD, "image_token_id"), (VISION_START, "vision_start_token_id")):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id != getattr(config, name):
            raise ValueError(f"tokenizer's {token} id {token_id} != the model's {name} {getattr(config, name)}")


def prepare_qwen_vl_tokenizer(tokenizer: Any, config: PretrainedConfig) -> Any:
    """``tokenizer``, checked against the model (:func:`check_qwen_vl_tokenizer`), with r4b's prompt template set."""
    check_qwen_vl_tokenizer(tokenizer, config)
    tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE
    return tokenizer


def load_qwen_vl(path: str | Path, tokenizer: Any, **kwargs: Any) -> tuple[PreTrainedModel, Any, QwenVLImageProcessor]:
    """A Qwen2.5-VL / Qwen3-VL directory: the stock model (``kwargs`` to ``from_pretrained``), ``tokenizer`` with
    r4b's prompt template set, and the image processor from the directory's preprocessor_config.json."""
    model = AutoModelForImageTextToText.from_pretrained(str(path), **kwargs)
    if not is_qwen_vl(model):
        raise ValueError(f"{path}: model_type {model.config.model_type!r} is not one of {QWEN_VL_MODEL_TYPES}")
    processor = QwenVLImageProcessor.from_pretrained(path, model.config)
    return model, prepare_qwen_vl_tokenizer(tokenizer, model.config), processor


def save_qwen_vl(
    model: PreTrainedModel, out: str | Path, tokenizer: Any = None, processor: QwenVLImageProcessor | None = None
) -> Path:
    """Export with transformers' own ``save_pretrained`` (config, safetensors), the tokenizer (with r4b's chat
    template) and preprocessor_config.json. Without ``processor``: the one of the directory the model was loaded
    from (``config._name_or_path``), else the published defaults."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if processor is None:
        processor = QwenVLImageProcessor.for_model(model)
    model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    processor.save_pretrained(out)
    return out
