"""Performance-based split of objective questions into thinking and non-thinking samples (R-4B's hard mining).

R-4B's bi-mode annealing data is split without manual labels: for each objective question a model samples
N = 8 answers; when all are wrong the question becomes a reasoning (thinking) sample, otherwise a
direct-answer (non-thinking) sample. :func:`curate` does this with any :class:`~r4b.rollout.RolloutEngine`
(by default transformers' ``generate``) and a rule-based reward.

Input: a JSONL of questions, one object a line, with ``messages`` (no assistant turn), optional ``images``
(relative to the file's directory) and a reference ``answer``, read by r4b's prompt reader
(:func:`r4b.data.read_prompts`); fields it does not know are carried along unchecked. Output under
``out_dir``: ``thinking.jsonl`` and ``non_thinking.jsonl`` (each record as read, plus ``"mode"`` and
``"curate": {"correct": k, "n": n}``, image paths rewritten relative to ``out_dir``), and
``curate_report.json`` with the counts (and, under ``"data_report"``, the bad lines skipped with
``on_error="skip"``).
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
from typing import TYPE_CHECKING, Any, Literal

from r4b.format import MODES, check_mode

# Heavy imports (torch, transformers, r4b.data) happen inside the functions: `r4b --help` stays fast.
if TYPE_CHECKING:
    from r4b.data.report import DataReport
    from r4b.data.schema import Sample
    from r4b.rollout.base import Prompt, RolloutEngine, SamplingParams

__all__ = ["Question", "add_parser", "curate", "load_model", "read_questions", "split_mode"]


@dataclass
class Question:
    """One validated question: its sample (fields r4b.data does not know ride along in ``sample.extra``) and the
    prompt handed to the rollout engine."""

    sample: Sample
    prompt: Prompt

    @property
    def answer(self) -> str:
        return self.sample.answer  # check_prompt guarantees a non-empty answer

    @property
    def source(self) -> str:
        return self.sample.source


def read_questions(
    path: str | Path, *, on_error: Literal["raise", "skip"] = "raise"
) -> tuple[list[Question], DataReport]:
    """Read a JSONL of questions with :func:`r4b.data.read_prompts`: a bad line raises a :class:`DataError`
    naming ``file:line`` and the field, or with ``on_error="skip"`` is counted in the returned report."""
    from r4b.data.schema import read_prompts
    from r4b.rollout.base import Prompt

    # keep_unknown: curate documents that a question's own fields are carried into its output.
    samples, report = read_prompts(path, on_error=on_error, what="a question", keep_unknown=True)
    return [Question(sample, Prompt(sample.messages, list(sample.images))) for sample in samples], report


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
    from r4b.rollout.factory import build_rollout_engine

    return build_rollout_engine(model, tokenizer, batch_size=batch_size)  # the processor: the model's default


def _chunks(items: list[Question], size: int) -> Iterator[list[Question]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _output_record(question: Question, mode: str, correct: int, n: int, out_dir: Path) -> dict[str, Any]:
    sample = question.sample
    record: dict[str, Any] = {"messages": sample.messages}
    if sample.images:  # keep image paths valid next to the output files
        record["images"] = [os.path.relpath(Path(p).resolve(), out_dir.resolve()) for p in sample.images]
    record["answer"] = sample.answer
    if sample.meta:
        record["meta"] = sample.meta
    record.update(sample.extra)
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
    on_error: Literal["raise", "skip"] = "raise",
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
        on_error: ``"raise"`` on the first bad question, or ``"skip"`` bad lines, counting them by reason in the
            report's ``data_report``.

    Returns:
        The report written to ``curate_report.json``: counts per mode and the histogram of correct answers.
    """
    from r4b.rl.reward import answer_reward
    from r4b.rollout.base import SamplingParams

    check_mode(mode)
    sampling = sampling if sampling is not None else SamplingParams(temperature=1.0, max_new_tokens=256, seed=0)
    reward = reward if reward is not None else answer_reward
    if n < 1 or chunk_size < 1:
        raise ValueError(f"n and chunk_size must be >= 1, got n={n}, chunk_size={chunk_size}")
    questions, data_report = read_questions(data_path, on_error=on_error)  # bad data fails before a model loads
    if not questions:
        from r4b.errors import InputError

        skipped = sum(data_report.skipped.values())
        raise InputError(f"{data_path}: no questions" + (f" ({skipped} bad lines skipped)" if skipped else ""))
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
        "data_report": data_report.to_dict(),
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
    from r4b.errors import output_dir

    for flag in ("n", "batch_size", "max_new_tokens"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    output_dir(args.out, "--out", create=False)  # checked before a model loads
    if not Path(args.data).is_file():
        raise InputError(f"--data {args.data}: no such file")
    try:
        report = curate(
            args.model, args.data, args.out, n=args.n, mode=args.mode, sampling=sampling,
            batch_size=args.batch_size, device=args.device, on_error=args.on_error,
        )  # fmt: skip
    except (DataError, FileNotFoundError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(str(error)) from None
    print(
        f"curated {report['questions']} questions: {report['thinking']} thinking, "
        f"{report['non_thinking']} non-thinking (correct of {report['n']}: {report['correct_histogram']}) -> {args.out}"
    )
    skipped = report["data_report"]["skipped"]
    if skipped:
        print(f"skipped {sum(skipped.values())} bad lines ({skipped}); see curate_report.json")
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
    parser.add_argument("--mode", default="non_thinking", choices=MODES)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32, help="rows (question x answer) per generate call")
    parser.add_argument("--device", default=None, help="e.g. cuda; default: where the model loads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--on-error", default="raise", choices=("raise", "skip"), help="a bad question line stops the run or is counted"
    )
    parser.set_defaults(run=_run)
    return parser
