"""Rule-based answer rewards: extract the final answer of a response and check it against the reference.

The final answer is what follows the last ``</think>`` (the whole response if there is none): the
last ``\\boxed{...}`` in it (nested braces allowed), else a caller's regex, else the text itself.
Multiple-choice references (a single letter) match a letter answer such as ``B``, ``(B)`` or
``B. 42``. Everything else is compared with math-verify (fractions, LaTeX, units, sets), with a
relative numeric tolerance for plain numbers and normalized string equality as the last resort.

:func:`format_reward` (optional; the paper mentions none) checks R-4B's output format instead:
``<think>`` first, one closed think block, then a non-empty answer.

:func:`off_mode` tells whether a forced-mode response left its mode (a forced thought closed at once, or a forced
direct answer that thinks after all); BPO scores such responses as format failures by default
(``reward.off_mode``, see :func:`r4b.train.bpo.RewardSection`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_CHOICE = re.compile(r"^\(?([A-Ja-j])\)?(?:[.:)\s]|$)")
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")

RewardFn = Callable[[str, str], float]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register ``fn(response, answer) -> float`` under ``name`` (the config's ``reward`` field)."""

    def add(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return add


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i].strip()
        i += 1
    return None  # unbalanced: no answer


def extract_answer(response: str, pattern: str | None = None) -> str | None:
    """The final answer of ``response`` (see the module docstring), or None when there is none."""
    if "<think>" in response and THINK_CLOSE not in response:
        return None  # an unfinished thought has no answer
    final = response.rsplit(THINK_CLOSE, 1)[-1].strip()
    if "\\boxed{" in final or "\\fbox{" in final:
        return last_boxed(final)  # None when its braces never close
    if pattern is not None:
        matches = re.findall(pattern, final)
        return matches[-1].strip() if matches else None
    return final or None


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().strip("$").rstrip(".")).lower()


def _numbers_match(pred: str, gold: str, rel_tol: float) -> bool | None:
    p, g = pred.replace(",", ""), gold.replace(",", "")
    if not (_NUMBER.match(p) and _NUMBER.match(g)):
        return None
    a, b = float(p), float(g)
    return abs(a - b) <= rel_tol * max(1.0, abs(b))


def answers_match(pred: str, gold: str, *, rel_tol: float = 1e-4) -> bool:
    gold = gold.strip()
    if re.fullmatch(r"[A-Ja-j]", gold):
        found = _CHOICE.match(pred.strip())
        return bool(found) and found.group(1).upper() == gold.upper()
    numeric = _numbers_match(pred.strip(), gold, rel_tol)
    if numeric is not None:
        return numeric
    if _normalize(pred) == _normalize(gold):
        return True
    from math_verify import parse, verify

    wrap = lambda s: s if "$" in s else f"${s}$"
    try:
        return bool(verify(parse(wrap(gold)), parse(wrap(pred))))
    except Exception:  # math-verify gives up on some inputs: not a match
        return False


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


def thought(full_text: str) -> str:
    """The reasoning of a full text: its think block (after the first ``<think>``, up to the first ``</think>`` or
    the end) without ``<think>`` tags, stripped; empty when there is none."""
    if not full_text.startswith(THINK_OPEN):
        return ""
    return full_text[len(THINK_OPEN) :].partition(THINK_CLOSE)[0].replace(THINK_OPEN, "").strip()


def off_mode(full_text: str, mode: str, *, min_thought_chars: int = 1) -> bool:
    """Whether a forced-mode response (its full text: mode suffix + response) departs from its forced mode.

    - ``thinking`` (suffix ``<think>\\n``): the response does not think, i.e. its think block is empty (it
      closed ``</think>`` at once, wrote only whitespace or only ``<think>`` tags) or malformed
      (:func:`r4b.eval.metrics.think_state`), or its reasoning (:func:`thought`) is shorter than
      ``min_thought_chars`` characters.
    - ``non_thinking`` (suffix ``<think>\\n\\n</think>``): the response thinks anyway: its think block has
      content (a replaced suffix) or it opens a second ``<think>`` after the closed empty one.
    - ``auto``: never (the mode is the model's choice).
    """
    from r4b.eval.metrics import is_thinking  # lazy: r4b.eval.metrics imports this module

    if mode == "thinking":
        return not is_thinking(full_text) or len(thought(full_text)) < min_thought_chars
    if mode == "non_thinking":
        return is_thinking(full_text) or THINK_OPEN in full_text.split(THINK_CLOSE, 1)[-1]
    return False
