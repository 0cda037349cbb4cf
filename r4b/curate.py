"""Performance-based split of objective questions into thinking and non-thinking samples (R-4B's hard mining).

R-4B's bi-mode annealing data is split without manual labels: for each objective question a model samples
N = 8 answers; when all are wrong the question becomes a reasoning (thinking) sample, otherwise a
direct-answer (non-thinking) sample. :func:`curate` does this with any :class:`~r4b.rollout.RolloutEngine`
(by default transformers' ``generate``) and a rule-based reward.

Input: a JSONL of questions, one object a line, with ``messages`` (no assistant turn), optional ``images``
(relative to the file's directory) and a reference ``answer``; other fields are carried along. Output under
``out_dir``: ``thinking.jsonl`` and ``non_thinking.jsonl`` (each record as read, plus ``"mode"`` and
``"curate": {"correct": k, "n": n}``, image paths rewritten relative to ``out_dir``), and
``curate_report.json`` with the counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Heavy imports (torch, transformers, r4b.data) happen inside the functions: `r4b --help` stays fast.
if TYPE_CHECKING:
    from r4b.rollout.base import Prompt, RolloutEngine, SamplingParams

__all__ = ["Question", "add_parser", "curate", "load_model", "read_questions", "split_mode"]


@dataclass
class Question:
    """One question: the record as read, its prompt, reference answer and ``file:line``."""

    record: dict[str, Any]
    prompt: Prompt
    answer: str
    source: str


def read_questions(path: str | Path) -> list[Question]:
    """Read a JSONL of questions; a bad line raises :class:`DataError` naming ``file:line`` and the field.

    ``messages``, ``images``, ``answer`` and ``meta`` are validated by :func:`r4b.data.parse_sample`; other
    fields are not checked, only carried along.
    """
    from r4b.data.errors import DataError
    from r4b.data.schema import parse_sample
    from r4b.rollout.base import Prompt

    path = Path(path)
    questions = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            record = _json_object(raw, where)
            for name in ("messages", "answer"):
                if name not in record:
                    raise DataError(where, "missing required field", field=name, reason="missing_field")
            if not isinstance(record["answer"], str) or not record["answer"].strip():
                raise DataError(where, "must be a non-empty string", field="answer", reason="bad_type")
            core = {key: record[key] for key in ("messages", "images", "answer", "meta") if key in record}
            sample = parse_sample({**core, "mode": "non_thinking"}, where=where, root=path.parent)
            if sample.has_response:
                roles = [message["role"] for message in sample.messages]
                raise DataError(
                    where,
                    "a question must not hold an assistant turn (the model writes the answers)",
                    field=f"messages[{roles.index('assistant')}]",
                    reason="bad_role",
                )
            questions.append(Question(record, Prompt(sample.messages, list(sample.images)), sample.answer, where))
    return questions


def _json_object(raw: bytes, where: str) -> dict[str, Any]:
    from r4b.data.errors import DataError

    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise DataError(where, f"not UTF-8 (byte {error.start})", reason="malformed_json") from None
    except json.JSONDecodeError as error:
        raise DataError(
            where, f"malformed JSON: {error.msg} at column {error.colno}", reason="malformed_json"
        ) from None
    if not isinstance(record, dict):
        raise DataError(where, "a question must be a JSON object", reason="malformed_json")
    return record


def split_mode(correct: int) -> str:
    """R-4B's rule: no correct answer out of N -> ``thinking``; at least one -> ``non_thinking``."""
    return "thinking" if correct == 0 else "non_thinking"


def load_model(name: str | Path, *, device: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` in eval mode: ``"tiny"`` is the untrained embedded tiny R-4B; a directory is an
    R-4B checkpoint (its layout or the older LLaVA one), through :func:`r4b.models.loading.load_model_and_processor`."""
    from r4b.models.loading import load_model_and_processor

    if str(name) != "tiny" and not Path(name).is_dir():
        raise FileNotFoundError(f"--model {name}: not a directory (nor 'tiny')")
    model, tokenizer, _ = load_model_and_processor(None if str(name) == "tiny" else name)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def _engine(model: Any, tokenizer: Any, batch_size: int, device: str | None) -> RolloutEngine:
    from r4b.rollout.base import RolloutEngine

    if isinstance(model, RolloutEngine):
        return model
    if isinstance(model, (str, Path)):
        model, loaded_tokenizer = load_model(model, device=device)
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    if tokenizer is None:
        raise ValueError("curate needs a tokenizer with a model object")
    from r4b.rollout.hf import HFRolloutEngine

    return HFRolloutEngine(model, tokenizer, batch_size=batch_size)


def _chunks(items: list[Question], size: int) -> Iterator[list[Question]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _output_record(question: Question, mode: str, correct: int, n: int, out_dir: Path) -> dict[str, Any]:
    record = dict(question.record)
    if question.prompt.images:  # keep image paths valid next to the output files
        record["images"] = [os.path.relpath(Path(p).resolve(), out_dir.resolve()) for p in question.prompt.images]
    record["mode"] = mode
    record["curate"] = {"correct": correct, "n": n}
    return record


def curate(
    model: str | Path | Any,
    data_path: str | Path,
    out_dir: str | Path,
    *,
    n: int = 8,
    mode: str = "non_thinking",
    sampling: SamplingParams | None = None,
    reward: Callable[[str, str], float] | None = None,
    tokenizer: Any = None,
    batch_size: int = 32,
    chunk_size: int = 64,
    device: str | None = None,
) -> dict[str, Any]:
    """Split the questions of ``data_path`` by how often ``model`` answers them correctly (see the module docstring).

    Args:
        model: ``"tiny"``, a model directory, a model object (then ``tokenizer`` is required) or a RolloutEngine.
        n: answers sampled per question (the paper: 8).
        mode: the mode the answers are sampled in (the suffix forced on the prompt).
        sampling: sampling parameters (temperature > 0, or the n answers are identical); default temperature 1,
            256 new tokens, seed 0.
        reward: ``reward(full_text, answer) -> float``, an answer correct when > 0; default
            :func:`r4b.rl.reward.answer_reward`.
        batch_size: rows (question x answer) per ``generate`` batch of the default engine.
        chunk_size: questions handed to the engine per ``generate`` call (its seed is ``sampling.seed`` + chunk index).
        device: where a model loaded by name goes (default: where it loads).

    Returns:
        The report written to ``curate_report.json``: counts per mode and the histogram of correct answers.
    """
    from r4b.rl.reward import answer_reward
    from r4b.rollout.base import SamplingParams, check_mode

    check_mode(mode)
    sampling = sampling if sampling is not None else SamplingParams(temperature=1.0, max_new_tokens=256, seed=0)
    reward = reward if reward is not None else answer_reward
    if n < 1 or chunk_size < 1:
        raise ValueError(f"n and chunk_size must be >= 1, got n={n}, chunk_size={chunk_size}")
    questions = read_questions(data_path)  # bad data fails before a model loads
    engine = _engine(model, tokenizer, batch_size, device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    histogram: Counter[int] = Counter()
    counts = Counter({"thinking": 0, "non_thinking": 0})
    unfinished = 0
    with (out / "thinking.jsonl").open("w") as thinking, (out / "non_thinking.jsonl").open("w") as direct:
        files = {"thinking": thinking, "non_thinking": direct}
        for index, chunk in enumerate(_chunks(questions, chunk_size)):
            params = dataclasses.replace(sampling, seed=sampling.seed + index)
            answers = engine.generate([q.prompt for q in chunk], n=n, mode=mode, sampling=params)
            for question, rollouts in zip(chunk, answers, strict=True):
                correct = sum(reward(rollout.full_text, question.answer) > 0 for rollout in rollouts)
                unfinished += sum(not rollout.finished for rollout in rollouts)
                split = split_mode(correct)
                counts[split] += 1
                histogram[correct] += 1
                record = _output_record(question, split, correct, len(rollouts), out)
                files[split].write(json.dumps(record, ensure_ascii=False) + "\n")
    report = {
        "data": str(data_path),
        "questions": len(questions),
        "thinking": counts["thinking"],
        "non_thinking": counts["non_thinking"],
        "thinking_fraction": counts["thinking"] / len(questions) if questions else 0.0,
        "n": n,
        "mode": mode,
        "correct_histogram": {str(k): histogram[k] for k in sorted(histogram)},
        "unfinished_answers": unfinished,
        "sampling": dataclasses.asdict(sampling),
    }
    (out / "curate_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _run(args: argparse.Namespace) -> int:
    from r4b.data.errors import DataError
    from r4b.errors import InputError
    from r4b.rollout.base import SamplingParams

    try:
        sampling = SamplingParams(
            temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed
        )
    except ValueError as error:
        raise InputError(f"r4b curate: {error}") from None
    try:
        report = curate(
            args.model, args.data, args.out, n=args.n, mode=args.mode, sampling=sampling,
            batch_size=args.batch_size, device=args.device,
        )  # fmt: skip
    except (DataError, FileNotFoundError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(str(error)) from None
    print(
        f"curated {report['questions']} questions: {report['thinking']} thinking, "
        f"{report['non_thinking']} non-thinking (correct of {report['n']}: {report['correct_histogram']}) -> {args.out}"
    )
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``r4b curate`` on an ``argparse`` subparsers object (the handler is ``args.run``)."""
    help = "split questions into thinking / non-thinking by sampling N answers (all wrong -> thinking)"
    parser = subparsers.add_parser("curate", help=help, description=help)
    parser.add_argument("--model", required=True, help="model directory, or 'tiny' for the untrained tiny R-4B")
    parser.add_argument(
        "--data", required=True, help="JSONL of questions with 'answer' (e.g. rl.jsonl of r4b data synth)"
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n", type=int, default=8, help="answers sampled per question (default 8)")
    parser.add_argument("--mode", default="non_thinking", choices=("auto", "thinking", "non_thinking"))
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32, help="rows (question x answer) per generate call")
    parser.add_argument("--device", default=None, help="e.g. cuda; default: where the model loads")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=_run)
    return parser
