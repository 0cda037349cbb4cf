"""LoRA adapters (peft) on a model r4b trains (``model.lora``), and what the rest of r4b needs of them.

The adapters are injected in place (:func:`peft.inject_adapter_in_model`): the model keeps its class, so the packed
forwards, the fused losses (they read the base ``lm_head.weight``; LoRA on ``lm_head`` is refused) and the engines
see the same model with each targeted ``nn.Linear`` replaced by peft's LoRA layer. Its state-dict names become
``<layer>.base_layer.weight`` / ``.bias`` and ``<layer>.lora_A.default.weight`` / ``.lora_B.default.weight``.

Everything that leaves training under the base names goes through :func:`merged_tensors`: the rollout weight sync
(one parameter at a time: each base weight is held only until its two small adapter matrices arrive) and the merged
export. :func:`adapters_disabled` gives BPO's reference model, the base without adapters, without a second copy.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from r4b.config.sections import LoraSection
from r4b.errors import InputError

__all__ = [
    "ADAPTER",
    "adapter_state_dict",
    "adapters_disabled",
    "apply_lora",
    "check_adapters_train",
    "frozen_targets_error",
    "has_lora",
    "is_adapter_parameter",
    "lora_config",
    "lora_scale",
    "lora_summary",
    "lora_targets",
    "merged_state_dict",
    "merged_tensors",
    "save_adapter",
]

ADAPTER = "default"  # peft's adapter name; r4b trains one adapter
_ADAPTER_KEY = re.compile(rf"^(.*)\.lora_([AB])\.{ADAPTER}\.weight$")
_BASE_KEY = re.compile(r"^(.*)\.base_layer\.(weight|bias)$")
# The language model's modules: any family's vision tower and projector (r4b.train.schedule's patterns) are not.
_NOT_LANGUAGE = ("vision_tower.", "visual.", "multi_modal_projector.")


def lora_targets(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """The ``nn.Linear`` modules of ``model`` that ``patterns`` name, in module order. A pattern without a dot is a
    module's own name (a regular expression over it, ``q_proj`` or ``(q|v)_proj``) and names the language model's
    modules only; a pattern with a dot is a regular expression over the whole dotted name, and may reach the vision
    tower or the projector. A pattern that names nothing, and ``lm_head``, are one-line errors."""
    patterns = list(patterns)
    linear = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    found: list[str] = []
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as error:
            raise InputError(f"model.lora.targets: {pattern!r} is not a regular expression ({error})") from None
        if "." in pattern:
            hits = [name for name, _ in linear if regex.fullmatch(name)]
        else:
            hits = [n for n, _ in linear if regex.fullmatch(n.rsplit(".", 1)[-1]) and _in_language_model(n)]
        if not hits:
            raise InputError(f"model.lora.targets: {pattern!r} names no linear layer of the model")
        found += [name for name in hits if name not in found]
    if any(name.rsplit(".", 1)[-1] == "lm_head" for name in found):
        raise InputError(
            "model.lora.targets: lm_head cannot take LoRA: the fused loss reads the base lm_head.weight; "
            "name the decoder's projections only"
        )
    order = {name: i for i, (name, _) in enumerate(linear)}
    return sorted(found, key=order.__getitem__)


def check_adapters_train(model: nn.Module, module_of: Callable[[str], str], trains: Callable[[str], bool]) -> None:
    """Refuse LoRA targets in a module that does not train: adapters there would stay at B = 0 for the whole run (a
    dotted target reaching the vision tower while ``model.train`` leaves ``vision`` out, or ``optim.lr_vision`` is
    0). ``module_of``: a parameter name's module (``vision`` / ``projector`` / ``llm``); ``trains``: whether a module
    trains. A one-line error naming the module, how many targeted layers it holds and the first of them."""
    frozen: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        adapter = _ADAPTER_KEY.match(name)
        if adapter is not None and adapter.group(2) == "A" and not trains(module := module_of(name)):
            frozen.setdefault(module, []).append(adapter.group(1))
    for module, layers in frozen.items():
        raise frozen_targets_error(module, layers)


def frozen_targets_error(module: str, layers: list[str]) -> InputError:
    """The one-line error of :func:`check_adapters_train` (``r4b plan`` says it too): ``layers``, the targeted layers
    of ``module``, which does not train."""
    first = f"{layers[0]}, ..." if len(layers) > 1 else layers[0]
    return InputError(
        f"model.lora.targets: {len(layers)} targeted layer(s) are in the {module} module ({first}), which does not "
        f"train (model.train, optim.lr_{module}): their adapters would never change; train {module} or leave its "
        "layers out of model.lora.targets"
    )


def _in_language_model(name: str) -> bool:
    return not any(part in f"{name}." for part in _NOT_LANGUAGE)


def apply_lora(
    model: nn.Module, section: LoraSection, base_dtype: torch.dtype | None = None, announce: bool = False
) -> Any:
    """Inject LoRA adapters of ``section`` (``model.lora``) into ``model`` in place and freeze everything else; the
    frozen base is cast to ``base_dtype`` (the training dtype: bf16 under ``engine.mixed_precision: bf16``; None
    keeps it). Returns peft's ``LoraConfig``, or None when ``section.rank`` is 0 (no LoRA). B starts at zero, so
    the model computes what it computed before. ``announce``: print the adapters' size and their AdamW state's (the
    run's log)."""
    if section.rank == 0:
        return None
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=section.rank,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=lora_targets(model, section.targets),  # full names: peft matches them as suffixes
        bias="none",
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    model.r4b_lora = config  # what an adapter export writes (lora_config)
    for name, param in model.named_parameters():
        adapter = is_adapter_parameter(name)
        param.requires_grad_(adapter)
        if not adapter and base_dtype is not None and param.is_floating_point():
            param.data = param.data.to(base_dtype)
    if announce:
        size = lora_summary(model)
        print(
            f"lora: rank {section.rank} on {len(config.target_modules)} layers: {size['trainable']:,} trainable "
            f"parameters of {size['total']:,} ({100 * size['trainable'] / size['total']:.2f}%), AdamW state "
            f"{size['optimizer_state_bytes'] / 2**20:.2f} MiB"
        )
    return config


def lora_config(model: nn.Module) -> Any:
    """peft's ``LoraConfig`` that :func:`apply_lora` gave ``model``; None: no LoRA."""
    return getattr(model, "r4b_lora", None)


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter (or state-dict key) is one of the LoRA matrices."""
    return _ADAPTER_KEY.match(name) is not None


def has_lora(module: nn.Module) -> bool:
    """Whether ``module`` holds LoRA adapters (peft's layers)."""
    return any(_is_lora_layer(m) for m in module.modules())


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer") and hasattr(module, "scaling")


def lora_scale(module: nn.Module) -> float | None:
    """The adapters' scale (``alpha / rank``), the one of every LoRA layer of ``module``; None without LoRA."""
    scales = {float(m.scaling[ADAPTER]) for m in module.modules() if _is_lora_layer(m)}
    if len(scales) > 1:
        raise ValueError(f"LoRA layers with different scales {sorted(scales)}: r4b merges one model.lora")
    return scales.pop() if scales else None


@contextlib.contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Run ``module`` as its base model: every LoRA layer's adapter off (BPO's reference, the initial policy, with
    no second copy of the weights). Back on afterwards."""
    layers = [m for m in module.modules() if _is_lora_layer(m)]
    trains = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]

    def switch(enabled: bool) -> None:
        for layer in layers:
            layer.enable_adapters(enabled)
        # peft's switch also sets the adapters' requires_grad: keep what trains, as FSDP2 reads it (its reduce dtype
        # is set from the trainable parameters at the first forward, which may be the reference's)
        for param, flag in trains:
            param.requires_grad_(flag)

    switch(False)
    try:
        yield
    finally:
        switch(True)


def merged_tensors(
    pairs: Iterable[tuple[str, torch.Tensor]], scale: float | None, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """A stream of ``(name, tensor)`` of a model with LoRA as the base model's: ``<layer>.weight = base + scale·BA``
    (computed in fp32), ``<layer>.bias`` the base's, adapter names gone; floating tensors cast to ``dtype`` (None:
    fp32 for merged weights, the others as they come). One tensor at a time: a base weight waits only for its own
    A and B. ``scale`` None: the pairs pass through (cast), the model has no LoRA."""
    cast = lambda t: t.to(dtype) if dtype is not None and t.is_floating_point() else t
    if scale is None:
        for name, tensor in pairs:
            yield name, cast(tensor)
        return
    waiting: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in pairs:
        base, adapter = _BASE_KEY.match(name), _ADAPTER_KEY.match(name)
        if base is not None and base.group(2) == "bias":
            yield f"{base.group(1)}.bias", cast(tensor)
            continue
        if base is None and adapter is None:
            yield name, cast(tensor)
            continue
        layer, part = (base.group(1), "W") if base is not None else (adapter.group(1), adapter.group(2))  # type: ignore[union-attr]
        parts = waiting.setdefault(layer, {})
        parts[part] = tensor
        if len(parts) == 3:
            del waiting[layer]
            a, b, w = parts["A"].float(), parts["B"].float(), parts["W"]
            merged = w.float().addmm(b.to(w.device), a.to(w.device), alpha=scale)
            yield f"{layer}.weight", merged.to(dtype) if dtype is not None else merged
    if waiting:
        raise ValueError(f"LoRA layers without their base weight or adapters: {sorted(waiting)[:3]}")


def merged_state_dict(state: dict[str, torch.Tensor], scale: float | None) -> dict[str, torch.Tensor]:
    """:func:`merged_tensors` of a whole state dict (the export's): base names, merged weights in fp32."""
    return dict(merged_tensors(state.items(), scale))


def adapter_state_dict(state: dict[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The adapter matrices of a training state dict under peft's saved names (``base_model.model.<layer>.lora_A
    .weight``), what ``PeftModel.from_pretrained`` loads onto the base; ``prefix``: the objective's attribute."""
    out = {}
    for name, tensor in state.items():
        if is_adapter_parameter(name):
            saved = name.removeprefix(prefix).replace(f".{ADAPTER}.", ".")
            out[f"base_model.model.{saved}"] = tensor.detach().float().contiguous()
    return out


def save_adapter(out: Any, state: dict[str, torch.Tensor], config: Any, base: str | None) -> None:
    """Write peft's adapter directory into ``out``: ``adapter_config.json`` (``base``: the base model's directory or
    hub id, None for the embedded tiny model) and ``adapter_model.safetensors``."""
    from safetensors.torch import save_file

    config.base_model_name_or_path = base
    config.save_pretrained(str(out))
    save_file(adapter_state_dict(state), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def lora_summary(module: nn.Module) -> dict[str, int]:
    """Parameter counts of a model with adapters: ``trainable`` (the adapters), ``total`` (base and adapters) and
    ``optimizer_state_bytes`` (AdamW's two fp32 moments of each trainable parameter)."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return {"trainable": trainable, "total": total, "optimizer_state_bytes": 2 * 4 * trainable}
