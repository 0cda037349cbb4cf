"""The trackers a run's metrics go to besides metrics.jsonl (``logging.sinks``): TensorBoard, W&B and MLflow.

Every sink gets each step's scalars, the keys of metrics.jsonl (nested ones joined by ``/``), and BPO's sample tables
(:mod:`r4b.train.samples`). Only rank 0 starts sinks (:class:`r4b.train.logging.RunLogger`). A sink whose package is
missing or that cannot start (no account, an unwritable directory) is one line on stderr, and the run goes on with
the others. Runs are seeded: a sink starts and logs inside :func:`preserved_rng`, so no tracker draws from the
generators that training reads."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch

from r4b.config.sections import LoggingSection

SINKS = ("tensorboard", "wandb", "mlflow")
INSTALL = {"tensorboard": "tensorboard", "wandb": "'r4b[wandb]'", "mlflow": "'r4b[mlflow]'"}  # what pip needs
RUNS_FILE = "sink_runs.json"  # the W&B and MLflow run ids, so that a resumed run continues the same runs
SAMPLE_COLUMNS = ("prompt", "image", "answer", "mode", "response", "reward", "off_mode")


def chosen_sinks(sinks: Sequence[str], tensorboard: bool | None) -> list[str]:
    """``logging.sinks``, each once, with ``train.tensorboard`` applied: true / false adds / removes TensorBoard,
    null leaves the list as it is."""
    chosen = [name for name in dict.fromkeys(sinks) if name != "tensorboard" or tensorboard is not False]
    if tensorboard and "tensorboard" not in chosen:
        chosen.insert(0, "tensorboard")
    return chosen


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Python's, NumPy's and torch's CPU generators as they were before the block: a tracker that draws from them
    (an id, a sample) would otherwise change the rollouts and batches of a seeded run."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def one_line(error: BaseException, sink: str | None = None) -> str:
    """``error`` as one short line; for a missing package, what to install."""
    text = " ".join(str(error).split())
    text = f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__
    if sink is not None and isinstance(error, ImportError):
        text += f"; pip install {INSTALL[sink]}"
    return text


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class SinkContext:
    """What a sink starts from: the run directory, the step it resumes after, the logging section, the run's config
    (the trackers' hyperparameters) and the tracker run ids of the run it resumes."""

    run_dir: Path
    start_step: int
    settings: LoggingSection
    run_config: dict[str, Any] = field(default_factory=dict)

    @property
    def run_name(self) -> str:
        return self.settings.run_name or self.run_dir.resolve().name

    def previous_id(self, sink: str) -> str | None:
        """The tracker run this run resumes (none for a fresh start, so a restart never appends to an old run)."""
        path = self.run_dir / RUNS_FILE
        if self.start_step == 0 or not path.exists():
            return None
        try:
            return json.loads(path.read_text()).get(sink)
        except (ValueError, AttributeError):
            return None

    def remember(self, sink: str, run_id: str) -> None:
        path = self.run_dir / RUNS_FILE
        try:
            ids = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            ids = {}
        ids[sink] = run_id
        path.write_text(json.dumps(ids, indent=2) + "\n")


class Sink:
    """One tracker: each step's scalars, BPO's sample tables, and the end of the run."""

    name = ""

    def log(self, step: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def log_samples(self, step: int, records: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def sample_rows(records: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(prompt record, response) per response of a sample table."""
    for record in records:
        for response in record["responses"]:
            yield record, response


class TensorBoardSink(Sink):
    """Scalars under their keys in output_dir/tensorboard (steps past the resumed one purged); a sample table as text
    (a markdown table per prompt) and each prompt's first image."""

    name = "tensorboard"

    def __init__(self, context: SinkContext) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = context.run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=context.start_step + 1)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def log_samples(self, step: int, records: list[dict[str, Any]]) -> None:
        from PIL import Image

        for index, record in enumerate(records):
            lines = [f"**prompt** {_cell(record['prompt'])}", "", f"**answer** {_cell(record['answer'])}", ""]
            lines += ["| mode | response | reward | off_mode |", "|---|---|---|---|"]
            for r in record["responses"]:
                lines.append(f"| {r['mode']} | {_cell(r['response'])} | {r['reward']:.3f} | {r['off_mode']} |")
            self.writer.add_text(f"samples/prompt_{index}", "\n".join(lines), step)
            if record["images"]:
                with Image.open(record["images"][0]) as image:
                    pixels = np.asarray(image.convert("RGB"))
                self.writer.add_image(f"samples/prompt_{index}", pixels, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbSink(Sink):
    """A W&B run (files in $WANDB_DIR, else output_dir/wandb); a resumed r4b run continues it. Scalars at their step;
    a sample table as a ``samples`` wandb.Table (one row per response, the prompt's first image as a wandb.Image)."""

    name = "wandb"

    def __init__(self, context: SinkContext) -> None:
        import wandb

        self.wandb = wandb
        settings = context.settings
        kwargs: dict[str, Any] = {
            "project": settings.project or os.environ.get("WANDB_PROJECT") or "r4b",
            "name": context.run_name,
            "config": context.run_config,
            "dir": os.environ.get("WANDB_DIR") or str(context.run_dir),
            # r4b's own progress line and messages stay on the terminal, uncaptured, unless the user asks
            "settings": wandb.Settings(console=os.environ.get("WANDB_CONSOLE", "off")),
        }
        if previous := context.previous_id(self.name):
            kwargs |= {"id": previous, "resume": "allow"}
        self.run = wandb.init(**kwargs)
        context.remember(self.name, self.run.id)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def log_samples(self, step: int, records: list[dict[str, Any]]) -> None:
        table = self.wandb.Table(columns=list(SAMPLE_COLUMNS))
        for record, r in sample_rows(records):
            image = self.wandb.Image(str(record["images"][0])) if record["images"] else None
            prompt = (record["prompt"], image, record["answer"])
            table.add_data(*prompt, r["mode"], r["response"], r["reward"], r["off_mode"])
        self.run.log({"samples": table}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowSink(Sink):
    """An MLflow run at ``logging.mlflow_uri`` (else $MLFLOW_TRACKING_URI, else a file store in output_dir/mlruns);
    a resumed r4b run continues it. The config as parameters (dotted keys), scalars at their step, a sample table as
    the artifact samples/step-NNNNNN.json with the prompts' images beside it in samples/step-NNNNNN/."""

    name = "mlflow"

    def __init__(self, context: SinkContext) -> None:
        from mlflow.tracking import MlflowClient

        settings = context.settings
        local = (context.run_dir / "mlruns").resolve().as_uri()
        uri = settings.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or local
        if urlparse(uri).scheme in ("", "file"):
            # MLflow 3 keeps its file store behind this switch; a run without a server or SQL has nothing else
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = self._resumed(context.previous_id(self.name))
        if self.run_id is None:
            name = settings.project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "r4b"
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment_id, run_name=context.run_name).info.run_id
            self._log_params(context.run_config)
        context.remember(self.name, self.run_id)

    def _resumed(self, run_id: str | None) -> str | None:
        if run_id is None:
            return None
        try:
            self.client.update_run(run_id, status="RUNNING")
        except Exception:  # not in this store (another mlflow_uri): a new run
            return None
        return run_id

    def _log_params(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(key, _param_value(value)) for key, value in _dotted(config)]
        self.client.log_batch(self.run_id, params=params)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def log_samples(self, step: int, records: list[dict[str, Any]]) -> None:
        folder = f"samples/step-{step:06d}"
        with tempfile.TemporaryDirectory() as staging:
            logged = []
            for index, record in enumerate(records):
                names = []
                for number, path in enumerate(record["images"]):
                    name = f"prompt{index}-{number}{Path(path).suffix}"
                    shutil.copyfile(path, Path(staging) / name)
                    names.append(f"{folder}/{name}")
                logged.append(record | {"images": names})
            if any(record["images"] for record in records):
                self.client.log_artifacts(self.run_id, staging, folder)
        self.client.log_dict(self.run_id, {"step": step, "prompts": logged}, f"{folder}.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


FACTORIES: dict[str, Callable[[SinkContext], Sink]] = {
    "tensorboard": TensorBoardSink,
    "wandb": WandbSink,
    "mlflow": MlflowSink,
}


def start_sinks(names: Sequence[str], context: SinkContext) -> list[Sink]:
    """The sinks of ``names`` that start; each that does not is one line on stderr."""
    started = []
    for name in names:
        try:
            with preserved_rng():
                started.append(FACTORIES[name](context))
        except Exception as error:  # a tracker's failure never stops training
            say(f"logging: {name} did not start ({one_line(error, name)}); the run goes on without it")
    return started


def _cell(text: Any) -> str:
    """Text for a markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _dotted(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _dotted(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:6000]  # MLflow's longest parameter value
