"""Run logs on the main process: metrics.jsonl, the trackers of ``logging.sinks`` and a rich progress line.

metrics.jsonl is strict JSON: a non-finite number (a skipped update's loss, ``train.on_nonfinite=skip``) is written
as null. Every finite scalar of a step's metrics (a flag as 1 / 0) goes to each sink (:mod:`r4b.train.sinks`:
TensorBoard, W&B, MLflow) under its path (``thinking/off_mode``, ``time/rollout``); BPO's sample tables go to
samples.jsonl and the sinks every ``logging.samples_every`` steps. A sink that fails is one line and the run goes on
without it. The progress line shows the loss, lr, tokens/s, skipped updates and, in BPO, the reward, each forced
mode's off-mode share and a warning on a step whose rewards teach nothing (``flat``)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from r4b.config.sections import LoggingSection
from r4b.train.sinks import Sink, SinkContext, chosen_sinks, one_line, preserved_rng, say, start_sinks


class RunLogger:
    """Appends one JSON object per step to ``metrics.jsonl`` (kept across resumes: lines past the resumed
    step, and a last line torn by a kill mid-write, are dropped first, from samples.jsonl too), mirrors scalars to
    the sinks and shows progress. Disabled (``enabled=False``: every rank but 0) it writes and starts nothing.

    ``settings`` is the ``logging`` section, ``tensorboard`` the older ``train.tensorboard`` that turns TensorBoard
    on or off over ``logging.sinks`` (:func:`r4b.train.sinks.chosen_sinks`), and ``run_config`` the config the
    trackers record."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        *,
        start_step: int = 0,
        enabled: bool = True,
        tensorboard: bool | None = None,
        settings: LoggingSection | None = None,
        run_config: dict[str, Any] | None = None,
        progress: bool = True,
        description: str = "train",
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.samples_path = Path(run_dir) / "samples.jsonl"
        self.settings = settings or LoggingSection()
        self.sinks: list[Sink] = []
        self.progress = None
        if not enabled:
            return
        self._truncate_after(self.path, start_step)
        self._truncate_after(self.samples_path, start_step)
        context = SinkContext(Path(run_dir), start_step, self.settings, run_config or {})
        self.sinks = start_sinks(chosen_sinks(self.settings.sinks, tensorboard), context)
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

    @staticmethod
    def _truncate_after(path: Path, step: int) -> None:
        if not path.exists():
            return
        kept, torn = [], 0
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
                if row["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):  # a line torn by a kill mid-write (or blank): dropped
                torn += bool(line.strip())
        if torn:
            print(f"{path}: dropped {torn} torn line(s) (a run killed mid-write)")
        path.write_text("".join(f"{line}\n" for line in kept))

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(_finite_or_null(metrics), allow_nan=False) + "\n")
        step = metrics["step"]
        scalars = dict(_scalars(metrics))
        for sink in list(self.sinks):
            self._call(sink, step, sink.log, step, scalars)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, status=_status(metrics))

    def samples_due(self, step: int) -> bool:
        """Whether step ``step`` (1-based) logs a sample table (``logging.samples_every``; only where enabled)."""
        every = self.settings.samples_every
        return self.enabled and every > 0 and step % every == 0

    def log_samples(self, step: int, records: list[dict[str, Any]]) -> None:
        """One sample table (:func:`r4b.train.samples.sample_records`): a samples.jsonl line per prompt, and the
        sinks."""
        if not self.enabled:
            return
        with self.samples_path.open("a") as handle:
            for record in records:
                handle.write(json.dumps(_finite_or_null({"step": step, **record}), allow_nan=False) + "\n")
        for sink in list(self.sinks):
            self._call(sink, step, sink.log_samples, step, records)

    def _call(self, sink: Sink, step: int, method: Any, *args: Any) -> None:
        """``method(*args)`` of ``sink``; a failure drops the sink with one line, and the run goes on."""
        try:
            with preserved_rng():
                method(*args)
        except Exception as error:  # a tracker's failure never stops training
            say(f"logging: {sink.name} failed at step {step} ({one_line(error)}); the run goes on without it")
            self.sinks.remove(sink)
            self._close(sink)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        for sink in self.sinks:
            self._close(sink)
        self.sinks = []

    @staticmethod
    def _close(sink: Sink) -> None:
        try:
            with preserved_rng():
                sink.close()
        except Exception as error:
            say(f"logging: {sink.name} did not close cleanly ({one_line(error)})")


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
    """``(path, number)`` of every finite number of a metrics row but its step, nested keys joined by ``/`` and a flag
    (``flat``) as 1 / 0: what every sink gets."""
    for key, value in metrics.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, bool):
            yield f"{prefix}{key}", int(value)
        elif isinstance(value, int | float) and math.isfinite(value):
            yield f"{prefix}{key}", value
