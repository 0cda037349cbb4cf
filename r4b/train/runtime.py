"""What every training stage does around its steps: start the run, seed, resume, export."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from r4b.config import config_to_dict
from r4b.train.checkpoint import list_checkpoints, load_checkpoint
from r4b.train.engine import init_distributed
from r4b.train.ranks import barrier, world  # one source of rank helpers, shared with checkpoint.py


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start_run(config: Any, output_dir: str | Path, seed: int) -> tuple[int, int, Path]:
    """Join the process group (under torchrun), create the run directory with its config.yaml, seed.
    Returns (rank, world size, run directory)."""
    init_distributed(getattr(getattr(config, "engine", None), "timeout_minutes", None))  # engine.timeout_minutes
    rank, world_size = world()
    run_dir = Path(output_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    seed_everything(seed)
    return rank, world_size, run_dir


def resume(policy: str, run_dir: Path, engine: Any) -> int:
    """Restore per ``policy`` ("auto": the newest complete checkpoint of the run, "none", or a checkpoint
    path); returns the step to continue from."""
    if policy == "none":
        return 0
    if policy == "auto":
        found = list_checkpoints(run_dir)
        if not found:
            return 0
        path = found[-1]
    else:
        path = Path(policy)
    state = load_checkpoint(path, engine)
    print(f"resumed from {path} at step {state['step']}")
    return int(state["step"])


def export_model(engine: Any, model: torch.nn.Module, tokenizer: Any, out: Path, main: bool) -> None:
    """Write the trained model as a Hugging Face directory (R-4B's layout) from rank 0 (all ranks call this)."""
    from r4b.models.loading import save_model

    state = engine.full_state_dict()  # collective: every rank takes part
    if main:
        # The engine may have sharded `model` in place: load the full weights into a fresh copy.
        fresh = type(model)(model.config)
        fresh.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
        save_model(fresh, out, tokenizer)
        print(f"exported {out}")
    barrier()
