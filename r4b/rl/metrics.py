"""What a BPO step logs about its rollouts and its update (the rows of ``metrics.jsonl``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from r4b.format import is_thinking
from r4b.rollout.base import Rollout

from .reward import off_mode

__all__ = ["rollout_metrics", "update_scalars"]


def rollout_metrics(
    rollouts: Sequence[Sequence[Rollout]],
    rewards: Tensor,
    scores: Tensor,
    formats: Tensor | None,
    off: Tensor | None = None,
    advantages: Tensor | None = None,
    per_mode: Mapping[str, Tensor] | None = None,
) -> dict[str, Any]:
    """Per mode: reward, accuracy (the configured reward alone), response length, the share of prompts whose
    responses in that mode all got one reward and, with a format reward, the share of well-formed responses;
    the thinking trigger rate (:func:`r4b.format.is_thinking`, as in evaluation) and, in the forced modes,
    ``off_mode``: the share of rollouts that left their mode (``off``, :func:`r4b.rl.reward.off_mode`: thinking
    rollouts with an empty think block, non-thinking ones that think); overall, ``zero_adv_groups``, the share of
    prompts whose 2g advantages are all 0 (no learning signal; without ``advantages``: whose 2g rewards are all
    equal, joint grouping's test), and ``flat``, whether that holds for every prompt: the step teaches nothing.
    ``per_mode``: further ``[prompts, G]`` values averaged per mode under their own names (the length controls':
    :meth:`r4b.rl.shaping.ShapedRewards.per_mode_metrics`)."""
    if off is None:
        off = torch.tensor([[off_mode(r.full_text, r.mode) for r in row] for row in rollouts], dtype=torch.bool)
    out: dict[str, Any] = {"reward": float(rewards.mean())}
    columns = [rewards, scores] + ([formats] if formats is not None else [])
    by_mode: dict[str, list[tuple[float, ...]]] = {}
    for p, row in enumerate(rollouts):
        for k, rollout in enumerate(row):
            values = (*(float(c[p, k]) for c in columns), len(rollout.response_ids))
            by_mode.setdefault(rollout.mode, []).append(values)
    for mode, rows in by_mode.items():
        mean = lambda i, rows=rows: sum(r[i] for r in rows) / len(rows)
        out[mode] = {
            "reward": mean(0),
            "accuracy": sum(r[1] >= 1.0 for r in rows) / len(rows),
            "response_len": mean(-1),
        }
        mine = [(p, k) for p, row in enumerate(rollouts) for k, r in enumerate(row) if r.mode == mode]
        out[mode]["trigger_rate"] = sum(is_thinking(rollouts[p][k].full_text) for p, k in mine) / len(mine)
        if mode != "auto":
            out[mode]["off_mode"] = sum(bool(off[p, k]) for p, k in mine) / len(mine)
        if formats is not None:
            out[mode]["format"] = mean(2)
        for name, values in (per_mode or {}).items():
            out[mode][name] = sum(float(values[p, k]) for p, k in mine) / len(mine)
        # prompts whose responses in this mode all got one reward (under joint grouping they may still
        # get advantages, from the other mode's rewards)
        groups = [{float(rewards[p, k]) for k, r in enumerate(row) if r.mode == mode} for p, row in enumerate(rollouts)]
        groups = [values for values in groups if values]
        out[mode]["uniform_reward_groups"] = sum(len(values) == 1 for values in groups) / len(groups)
    if advantages is None:
        no_signal = rewards.max(dim=1).values == rewards.min(dim=1).values
    else:  # exact zeros: compute_advantages gives 0 to a group of equal rewards
        no_signal = (advantages == 0).all(dim=1)
    out["zero_adv_groups"] = float(no_signal.float().mean())
    out["flat"] = bool(no_signal.all())
    return out


def update_scalars(update: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers of :func:`r4b.rl.policy_update`'s result (loss, clip_frac, kl, ..., counts), without the rest."""
    return {k: v for k, v in update.items() if isinstance(v, int | float) and not isinstance(v, bool)}
