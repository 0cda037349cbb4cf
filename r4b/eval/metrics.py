"""Auto-thinking metrics: accuracy, thinking trigger rate and output tokens, per model, mode and group.

Definitions (the same in every mode, computed from the text, so a broken mode suffix shows up):

- **Full text**: the assistant turn as written, ``MODE_SUFFIX[mode] + response`` (auto: ``<think>`` +
  response; thinking: ``<think>\\n`` + response; non-thinking: ``<think>\\n\\n</think>`` + response).
- **Think block**: the text after the opening ``<think>``, up to the first ``</think>``, or to the end of the
  text when no ``</think>`` follows (an *unclosed* think block: generation stopped, at ``max_new_tokens``
  or a stop token, inside the thought).
- **Thinking** (:func:`think_state`): the full text starts with ``<think>`` directly followed by a newline
  (R-4B's format: ``<think>\\n`` opens both a thought and the empty ``<think>\\n\\n</think>``), and the think
  block holds non-whitespace content besides ``<think>`` tags (``<think>\\n<think></think>`` is empty: a policy
  can learn to write that to look thinking). So ``<think>\\n\\n</think>`` (an empty think) is not thinking; an
  unclosed block with content is thinking (and has no answer, so it is wrong); a text without a leading
  ``<think>``, or whose ``<think>`` is not followed by a newline (``<think>The answer``), is *malformed*
  and not thinking.
- **Trigger rate**: the share of responses that are thinking. Forced modes report it too: 1.0 (thinking) and
  0.0 (non-thinking) by construction when the model follows the format.
- **Output tokens**: ``len(response_ids)``, every token the model generated, **including the stop token**
  (``<|im_end|>``) when one was generated; a response cut at ``max_new_tokens`` has exactly that many. In
  auto mode this counts the mode decision (``\\n\\n</think>`` or ``\\n``), which the forced modes get
  for free in their prompt suffix.
- **Correct**: the final answer (:func:`r4b.rl.reward.extract_answer`: after the last ``</think>``; the
  last ``\\boxed{}`` if any) matches the reference (:func:`r4b.rl.reward.answers_match`). A multiple-choice
  question (options ``A``, ``B``, ... and a one-letter reference) is scored on the chosen letter
  (:func:`choice_letter`: a leading ``B`` / ``(B)`` / ``B. text``, else the text of exactly one option,
  else the only option letter standing alone in the answer). No answer is wrong.
- **Unfinished rate**: the share of responses cut at ``max_new_tokens`` (no stop token).
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from r4b.models.tokenizer import MODE_SUFFIX, MODES, THINK_CLOSE, THINK_OPEN
from r4b.rl.reward import answers_match, extract_answer

__all__ = [
    "THINK_STATES",
    "choice_letter",
    "compute_metrics",
    "full_text",
    "is_thinking",
    "score_response",
    "summarize",
    "think_state",
]

# think_state values: "thought" (closed, with content), "unclosed" (no </think>, with content), "empty"
# (nothing but whitespace in the block, closed or not), "malformed" (no leading "<think>\n").
THINK_STATES = ("thought", "unclosed", "empty", "malformed")
THINKING_STATES = frozenset({"thought", "unclosed"})

_LEADING_CHOICE = re.compile(r"^\(?([A-Za-z])\)?(?:[.:)\s]|$)")
_LONE_LETTER = re.compile(r"(?<![A-Za-z0-9])([A-Z])(?![A-Za-z0-9])")


def full_text(mode: str, response: str) -> str:
    """The assistant turn as written: ``MODE_SUFFIX[mode] + response``."""
    if mode not in MODE_SUFFIX:
        raise ValueError(f"unknown mode {mode!r} (expected one of {', '.join(MODES)})")
    return MODE_SUFFIX[mode] + response


def think_state(text: str) -> str:
    """One of :data:`THINK_STATES` for a full text (see the module docstring)."""
    if not text.startswith(THINK_OPEN + "\n"):
        return "malformed"
    block, closed, _ = text[len(THINK_OPEN) :].partition(THINK_CLOSE)
    if not block.replace(THINK_OPEN, "").strip():  # a nested <think> tag is no reasoning
        return "empty"
    return "thought" if closed else "unclosed"


def is_thinking(text: str) -> bool:
    """Whether a full text thinks: a think block with non-whitespace content, closed or not."""
    return think_state(text) in THINKING_STATES


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().strip("$").rstrip(".")).lower()


def choice_letter(prediction: str, options: Mapping[str, str]) -> str | None:
    """The option letter a final answer picks, or None: a leading ``B.`` / ``B:`` / ``B)`` / ``(B)``, or a leading
    ``B`` that is the only option letter in the answer (``A or B`` picks none); else the text of exactly one
    option; else the only option letter standing alone (``The answer is B``)."""
    letters = {letter.upper() for letter in options}
    pred = prediction.strip()
    lone = {letter for letter in _LONE_LETTER.findall(pred) if letter in letters}
    found = _LEADING_CHOICE.match(pred)
    if found and found.group(1).upper() in letters:
        letter, rest = found.group(1), pred[found.end() - 1 :]
        if found.end() == len(pred) or rest[0] in ".:)" or pred.startswith("("):
            return letter.upper()  # "B", "B.", "B: blue", "(B) blue"
        if letter.isupper():  # "B blue" picks B, "A or B" nothing
            return letter if lone <= {letter} else None
    by_text = [letter for letter, text in options.items() if text and _normalize(text) == _normalize(pred)]
    if len(by_text) == 1:
        return by_text[0].upper()
    return lone.pop() if len(lone) == 1 else None


def score_response(text: str, answer: str, options: Mapping[str, str] | None = None) -> tuple[str | None, bool]:
    """``(extracted answer, correct)`` of a full text against the reference ``answer``.

    With ``options`` and a one-letter reference the question is multiple choice and the extracted answer is
    the chosen letter (or the raw final answer when no letter can be read from it)."""
    prediction = extract_answer(text)
    if prediction is None:
        return None, False
    gold = answer.strip()
    if options and len(gold) == 1 and gold.upper() in {letter.upper() for letter in options}:
        letter = choice_letter(prediction, options)
        return (letter if letter is not None else prediction), letter == gold.upper()
    return prediction, answers_match(prediction, gold)


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``n``, ``accuracy``, ``trigger_rate``, ``mean_tokens``, ``median_tokens`` and ``unfinished_rate`` of
    prediction records (each with ``correct``, ``thinking``, ``tokens`` and ``finished``)."""
    n = len(records)
    if n == 0:
        return {"n": 0, "accuracy": None, "trigger_rate": None, "mean_tokens": None, "median_tokens": None,
                "unfinished_rate": None}  # fmt: skip
    tokens = [int(r["tokens"]) for r in records]
    return {
        "n": n,
        "accuracy": sum(bool(r["correct"]) for r in records) / n,
        "trigger_rate": sum(bool(r["thinking"]) for r in records) / n,
        "mean_tokens": sum(tokens) / n,
        "median_tokens": float(statistics.median(tokens)),
        "unfinished_rate": sum(not r["finished"] for r in records) / n,
    }


def _order(values: Iterable[str], preferred: Sequence[str]) -> list[str]:
    values = list(dict.fromkeys(values))
    return [v for v in preferred if v in values] + sorted(v for v in values if v not in preferred)


def compute_metrics(
    records: Sequence[Mapping[str, Any]], group_keys: Sequence[str] | None = None
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{model: {mode: summary + {"by_<key>": {value: summary}}}}`` over prediction records.

    Records carry ``model``, ``mode`` and ``groups`` (``{key: value}``, e.g. ``{"difficulty": "hard"}``).
    ``group_keys`` default to every key found in ``groups``; a record without a key counts under ``"(none)"``.
    Models keep their first-seen order, modes the order of :data:`MODES`.
    """
    if group_keys is None:
        group_keys = list(dict.fromkeys(key for r in records for key in r.get("groups", {})))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for model in dict.fromkeys(r["model"] for r in records):
        mine = [r for r in records if r["model"] == model]
        out[model] = {}
        for mode in _order((r["mode"] for r in mine), MODES):
            rows = [r for r in mine if r["mode"] == mode]
            summary = summarize(rows)
            for key in group_keys:
                values = [str(r.get("groups", {}).get(key, "(none)")) for r in rows]
                summary[f"by_{key}"] = {
                    value: summarize([r for r, v in zip(rows, values, strict=True) if v == value])
                    for value in _order(values, ("easy", "medium", "hard"))
                }
            out[model][mode] = summary
    return out
