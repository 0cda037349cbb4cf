"""Group-relative advantages for BPO (R-4B's Bi-mode Policy Optimization) and its ablations.

BPO's layout, per prompt (one row of ``rewards``): columns ``[:g]`` are the ``g`` thinking rollouts
(prompt suffix ``<think>\\n``), columns ``[g:]`` the non-thinking ones (``<think>\\n\\n</think>``).

- ``mode="joint"`` (the paper): GRPO's normalisation over the merged group of all ``G`` responses,
  so a mode whose answers are more often right gets positive advantages as a whole.
- ``mode="per_mode"`` (ablation): normalise each mode's ``g`` responses among themselves.
- ``scale_by_std=False``: Dr. GRPO, only the group mean is subtracted.

The normalisation is verl's ``compute_grpo_outcome_advantage``: ``(r - mean) / (std + eps)`` with
``torch.std``'s default, the *unbiased* (Bessel-corrected, ``n - 1``) standard deviation, and
``eps = 1e-6``. A group whose rewards are all equal gets 0 (no relative signal). One difference from
verl: a group of one response (``per_mode`` with ``g = 1``) gets 0 here, where verl uses mean 0 and std
1 (the raw reward) -- a lone response has no baseline to be better or worse than.

``valid`` (``reward.overlong: mask``) leaves rollouts out: each group's mean and std are those of its valid
rollouts alone, and a left-out rollout gets 0 (the batch drops it from the loss too). A cut response has no
answer, so its reward says nothing about its group; counted in the mean it would still push its siblings up.
A group (joint: all 2g) with fewer than two valid rollouts gets 0 throughout.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ADVANTAGE_MODES", "compute_advantages"]

ADVANTAGE_MODES = ("joint", "per_mode")


def compute_advantages(
    rewards: Tensor,
    mode: str = "joint",
    *,
    num_thinking: int | None = None,
    scale_by_std: bool = True,
    eps: float = 1e-6,
    valid: Tensor | None = None,
) -> Tensor:
    """Per-response advantages ``[num_prompts, G]`` (float32) from rewards ``[num_prompts, G]``.

    Args:
        rewards: one row per prompt, thinking rollouts first (``num_thinking`` of them), then non-thinking.
        mode: ``"joint"`` (normalise over all G of a row, BPO) or ``"per_mode"`` (over each mode's columns).
        num_thinking: how many leading columns are thinking rollouts (default ``G // 2``); only
            ``per_mode`` uses it.
        scale_by_std: divide by ``std + eps`` (GRPO) or not (Dr. GRPO).
        eps: added to the std.
        valid: bool ``[num_prompts, G]``, the rollouts that count (see the module docstring); None: all.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 1:
        raise ValueError(f"rewards must be [num_prompts, G] with G >= 1, got shape {tuple(rewards.shape)}")
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"unknown advantage mode {mode!r}; expected one of {ADVANTAGE_MODES}")
    if valid is not None and valid.shape != rewards.shape:
        raise ValueError(f"valid must have the shape of rewards {tuple(rewards.shape)}, got {tuple(valid.shape)}")
    values = rewards.detach().to(torch.float64)

    def normalise(columns: slice) -> Tensor:
        if valid is None:
            return _normalise(values[:, columns], scale_by_std, eps)
        return _normalise_valid(values[:, columns], valid[:, columns], scale_by_std, eps)

    if mode == "joint":
        return normalise(slice(None)).float()
    width = rewards.shape[1]
    g = width // 2 if num_thinking is None else int(num_thinking)
    if not 0 <= g <= width:
        raise ValueError(f"num_thinking={g} is outside [0, G={width}]")
    parts = [normalise(c) for c in (slice(0, g), slice(g, width)) if c.stop > c.start]
    return torch.cat(parts, dim=1).float()


def _normalise(values: Tensor, scale_by_std: bool, eps: float) -> Tensor:
    """Each row centred (and divided by its unbiased std + eps); rows of one column, or all equal, give 0."""
    if values.shape[1] < 2:
        return torch.zeros_like(values)
    centred = values - values.mean(dim=1, keepdim=True)
    equal = (values == values[:, :1]).all(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (values.std(dim=1, keepdim=True) + eps)
    return torch.where(equal, 0.0, centred)


def _normalise_valid(values: Tensor, valid: Tensor, scale_by_std: bool, eps: float) -> Tensor:
    """:func:`_normalise` over each row's valid entries alone; invalid entries, and rows of fewer than two valid
    entries or all-equal valid ones, give 0."""
    weight = valid.to(values.dtype)
    count = weight.sum(dim=1, keepdim=True)
    mean = (values * weight).sum(dim=1, keepdim=True) / count.clamp(min=1)
    centred = (values - mean) * weight
    highest = values.masked_fill(~valid, -torch.inf).amax(dim=1, keepdim=True)
    equal = highest == values.masked_fill(~valid, torch.inf).amin(dim=1, keepdim=True)
    if scale_by_std:
        std = ((centred**2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
        centred = centred / (std + eps)
    silent = (count < 2) | equal
    return torch.where(silent | ~valid, 0.0, centred)
