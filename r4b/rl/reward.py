"""Rule-based answer rewards: extract the final answer of a response and check it against the reference.

:func:`answer_reward` scores the final answer (:func:`r4b.answers.extract_answer`: after the last ``</think>``, the
last ``\\boxed{...}`` if any) against the reference with :func:`r4b.answers.answers_match` (choice letters, a
numeric tolerance, math-verify).

:func:`format_reward` (optional; the paper mentions none) checks R-4B's output format instead:
``<think>`` first, one closed think block, then a non-empty answer.

:func:`off_mode` tells whether a forced-mode response left its mode (a forced thought closed at once, or a forced
direct answer that thinks after all); BPO scores such responses as format failures by default
(``reward.off_mode``, see :class:`r4b.config.sections.RewardSection`).
"""

from __future__ import annotations

from collections.abc import Callable

from r4b.answers import answers_match, extract_answer
from r4b.format import THINK_CLOSE, THINK_OPEN, is_thinking, thought

RewardFn = Callable[[str, str], float]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register ``fn(response, answer) -> float`` under ``name`` (the config's ``reward`` field)."""

    def add(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return add


@register_reward("answer")
def answer_reward(response: str, answer: str, pattern: str | None = None) -> float:
    """1.0 when the response's final answer matches ``answer``, else 0.0."""
    pred = extract_answer(response, pattern)
    return float(pred is not None and answers_match(pred, answer))


@register_reward("format")
def format_reward(response: str, answer: str | None = None) -> float:
    """1.0 when the response (mode suffix included) is ``<think>`` + one closed think block + a non-empty
    answer, else 0.0; ``answer`` is not read (the registry's signature)."""
    if not response.startswith(THINK_OPEN) or response.count(THINK_OPEN) != 1 or response.count(THINK_CLOSE) != 1:
        return 0.0
    return float(bool(response.split(THINK_CLOSE, 1)[1].strip()))


def off_mode(full_text: str, mode: str, *, min_thought_chars: int = 1) -> bool:
    """Whether a forced-mode response (its full text: mode suffix + response) departs from its forced mode.

    - ``thinking`` (suffix ``<think>\\n``): the response does not think, i.e. its think block is empty (it
      closed ``</think>`` at once, wrote only whitespace or only ``<think>`` tags) or malformed
      (:func:`r4b.format.think_state`), or its reasoning (:func:`r4b.format.thought`) is shorter than
      ``min_thought_chars`` characters.
    - ``non_thinking`` (suffix ``<think>\\n\\n</think>``): the response thinks anyway: its think block has
      content (a replaced suffix) or it opens a second ``<think>`` after the closed empty one.
    - ``auto``: never (the mode is the model's choice).
    """
    if mode == "thinking":
        return not is_thinking(full_text) or len(thought(full_text)) < min_thought_chars
    if mode == "non_thinking":
        return is_thinking(full_text) or THINK_OPEN in full_text.split(THINK_CLOSE, 1)[-1]
    return False
