"""Run logs on the main process: metrics.jsonl, TensorBoard curves and a rich progress line.

metrics.jsonl is strict JSON: a non-finite number (a skipped update's loss, ``train.on_nonfinite=skip``) is written
as null. Every finite scalar of a step's metrics goes to TensorBoard under its path (``thinking/off_mode``,
``time/rollout``); the progress line shows the loss, lr, tokens/s, skipped updates and, in BPO, the reward, each
forced mode's off-mode share and a warning on a step whose rewards teach nothing (``flat``)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class RunLogger:
    """Appends one JSON object per step to ``metrics.jsonl`` (kept across resumes: lines past the resumed
    step, and a last line torn by a kill mid-write, are dropped first), mirrors scalars to TensorBoard and
    shows progress."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        *,
        start_step: int = 0,
        enabled: bool = True,
        tensorboard: bool = True,
        progress: bool = True,
        description: str = "train",
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        self.progress = None
        if not enabled:
            return
        self._truncate_after(start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        if progress:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self.task = self.progress.add_task(description, total=total_steps, completed=start_step, status="")
            self.progress.start()
        self.started = time.perf_counter()

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept, torn = [], 0
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
                if row["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):  # a line torn by a kill mid-write (or blank): dropped
                torn += bool(line.strip())
        if torn:
            print(f"{self.path}: dropped {torn} torn line(s) (a run killed mid-write)")
        self.path.write_text("".join(f"{line}\n" for line in kept))

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(_finite_or_null(metrics), allow_nan=False) + "\n")
        step = metrics["step"]
        if self.writer is not None:
            for key, value in _scalars(metrics):
                self.writer.add_scalar(key, value, step)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, status=_status(metrics))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()


# BPO's forced modes on the progress line: the share of rollouts that left their mode (r4b.rl.reward.off_mode).
OFF_MODE_LABELS = {"thinking": "empty think", "non_thinking": "non-think thinks"}


def _status(metrics: dict[str, Any]) -> str:
    """The progress line's text: loss, lr, tokens/s and, for RL steps, the reward and, per forced mode, the share of
    rollouts that left it (a thinking rollout with an empty think block, a non-thinking one that thinks)."""
    if "loss" not in metrics:
        return ""
    loss = metrics["loss"]
    loss = f"{loss:.4f}" if isinstance(loss, int | float) and math.isfinite(loss) else "-"
    status = f"loss {loss}  lr {metrics['lr']:.2e}  {metrics['tokens_per_s']:,.0f} tok/s"
    if metrics.get("skipped_updates"):
        status += f"  [red]skipped {metrics['skipped_updates']} non-finite update(s)[/]"
    if "reward" in metrics:
        status += f"  reward {metrics['reward']:.3f}"
    for mode, label in OFF_MODE_LABELS.items():
        if isinstance(metrics.get(mode), dict) and "off_mode" in metrics[mode]:
            status += f"  {label} {metrics[mode]['off_mode']:.0%}"
    if metrics.get("flat"):
        in_a_row = metrics.get("flat_steps", 1)
        status += f"  [yellow]no signal: each group's rewards equal ({in_a_row} step(s) in a row)[/]"
    return status


def _finite_or_null(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON's null; bare NaN is not JSON)."""
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _scalars(metrics: dict[str, Any], prefix: str = ""):
    for key, value in metrics.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            yield f"{prefix}{key}", value
