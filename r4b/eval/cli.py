"""``r4b eval``: accuracy, thinking trigger rate and output tokens of one or several models in each mode."""

from __future__ import annotations

import argparse
from typing import Any

from r4b.format import MODES

# Heavy imports (torch, transformers) happen inside the handler: `r4b --help` stays fast.

__all__ = ["add_parser"]

DEFAULT_OUT = "eval_results"


def _modes(text: str) -> list[str]:
    return [mode.strip() for mode in text.split(",") if mode.strip()]


def _vllm_args(pairs: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` pairs, each value read as YAML (``0.5`` a float, ``true`` a bool, ``[1, 2]`` a list)."""
    import yaml

    from r4b.eval.errors import EvalError

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise EvalError(f"--vllm-arg {pair!r}: expected KEY=VALUE (e.g. gpu_memory_utilization=0.8)")
        out[key] = yaml.safe_load(value)
    return out


def _run(args: argparse.Namespace) -> int:
    from r4b.eval.errors import EvalError
    from r4b.eval.runner import evaluate, model_name

    names = args.name or []
    if names and len(names) != len(args.model):
        raise EvalError(f"{len(names)} --name for {len(args.model)} --model; give one --name per --model or none")
    names = names or [model_name(spec) for spec in args.model]
    from r4b.errors import output_dir

    output_dir(args.out, "--out", create=False)  # checked before a model loads
    if len(set(names)) != len(names):
        raise EvalError(f"model names {names} clash; tell them apart with --name (one per --model)")
    report = evaluate(
        dict(zip(names, args.model, strict=True)), args.data, args.out, modes=_modes(args.modes),
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        batch_size=args.batch_size, seed=args.seed, limit=args.limit, benchmark=args.benchmark,
        device=args.device, dtype=args.dtype, engine=args.engine, vllm_args=_vllm_args(args.vllm_arg),
        progress=not args.no_progress, plots=not args.no_plots,
    )  # fmt: skip
    for name, per_mode in report["models"].items():
        for mode, m in per_mode.items():
            print(
                f"{report['benchmark']} {name} {mode}: accuracy {100 * m['accuracy']:.1f}%, "
                f"trigger rate {100 * m['trigger_rate']:.1f}%, tokens mean {m['mean_tokens']:.1f} "
                f"median {m['median_tokens']:.1f} (n={m['n']})"
            )
    print(f"report: {args.out}/report.md")
    _update_model_cards(dict(zip(names, args.model, strict=True)), report)
    return 0


def _update_model_cards(models: dict[str, str], report: dict[str, Any]) -> None:
    """Add the per-mode table to the card of every evaluated r4b export (a directory whose README.md is an r4b
    model card); other directories, e.g. a released model's, are never written to."""
    from r4b.models.model_card import read_card_data, update_model_card

    for name, spec in models.items():
        if spec == "tiny" or read_card_data(spec) is None:
            continue
        try:
            print(f"model card: {update_model_card(spec, report, name=name)}")
        except OSError as error:  # a read-only model directory: the report still stands
            print(f"model card of {spec} not updated: {error}")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``r4b eval`` on an ``argparse`` subparsers object (the handler is ``args.run``)."""
    help = "evaluate models in auto / thinking / non-thinking mode: accuracy, trigger rate, output tokens"
    parser = subparsers.add_parser("eval", help=help, description=help)
    parser.add_argument(
        "--model", action="append", required=True, metavar="DIR|tiny",
        help="model directory (R-4B, Qwen2.5-VL, Qwen3-VL), or 'tiny' for the untrained tiny R-4B; repeat to compare "
        "models in one report",
    )  # fmt: skip
    parser.add_argument(
        "--name", action="append", metavar="NAME",
        help="report name of each --model, in order (default: the directory's name)",
    )  # fmt: skip
    parser.add_argument(
        "--data", required=True, help="JSONL of prompts with 'answer' (e.g. eval.jsonl of r4b data synth) or a "
        "VLMEvalKit .tsv",
    )  # fmt: skip
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated (default: all three)")
    parser.add_argument("--max-new-tokens", type=int, default=8192, help="default 8192 (the paper)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default, the paper)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32, help="questions per generate call")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed; also the tiny model's init seed")
    parser.add_argument("--benchmark", default=None, help="benchmark name in the report (default: the file's stem)")
    parser.add_argument("--device", default=None, help="e.g. cuda:1 or cpu; default: cuda when available, else cpu")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16, float32, auto (default: as loaded)")
    parser.add_argument(
        "--engine", choices=("hf", "vllm"), default="hf",
        help="hf: transformers generate (anywhere); vllm: vLLM on a GPU (pip install 'r4b[vllm]'; raise --batch-size)",
    )  # fmt: skip
    parser.add_argument(
        "--vllm-arg", action="append", metavar="KEY=VALUE",
        help="a vllm.LLM argument, repeatable (e.g. gpu_memory_utilization=0.8, max_model_len=16384)",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-plots", action="store_true", help="no PNG plots")
    parser.set_defaults(run=_run)
    return parser
