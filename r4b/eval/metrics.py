"""Auto-thinking metrics: accuracy, thinking trigger rate and output tokens, per model, mode and group.

Definitions (computed from the text, so a broken mode suffix shows up). The full text, think block and what counts
as thinking (:func:`r4b.format.think_state`, :func:`r4b.format.is_thinking`) are defined in :mod:`r4b.format`.

- **Trigger rate**: the share of responses that are thinking. Forced modes report it too: 1.0 (thinking) and
  0.0 (non-thinking) by construction when the model follows the format.
- **Output tokens**: ``len(response_ids)``, every token the model generated, **including the stop token**
  (``<|im_end|>``) when one was generated; a response cut at ``max_new_tokens`` has exactly that many. In
  auto mode this counts the mode decision (``\\n\\n</think>`` or ``\\n``), which the forced modes get
  for free in their prompt suffix.
- **Correct**: the final answer (:func:`r4b.answers.extract_answer`: after the last ``</think>``; the
  last ``\\boxed{}`` if any) matches the reference (:func:`r4b.answers.answers_match`). A multiple-choice
  question (options ``A``, ``B``, ... and a one-letter reference) is scored on the chosen letter
  (:func:`r4b.answers.choice_letter`: a leading ``B`` / ``(B)`` / ``B. text``, else the text of exactly one option,
  else the only option letter standing alone in the answer). No answer is wrong.
- **Unfinished rate**: the share of responses cut at ``max_new_tokens`` (no stop token).
- **Thought tokens** (per model and mode, :func:`thought_percentiles`): the 50th, 90th and 99th percentiles
  (linear interpolation, numpy's default) of ``thought_tokens`` over the thinking responses, the response
  tokens before the first ``</think>`` (an unclosed thought: all but the stop token; auto mode counts its ``\n``
  decision too); None without a thinking response that carries the count (predictions of older versions).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from r4b.answers import answers_match, choice_letter, extract_answer
from r4b.format import MODES

__all__ = ["THOUGHT_PERCENTILES", "compute_metrics", "score_response", "summarize", "thought_percentiles"]

THOUGHT_PERCENTILES = (50, 90, 99)


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


def thought_percentiles(records: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """``{"p50", "p90", "p99"}`` of the thinking records' ``thought_tokens`` (see the module docstring)."""
    lengths = sorted(int(r["thought_tokens"]) for r in records if r.get("thinking") and "thought_tokens" in r)
    return {f"p{q}": _percentile(lengths, q) if lengths else None for q in THOUGHT_PERCENTILES}


def _percentile(ordered: Sequence[int], q: float) -> float:
    """The ``q``-th percentile of sorted values, interpolated linearly between the two nearest ranks."""
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


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
            summary["thought_tokens"] = thought_percentiles(rows)
            for key in group_keys:
                values = [str(r.get("groups", {}).get(key, "(none)")) for r in rows]
                summary[f"by_{key}"] = {
                    value: summarize([r for r, v in zip(rows, values, strict=True) if v == value])
                    for value in _order(values, ("easy", "medium", "hard"))
                }
            out[model][mode] = summary
    return out
