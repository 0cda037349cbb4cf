"""The ``r4b`` command line."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Sequence

from r4b import __version__


def environment_info() -> dict[str, str]:
    """Versions and the backend r4b.kernels will use on this machine."""
    import torch
    import triton

    from r4b.kernels._backend import interpreting

    if torch.cuda.is_available():
        device, backend = torch.cuda.get_device_name(0), "triton (GPU)"
    else:
        device = f"cpu ({platform.processor() or platform.machine()})"
        backend = "triton interpreter" if interpreting() else "torch reference (set TRITON_INTERPRET=1 for Triton)"
    from r4b import packing, shared_prefix

    return {
        "r4b": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda or "none",
        "device": device,
        "kernel backend for this device": backend,
        "packing planner": packing.BACKEND,
        "shared-prefix packing on CUDA": "r4b._cuda kernels" if shared_prefix._cuda is not None else "torch",
    }


def _info(args: argparse.Namespace) -> int:
    info = environment_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _stage_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if args.output_dir is not None:
        overrides.append(f"output_dir={args.output_dir}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    return overrides


def _sft(args: argparse.Namespace) -> int:
    from r4b.config import load_config
    from r4b.train.sft import SFTConfig, train_sft

    config = load_config(SFTConfig, args.config, _stage_overrides(args))
    run_dir = train_sft(config)
    print(f"run directory: {run_dir}")
    return 0


def _bpo(args: argparse.Namespace) -> int:
    from r4b.config import load_config
    from r4b.train.bpo import BPOConfig, train_bpo

    run_dir = train_bpo(load_config(BPOConfig, args.config, _stage_overrides(args)))
    print(f"run directory: {run_dir}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from r4b.synth import write_synthetic

    counts = write_synthetic(args.out, n_sft=args.sft, n_rl=args.rl, n_eval=args.eval, seed=args.seed)
    print(json.dumps({"out": str(args.out), **counts}))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from r4b.data.prepare import load_data_tools, prepare

    tokenizer, processor = load_data_tools(args.model, args.tokenizer)
    manifest = prepare(
        args.data,
        args.out,
        tokenizer,
        processor,
        workers=args.workers,
        on_error=args.on_error,
        mask_empty_think=not args.no_mask_empty_think,
        overwrite=args.overwrite,
        image_root=args.image_root,
    )
    keys = ("samples", "tokens", "seconds", "workers")
    print(json.dumps({"out": str(args.out), **{k: manifest[k] for k in keys}}))
    return 0


def _add_stage(commands, name: str, help: str, run) -> argparse.ArgumentParser:
    stage = commands.add_parser(name, help=help, description=help)
    stage.add_argument(
        "--config",
        required=True,
        help="YAML run config; configs/demo/sft.yaml and the others r4b ships are found from any directory",
    )
    stage.add_argument("--output-dir", help="run directory (overrides output_dir)")
    stage.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    stage.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr_llm=1e-5")
    stage.set_defaults(run=run)
    return stage


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="r4b",
        description="Train auto-thinking multimodal LLMs: bi-mode annealing, BPO, auto-thinking evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"r4b {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = commands.add_parser("info", help="print versions, the device and the kernel backend")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=_info)
    data = commands.add_parser("data", help="data tools").add_subparsers(dest="data_command", metavar="TOOL")
    synth = data.add_parser("synth", help="write the synthetic rendered-image task (annealing, RL and eval sets)")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--sft", type=int, default=512, help="annealing samples")
    synth.add_argument("--rl", type=int, default=256, help="RL prompts")
    synth.add_argument("--eval", type=int, default=128, help="held-out evaluation items")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(run=_synth)
    prep = data.add_parser(
        "prepare", help="validate, tokenize and index data once, in parallel, into a prepared DIR for data.train"
    )
    prep.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="FILE",
        help="in training order: JSONL, LLaVA/ShareGPT .json, .parquet, or a datasets save_to_disk directory (one "
        "split's); table rows are r4b or LLaVA records whose images are paths or bytes (stored once in DIR/images)",
    )
    prep.add_argument(
        "--image-root",
        help="directory image paths are relative to (default: the one holding each file or datasets dir)",
    )
    prep.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    prep.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    prep.add_argument("--model", help="model directory whose tokenizer and processor to use (default: the tiny model)")
    prep.add_argument("--tokenizer", help="tokenizer directory (as model.tokenizer)")
    prep.add_argument("--on-error", choices=("skip", "raise"), default="skip", help="bad records: count or stop")
    prep.add_argument("--no-mask-empty-think", action="store_true", help="as data.mask_empty_think=false")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing prepared DIR")
    prep.set_defaults(run=_prepare)
    _add_stage(commands, "sft", "bi-mode annealing: packed SFT over thinking and non-thinking samples", _sft)
    _add_stage(commands, "bpo", "BPO: RL with g thinking + g non-thinking rollouts per prompt (joint advantages)", _bpo)
    from r4b.curate import add_parser as add_curate

    add_curate(commands)
    from r4b.eval.cli import add_parser as add_eval

    add_eval(commands)
    from r4b.demo import add_parser as add_demo

    add_demo(commands)
    from r4b.plan.command import add_parser as add_plan

    add_plan(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 0
    return run_command(args.command, lambda: args.run(args))


def run_command(command: str, run) -> int:
    """The one place where user errors become messages: a bad config, data file or path (an InputError or an
    OSError naming a file) prints one line ``r4b <command>: error: ...`` and returns 2; Ctrl-C returns 130 (one
    line; training stops at a step boundary with a checkpoint, r4b.train.signals.StopSignal).
    Other exceptions are bugs and keep their traceback; ``R4B_DEBUG=1`` shows it for user errors too."""
    from r4b.errors import InputError, RunInterrupted

    debug = os.environ.get("R4B_DEBUG", "") not in ("", "0")
    try:
        return run()
    except RunInterrupted as stopped:  # Ctrl-C at a step boundary: the checkpoint is written
        print(f"r4b {command}: {stopped}", file=sys.stderr)
        return 130
    except InputError as error:  # bad config or data: the message names the file, line and field
        if debug:
            raise
        message = str(error)
    except OSError as error:  # a path the user gave that cannot be read or written
        if debug or error.strerror is None:
            raise
        where = f"{error.filename}: " if error.filename is not None else ""
        message = f"{where}{error.strerror}"
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"r4b {command}: interrupted", file=sys.stderr)
        return 130
    message = " ".join(message.split()).removeprefix(f"r4b {command}: ").removeprefix("error: ")  # one line
    print(f"r4b {command}: error: {message}", file=sys.stderr)
    return 2
