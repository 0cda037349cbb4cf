"""BPO's rewards: from a step's rollouts to the ``[prompts, G]`` rewards its advantages are computed from.

:func:`shape_rewards` applies the ``reward`` section of the BPO config (:class:`r4b.config.sections.RewardSection`):

1. ``scores``: the configured reward (``REWARDS[reward.name]``, with ``reward.pattern``) of each rollout's full text
   (mode suffix + response) against the prompt's answer (:func:`score`, the same in training and evaluation), or
   the reward server's (``reward.name: http``: :class:`r4b.rl.remote_reward.ServerScoring`, passed in as
   ``scores``);
2. with ``reward.format_weight``, plus that weight times the format reward (``formats``);
3. ``off``: whether a forced-mode rollout left its mode (:func:`r4b.rl.reward.off_mode`, with
   ``reward.min_thought_chars``; with ``reward.close_thoughts`` also a forced thought that stopped before
   ``</think>``); with ``reward.off_mode`` set, such rollouts get that reward whatever their answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from r4b.config.sections import RewardSection
from r4b.format import THINK_CLOSE
from r4b.rollout.base import Rollout

from .reward import REWARDS, off_mode

__all__ = ["ShapedRewards", "score", "shape_rewards"]


@dataclass(frozen=True)
class ShapedRewards:
    """One step's rewards, each ``[prompts, G]`` in the rollouts' layout: ``rewards`` (what the advantages read),
    ``scores`` (the configured reward alone), ``formats`` (the format reward; None without ``format_weight``) and
    ``off`` (bool: left its forced mode)."""

    rewards: Tensor
    scores: Tensor
    formats: Tensor | None
    off: Tensor


def score(rollout: Rollout, answer: str, reward: RewardSection) -> float:
    """The configured reward of one rollout (its mode suffix included), in training and evaluation alike."""
    kwargs = {"pattern": reward.pattern} if reward.pattern else {}
    return REWARDS[reward.name](rollout.full_text, answer, **kwargs)


def shape_rewards(
    rollouts: Sequence[Sequence[Rollout]], answers: Sequence[str], reward: RewardSection, scores: Tensor | None = None
) -> ShapedRewards:
    """The rewards of ``rollouts[p][j]`` (prompt p's reference answer ``answers[p]``; see the module docstring);
    ``scores`` [prompts, G]: the configured reward where it was computed elsewhere (a reward server)."""
    pairs = list(zip(rollouts, answers, strict=True))
    if scores is None:
        scores = torch.tensor([[score(r, answer, reward) for r in row] for row, answer in pairs])
    formats = None
    if reward.format_weight:
        formats = torch.tensor([[REWARDS["format"](r.full_text, answer) for r in row] for row, answer in pairs])
    rewards = scores if formats is None else scores + reward.format_weight * formats
    off = [[off_mode(r.full_text, r.mode, min_thought_chars=reward.min_thought_chars) for r in row] for row in rollouts]
    if reward.close_thoughts:
        off = [
            [o or _stopped_thought(r) for o, r in zip(offs, row, strict=True)]
            for offs, row in zip(off, rollouts, strict=True)
        ]
    off = torch.tensor(off, dtype=torch.bool)
    if reward.off_mode is not None:
        rewards = torch.where(off, torch.tensor(reward.off_mode, dtype=rewards.dtype), rewards)
    return ShapedRewards(rewards=rewards, scores=scores, formats=formats, off=off)


def _stopped_thought(rollout: Rollout) -> bool:
    """A forced thought that ended at a stop token before ``</think>`` (no answer; one cut at the token limit is
    not)."""
    return rollout.mode == "thinking" and rollout.finished and THINK_CLOSE not in rollout.full_text
