"""What every training stage does around its steps: start the run, seed, resume, export."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from r4b.config import check_values, config_to_dict
from r4b.config.fields import resume_may_change_keys
from r4b.config.sections import STAGES
from r4b.errors import InputError, RunInterrupted, output_dir
from r4b.train.checkpoint import (
    CONFIG_FILE,
    DATA_FILE,
    STATE_FILE,
    checkpoint_damage,
    list_checkpoints,
    load_checkpoint,
)
from r4b.train.engine import init_distributed
from r4b.train.integrity import (
    checksum_files,
    disk_full_is_said,
    no_space_error,
    publish,
    together,
    write_manifest,
)
from r4b.train.ranks import barrier, world  # one source of rank helpers, shared with checkpoint.py
from r4b.train.run_lock import lock_run_dir, unlock_run_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start_run(config: Any, output_dir: str | Path, seed: int) -> tuple[int, int, Path]:
    """Join the process group (under torchrun), lock the run directory for this run (r4b.train.run_lock: before
    anything is written into it; released when the run ends), create it with its config.yaml, seed.
    Returns (rank, world size, run directory). A config built in Python is checked as a loaded one is, and
    ``model.attention_backend`` / ``model.fused_loss_method`` are applied to the process."""
    check_values(config)
    init_distributed(getattr(getattr(config, "engine", None), "timeout_minutes", None))  # engine.timeout_minutes
    rank, world_size = world()
    run_dir = Path(output_dir)
    _check_writable(run_dir)
    created = not run_dir.exists()
    lock_run_dir(run_dir)
    try:
        check_run_dir(config, run_dir)
    except BaseException:
        unlock_run_dir(run_dir, remove_if_empty=created)  # a refused run leaves nothing behind
        raise
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        (run_dir / DATA_FILE).write_text(json.dumps(data_fingerprints(config), indent=2))
    apply_kernel_choices(getattr(config, "model", None))
    seed_everything(seed)
    return rank, world_size, run_dir


_BACKEND_FROM_CONFIG: list[str] = []  # the backend apply_kernel_choices set, so that the next run resets it


def apply_kernel_choices(model: Any) -> dict[str, str | None]:
    """Apply ``model.attention_backend`` and ``model.fused_loss_method`` process-wide (None: the library's choice).
    The environment variables ``R4B_ATTENTION_BACKEND`` / ``R4B_FUSED_LOSS_METHOD`` override the keys when set; a
    later run of the process starts from the library's defaults again. Returns what the run gets, per key (None:
    the library's default)."""
    from r4b.kernels import fused_grad
    from r4b.models.attention_backends import ENV_VAR, set_attention_backend

    backend = getattr(model, "attention_backend", None)
    if _BACKEND_FROM_CONFIG:  # undo the previous run's key, never a setting the caller made
        set_attention_backend(None)
        _BACKEND_FROM_CONFIG.clear()
    env_backend = os.environ.get(ENV_VAR, "").strip() or None
    if backend is not None and env_backend is None:
        set_attention_backend(backend)
        _BACKEND_FROM_CONFIG.append(backend)
    fused_grad.set_default_method(getattr(model, "fused_loss_method", None))
    method = os.environ.get(fused_grad.METHOD_ENV) or getattr(model, "fused_loss_method", None)
    return {
        "attention_backend": env_backend or (backend if _BACKEND_FROM_CONFIG else None),
        "fused_loss_method": method,
    }


# Config keys whose change cannot alter what a resumed run computes (where it writes, how often it saves and logs,
# where it stops: the schedule's length is its own key), marked RESUME_MAY_CHANGE on their fields in
# r4b/config/sections.py. Every other change stops a resume unless train.allow_config_change lists it.
HARMLESS_KEYS = resume_may_change_keys(*STAGES.values())


def check_run_dir(config: Any, run_dir: Path) -> None:
    """Refuse, before anything is written, a run directory that cannot be written or that would mix two runs:
    ``train.resume=none`` over an earlier run's checkpoints, a resume whose config changes the run (every changed
    key named; ``train.allow_config_change`` lets listed keys or sections change), a resume past ``max_steps``."""
    _check_writable(run_dir)
    _check_inputs(config)
    train = config.train
    policy = train.resume
    found = list_checkpoints(run_dir)
    if policy == "none":
        if found:
            raise InputError(
                f"output_dir {run_dir} holds an earlier run (newest: {found[-1].name}); train.resume=none would "
                "mix the two: continue it with train.resume=auto, or start afresh in a new --output-dir "
                "(or delete the old one)"
            )
        return
    path = resume_checkpoint(policy, run_dir)
    if path is None:
        return
    try:
        step = int(json.loads((path / STATE_FILE).read_text())["step"])
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(f"{path / STATE_FILE}: unreadable checkpoint state ({error})") from None
    max_steps = getattr(train, "max_steps", None)
    if max_steps is not None and max_steps < step:
        raise InputError(
            f"--max-steps {max_steps} is below the step of the newest checkpoint, {path} (step {step}): "
            "raise it, resume an earlier checkpoint (train.resume=<checkpoint directory>) or use a new --output-dir"
        )
    previous = _checkpoint_config(path, run_dir)
    if previous is None:
        return
    # a key added to r4b after the checkpoint was written (model.lora) had its default's effect then
    if dataclasses.is_dataclass(config):
        previous = _with_defaults(config_to_dict(type(config)()), previous)
    current = config_to_dict(config)
    previous_data = _checkpoint_data(path)
    if previous_data is not None:  # the data files' contents, beside their paths (older checkpoints lack them)
        previous, current = {**previous, **previous_data}, {**current, **data_fingerprints(config)}
    changed = changed_keys(previous, current, getattr(train, "allow_config_change", None) or [])
    if changed:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changed)
        keys = ",".join(sorted({key.split(".content[")[0] for key, _, _ in changed}))
        raise InputError(
            f"resuming {path} with a config that changes the run: {listed}. Go back to the checkpoint's values, "
            f"start a new --output-dir, or allow the change with train.allow_config_change=[{keys}]"
        )


def changed_keys(old: dict[str, Any], new: dict[str, Any], allowed: list[str] = ()) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every key that differs and is neither harmless nor allowed (a listed
    section allows all its keys)."""
    old, new = _flatten(_plain(old)), _flatten(_plain(new))
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key) or key in HARMLESS_KEYS:
            continue
        if any(key == a or key.startswith(f"{a}.") for a in allowed):
            continue
        out.append((key, old.get(key), new.get(key)))
    return out


def _with_defaults(defaults: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with the keys it lacks taken from ``defaults`` (sections merged key by key)."""
    out = dict(saved)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _with_defaults(value, out[key])
    return out


def _plain(value: Any) -> Any:
    """Tuples as lists (as config.yaml holds them)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or (prefix and not tree):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def data_fingerprints(config: Any) -> dict[str, str]:
    """``data.<key>.content[<file>]`` -> the file's size and a SHA-256 of its first and last MiB (a prepared
    directory: of its files' names and sizes): a resume notices a data file rewritten under the same path."""
    import hashlib

    data = getattr(config, "data", None)
    out = {}
    for key in ("train", "prompts", "eval"):
        files = getattr(data, key, None)
        for file in [files] if isinstance(files, str) else files or []:
            path, digest = Path(file), hashlib.sha256()
            if path.is_dir():
                listing = sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*") if p.is_file())
                digest.update(json.dumps(listing).encode())
                size = sum(n for _, n in listing)
            elif path.is_file():
                size = path.stat().st_size
                with path.open("rb") as handle:
                    digest.update(handle.read(1 << 20))
                    if size > 2 << 20:
                        handle.seek(size - (1 << 20))
                        digest.update(handle.read())
            else:
                continue
            out[f"data.{key}.content[{file}]"] = f"{size} bytes, sha256 {digest.hexdigest()[:16]}"
    return out


def _checkpoint_data(path: Path) -> dict[str, str] | None:
    try:
        loaded = json.loads((path / DATA_FILE).read_text())
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def _checkpoint_config(path: Path, run_dir: Path) -> dict[str, Any] | None:
    """The config the checkpoint was trained with: its own copy, or (older checkpoints) its run's config.yaml."""
    for candidate in (path / CONFIG_FILE, path.parent / "config.yaml"):
        if candidate.is_file():
            try:
                loaded = yaml.safe_load(candidate.read_text())
            except yaml.YAMLError:
                continue
            if isinstance(loaded, dict):
                return loaded
    return None


def _check_writable(run_dir: Path) -> None:
    output_dir(run_dir, "output_dir", create=False)


def _check_inputs(config: Any) -> None:
    """The files a run reads, before a model loads: data files and a local model directory."""
    data = getattr(config, "data", None)
    for key, what in (("train", "training data"), ("prompts", "prompts")):
        if hasattr(data, key) and not getattr(data, key):
            raise InputError(f"data.{key} is empty: no {what}; name one or more JSONL files (or prepared DIRs)")
    for key in ("train", "prompts", "eval"):
        files = getattr(data, key, None)
        for file in [files] if isinstance(files, str) else files or []:
            if not Path(file).is_file() and not _is_data_dir(Path(file)):
                what = "a directory, not a file" if Path(file).is_dir() else "no such file"
                raise InputError(f"data.{key}: {file}: {what}")
    path = getattr(getattr(config, "model", None), "path", None)
    # a local directory (a Hugging Face id, "org/name", is left to the loader)
    if path is not None and not Path(path).is_dir() and (Path(path).exists() or not _looks_like_hub_id(path)):
        raise InputError(f"model.path {path}: no such model directory")


def _is_data_dir(path: Path) -> bool:
    """A directory a run reads as data: a prepared DIR (r4b data prepare) or a datasets save_to_disk directory."""
    return (path / "r4b_prepared.json").is_file() or (path / "state.json").is_file()


def _looks_like_hub_id(name: str) -> bool:
    parts = str(name).split("/")
    return len(parts) == 2 and all(parts) and not str(name).startswith((".", "~"))


def resume_checkpoint(policy: str, run_dir: Path) -> Path | None:
    """The checkpoint a run resumes from (None: from the start), its files checked against their checksums
    (r4b.train.integrity; all ranks call this). ``auto``: the newest intact checkpoint, one line for each damaged
    newer one skipped; a named checkpoint that is damaged is an error naming the file."""
    if policy == "none":
        return None
    if policy != "auto":
        path = Path(policy)
        if not path.is_dir():
            raise InputError(f"train.resume={policy}: no such checkpoint directory")
        if not (path / STATE_FILE).is_file():
            raise InputError(f"train.resume={policy}: not a complete r4b checkpoint (no {STATE_FILE})")
        damage = checkpoint_damage(path)
        if damage is not None:
            raise InputError(f"train.resume={policy}: {damage}; resume another checkpoint")
        return path
    found = list_checkpoints(run_dir)
    skipped: list[str] = []
    for path in reversed(found):
        damage = checkpoint_damage(path)
        if damage is None:
            for why in skipped:
                _say_once(f"skipping a damaged checkpoint: {why}; resuming from {path.name}, the newest intact one")
            return path
        skipped.append(damage)
    if found:
        raise InputError(
            f"no intact checkpoint to resume in {run_dir}: {'; '.join(skipped)}; restore the files, or start afresh "
            "in a new --output-dir"
        )
    return None


_SAID: set[str] = set()  # check_run_dir and resume both pick the checkpoint: say each skip once per run


def _say_once(line: str) -> None:
    if line not in _SAID and world()[0] == 0:
        print(line, file=sys.stderr)
    _SAID.add(line)


def resume(policy: str, run_dir: Path, engine: Any) -> int:
    """Restore per ``policy`` ("auto": the newest intact checkpoint of the run, "none", or a checkpoint path;
    :func:`resume_checkpoint`); returns the step to continue from."""
    path = resume_checkpoint(policy, run_dir)
    _SAID.clear()
    if path is None:
        return 0
    state = load_checkpoint(path, engine)
    print(f"resumed from {path} at step {state['step']}")
    return int(state["step"])


EXPORT_UNCHECKED = ("README.md",)  # the model card: rewritten after the export (r4b eval adds its results)


def export_model(
    engine: Any, model: torch.nn.Module, tokenizer: Any, out: Path | None, main: bool, adapter: tuple | None = None
) -> None:
    """Write the trained model as a Hugging Face directory (R-4B's layout) from rank 0 (all ranks call this).
    It is written into a staging sibling with its checksums (r4b.train.integrity) and renamed into place: a
    signal or a full disk mid-export leaves the previous ``out`` (or none), and says so in one line.
    A model with LoRA adapters (r4b.models.lora) is written merged, base + alpha/rank x BA under the base names;
    ``adapter`` = ``(directory, peft LoraConfig, base model)`` writes peft's adapter directory there too (``out``
    None: that alone)."""
    from r4b.models.lora import lora_scale, merged_state_dict, save_adapter

    state = engine.full_state_dict()  # collective: every rank takes part
    if out is not None:
        scale = lora_scale(model)
        merged = merged_state_dict(state, scale) if main and scale is not None else state
        _publish_export(Path(out), main, lambda staging: _save_full(model, merged, tokenizer, staging))
    if adapter is not None:
        where, config, base = adapter
        _publish_export(Path(where), main, lambda staging: save_adapter(staging, state, config, base))


def _publish_export(out: Path, main: bool, write: Any) -> None:
    """``write(staging)`` on rank 0 into a staging sibling of ``out``, then its checksums and the rename."""
    staging = out.parent / f".{out.name}.partial"
    try:
        together(lambda: _write_export(write, staging, out) if main else None)
    except BaseException as error:  # (a full disk may come as DCP's CheckpointException, a BaseException)
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, _Stopped):
            raise RunInterrupted(
                f"stopped by {error} during the export; {out} was not written: rerun the same command to export"
            ) from None
        full = no_space_error(error, str(out), "free space and rerun the same command to export")
        if full is not None:
            raise full from None
        raise
    if main:
        print(f"exported {out}")
    barrier()


def _save_full(model: torch.nn.Module, state: dict, tokenizer: Any, staging: Path) -> None:
    from r4b.models.loading import save_model

    # The engine may have sharded `model` in place (and LoRA replaced its layers): a fresh copy of the base class.
    fresh = type(model)(model.config)
    fresh.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    save_model(fresh, staging, tokenizer)


def _write_export(write: Any, staging: Path, out: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    with _signals_stop_export():
        staging.mkdir(parents=True)
        with disk_full_is_said(staging):
            write(staging)
        entries = checksum_files(staging)
        write_manifest(staging, {k: v for k, v in entries.items() if k not in EXPORT_UNCHECKED})
        publish(staging, out)


def lora_base_dtype(engine: Any) -> torch.dtype | None:
    """The dtype a LoRA run keeps its frozen base in (``model.lora``): the training dtype, bf16 under
    ``engine.mixed_precision: bf16`` (no fp32 copy of weights that never update), else as loaded."""
    return torch.bfloat16 if engine.mixed_precision == "bf16" else None


def export_trained(
    engine: Any, model: torch.nn.Module, tokenizer: Any, config: Any, run_dir: Path, main: bool, **card: Any
) -> None:
    """The end of a training stage (train.export): ``run_dir/model`` and its model card; with ``model.lora``,
    ``export.lora`` says whether the model is merged (``model``), peft's adapter directory (``adapter``) or both.
    ``card``: :func:`r4b.models.model_card.write_model_card`'s stage and data files."""
    from r4b.models.lora import lora_config
    from r4b.models.model_card import write_model_card

    lora = lora_config(model)
    how = config.export.lora if lora is not None else "merged"
    out = run_dir / "model" if how in ("merged", "both") else None
    adapter = (run_dir / "adapter", lora, config.model.path) if how in ("adapter", "both") else None
    export_model(engine, model, tokenizer, out, main, adapter)
    if main:
        for where, is_adapter in ((out, False), (adapter and adapter[0], True)):
            if where is not None:
                write_model_card(where, config=config, run_dir=run_dir, adapter=is_adapter, **card)


class _Stopped(KeyboardInterrupt):
    """SIGINT / SIGTERM during the export (a KeyboardInterrupt: nothing on the way may swallow it)."""


@contextlib.contextmanager
def _signals_stop_export():
    """SIGINT / SIGTERM raise :class:`_Stopped` while the export is written, so that it is cleaned up and reported
    (the training loop's StopSignal is gone by then); the old handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise _Stopped(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
