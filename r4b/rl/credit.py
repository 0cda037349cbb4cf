"""Mode-decision credit (``advantages.mode_decision_credit``, beyond the paper): the mode choice trained with the
response's advantage.

The prompt ends with the mode suffix, so the token(s) after ``<think>`` that choose the mode (``\\n``: think,
``\\n\\n</think>``: answer directly) belong to the prompt and are never trained. With mode-decision credit they move
to the head of the response (:func:`move_decision_tokens`), so the loss trains the choice. With
``advantages.mode_decision_from: positive`` only the rollouts of a prompt's mode whose mean advantage is positive
move them (:func:`decision_tokens`): the decision is a choice between two tokens but the softmax spans the
vocabulary, so a negative push on one mode's token feeds the likeliest other token, not the other mode's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from r4b.format import MODE_SUFFIX, THINK_OPEN
from r4b.rollout.base import Rollout

__all__ = ["credit_mode_decision", "decision_token_counts", "decision_tokens", "move_decision_tokens"]


def decision_token_counts(tokenizer: Any, suffixes: dict[str, str] | None = None) -> dict[str, int]:
    """Tokens after ``<think>`` in each mode's suffix (``suffixes`` overriding ``MODE_SUFFIX``; with the template's
    suffixes and R-4B's or Qwen3's vocabulary: thinking 1, non-thinking 2, auto 0). Mode-decision credit needs
    ``<think>`` to be one token, so that the decision starts on a token boundary; Qwen2.5-VL's vocabulary has no
    ``<think>`` token, which is an error here."""
    head = tokenizer.encode(THINK_OPEN, add_special_tokens=False)
    counts = {}
    for mode, suffix in (MODE_SUFFIX | (suffixes or {})).items():
        ids = tokenizer.encode(suffix, add_special_tokens=False)
        if len(head) != 1 or ids[:1] != head:
            raise ValueError(
                f"advantages.mode_decision_credit needs {THINK_OPEN!r} to be one token that starts every mode "
                f"suffix; the tokenizer gives {head} for it and {ids} for the {mode} suffix {suffix!r}"
            )
        counts[mode] = len(ids) - 1
    return counts


def move_decision_tokens(rollout: Rollout, decision: int) -> Rollout:
    """Mode-decision credit: the last ``decision`` prompt tokens (the suffix after ``<think>``) become the
    head of the response, so the loss trains the choice between ``\\n`` and ``\\n\\n``."""
    if decision == 0:
        return rollout
    moved = list(rollout.prompt_ids[-decision:])
    return Rollout(
        prompt_ids=list(rollout.prompt_ids[:-decision]),
        response_ids=moved + list(rollout.response_ids),
        text=rollout.text,
        finished=rollout.finished,
        mode=rollout.mode,
        # the moved tokens were forced, not sampled: no rollout log-prob (the rollout correction weighs them 1)
        logprobs=None if rollout.logprobs is None else [math.nan] * decision + list(rollout.logprobs),
        prompt_suffix=rollout.prompt_suffix,
    )


def decision_tokens(
    row: Sequence[Rollout], advantages: Tensor, counts: Mapping[str, int], *, positive: bool = False
) -> list[int]:
    """How many suffix tokens after ``<think>`` each of one prompt's rollouts trains: its mode's (``counts``), or
    with ``positive`` only in the mode whose mean advantage is positive (a mode's rollouts share their prompt ids;
    its decision token's net push is its advantages' sum)."""
    modes = [r.mode for r in row]
    mean = {m: float(advantages[torch.tensor([x == m for x in modes])].mean()) for m in set(modes)}
    return [0 if positive and mean[r.mode] <= 0 else counts[r.mode] for r in row]


def credit_mode_decision(
    rollouts: Sequence[Sequence[Rollout]], advantages: Tensor, counts: Mapping[str, int], *, positive: bool = False
) -> list[list[Rollout]]:
    """The rollouts the update trains on under mode-decision credit: each with its decision tokens moved into the
    response (``counts``: :func:`decision_token_counts`; ``positive``: ``advantages.mode_decision_from=positive``,
    only in each prompt's mode with a positive mean advantage, see :func:`decision_tokens`)."""
    out = []
    for row, adv in zip(rollouts, advantages, strict=True):
        moves = decision_tokens(row, adv, counts, positive=positive)
        out.append([move_decision_tokens(r, n) for r, n in zip(row, moves, strict=True)])
    return out
