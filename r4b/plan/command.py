"""``r4b plan``: before a run, what it will take (parameters, memory per GPU, tokens and time) and, when it will not
fit, which single change makes it fit."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from r4b.config import load_config
from r4b.config.loading import shipped_config
from r4b.config.sections import BPOConfig, SFTConfig
from r4b.errors import InputError
from r4b.plan.estimate import Assumptions, Plan, plan
from r4b.plan.gpus import GIB, GPUS, RESERVED_BYTES
from r4b.plan.shapes import model_shapes

BPO_SECTIONS = {"rollout", "reward", "advantages", "policy"}


def add_parser(commands) -> None:
    help = "estimate a run before it starts: parameters, memory per GPU, tokens and time per step (no weights load)"
    cmd = commands.add_parser("plan", help=help, description=help)
    cmd.add_argument("--config", required=True, help="an r4b sft or r4b bpo YAML config (a shipped one by name)")
    cmd.add_argument(
        "--gpus", type=int, help="GPUs in the run, all nodes together (default: 1 for engine.kind=single, else 8)"
    )
    cmd.add_argument("--gpu", choices=sorted(GPUS), default="h100-80gb", help="GPU kind (default h100-80gb)")
    cmd.add_argument("--mfu", type=float, default=Assumptions.mfu, help="model FLOPs utilisation (default 0.4)")
    cmd.add_argument("--sample-tokens", type=int, default=Assumptions.sample_tokens, help="sft: mean tokens a sample")
    cmd.add_argument("--samples", type=int, help="sft: samples in the data (for the run time)")
    cmd.add_argument("--prompt-tokens", type=int, default=Assumptions.prompt_tokens, help="bpo: mean prompt tokens")
    cmd.add_argument("--response-tokens", type=int, help="bpo: mean response tokens (default: max_new_tokens / 2)")
    cmd.add_argument("--image-share", type=float, default=Assumptions.image_share, help="image tokens' share of a pack")
    cmd.add_argument("--json", action="store_true", help="print JSON")
    cmd.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. engine.kind=fsdp2")
    cmd.set_defaults(run=run)


def stage_of(path: str) -> type:
    """SFTConfig or BPOConfig, from the sections the YAML file sets."""
    found = Path(path) if Path(path).exists() else shipped_config(path)
    if found is None:
        raise InputError(f"--config {path}: no such file")
    raw = yaml.safe_load(found.read_text()) or {}
    return BPOConfig if isinstance(raw, dict) and BPO_SECTIONS & set(raw) else SFTConfig


def assumptions(args: argparse.Namespace, engine_kind: str) -> Assumptions:
    if args.gpus is None:
        args.gpus = 1 if engine_kind == "single" else 8
    checks = {"--gpus": args.gpus >= 1, "--mfu": 0 < args.mfu <= 1, "--image-share": 0 <= args.image_share <= 1,
              "--sample-tokens": args.sample_tokens >= 1, "--prompt-tokens": args.prompt_tokens >= 1}  # fmt: skip
    for flag, ok in checks.items():
        if not ok:
            raise InputError(f"{flag} = {getattr(args, flag[2:].replace('-', '_'))}: out of range")
    return Assumptions(
        gpus=args.gpus, sample_tokens=args.sample_tokens, image_share=args.image_share,
        prompt_tokens=args.prompt_tokens, response_tokens=args.response_tokens, mfu=args.mfu, samples=args.samples,
    )  # fmt: skip


def make_plan(path: str, overrides: list[str], gpu: str, assume: Assumptions) -> Plan:
    config = load_config(stage_of(path), path, overrides)
    _check_engine(config, assume.gpus, path)
    return plan(config, model_shapes(config.model.path, config.model.lora), GPUS[gpu], assume)


def _check_engine(config: Any, gpus: int, path: str) -> None:
    if config.engine.kind == "single" and gpus > 1:
        raise InputError(f"{path}: engine.kind = 'single' runs on one GPU, not {gpus}: plan engine.kind=fsdp2")


def fixes(path: str, overrides: list[str], gpu: str, assume: Assumptions, config: Any) -> list[str]:
    """Single changes, each of which makes a config that does not fit fit (cheapest first)."""
    engine = config.engine
    candidates: list[tuple[list[str], int]] = []
    if not engine.activation_checkpointing:
        candidates.append((["engine.activation_checkpointing=true"], assume.gpus))
    if engine.kind == "deepspeed" and engine.zero_stage < 3:
        candidates.append((["engine.zero_stage=3"], assume.gpus))
    if isinstance(config, BPOConfig):
        if config.policy.beta > 0:
            candidates.append((["policy.beta=0"], assume.gpus))
        if config.rollout.engine == "vllm" and not config.rollout.vllm_sleep_level:
            candidates.append((["rollout.vllm_sleep_level=1"], assume.gpus))
        key, tokens = "policy.max_tokens", config.policy.max_tokens
    else:
        key, tokens = "data.max_tokens", config.data.max_tokens
    if tokens > 4096:
        candidates.append(([f"{key}={tokens // 2}"], assume.gpus))
    if not config.model.lora.rank:  # adapters instead of the full weights: no full gradients or AdamW state
        candidates.append((["model.lora.rank=16"], assume.gpus))
    if engine.kind != "single":
        candidates += [([], n) for n in (2 * assume.gpus, 4 * assume.gpus, 8 * assume.gpus)]
    found = []
    for extra, gpus in candidates:
        trial = make_plan(path, [*overrides, *extra], gpu, Assumptions(**{**vars(assume), "gpus": gpus}))
        if trial.fits:
            found.append(" ".join(extra) if extra else f"--gpus {gpus}")
    return found


def to_dict(p: Plan) -> dict[str, Any]:
    return {
        "stage": p.stage,
        "model": p.shapes.source,
        "gpu": p.gpu.name,
        "gpus": p.assumptions.gpus,
        "assumptions": vars(p.assumptions),
        "parameters": {**p.shapes.params, "total": p.shapes.total},
        "trained": p.trained,
        "lora": _lora(p),
        "memory_gib": {item.name: item.bytes / GIB for item in p.memory},
        "peak_gib": p.peak_bytes / GIB,
        "budget_gib": p.budget_bytes / GIB,
        "peak_phase": p.phase,
        "fits": p.fits,
        "activations_gib": {k: v / GIB for k, v in p.activations.items()},
        "tokens_per_step": p.tokens_per_step,
        "step_seconds": p.step_seconds,
        "step_seconds_by_part": p.timing,
        "steps": p.steps,
        "run_hours": None if p.run_seconds is None else p.run_seconds / 3600,
        "notes": p.notes,
    }


def _lora(p: Plan) -> dict[str, Any] | None:
    """model.lora's part of the JSON: the rank, the adapters' parameters per module, those that train."""
    if not p.shapes.lora:
        return None
    adapters = p.shapes.adapters
    trainable = sum(adapters[m] for m in p.trained)
    return {
        "rank": p.shapes.lora_rank,
        "adapters": {**adapters, "total": sum(adapters.values())},
        "trainable": trainable,
    }


def render(p: Plan, fixes_found: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    a = p.assumptions
    where = f"{p.shapes.source} ({p.shapes.family}) on {a.gpus} x {p.gpu.name}"
    console.print(f"[bold]r4b plan[/bold]: {p.stage} of {where}")
    params = Table("module", "parameters", "trained", title="parameters")
    lora = p.shapes.adapters
    for module, count in p.shapes.params.items():
        if module not in p.trained:
            trains = "frozen"
        else:  # with model.lora the module's adapters train, its base stays frozen
            trains = f"LoRA rank {p.shapes.lora_rank}: {lora[module]:,} adapter parameters" if lora else "yes"
        params.add_row(module, f"{count:,}", trains)
    params.add_row("total", f"{p.shapes.total:,}", f"{sum(lora[m] for m in p.trained):,} trainable" if lora else "")
    console.print(params)
    memory = Table("per GPU", "GiB", "what", title=f"memory per GPU (the {p.phase} phase peaks)")
    for item in p.memory:
        memory.add_row(item.name, f"{item.bytes / GIB:,.2f}", item.note)
    verdict = "[green]fits[/green]" if p.fits else "[red]does not fit[/red]"
    memory.add_row("[bold]total[/bold]", f"[bold]{p.peak_bytes / GIB:,.2f}[/bold]",
                   f"{verdict}: budget {p.budget_bytes / GIB:,.1f} GiB ({RESERVED_BYTES / GIB:g} GiB kept for "
                   "CUDA, NCCL, fragmentation)")  # fmt: skip
    console.print(memory)
    for name, value in p.activations.items():
        console.print(f"activations {name}: {value / GIB:,.2f} GiB")
    timing = ", ".join(f"{k} {v:,.1f} s" for k, v in p.timing.items()) if len(p.timing) > 1 else ""
    console.print(f"tokens per step: {p.tokens_per_step:,.0f}; step: {p.step_seconds:,.1f} s" +
                  (f" ({timing})" if timing else "") + f" at MFU {a.mfu:g}")  # fmt: skip
    if p.run_seconds is not None:
        console.print(f"run: {p.steps:,} steps, {p.run_seconds / 3600:,.1f} h")
    else:
        console.print("run: give --samples (or set train.max_steps) for the run time")
    console.print(f"assumed: {_assumed(p)}")
    for note in p.notes:
        console.print(f"note: {note}")
    if not p.fits:
        console.print("to fit, any one of: " + ("; ".join(fixes_found) if fixes_found else "none found: more GPUs "
                                                "and a shorter pack together, or a smaller model"))  # fmt: skip


def _assumed(p: Plan) -> str:
    a = p.assumptions
    if p.stage == "sft":
        return f"samples of {a.sample_tokens} tokens on average, images {a.image_share:.0%} of a pack's tokens"
    response = a.response_tokens or "max_new_tokens / 2"
    return f"prompts of {a.prompt_tokens} tokens, responses of {response}, images {a.image_share:.0%} of a prompt"


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    config = load_config(stage_of(args.config), args.config, overrides)
    assume = assumptions(args, config.engine.kind)
    p = make_plan(args.config, overrides, args.gpu, assume)
    found = [] if p.fits else fixes(args.config, overrides, args.gpu, assume, config)
    if args.json:
        print(json.dumps({**to_dict(p), "fixes": found}, indent=2))
    else:
        render(p, found)
    return 0 if p.fits else 1
