"""The packed training forward of R-4B / LLaVA-OneVision: one row of N tokens from several samples.

The vision tower and projector run as in LLaVA-OneVision (``get_image_features``: AnyRes tiles, unpadding,
newlines; the tower keeps its own attention implementation); the features replace the ``<image>`` tokens in
order, as LLaVA-OneVision's ``masked_scatter`` does; the language model runs with ``r4b_varlen`` attention
and the row's :class:`~r4b.kernels.packed_layout.PackedLayout` (``cu_seqlens``) so that no token sees another
sample. The result is the final hidden state (after the last norm), for r4b's fused losses with
``model.lm_head.weight`` -- never an [N, V] logits tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionForConditionalGeneration

from .attention import packed_layout, register_varlen_attention
from .vision import vision_dtype, vision_dummy_term


def use_varlen_language_model(model: torch.nn.Module) -> str:
    """Switch only the language model of a LLaVA-OneVision-style model to ``r4b_varlen`` (the vision tower keeps
    its implementation; for the whole model see :func:`r4b.models.mrope.use_varlen_attention`). Persistent on
    purpose: gradient-checkpoint recomputation must see the same attention."""
    base = model.model if isinstance(model, LlavaOnevisionForConditionalGeneration) else model
    name = register_varlen_attention()
    if base.language_model.config._attn_implementation != name:
        base.language_model.set_attn_implementation(name)
    return name


def packed_hidden_states(
    model: torch.nn.Module,
    *,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    pixel_values: torch.Tensor | None = None,
    image_sizes: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    bidir_ids: torch.Tensor | None = None,
    vision_every_step: bool = False,
    cu_seqlens_host: Sequence[int] | None = None,
) -> torch.Tensor:
    """Final hidden states [N, H] of a packed row through an R-4B (or any LLaVA-OneVision) model.

    ``input_ids`` / ``position_ids`` [N] (positions restart at 0 in each sample), ``cu_seqlens`` int32 [S+1]
    sample boundaries, ``max_seqlen`` the longest sample. ``pixel_values`` [num_images, max_tiles, 3, S, S] and
    ``image_sizes`` [num_images, 2] cover the row's images in token order; the row must hold exactly
    ``sum(num_image_tokens)`` ``<image>`` tokens. ``segment_ids`` / ``bidir_ids`` [N] reach r4b's varlen
    attention (shared-prefix responses, bidirectional blocks). Switches the language model to ``r4b_varlen``.
    ``pixel_values`` are cast to the vision tower's parameter dtype. ``vision_every_step``: a row without images
    still runs the vision tower, on a blank image contributing exactly zero (:func:`r4b.models.forward.
    vision_dummy_term`), so that every rank of a sharded engine runs the same modules. ``cu_seqlens_host``:
    ``cu_seqlens``' values on the host, where known (else read once from the device).
    """
    if position_ids.shape != input_ids.shape:
        raise ValueError(f"position_ids shape {tuple(position_ids.shape)} != input_ids shape {tuple(input_ids.shape)}")
    layout = packed_layout(
        input_ids, position_ids, cu_seqlens, max_seqlen, cu_seqlens_host, segment_ids=segment_ids, bidir_ids=bidir_ids
    )
    base = model.model if isinstance(model, LlavaOnevisionForConditionalGeneration) else model
    use_varlen_language_model(base)

    embeds = base.get_input_embeddings()(input_ids)
    image_mask = input_ids == base.config.image_token_id
    num_image_tokens = int(image_mask.sum())
    if pixel_values is not None:
        if image_sizes is None or image_sizes.shape[0] != pixel_values.shape[0]:
            raise ValueError("pixel_values needs image_sizes [num_images, 2], one row per image")
        pixel_values = pixel_values.to(vision_dtype(base))
        features = base.get_image_features(pixel_values, image_sizes, return_dict=True).pooler_output
        features = torch.cat(list(features), dim=0).to(embeds.dtype)
        if features.shape[0] != num_image_tokens:
            raise ValueError(
                f"the row holds {num_image_tokens} <image> tokens but its {pixel_values.shape[0]} images give "
                f"{features.shape[0]} features: expand each <image> to RImageProcessor.num_image_tokens(h, w)"
            )
        embeds = embeds.masked_scatter(image_mask[:, None], features)
    elif num_image_tokens:
        raise ValueError(f"the row holds {num_image_tokens} <image> tokens but no pixel_values were given")
    elif vision_every_step:
        embeds = embeds + vision_dummy_term(model, embeds.device).to(embeds.dtype)

    out = base.language_model(
        inputs_embeds=embeds[None], position_ids=position_ids[None], r4b_layout=layout, use_cache=False
    )
    return out.last_hidden_state[0]
