"""R-4B's auto-thinking format: think tags, modes, mode suffixes, and reading a think block.

The mode is forced by what follows ``<|im_start|>assistant\\n`` (:data:`MODE_SUFFIX`): ``<think>`` lets the model
choose (auto), ``<think>\\n`` forces thinking, ``<think>\\n\\n</think>`` (:data:`EMPTY_THINK`) forces a direct
answer. ``\\n`` and ``\\n\\n`` are distinct tokens, so the first token after ``<think>`` is the model's mode decision.
An assistant turn is ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}`` or ``<think>\\n\\n</think>\\n\\n{answer}``
(:func:`format_response`, read back by :func:`parse_response`).

Definitions (the same in every mode, computed from the text, so a broken mode suffix shows up):

- **Full text** (:func:`full_text`): the assistant turn as written, ``MODE_SUFFIX[mode] + response`` (auto:
  ``<think>`` + response; thinking: ``<think>\\n`` + response; non-thinking: ``<think>\\n\\n</think>`` + response).
- **Think block**: the text after the opening ``<think>``, up to the first ``</think>``, or to the end of the
  text when no ``</think>`` follows (an *unclosed* think block: generation stopped, at ``max_new_tokens``
  or a stop token, inside the thought). Its reasoning (:func:`thought`) is the block without ``<think>`` tags.
- **Thinking** (:func:`think_state`, :func:`is_thinking`): the full text starts with ``<think>`` directly followed by
  a newline (R-4B's format: ``<think>\\n`` opens both a thought and the empty ``<think>\\n\\n</think>``), and the
  think block holds non-whitespace content besides ``<think>`` tags (``<think>\\n<think></think>`` is empty: a
  policy can learn to write that to look thinking). So ``<think>\\n\\n</think>`` (an empty think) is not thinking;
  an unclosed block with content is thinking (and has no answer, so it is wrong); a text without a leading
  ``<think>``, or whose ``<think>`` is not followed by a newline (``<think>The answer``), is *malformed* and not
  thinking.

This module imports only the standard library, so every layer of r4b (data, rollout, rl, eval, train) can use it.
"""

from __future__ import annotations

import re

__all__ = [
    "EMPTY_THINK",
    "MODES",
    "MODE_SUFFIX",
    "NON_THINKING_RESPONSE",
    "THINKING_RESPONSE",
    "THINKING_STATES",
    "THINK_CLOSE",
    "THINK_OPEN",
    "THINK_STATES",
    "check_mode",
    "format_response",
    "full_text",
    "is_thinking",
    "parse_response",
    "think_state",
    "thought",
]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
EMPTY_THINK = f"{THINK_OPEN}\n\n{THINK_CLOSE}"  # a direct answer's think block

MODES = ("auto", "thinking", "non_thinking")
# What the prompt ends with in each mode (the paper's suffixes).
MODE_SUFFIX = {"auto": THINK_OPEN, "thinking": f"{THINK_OPEN}\n", "non_thinking": EMPTY_THINK}

# An assistant turn in R-4B's format (:func:`format_response`): thinking, and non-thinking (an empty think block).
THINKING_RESPONSE = re.compile(r"<think>\n(?P<reasoning>.*?)\n</think>\n\n(?P<answer>.*)", re.DOTALL)
NON_THINKING_RESPONSE = re.compile(r"<think>\n\n</think>\n\n(?P<answer>.*)", re.DOTALL)

# think_state values: "thought" (closed, with content), "unclosed" (no </think>, with content), "empty"
# (nothing but whitespace in the block, closed or not), "malformed" (no leading "<think>\n").
THINK_STATES = ("thought", "unclosed", "empty", "malformed")
THINKING_STATES = frozenset({"thought", "unclosed"})


def check_mode(mode: str) -> str:
    """``mode`` itself, or a ValueError naming the modes."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (expected one of {', '.join(MODES)})")
    return mode


def format_response(answer: str, reasoning: str | None) -> str:
    """R-4B's assistant text: ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}`` or, without
    reasoning, ``<think>\\n\\n</think>\\n\\n{answer}``."""
    if reasoning is None:
        return f"{MODE_SUFFIX['non_thinking']}\n\n{answer}"
    return f"{MODE_SUFFIX['thinking']}{reasoning}\n{THINK_CLOSE}\n\n{answer}"


def parse_response(text: str) -> tuple[str, str | None, str] | None:
    """``(mode, reasoning, answer)`` of an assistant text in R-4B's format (:func:`format_response`): mode
    ``non_thinking`` (reasoning None) for an empty think block, ``thinking`` for one whose reasoning has
    non-whitespace content; None for anything else."""
    empty = NON_THINKING_RESPONSE.fullmatch(text)
    if empty is not None:
        return "non_thinking", None, empty["answer"]
    full = THINKING_RESPONSE.fullmatch(text)
    if full is not None and full["reasoning"].strip():
        return "thinking", full["reasoning"], full["answer"]
    return None


def full_text(mode: str, response: str, suffix: str | None = None) -> str:
    """The assistant turn as written: ``MODE_SUFFIX[mode] + response`` (``mode`` checked), or ``suffix + response``
    when the prompt ended with another ``suffix`` than the template's (``mode`` is then not read)."""
    if suffix is not None:
        return suffix + response
    return MODE_SUFFIX[check_mode(mode)] + response


def thought(full_text: str) -> str:
    """The reasoning of a full text: its think block (after the first ``<think>``, up to the first ``</think>`` or
    the end) without ``<think>`` tags, stripped; empty when there is none."""
    if not full_text.startswith(THINK_OPEN):
        return ""
    return full_text[len(THINK_OPEN) :].partition(THINK_CLOSE)[0].replace(THINK_OPEN, "").strip()


def think_state(text: str) -> str:
    """One of :data:`THINK_STATES` for a full text (see the module docstring)."""
    if not text.startswith(THINK_OPEN + "\n"):
        return "malformed"
    if not thought(text):  # a nested <think> tag is no reasoning
        return "empty"
    return "thought" if THINK_CLOSE in text[len(THINK_OPEN) :] else "unclosed"


def is_thinking(text: str) -> bool:
    """Whether a full text thinks: a think block with non-whitespace content, closed or not."""
    return think_state(text) in THINKING_STATES
