"""Atomic checkpoints and exact resume.

A checkpoint is a directory ``checkpoint-<step>/`` holding the engine's state (model, optimizer,
scheduler; sharded as the engine likes), ``trainer_state.json`` (step, data position), one
``rng-<rank>.pt`` per rank and copies of the run's ``config.yaml`` and ``data_files.json`` (resume
compares against them).
It is written into a temporary sibling and renamed into place, so a
run killed mid-save leaves the previous checkpoint intact and never a half-written one that resume
would pick.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r4b.train.ranks import barrier, rank

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"  # the run's config when the checkpoint was written (resume compares against it)
DATA_FILE = "data_files.json"  # its data files' sizes and content hashes (r4b.train.runtime.data_fingerprints)


def rng_state() -> dict[str, Any]:
    """Every RNG a step may draw from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, engine: Any, trainer_state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``run_dir/checkpoint-<step>`` atomically (all ranks call this); keep the newest ``keep``."""
    final = Path(run_dir) / f"checkpoint-{step}"
    staging = Path(run_dir) / f".checkpoint-{step}.partial"
    if rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()
    engine.save(staging / "engine")
    torch.save(rng_state(), staging / f"rng-{rank()}.pt")
    barrier()
    if rank() == 0:
        (staging / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
        for name in (CONFIG_FILE, DATA_FILE):
            if (Path(run_dir) / name).is_file():
                shutil.copyfile(Path(run_dir) / name, staging / name)
        _fsync_tree(staging)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_FILE).exists()]


def load_checkpoint(path: Path, engine: Any) -> dict[str, Any]:
    """Restore the engine and this rank's RNG from ``path``; returns the trainer state."""
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{path}: not a complete r4b checkpoint (no {STATE_FILE})")
    engine.load(path / "engine")
    rng_file = path / f"rng-{rank()}.pt"
    if not rng_file.exists():
        raise FileNotFoundError(f"{rng_file}: the checkpoint was written by fewer ranks than this run has")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / STATE_FILE).read_text())


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
