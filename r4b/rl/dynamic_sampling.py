"""DAPO's dynamic sampling (``rollout.filter_groups``), made BPO-aware.

A prompt whose advantages are all 0 gives the policy gradient nothing; with ``filter_groups`` the step drops such
prompts and draws more, round after round, until it holds ``train.prompts_per_step`` prompts with a signal or
``rollout.max_filter_rounds`` rounds (the first included) have run; then it trains on what it has and says so.

Which groups are empty under BPO: a prompt's group is its **joint** 2g rollouts, both forced modes together, as
the advantages see them (:func:`r4b.rl.compute_advantages`), so a prompt is empty exactly when its advantages are
all 0: under the default ``advantages.grouping: joint`` when its 2g rewards (shaped: penalties included) are all
equal among the rollouts that count (``reward.overlong: mask`` leaves cut ones out). Not per mode: a prompt whose g
thinking rollouts are all right and whose g non-thinking ones are all wrong is uniform within each mode, yet it is
the clearest signal BPO has (which mode to use) and is kept. Under ``grouping: per_mode`` that prompt's advantages
are 0 and it is dropped, as it should be: it teaches nothing there.

Determinism: round 0 takes the step's prompts (:func:`r4b.train.bpo.prompt_indices`); round r > 0 takes prompts in
the order of a shuffle seeded by (seed, step, r), skipping those the step already drew (:func:`refill_indices`), and
samples with seeds that depend on the round too. Everything is a function of (seed, step) and the weights, so a
resumed run and any number of ranks draw the same prompts. Refills are drawn with replacement across steps: a
prompt may come back in a later step's own draw.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from r4b.rollout.base import Prompt, Rollout

from .shaping import ShapedRewards

__all__ = ["Draw", "concat_draws", "empty_groups", "refill_indices", "refill_size", "select_rows"]


@dataclass
class Draw:
    """One round's (or several rounds') prompts and what became of them, a row per prompt: the prompt ``samples``,
    the ``prompts`` as generated from (images decoded), their ``rollouts``, ``shaped`` rewards and ``advantages``
    ``[prompts, G]``, and the rollouts the reward server failed to score (``failures``)."""

    samples: list[Any]
    prompts: list[Prompt]
    rollouts: list[list[Rollout]]
    shaped: ShapedRewards
    advantages: Tensor
    failures: int = 0

    def __len__(self) -> int:
        return len(self.rollouts)


def empty_groups(advantages: Tensor) -> Tensor:
    """``[prompts]`` bool: the prompts whose advantages are all 0 (see the module docstring)."""
    return (advantages == 0).all(dim=1)


def refill_indices(step: int, round_: int, count: int, total: int, seed: int, drawn: set[int]) -> list[int]:
    """Up to ``count`` prompt indices for refill round ``round_`` (>= 1) of ``step``: a shuffle of all ``total``
    prompts seeded by (seed, step, round), less those in ``drawn``; fewer when the prompt set runs out."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) * 8_191 + round_ + 1)
    order = torch.randperm(total, generator=generator).tolist()
    return [i for i in order if i not in drawn][:count]


def refill_size(missing: int, drawn: int, kept: int, limit: int) -> int:
    """How many prompts the next round draws: the ``missing`` ones scaled by the share kept so far (``kept`` of
    ``drawn``; none kept counts as one), at most ``limit`` (a full step's worth, as DAPO draws)."""
    return min(limit, math.ceil(missing * drawn / max(kept, 1)))


def select_rows(draw: Draw, rows: Sequence[int]) -> Draw:
    """The prompts ``rows`` of ``draw``, in that order."""
    index = torch.tensor(list(rows), dtype=torch.long)
    return Draw(
        samples=[draw.samples[i] for i in rows],
        prompts=[draw.prompts[i] for i in rows],
        rollouts=[draw.rollouts[i] for i in rows],
        shaped=_map_tensors(draw.shaped, lambda t: t[index]),
        advantages=draw.advantages[index],
        failures=draw.failures,
    )


def concat_draws(draws: Sequence[Draw]) -> Draw:
    """The rounds' draws as one, rows in round order."""
    parts = [d.shaped for d in draws]
    shaped = {}
    for f in dataclasses.fields(ShapedRewards):
        values = [getattr(p, f.name) for p in parts]
        if isinstance(values[0], dict):
            shaped[f.name] = {k: torch.cat([v[k] for v in values]) for k in values[0]}
        else:
            shaped[f.name] = None if values[0] is None else torch.cat(values)
    return Draw(
        samples=[s for d in draws for s in d.samples],
        prompts=[p for d in draws for p in d.prompts],
        rollouts=[r for d in draws for r in d.rollouts],
        shaped=ShapedRewards(**shaped),
        advantages=torch.cat([d.advantages for d in draws]),
        failures=sum(d.failures for d in draws),
    )


def _map_tensors(shaped: ShapedRewards, fn: Any) -> ShapedRewards:
    """``shaped`` with ``fn`` applied to each of its tensors (those in ``penalties`` too)."""
    changes = {}
    for f in dataclasses.fields(shaped):
        value = getattr(shaped, f.name)
        if isinstance(value, dict):
            changes[f.name] = {k: fn(v) for k, v in value.items()}
        elif isinstance(value, Tensor):
            changes[f.name] = fn(value)
    return dataclasses.replace(shaped, **changes)
