"""Packed (varlen) training forward for Qwen2.5-VL and Qwen3-VL: mRoPE position ids and the forward call.

These models rotate queries and keys by three position ids per token (temporal, height, width: "mRoPE"),
which their ``get_rope_index`` derives from the token types and each image's grid. In a packed row of
several samples, each sample gets its own positions, restarting at 0, exactly as if it ran alone:
:func:`packed_mrope_position_ids` calls the model's own ``get_rope_index`` once per sample and concatenates.

How transformers 5.24 takes position ids in these models (``Qwen2_5_VLTextModel`` / ``Qwen3VLTextModel``):
``[3, B, T]`` are the mRoPE rows; ``[4, B, T]`` prepends a row of plain text positions, which only serves to
build the attention mask (sdpa/eager detect packing from positions that restart) and is handed to the
attention function as ``position_ids`` (flash-attn derives cu_seqlens from it). With ``r4b_varlen`` the
packing travels as the row's ``r4b_layout`` and the text row is not needed; both forms work.

The vision tower: its attention calls, unless the implementation's name contains "flash", run once per
image (per window for Qwen2.5-VL's window attention) with no cu_seqlens, so ``r4b_varlen`` serves them as one
bidirectional document each (``module.is_causal`` is False there). But the models forward their own ``**kwargs``
to the vision tower, so the text's ``r4b_layout`` would reach it: :func:`packed_vl_forward` therefore runs
the vision tower first without them and hands its output to the model as ``mm_encoder_outputs`` (transformers
5.24). Where the model's forward has no such parameter (transformers 5.17, which would swallow it in ``**kwargs``
and drop the images), :func:`packed_vl_forward` scatters the vision features into the token embeddings itself and
calls the language model (with Qwen3-VL's deepstack features), as the model's own forward does.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoModel, PretrainedConfig, PreTrainedModel

from .attention import packed_layout, register_varlen_attention

TEXT, IMAGE, VIDEO = 0, 1, 2


class _RopeIndexHost:
    """Stands in for the model instance: the class's ``get_rope_index`` only reads ``self.config`` and helpers."""

    def __init__(self, model_class: type, config: PretrainedConfig) -> None:
        self.config = config
        self._model_class = model_class

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model_class, name).__get__(self)


def base_vl_model(model: PreTrainedModel) -> PreTrainedModel:
    """The part of a VL model that owns ``get_rope_index`` and ``visual``: the model or its ``.model``."""
    for candidate in (model, getattr(model, "model", None)):
        if candidate is not None and hasattr(candidate, "get_rope_index") and hasattr(candidate, "visual"):
            return candidate
    raise TypeError(f"{type(model).__name__} has no get_rope_index/visual: not a Qwen2.5-VL / Qwen3-VL style model")


def _rope_index_host(model_or_config: PreTrainedModel | PretrainedConfig) -> Any:
    if isinstance(model_or_config, PretrainedConfig):
        model_class = AutoModel._model_mapping[type(model_or_config)]
        if not hasattr(model_class, "get_rope_index"):
            raise TypeError(f"{model_class.__name__} ({model_or_config.model_type}) has no get_rope_index (no mRoPE)")
        return _RopeIndexHost(model_class, model_or_config)
    return base_vl_model(model_or_config)


def mm_token_type_ids(config: PretrainedConfig, input_ids: torch.Tensor) -> torch.Tensor:
    """Token types as the processor makes them: 0 text, 1 image placeholder, 2 video placeholder."""
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == config.image_token_id] = IMAGE
    if getattr(config, "video_token_id", None) is not None:
        types[input_ids == config.video_token_id] = VIDEO
    return types


def _check_grids(i: int, types: torch.Tensor, kind: int, grids: torch.Tensor | None, merge: int, name: str) -> None:
    expected = 0 if grids is None else int((grids.prod(-1) // merge**2).sum())
    found = int((types == kind).sum())
    if found != expected:
        raise ValueError(
            f"sample {i}: {found} {name} placeholder tokens but {name}_grid_thw "
            f"{None if grids is None else grids.tolist()} needs {expected}"
        )


def packed_mrope_position_ids(
    model_or_config: PreTrainedModel | PretrainedConfig,
    input_ids_per_sample: Sequence[torch.Tensor],
    image_grid_thw_per_sample: Sequence[torch.Tensor | None] | None = None,
    video_grid_thw_per_sample: Sequence[torch.Tensor | None] | None = None,
    second_per_grid_ts_per_sample: Sequence[torch.Tensor | None] | None = None,
    *,
    text_positions: bool = False,
) -> torch.Tensor:
    """mRoPE position ids of a packed row: ``[3, N]`` (``[4, N]`` with a leading text-position row).

    Sample i has 1-D ``input_ids_per_sample[i]`` and the ``[n_images, 3]`` grids of its own images (``None``:
    none); its positions are the model's ``get_rope_index`` of that sample alone, so they restart at 0.
    ``model_or_config``: a Qwen2.5-VL / Qwen3-VL model (any of its classes) or its top-level config.
    """
    host = _rope_index_host(model_or_config)
    config = host.config
    merge = config.vision_config.spatial_merge_size
    n = len(input_ids_per_sample)
    per_sample = {
        "image_grid_thw": image_grid_thw_per_sample,
        "video_grid_thw": video_grid_thw_per_sample,
        "second_per_grid_ts": second_per_grid_ts_per_sample,
    }
    for name, values in per_sample.items():
        if values is not None and len(values) != n:
            raise ValueError(f"{name}_per_sample has {len(values)} entries for {n} samples")
    rows = []
    for i, ids in enumerate(input_ids_per_sample):
        if ids.ndim != 1 or ids.numel() == 0:
            raise ValueError(f"sample {i}: input_ids must be a non-empty 1-D tensor, got shape {tuple(ids.shape)}")
        extra = {k: v[i] for k, v in per_sample.items() if v is not None and v[i] is not None}
        types = mm_token_type_ids(config, ids)
        _check_grids(i, types, IMAGE, extra.get("image_grid_thw"), merge, "image")
        if "video_grid_thw" in extra or (types == VIDEO).any():
            _check_grids(i, types, VIDEO, extra.get("video_grid_thw"), merge, "video")
        if "image_grid_thw" not in extra and "video_grid_thw" not in extra:  # text only: 1-D positions
            mrope = torch.arange(ids.numel(), device=ids.device).expand(3, -1)
        else:
            mrope = host.get_rope_index(ids[None], mm_token_type_ids=types[None], **extra)[0][:, 0]
        if text_positions:
            mrope = torch.cat([torch.arange(ids.numel(), device=ids.device)[None], mrope])
        rows.append(mrope)
    return torch.cat(rows, dim=1)


def continued_mrope_position_ids(prompt_positions: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``[3, n]`` mRoPE positions of tokens at 1-D ``positions`` of a document that starts with a prompt.

    ``prompt_positions`` ``[3, P]`` are the prompt's own (:func:`packed_mrope_position_ids` of it alone). A token at
    ``q < P`` is prompt token ``q``; ``q >= P`` is text after the prompt (a response), at
    ``prompt_positions.max() + 1 + (q - P)`` in all three rows: what ``get_rope_index`` gives on prompt + response
    and what generation uses (its ``rope_deltas``). Shared-prefix packing (:mod:`r4b.shared_prefix`) gives each
    packed token its 1-D position as if its response followed the prompt alone, so this maps the packed row.
    """
    if prompt_positions.ndim != 2 or prompt_positions.shape[0] != 3 or positions.ndim != 1:
        raise ValueError(
            f"want prompt_positions [3, P] and positions [n]; got {tuple(prompt_positions.shape)}, "
            f"{tuple(positions.shape)}"
        )
    length = prompt_positions.shape[1]
    inside = prompt_positions[:, positions.clamp(max=length - 1)]
    after = (prompt_positions.max() + 1 + positions - length).expand(3, -1)
    return torch.where(positions < length, inside, after)


def use_varlen_attention(model: PreTrainedModel, *, vision: str | None = None) -> str:
    """Whole-model switch: the language model on ``r4b_varlen``, the vision tower on ``vision`` (default:
    ``r4b_varlen`` too). For the language model alone see :func:`r4b.models.packed.use_varlen_language_model`."""
    name = register_varlen_attention()
    model.set_attn_implementation({"": name, "text_config": name, "vision_config": vision or name})
    return name


def packed_vl_forward(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    cu_seqlens_host: Sequence[int] | None = None,
) -> Any:
    """Packed forward of a Qwen2.5-VL / Qwen3-VL model: returns its base model output (``last_hidden_state[1, N, H]``).

    ``input_ids[N]`` is the packed row, ``position_ids`` the ``[3|4, N]`` of :func:`packed_mrope_position_ids`,
    ``cu_seqlens`` / ``max_seqlen`` the sample boundaries; ``pixel_values`` / ``image_grid_thw`` are all the
    row's images in order (the processor's outputs concatenated). The vision tower runs first, without the
    text's packing; ``segment_ids`` (shared-prefix responses) reach the language model's attention only, in the
    row's layout. ``cu_seqlens_host``: ``cu_seqlens``' values where known (else read once from the device).
    No logits: r4b's fused loss takes the hidden states and ``lm_head.weight``.
    """
    if input_ids.ndim != 1 or position_ids.ndim != 2 or position_ids.shape[1] != input_ids.shape[0]:
        raise ValueError(
            f"want input_ids [N] and position_ids [3|4, N]; got {tuple(input_ids.shape)}, {tuple(position_ids.shape)}"
        )
    layout = packed_layout(input_ids, position_ids, cu_seqlens, max_seqlen, cu_seqlens_host, segment_ids=segment_ids)
    base = base_vl_model(model)
    encoded = {}
    if pixel_values is not None:
        encoded["image"] = base.get_image_features(pixel_values, image_grid_thw, return_dict=True)
    if pixel_values_videos is not None:
        encoded["video"] = base.get_video_features(pixel_values_videos, video_grid_thw, return_dict=True)
    if not accepts_mm_encoder_outputs(base):
        return _language_model_forward(base, input_ids, position_ids, encoded, r4b_layout=layout)
    return base(
        input_ids=input_ids[None],
        position_ids=position_ids[:, None],
        mm_encoder_outputs=encoded or None,
        use_cache=False,
        r4b_layout=layout,
    )


def accepts_mm_encoder_outputs(base: PreTrainedModel) -> bool:
    """Whether the VL base model's forward takes precomputed vision outputs (``mm_encoder_outputs``)."""
    return "mm_encoder_outputs" in inspect.signature(type(base).forward).parameters


def _language_model_forward(
    base: PreTrainedModel, input_ids: torch.Tensor, position_ids: torch.Tensor, encoded: dict, **kwargs: Any
) -> Any:
    """The model's forward from ``mm_encoder_outputs`` on, where it has no such parameter: each modality's features
    scattered into its placeholder tokens' embeddings, Qwen3-VL's deepstack features (one tensor per decoder layer
    they are added to) joined over the vision tokens in sequence order, then the language model."""
    config = base.config
    embeds = base.get_input_embeddings()(input_ids[None])
    masks, deepstack = {}, {}
    for kind, token_id in (("image", config.image_token_id), ("video", getattr(config, "video_token_id", None))):
        if kind not in encoded:
            continue
        out = encoded[kind]
        features = torch.cat(list(out.pooler_output)).to(embeds.device, embeds.dtype)
        mask = input_ids[None] == token_id
        if int(mask.sum()) != features.shape[0]:
            raise ValueError(
                f"{kind} features and {kind} tokens do not match: {features.shape[0]} != {int(mask.sum())}"
            )
        embeds = embeds.masked_scatter(mask[..., None], features)
        masks[kind] = mask
        layers = getattr(out, "deepstack_features", None)
        if layers is not None:  # per layer: one [n, H] tensor (5.17) or one per image/video (later versions)
            deepstack[kind] = [f if torch.is_tensor(f) else torch.cat(list(f)) for f in layers]
    extra = {}
    if deepstack:
        visual = torch.zeros_like(input_ids[None], dtype=torch.bool)
        for mask in masks.values():
            visual |= mask
        layers = []
        for per_kind in zip(*deepstack.values(), strict=True):
            joint = per_kind[0].new_zeros(int(visual.sum()), per_kind[0].shape[-1])
            for kind, features in zip(deepstack, per_kind, strict=True):
                joint[masks[kind][visual]] = features.to(joint.dtype)
            layers.append(joint)
        extra = {"visual_pos_masks": visual, "deepstack_visual_embeds": layers}
    return base.language_model(
        input_ids=None, inputs_embeds=embeds, position_ids=position_ids[:, None], use_cache=False, **extra, **kwargs
    )
