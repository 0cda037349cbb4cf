"""Learning-rate schedule and per-module parameter groups."""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Iterable

from torch import nn

from r4b.config.sections import TrainableModule

# Which module a parameter belongs to, by name: R-4B / LLaVA-OneVision (vision_tower,
# multi_modal_projector, image_newline) and Qwen-VL (visual, visual.merger) layouts.
VISION_PATTERNS = ("vision_tower.", "visual.")
PROJECTOR_PATTERNS = ("multi_modal_projector.", "image_newline", "visual.merger.")
MODULES = typing.get_args(TrainableModule)  # ("vision", "projector", "llm"): model.train


def module_of(name: str) -> str:
    """``"vision"``, ``"projector"`` or ``"llm"`` for a parameter name."""
    if any(pattern in name for pattern in PROJECTOR_PATTERNS):
        return "projector"
    if any(pattern in name for pattern in VISION_PATTERNS):
        return "vision"
    return "llm"


def parameter_groups(model: nn.Module, lrs: dict[str, float], trainable: Iterable[str]) -> list[dict]:
    """One optimizer group per module with its learning rate (the paper: ViT 4e-6, projector 4e-6,
    LLM 4e-5). Modules not in ``trainable`` are frozen (``requires_grad=False``) and left out. A model with LoRA
    adapters (r4b.models.lora) trains its adapters only, each in its module's group; the base stays frozen."""
    from r4b.models.lora import check_adapters_train, has_lora, is_adapter_parameter

    trainable = set(trainable)
    unknown = trainable - set(MODULES)
    if unknown:
        raise ValueError(f"unknown module(s) {sorted(unknown)}; expected a subset of {MODULES}")
    adapters_only = has_lora(model)
    if adapters_only:  # adapters where nothing trains would stay at B = 0: a one-line error (r4b.models.lora)
        check_adapters_train(model, module_of, lambda module: module in trainable and lrs[module] > 0)
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in MODULES}
    for name, param in model.named_parameters():
        module = module_of(name)
        trains = module in trainable and (not adapters_only or is_adapter_parameter(name))
        param.requires_grad_(trains)
        if trains:
            groups[module].append(param)
    return [{"name": m, "params": params, "lr": lrs[m]} for m, params in groups.items() if params]


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """Multiplier of the base learning rate after ``step`` optimizer steps: linear warmup from
    1/(warmup+1), then cosine decay to ``min_ratio`` at ``total_steps``."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier
