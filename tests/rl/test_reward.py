"""Answer extraction and checking on tricky strings."""

import pytest

from r4b.answers import extract_answer
from r4b.format import MODE_SUFFIX, thought
from r4b.rl import REWARDS, answer_reward, format_reward
from r4b.rl.reward import off_mode


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("<think>\nso 3\n</think>\n\n12", "12"),
        ("<think>\n\n</think>\n\nThe answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{\\{a, \\{b\\}\\}}", "\\{a, \\{b\\}\\}"),
        ("\\boxed{x^{2}+1}", "x^{2}+1"),
        ("<think>\nnever closed", None),
        ("\\boxed{unbalanced", None),
        ("", None),
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


@pytest.mark.parametrize(
    ("response", "answer", "reward"),
    [
        ("<think>\n\n</think>\n\n12", "12", 1.0),
        ("<think>\n3*4\n</think>\n\n\\boxed{12}", "12", 1.0),
        ("\\boxed{12.00001}", "12", 1.0),
        ("\\boxed{13}", "12", 0.0),
        ("\\boxed{1,000}", "1000", 1.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", 1.0),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
        ("(B)", "B", 1.0),
        ("B. 42", "B", 1.0),
        ("b", "B", 1.0),
        ("Because", "B", 0.0),
        ("C", "B", 0.0),
        ("Paris.", "paris", 1.0),
        ("<think>\nthe answer is 12", "12", 0.0),
    ],
)
def test_answer_reward(response, answer, reward):
    assert answer_reward(response, answer) == reward


def test_custom_pattern():
    assert answer_reward("Answer: 7 apples", "7", pattern=r"Answer:\s*(\d+)") == 1.0


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("<think>\nwork\n</think>\n\nThe answer is \\boxed{4}.", 1.0),
        ("<think>\n\n</think>\n\n4", 1.0),  # non-thinking: an empty block is well formed
        ("<think>\nwork, never closed", 0.0),
        ("<think>\nwork\n</think>\n\n   ", 0.0),  # no answer after the block
        ("4 <think>\n</think>\n\n4", 0.0),  # not first
        ("<think>\na</think><think>b</think>\n\n4", 0.0),  # two blocks
        ("<think>\na</think>\n\n4 </think>", 0.0),
    ],
)
def test_format_reward(response, expected):
    assert format_reward(response) == expected and REWARDS["format"](response, "4") == expected


@pytest.mark.parametrize(
    ("mode", "response", "off"),
    [
        ("thinking", "Two and two.\n</think>\n\n4", False),
        ("thinking", "Two and", False),  # cut inside the thought: still thinking
        ("thinking", "</think>\n\n4", True),  # the forced thought closed at once: off-mode
        ("thinking", "\n</think>\n\n4", True),
        ("thinking", " \n ", True),  # nothing but whitespace, cut off
        ("thinking", "<think></think>\n\n4", True),  # only a nested tag: the form of a thought, no reasoning
        ("non_thinking", "\n\n4", False),
        ("non_thinking", "\n\n<think>\nlate thought\n</think>\n\n4", True),  # a second, thinking block
        ("auto", "\n\n</think>\n\n4", False),  # the auto mode chooses: never off-mode
        ("auto", "\nTwo and two.\n</think>\n\n4", False),
    ],
)
def test_off_mode(mode, response, off):
    assert off_mode(MODE_SUFFIX[mode] + response, mode) is off


def test_off_mode_with_a_replaced_thinking_suffix():
    assert not off_mode("<think>\nLet me think.\n</think>\n\n4", "thinking")  # the suffix's own text is a thought


def test_off_mode_minimum_thought_length():
    short, full = "<think>\nIt is 4.\n</think>\n\n4", "<think>\nThe number in the picture is 4.\n</think>\n\n4"
    assert thought(short) == "It is 4." and thought("<think>\n<think>a</think>b") == "a" and thought("4") == ""
    assert not off_mode(short, "thinking") and off_mode(short, "thinking", min_thought_chars=20)
    assert not off_mode(full, "thinking", min_thought_chars=20)
    assert not off_mode("<think>\n\n</think>\n\n4", "non_thinking", min_thought_chars=20)  # thinking mode only
