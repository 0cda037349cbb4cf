"""r4b.eval.metrics: the thinking trigger (empty, unclosed, malformed think blocks), answer scoring (boxed,
multiple choice), and the summaries (accuracy, trigger rate, mean / median tokens, groups) on hand-made records."""

from __future__ import annotations

import pytest

from r4b.answers import choice_letter
from r4b.eval.metrics import compute_metrics, score_response, summarize
from r4b.eval.report import build_report, forced_mode_flags, to_markdown
from r4b.format import MODE_SUFFIX, full_text, is_thinking, think_state

# (mode, response) -> (think_state, thinking)
CASES = [
    ("auto", "\n\n</think>\n\n5", "empty", False),  # the model chose to answer directly
    ("auto", "\nTwo plus three.\n</think>\n\n5", "thought", True),  # the model chose to think
    ("auto", "\nTwo plus three is", "unclosed", True),  # cut at max_new_tokens inside the thought
    ("auto", "\n \n\t", "empty", False),  # unclosed but nothing thought
    ("auto", "5", "malformed", False),  # no newline after <think>: neither of R-4B's formats
    ("auto", "The answer</think>5", "malformed", False),
    ("thinking", "Two plus three.\n</think>\n\n5", "thought", True),
    ("thinking", "</think>\n\n5", "empty", False),  # forced thinking, but the model closed at once
    ("thinking", "<think></think>\n\n5", "empty", False),  # a nested tag is no reasoning (a BPO policy wrote this)
    ("thinking", "Two plus", "unclosed", True),
    ("non_thinking", "\n\n5", "empty", False),
    ("non_thinking", "\n\n<think>\nlate thought\n</think>\n\n5", "empty", False),  # the first </think> closes
]


@pytest.mark.parametrize(("mode", "response", "state", "thinking"), CASES)
def test_think_state(mode, response, state, thinking):
    text = full_text(mode, response)
    assert text == MODE_SUFFIX[mode] + response
    assert think_state(text) == state
    assert is_thinking(text) is thinking


def test_no_think_tag_at_all_is_not_thinking():
    assert think_state("5") == "malformed" and not is_thinking("5")
    assert think_state("") == "malformed"
    assert think_state(" <think>\nx\n</think>\n\n5") == "malformed"  # the tag must open the turn


def test_full_text_rejects_unknown_mode():
    with pytest.raises(ValueError, match="unknown mode 'think'"):
        full_text("think", "x")


@pytest.mark.parametrize(
    ("text", "answer", "extracted", "correct"),
    [
        ("<think>\n\n</think>\n\n12", "12", "12", True),
        ("<think>\n5 * 2 = 10, so 12\n</think>\n\nThe result is \\boxed{12}.", "12", "12", True),
        ("<think>\n\n</think>\n\n13", "12", "13", False),
        ("<think>\nthe answer is 12", "12", None, False),  # unclosed: no answer, wrong
        ("<think>\n\n</think>\n\n", "12", None, False),  # empty answer
        ("<think>\n\n</think>\n\n\\frac{1}{2}", "0.5", "\\frac{1}{2}", True),  # math-verify
    ],
)
def test_score_response(text, answer, extracted, correct):
    assert score_response(text, answer) == (extracted, correct)


OPTIONS = {"A": "red", "B": "blue", "C": "green"}


@pytest.mark.parametrize(
    ("final", "letter"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B. blue", "B"),
        ("b", "B"),
        ("blue", "B"),  # the text of one option
        ("Blue.", "B"),
        ("The answer is B.", "B"),  # the only option letter standing alone
        ("A or B", None),  # ambiguous
        ("D", None),  # not an option
        ("purple", None),
        ("a red one", None),  # "a" is an article, not a choice; the text is no option's whole text
        ("C blue", "C"),
    ],
)
def test_choice_letter(final, letter):
    assert choice_letter(final, OPTIONS) == letter


def test_multiple_choice_scoring():
    direct = lambda final: "<think>\n\n</think>\n\n" + final
    assert score_response(direct("The answer is B."), "B", OPTIONS) == ("B", True)
    assert score_response(direct("\\boxed{C}"), "B", OPTIONS) == ("C", False)
    assert score_response(direct("purple"), "B", OPTIONS) == ("purple", False)
    assert score_response("<think>\nB", "B", OPTIONS) == (None, False)  # unclosed


def _record(correct, thinking, tokens, finished=True, mode="auto", model="m", **groups):
    return {"model": model, "mode": mode, "correct": correct, "thinking": thinking, "tokens": tokens,
            "finished": finished, "groups": groups}  # fmt: skip


def test_summarize_accuracy_trigger_rate_tokens():
    records = [
        _record(True, True, 100),
        _record(False, True, 300, finished=False),
        _record(True, False, 10),
        _record(True, False, 30),
    ]
    summary = summarize(records)
    assert summary == {
        "n": 4,
        "accuracy": 0.75,
        "trigger_rate": 0.5,
        "mean_tokens": 110.0,
        "median_tokens": 65.0,  # even count: the mean of the middle two (30, 100)
        "unfinished_rate": 0.25,
    }
    assert summarize(records[:3])["median_tokens"] == 100.0
    assert summarize([])["n"] == 0 and summarize([])["accuracy"] is None


def test_compute_metrics_by_model_mode_and_group():
    records = [
        _record(True, False, 10, difficulty="easy"),
        _record(False, True, 90, difficulty="hard"),
        _record(True, True, 110, difficulty="hard"),
        _record(True, True, 200, mode="thinking", difficulty="easy"),
        _record(False, False, 5, mode="non_thinking"),  # no difficulty: "(none)"
        _record(True, False, 7, model="other", mode="non_thinking", difficulty="hard"),
    ]
    metrics = compute_metrics(records)
    assert list(metrics) == ["m", "other"]
    assert list(metrics["m"]) == ["auto", "thinking", "non_thinking"]  # MODES order
    auto = metrics["m"]["auto"]
    assert auto["n"] == 3 and auto["accuracy"] == pytest.approx(2 / 3) and auto["trigger_rate"] == pytest.approx(2 / 3)
    assert auto["mean_tokens"] == pytest.approx(70.0) and auto["median_tokens"] == 90.0
    assert list(auto["by_difficulty"]) == ["easy", "hard"]
    hard = auto["by_difficulty"]["hard"]
    assert (hard["n"], hard["accuracy"], hard["trigger_rate"], hard["mean_tokens"]) == (2, 0.5, 1.0, 100.0)
    assert auto["by_difficulty"]["easy"]["trigger_rate"] == 0.0
    assert list(metrics["m"]["non_thinking"]["by_difficulty"]) == ["(none)"]
    assert metrics["other"]["non_thinking"]["accuracy"] == 1.0
    assert "by_difficulty" not in compute_metrics(records, group_keys=[])["m"]["auto"]


def test_report_flags_a_forced_mode_that_leaves_its_mode():
    """Issue 16: a forced thinking mode whose trigger rate is 0.469 (the model closes the thought at once on 53% of
    the items) is flagged in report.json and report.md; rates within the tolerance are not."""
    records = [_record(True, k < 15, 5, mode="thinking", model="bpo") for k in range(32)]  # 15 / 32 = 0.469
    records += [_record(True, False, 5, mode="non_thinking", model="bpo") for _ in range(32)]
    records += [_record(True, k < 31, 5, mode="thinking", model="annealed") for k in range(32)]  # 0.969: within 0.05
    records += [_record(True, k < 4, 5, mode="non_thinking", model="annealed") for k in range(32)]  # 0.125
    report = build_report(records, benchmark="eval", data="eval.jsonl", settings={})
    flags = {(f["model"], f["mode"]): f for f in report["forced_mode_flags"]}
    assert set(flags) == {("bpo", "thinking"), ("annealed", "non_thinking")}
    assert (
        flags["bpo", "thinking"]["trigger_rate"] == pytest.approx(15 / 32) and flags["bpo", "thinking"]["expected"] == 1
    )
    assert flags["annealed", "non_thinking"]["expected"] == 0
    markdown = to_markdown(report)
    assert "forced thinking mode has trigger rate 0.469, expected 1" in markdown
    assert "forced non_thinking mode has trigger rate 0.125, expected 0" in markdown
    assert forced_mode_flags(report["models"], tolerance=0.6) == []
    auto_only = build_report([_record(True, False, 5)], benchmark="eval", data="x", settings={})
    assert auto_only["forced_mode_flags"] == [] and "Forced modes departing" not in to_markdown(auto_only)
