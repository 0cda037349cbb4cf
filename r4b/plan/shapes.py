"""A model's shapes without its weights: the model built on the meta device from its config.json alone.

Counting parameters on the meta model (rather than by formula) is exact for every family r4b trains, tied
embeddings and Qwen3-VL's deepstack mergers included; nothing is allocated and no weight file is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r4b.config.sections import LoraSection
from r4b.errors import InputError


@dataclass(frozen=True)
class Tower:
    """A transformer stack's sizes: what the activation and FLOP estimates read."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Shapes:
    """What the plan needs of a model: parameters per module (``vision`` / ``projector`` / ``llm``, the
    ``model.train`` names), the largest shardable layer, the parameters outside any layer (FSDP2's root unit),
    the language model's and the vision tower's sizes, and how many vision patches make one LLM image token."""

    family: str  # rvl, qwen2_5_vl, qwen3_vl
    params: dict[str, int]
    tensors: dict[str, int]  # parameter tensors per module (AdamW keeps one step counter each)
    embedding: int  # parameters of the input embedding (a lookup: no FLOPs)
    largest_layer: int
    outside_layers: int
    vocab: int
    tied: bool  # lm_head is the input embedding
    llm: Tower
    vision: Tower
    patches_per_image_token: int
    source: str = ""
    layer_params: list[int] = field(default_factory=list)
    # model.lora: the adapters' parameters and parameter tensors (A and B) per module, beside the base's; {}: none
    adapters: dict[str, int] = field(default_factory=dict)
    adapter_tensors: dict[str, int] = field(default_factory=dict)
    adapter_layers: dict[str, list[str]] = field(default_factory=dict)  # the targeted layers' names per module
    lora_rank: int = 0

    @property
    def total(self) -> int:
        """The base model's parameters (the adapters not included)."""
        return sum(self.params.values())

    @property
    def lora(self) -> bool:
        return bool(self.lora_rank)


def load_model_config(path: str | None) -> tuple[Any, str]:
    """The model's config (``model.path``; None: the embedded tiny R-4B) and where it came from. A hub id is read
    from the local Hugging Face cache only: planning never downloads."""
    from r4b.models.r4b_model import register_r4b_model

    register_r4b_model()
    if path is None:
        from r4b.models.tiny import tiny_r4b_config

        return tiny_r4b_config(), "the embedded tiny R-4B"
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True), f"{path}/config.json"
    except (OSError, ValueError) as error:
        if not Path(path).exists():  # nor a hub id in the local cache
            raise InputError(
                f"model.path {path}: no such directory (download the model first; r4b plan reads its config.json only)"
            ) from None
        why = " ".join(str(error).split())[:200]
        raise InputError(f"model.path {path}: no readable config.json: {why}") from None


def model_shapes(path: str | None, lora: LoraSection | None = None) -> Shapes:
    """The :class:`Shapes` of the model at ``path`` (see :func:`load_model_config`); ``lora`` (``model.lora``, rank
    > 0): with the adapters its targets name, rank x (in + out) parameters per targeted linear layer (peft's A and
    B; bench/lora_memory.py checks the count against peft's injected layers)."""
    import torch

    from r4b.train.schedule import module_of

    config, source = load_model_config(path)
    with torch.device("meta"):
        model = _build(config)
    params = {"vision": 0, "projector": 0, "llm": 0}
    tensors = dict(params)
    for name, param in model.named_parameters():  # tied weights are listed once
        params[module_of(name)] += param.numel()
        tensors[module_of(name)] += 1
    layer_classes = _layer_classes(model)
    layers = [m for m in model.modules() if isinstance(m, layer_classes)]
    layer_params = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    family = config.model_type
    merge = getattr(config.vision_config, "spatial_merge_size", 1)
    adapters, adapter_tensors, adapter_layers = _adapters(model, lora)
    return Shapes(
        family=family,
        params=params,
        tensors=tensors,
        embedding=embedding.numel(),
        largest_layer=max(layer_params, default=0),
        outside_layers=sum(params.values()) - sum(layer_params),
        vocab=head.shape[0],
        tied=head is embedding,
        llm=_text_tower(config.text_config),
        vision=_vision_tower(config.vision_config),
        patches_per_image_token=merge * merge,
        source=source,
        layer_params=layer_params,
        adapters=adapters,
        adapter_tensors=adapter_tensors,
        adapter_layers=adapter_layers,
        lora_rank=lora.rank if lora is not None else 0,
    )


def _adapters(model: Any, lora: LoraSection | None) -> tuple[dict[str, int], dict[str, int], dict[str, list[str]]]:
    """(parameters, tensors, targeted layers) per module of the LoRA adapters ``lora`` puts on ``model``; empty
    without LoRA. The targets resolve as training resolves them (r4b.models.lora.lora_targets: its one-line errors
    included)."""
    if lora is None or not lora.rank:
        return {}, {}, {}
    from r4b.models.lora import lora_targets
    from r4b.train.schedule import module_of

    params = {"vision": 0, "projector": 0, "llm": 0}
    tensors = dict(params)
    layers: dict[str, list[str]] = {m: [] for m in params}
    for name in lora_targets(model, lora.targets):
        layer, module = model.get_submodule(name), module_of(f"{name}.weight")
        params[module] += lora.rank * (layer.in_features + layer.out_features)
        tensors[module] += 2
        layers[module].append(name)
    return params, tensors, layers


def _build(config: Any) -> Any:
    if config.model_type == "rvl":
        from r4b.models.r4b_model import RForConditionalGeneration

        return RForConditionalGeneration(config)
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_config(config)


def _layer_classes(model: Any) -> tuple[type, ...]:
    """The units the sharded engines wrap (r4b.train.engine's rule: the ``_no_split_modules`` classes)."""
    from r4b.train.engine import _decoder_layer_classes

    return _decoder_layer_classes(model)


def _text_tower(text: Any) -> Tower:
    heads = text.num_attention_heads
    return Tower(
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
    )


def _vision_tower(vision: Any) -> Tower:
    heads = getattr(vision, "num_attention_heads", None) or vision.num_heads
    layers = getattr(vision, "num_hidden_layers", None) or vision.depth
    return Tower(
        layers=layers,
        hidden=vision.hidden_size,
        intermediate=vision.intermediate_size,
        heads=heads,
        kv_heads=heads,
        head_dim=vision.hidden_size // heads,
    )
