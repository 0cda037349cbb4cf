"""The ``r4b`` command line."""

from __future__ import annotations

import argparse
import json
import platform
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 0
    return args.run(args)
