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

Length controls (applied to the reward of steps 1-2, before the off-mode override, so an off-mode rollout keeps
exactly ``reward.off_mode``; all before the group normalisation, so under BPO's joint group of 2g a penalised
rollout lowers the group's mean and moves its 2g - 1 siblings' advantages up):

- ``reward.overlong: soft``: DAPO's overlong penalty, ``-min(1, max(0, L - (max_new - buffer)) / buffer)`` for a
  response of L tokens (stop token included, as ``rollout.max_new_tokens`` counts it), in every mode;
- ``reward.overlong: mask``: ``keep`` is False for a rollout cut at ``max_new_tokens`` (``Rollout.finished``
  False): the advantages leave it out of its group's statistics and the batch leaves it out of the loss
  (:func:`kept_rollouts`);
- ``reward.thought_budget``: a *thinking-mode* rollout whose thought is over the budget loses
  ``thought_budget_penalty * min(1, (T - budget) / budget)`` (linear up to twice the budget, then flat, as DAPO's
  soft penalty is: a penalty without a floor would rank a long thought below ``reward.off_mode`` and teach closing
  thoughts at once); T counts response tokens before the first ``</think>`` id
  (:func:`thought_tokens`: ids, not the text, so no re-tokenising; a custom thinking suffix's words are prompt,
  not counted). Non-thinking and auto rollouts are never penalised: the budget shapes the thinking half's length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from r4b.config.sections import RewardSection
from r4b.format import THINK_CLOSE
from r4b.rollout.base import Rollout

from .reward import REWARDS, off_mode

__all__ = ["ShapedRewards", "kept_rollouts", "score", "shape_rewards", "think_close_token", "thought_tokens"]


@dataclass(frozen=True)
class ShapedRewards:
    """One step's rewards, each ``[prompts, G]`` in the rollouts' layout: ``rewards`` (what the advantages read),
    ``scores`` (the configured reward alone), ``formats`` (the format reward; None without ``format_weight``) and
    ``off`` (bool: left its forced mode); ``keep`` (bool; None unless ``reward.overlong: mask``: the rollouts the
    loss trains on), ``truncated`` (bool: cut at ``max_new_tokens``) and ``penalties`` (the length penalties
    subtracted, by name: ``overlong_penalty``, ``thought_penalty``, ``thought_tokens`` with a budget)."""

    rewards: Tensor
    scores: Tensor
    formats: Tensor | None
    off: Tensor
    keep: Tensor | None = None
    truncated: Tensor | None = None
    penalties: dict[str, Tensor] = field(default_factory=dict)

    def per_mode_metrics(self) -> dict[str, Tensor]:
        """The ``[prompts, G]`` values a step's metrics average per mode: truncation, masking and penalties."""
        out = dict(self.penalties)
        if self.truncated is not None:
            out["truncated"] = self.truncated.float()
        if self.keep is not None:
            out["masked"] = (~self.keep).float()
        return out


def score(rollout: Rollout, answer: str, reward: RewardSection) -> float:
    """The configured reward of one rollout (its mode suffix included), in training and evaluation alike."""
    kwargs = {"pattern": reward.pattern} if reward.pattern else {}
    return REWARDS[reward.name](rollout.full_text, answer, **kwargs)


def shape_rewards(
    rollouts: Sequence[Sequence[Rollout]],
    answers: Sequence[str],
    reward: RewardSection,
    scores: Tensor | None = None,
    *,
    max_new_tokens: int | None = None,
    think_close_id: int | None = None,
) -> ShapedRewards:
    """The rewards of ``rollouts[p][j]`` (prompt p's reference answer ``answers[p]``; see the module docstring);
    ``scores`` [prompts, G]: the configured reward where it was computed elsewhere (a reward server).
    ``max_new_tokens`` (``reward.overlong: soft``) and ``think_close_id`` (``reward.thought_budget``, the id of
    ``</think>``: :func:`think_close_token`) are needed only by the controls that read them."""
    pairs = list(zip(rollouts, answers, strict=True))
    if scores is None:
        scores = torch.tensor([[score(r, answer, reward) for r in row] for row, answer in pairs])
    formats = None
    if reward.format_weight:
        formats = torch.tensor([[REWARDS["format"](r.full_text, answer) for r in row] for row, answer in pairs])
    rewards = scores if formats is None else scores + reward.format_weight * formats
    penalties = _length_penalties(rollouts, reward, max_new_tokens, think_close_id)
    for name in ("overlong_penalty", "thought_penalty"):
        if name in penalties:
            rewards = rewards - penalties[name].to(rewards.dtype)
    off = [[off_mode(r.full_text, r.mode, min_thought_chars=reward.min_thought_chars) for r in row] for row in rollouts]
    if reward.close_thoughts:
        off = [
            [o or _stopped_thought(r) for o, r in zip(offs, row, strict=True)]
            for offs, row in zip(off, rollouts, strict=True)
        ]
    off = torch.tensor(off, dtype=torch.bool)
    if reward.off_mode is not None:
        rewards = torch.where(off, torch.tensor(reward.off_mode, dtype=rewards.dtype), rewards)
    truncated = torch.tensor([[not r.finished for r in row] for row in rollouts], dtype=torch.bool)
    keep = kept_rollouts(rollouts, reward)
    return ShapedRewards(rewards, scores, formats, off, keep=keep, truncated=truncated, penalties=penalties)


def kept_rollouts(rollouts: Sequence[Sequence[Rollout]], reward: RewardSection) -> Tensor | None:
    """``[prompts, G]`` bool, the rollouts the loss trains on under ``reward.overlong: mask`` (those that
    finished); None otherwise (all of them)."""
    if reward.overlong != "mask":
        return None
    return torch.tensor([[r.finished for r in row] for row in rollouts], dtype=torch.bool)


def think_close_token(tokenizer: Any) -> int:
    """The id of ``</think>``, which :func:`thought_tokens` looks for; a ValueError where the tokenizer does not
    write it as one token."""
    ids = tokenizer.encode(THINK_CLOSE, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"the tokenizer writes {THINK_CLOSE} as {len(ids)} tokens, not one: no thought counts")
    return int(ids[0])


def thought_tokens(rollout: Rollout, think_close_id: int) -> int:
    """The thought's length in tokens: response tokens before the first ``</think>``; an unclosed thought is the
    whole response but its stop token."""
    ids = list(rollout.response_ids)
    if think_close_id in ids:
        return ids.index(think_close_id)
    return len(ids) - int(rollout.finished)


def _length_penalties(
    rollouts: Sequence[Sequence[Rollout]], reward: RewardSection, max_new_tokens: int | None, think_close_id: int | None
) -> dict[str, Tensor]:
    """The enabled length penalties (amounts to subtract, ``[prompts, G]``), with the thoughts' token counts."""
    out = {}
    if reward.overlong == "soft":
        if max_new_tokens is None:
            raise ValueError("reward.overlong=soft needs max_new_tokens (rollout.max_new_tokens)")
        out["overlong_penalty"] = _per_rollout(rollouts, lambda r: _overlong(r, max_new_tokens, reward.overlong_buffer))
    if reward.thought_budget is not None:
        if think_close_id is None:
            raise ValueError("reward.thought_budget needs think_close_id, the id of </think>")
        counts = _per_rollout(rollouts, lambda r: thought_tokens(r, think_close_id) if r.mode == "thinking" else 0)
        over = (counts - reward.thought_budget).clamp(min=0, max=reward.thought_budget) / reward.thought_budget
        out["thought_tokens"] = counts
        out["thought_penalty"] = reward.thought_budget_penalty * over
    return out


def _overlong(rollout: Rollout, max_new_tokens: int, buffer: int) -> float:
    """DAPO's soft overlong penalty (positive, at most 1) of one rollout."""
    start = max_new_tokens - buffer
    return min(1.0, max(0, len(rollout.response_ids) - start) / buffer)


def _per_rollout(rollouts: Sequence[Sequence[Rollout]], value: Any) -> Tensor:
    """``value(rollout)`` of every rollout as a float64 ``[prompts, G]`` tensor."""
    return torch.tensor([[float(value(r)) for r in row] for row in rollouts], dtype=torch.float64)


def _stopped_thought(rollout: Rollout) -> bool:
    """A forced thought that ended at a stop token before ``</think>`` (no answer; one cut at the token limit is
    not)."""
    return rollout.mode == "thinking" and rollout.finished and THINK_CLOSE not in rollout.full_text
