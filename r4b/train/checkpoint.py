"""Atomic checkpoints and exact resume.

A checkpoint is a directory ``checkpoint-<step>/`` holding the engine's state (model, optimizer,
scheduler; sharded as the engine likes), ``trainer_state.json`` (step, data position), one
``rng-<rank>.pt`` per rank and copies of the run's ``config.yaml`` and ``data_files.json`` (resume
compares against them).
It is written into a temporary sibling and renamed into place, so a
run killed mid-save leaves the previous checkpoint intact and never a half-written one that resume
would pick. ``checksums.json`` (r4b.train.integrity), written last, holds every file's size and SHA-256: resume
checks them (:func:`checkpoint_damage`) and names a damaged file. A full disk is one line naming the file and the
intact checkpoint to resume from.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r4b.errors import InputError
from r4b.train.integrity import (
    checksum_files,
    disk_full_is_said,
    has_manifest,
    no_space_error,
    publish,
    together,
    verify_dir,
    write_manifest,
)
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
    if "cuda" in state and torch.cuda.is_available():  # a node with fewer GPUs than the writer's sets its own
        for device, cuda_state in zip(range(torch.cuda.device_count()), state["cuda"], strict=False):
            torch.cuda.set_rng_state(cuda_state, device)


def save_checkpoint(run_dir: Path, step: int, engine: Any, trainer_state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``run_dir/checkpoint-<step>`` atomically (all ranks call this); keep the newest ``keep``.
    A full disk raises a one-line :class:`InputError` on every rank (the staging directory removed)."""
    run_dir = Path(run_dir)
    final = run_dir / f"checkpoint-{step}"
    staging = run_dir / f".checkpoint-{step}.partial"
    previous = [path for path in list_checkpoints(run_dir) if path != final]
    try:
        together(lambda: _make_staging(staging) if rank() == 0 else None)
        together(lambda: _write_rank_files(staging, engine))
        entries = checksum_files(staging, distributed=True)  # each rank hashes its share of what the ranks wrote
        together(lambda: _finish(run_dir, staging, final, step, trainer_state, entries) if rank() == 0 else None)
    except BaseException as error:  # a signal too: the partial checkpoint is of no use
        if rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)  # gives back the space the partial checkpoint took
        resume_from = f"resume from {previous[-1]}" if previous else "restart"
        full = no_space_error(error, str(final), f"free space and rerun the same command to {resume_from}")
        if full is not None:
            raise full from None
        raise
    if rank() == 0:
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _make_staging(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)


def _write_rank_files(staging: Path, engine: Any) -> None:
    with disk_full_is_said(staging / "engine"):
        engine.save(staging / "engine")
    with disk_full_is_said(staging / f"rng-{rank()}.pt"):
        torch.save(rng_state(), staging / f"rng-{rank()}.pt")


def _finish(
    run_dir: Path, staging: Path, final: Path, step: int, trainer_state: dict[str, Any], entries: dict[str, dict]
) -> None:
    """Rank 0: the trainer state and config copies, the manifest last, then the rename."""
    (staging / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
    names = [STATE_FILE]
    for name in (CONFIG_FILE, DATA_FILE):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, staging / name)
            names.append(name)
    write_manifest(staging, {**entries, **checksum_files(staging, names)})
    publish(staging, final)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_FILE).exists()]


def checkpoint_damage(path: Path) -> str | None:
    """What is wrong with checkpoint ``path``, naming the file (None: intact; all ranks call this, each hashing
    its share). A checkpoint of an r4b that wrote no checksums is only checked for its trainer state."""
    path = Path(path)
    if not has_manifest(path):
        return None if (path / STATE_FILE).is_file() else f"{path / STATE_FILE}: missing (not a complete checkpoint)"
    return verify_dir(path, distributed=True)


def load_checkpoint(path: Path, engine: Any) -> dict[str, Any]:
    """Restore the engine and this rank's RNG from ``path``; returns the trainer state."""
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise InputError(f"{path}: not a complete r4b checkpoint (no {STATE_FILE})")
    rng_file = path / f"rng-{rank()}.pt"
    if not rng_file.exists():
        rng_file = _rng_of_fewer_ranks(path, rng_file)
    engine.load(path / "engine")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / STATE_FILE).read_text())


def _rng_of_fewer_ranks(path: Path, rng_file: Path) -> Path:
    """The RNG state a rank the checkpoint's run did not have takes (resumed on more ranks than wrote it): rank
    ``rank % k`` of its k writers' (every rank starts from the same seed); a missing file of a writer is damage."""
    written = sorted(int(m.group(1)) for p in path.glob("rng-*.pt") if (m := re.fullmatch(r"rng-(\d+)\.pt", p.name)))
    ranks = len(written)
    if written and written == list(range(ranks)) and rank() >= ranks:
        return path / f"rng-{rank() % ranks}.pt"
    raise InputError(
        f"{rng_file}: missing: the checkpoint is damaged (each of its ranks wrote one); resume an earlier one"
    )
