"""Final answers: extract one from a response, and check it against a reference.

The final answer is what follows the last ``</think>`` (the whole response if there is none): the last
``\\boxed{...}`` in it (nested braces allowed), else a caller's regex, else the text itself (:func:`extract_answer`).
Multiple-choice references (a single letter) match a letter answer such as ``B``, ``(B)`` or ``B. 42``
(:func:`leading_choice`). Everything else is compared with math-verify (fractions, LaTeX, units, sets), with a
relative numeric tolerance for plain numbers and normalized string equality (:func:`normalize`) as the last resort
(:func:`answers_match`). With the options of a multiple-choice question, :func:`choice_letter` reads the letter an
answer picks.

The rewards (:mod:`r4b.rl.reward`), evaluation (:mod:`r4b.eval.metrics`) and curation all score with these. This
module imports only the standard library and :mod:`r4b.format` (math-verify when a comparison needs it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from r4b.format import THINK_CLOSE, THINK_OPEN

__all__ = ["answers_match", "choice_letter", "extract_answer", "last_boxed", "leading_choice", "normalize"]

# A leading option letter: "B", "B.", "B:", "B)", "(B)", "B text".
_LEADING_CHOICE = re.compile(r"^\(?([A-Za-z])\)?(?:[.:)\s]|$)")
_LONE_LETTER = re.compile(r"(?<![A-Za-z0-9])([A-Z])(?![A-Za-z0-9])")
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


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
    if THINK_OPEN in response and THINK_CLOSE not in response:
        return None  # an unfinished thought has no answer
    final = response.rsplit(THINK_CLOSE, 1)[-1].strip()
    if "\\boxed{" in final or "\\fbox{" in final:
        return last_boxed(final)  # None when its braces never close
    if pattern is not None:
        matches = re.findall(pattern, final)
        return matches[-1].strip() if matches else None
    return final or None


def normalize(text: str) -> str:
    """An answer for string comparison: stripped of whitespace, ``$`` and a final ``.``, inner whitespace runs as one
    space, lower case."""
    return re.sub(r"\s+", " ", text.strip().strip("$").rstrip(".")).lower()


def leading_choice(text: str) -> re.Match[str] | None:
    """The match of the option letter ``text`` (stripped) opens with (group 1): ``B``, ``B.``, ``B:``, ``B)``,
    ``(B)`` or ``B`` and a space; None when it opens with none."""
    return _LEADING_CHOICE.match(text.strip())


def _numbers_match(pred: str, gold: str, rel_tol: float) -> bool | None:
    p, g = pred.replace(",", ""), gold.replace(",", "")
    if not (_NUMBER.match(p) and _NUMBER.match(g)):
        return None
    a, b = float(p), float(g)
    return abs(a - b) <= rel_tol * max(1.0, abs(b))


def answers_match(pred: str, gold: str, *, rel_tol: float = 1e-4) -> bool:
    """Whether the final answer ``pred`` matches the reference ``gold`` (see the module docstring)."""
    gold = gold.strip()
    if re.fullmatch(r"[A-Ja-j]", gold):
        found = leading_choice(pred)
        return bool(found) and found.group(1).upper() == gold.upper()
    numeric = _numbers_match(pred.strip(), gold, rel_tol)
    if numeric is not None:
        return numeric
    if normalize(pred) == normalize(gold):
        return True
    from math_verify import parse, verify

    wrap = lambda s: s if "$" in s else f"${s}$"
    try:
        return bool(verify(parse(wrap(gold)), parse(wrap(pred))))
    except Exception:  # math-verify gives up on some inputs: not a match
        return False


def choice_letter(prediction: str, options: Mapping[str, str]) -> str | None:
    """The option letter a final answer picks, or None: a leading ``B.`` / ``B:`` / ``B)`` / ``(B)``, or a leading
    ``B`` that is the only option letter in the answer (``A or B`` picks none); else the text of exactly one
    option; else the only option letter standing alone (``The answer is B``)."""
    letters = {letter.upper() for letter in options}
    pred = prediction.strip()
    lone = {letter for letter in _LONE_LETTER.findall(pred) if letter in letters}
    found = leading_choice(pred)
    if found and found.group(1).upper() in letters:
        letter, rest = found.group(1), pred[found.end() - 1 :]
        if found.end() == len(pred) or rest[0] in ".:)" or pred.startswith("("):
            return letter.upper()  # "B", "B.", "B: blue", "(B) blue"
        if letter.isupper():  # "B blue" picks B, "A or B" nothing
            return letter if lone <= {letter} else None
    by_text = [letter for letter, text in options.items() if text and normalize(text) == normalize(pred)]
    if len(by_text) == 1:
        return by_text[0].upper()
    return lone.pop() if len(lone) == 1 else None
