"""Logging sinks (logging.sinks): TensorBoard, W&B (offline) and MLflow (a file: store) get the keys of metrics.jsonl,
BPO's sample tables go to samples.jsonl and the sinks, a sink that fails is one line and the run goes on, a resumed
run continues the same tracker runs, sinks leave the seeded run's metrics as they were, and only rank 0 logs."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import struct
import sys
import typing
from pathlib import Path

import pytest
import torch
from helpers import DEMO_BPO, DEMO_SFT, ROOT, run_two_ranks, synthetic_data, tiny_bpo

from r4b.config import load_config
from r4b.config.sections import LoggingSection, SinkName
from r4b.train import sinks as sinks_module
from r4b.train.bpo import BPOConfig, train_bpo
from r4b.train.logging import RunLogger, _scalars
from r4b.train.sft import SFTConfig, train_sft
from r4b.train.sinks import RUNS_FILE, SINKS, Sink, chosen_sinks

TIMING_KEYS = ("time/", "tokens_per_s")  # wall-clock: differs between any two runs

pytestmark = pytest.mark.usefixtures("torch_reference_kernels")  # tests/conftest.py

# the trackers are imported by the runs themselves, after the fixture's variables (telemetry off) are set
trackers = pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None or importlib.util.find_spec("mlflow") is None,
    reason="pip install -e '.[dev]' (wandb, mlflow-skinny)",
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthetic_data(tmp_path_factory, n_sft=24, n_rl=8)


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """W&B offline with its files in tmp; no tracker variable of the user's leaks in."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage reports from a test
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):  # staged tables
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    for name in ("WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "wandb-dir").mkdir()
    return tmp_path


def bpo_args(data: Path, out: Path, *extra: str) -> list[str]:
    return tiny_bpo(data, out, "train.prompts_per_step=2", "train.steps=2", "train.tensorboard=null", *extra)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def flat(row: dict) -> dict[str, float]:
    return dict(_scalars(row))


# -- reading back what the trackers wrote ------------------------------------------------------------------------------


def wandb_records(run_file: Path) -> list:
    """The records of an offline W&B run file (a LevelDB log of wandb's protobuf Record)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending, records = run_file.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer or padding
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            records.append(wandb_internal_pb2.Record())
            records[-1].ParseFromString(pending)
            pending = b""
    return records


def wandb_history(run_file: Path) -> list[dict[str, object]]:
    history = [r.history for r in wandb_records(run_file) if r.WhichOneof("record_type") == "history"]
    return [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in h.item} for h in history]


def wandb_artifact_files(run_file: Path) -> list[str]:
    """The paths in the artifacts a run logged (a logged wandb.Table is one, with its images)."""
    logged = [r.artifact for r in wandb_records(run_file) if r.WhichOneof("record_type") == "artifact"]
    return [entry.path for artifact in logged for entry in artifact.manifest.contents]


def wandb_runs(wandb_dir: Path) -> list[Path]:
    return sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))


def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mlflow_client(store: Path):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store.resolve().as_uri())


# -- choosing sinks ------------------------------------------------------------------------------------------------


def test_train_tensorboard_turns_tensorboard_on_or_off_over_logging_sinks():
    assert typing.get_args(SinkName) == SINKS
    assert LoggingSection().sinks == ["tensorboard"] and BPOConfig().train.tensorboard is None
    assert chosen_sinks(["tensorboard"], None) == ["tensorboard"]
    assert chosen_sinks(["tensorboard", "wandb"], False) == ["wandb"]  # an existing config's train.tensorboard=false
    assert chosen_sinks(["wandb", "mlflow"], True) == ["tensorboard", "wandb", "mlflow"]
    assert chosen_sinks(["wandb", "mlflow", "wandb"], None) == ["wandb", "mlflow"]
    assert chosen_sinks([], None) == []
    config = load_config(SFTConfig, DEMO_SFT, ["logging.sinks=[wandb,mlflow]", "train.tensorboard=false"])
    assert config.logging.sinks == ["wandb", "mlflow"] and config.train.tensorboard is False


def test_every_finite_number_of_a_row_is_a_scalar_flags_as_one_or_zero():
    row = {"step": 4, "loss": 0.5, "flat": True, "skipped_updates": 0, "thinking": {"off_mode": 0.25}, "kl": None}
    row |= {"grad_norm": float("nan"), "time": {"rollout": 1.5}}
    assert flat(row) == {"loss": 0.5, "flat": 1, "skipped_updates": 0, "thinking/off_mode": 0.25, "time/rollout": 1.5}


# -- every sink, end to end on BPO -----------------------------------------------------------------------------------


@trackers
def test_bpo_sinks_get_the_keys_of_metrics_jsonl_and_the_sample_tables_and_resume_continues_them(data, offline):
    """One BPO run with every sink, stopped after step 1 and resumed: W&B's offline run files, the MLflow store and the
    TensorBoard events hold the keys (and values) of metrics.jsonl; samples.jsonl and the sinks hold the sample
    tables; the resumed run continues the same W&B and MLflow runs; and a run without sinks logs the same metrics."""
    run, store = offline / "run", offline / "mlruns"
    sinks = ["logging.sinks=[tensorboard,wandb,mlflow]", f"logging.mlflow_uri=file:{store}"]
    sinks += ["logging.samples_every=1", "logging.samples_prompts=1", "logging.run_name=sinks-test"]
    train_bpo(load_config(BPOConfig, DEMO_BPO, bpo_args(data, run, *sinks, "train.max_steps=1")))
    first_ids = json.loads((run / RUNS_FILE).read_text())
    train_bpo(load_config(BPOConfig, DEMO_BPO, bpo_args(data, run, *sinks)))
    assert json.loads((run / RUNS_FILE).read_text()) == first_ids  # the same tracker runs, continued

    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    keys = set(flat(rows[0]))
    assert {"reward", "thinking/off_mode", "non_thinking/off_mode", "flat", "loss", "lr"} <= keys

    # W&B: two offline run files of one run id (the start and the resume), the same keys and values per step
    files = wandb_runs(offline / "wandb-dir")
    assert len(files) == 2 and {f.name for f in files} == {f"run-{first_ids['wandb']}.wandb"}
    history = [row for f in files for row in wandb_history(f)]
    assert [h["_step"] for h in history] == [1, 2]
    for logged, row in zip(history, rows, strict=True):
        scalars = {k: v for k, v in logged.items() if not k.startswith("_") and not k.startswith("samples")}
        assert scalars == pytest.approx(flat(row))
        assert logged["samples/_type"] == "table-file" and logged["samples/nrows"] == 4  # 1 prompt x 2 modes x g=2
    table = json.loads(next(files[0].parent.glob("files/media/table/samples_*.table.json")).read_text())
    assert table["columns"] == ["prompt", "image", "answer", "mode", "response", "reward", "off_mode"]
    assert [r[3] for r in table["data"]] == ["thinking", "thinking", "non_thinking", "non_thinking"]
    logged_files = wandb_artifact_files(files[0])  # the table's artifact carries the prompt's image
    assert "samples.table.json" in logged_files and any(p.startswith("media/images/") for p in logged_files)

    # MLflow: one run, every key with one value per step, the config as parameters, a sample table per step
    client = mlflow_client(store)
    mlflow_run = client.get_run(first_ids["mlflow"])
    assert mlflow_run.info.run_name == "sinks-test" and mlflow_run.info.status == "FINISHED"
    assert set(mlflow_run.data.metrics) == keys
    for key in keys:
        history = sorted((m.step, m.value) for m in client.get_metric_history(first_ids["mlflow"], key))
        assert [step for step, _ in history] == [1, 2]
        assert [value for _, value in history] == pytest.approx([flat(r)[key] for r in rows])
    assert mlflow_run.data.params["rollout.group_size"] == "2"
    artifacts = {a.path for a in client.list_artifacts(first_ids["mlflow"], "samples")}
    assert artifacts == {
        "samples/step-000001",
        "samples/step-000001.json",
        "samples/step-000002",
        "samples/step-000002.json",
    }
    logged_table = json.loads(
        Path(client.download_artifacts(first_ids["mlflow"], "samples/step-000002.json")).read_text()
    )
    assert logged_table["step"] == 2 and logged_table["prompts"][0]["images"] == ["samples/step-000002/prompt0-0.png"]

    # TensorBoard: the same keys and values
    board = tensorboard_scalars(run)
    assert set(board) == keys
    assert [step for step, _ in board["reward"]] == [1, 2]
    assert [value for _, value in board["reward"]] == pytest.approx([r["reward"] for r in rows])

    # samples.jsonl: one line per logged prompt, each response with its reward and off-mode flag
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 2]
    first = samples[0]
    assert first["prompt"].startswith("<image>") and Path(first["images"][0]).exists() and first["answer"]
    assert [r["mode"] for r in first["responses"]] == ["thinking", "thinking", "non_thinking", "non_thinking"]
    assert all(isinstance(r["reward"], float) and isinstance(r["off_mode"], bool) for r in first["responses"])
    assert first["responses"][0]["response"].startswith("<think>\n")  # the assistant turn as written

    # sinks draw nothing from the run's generators: the same run without them logs the same metrics
    plain = offline / "plain"
    train_bpo(load_config(BPOConfig, DEMO_BPO, bpo_args(data, plain, "logging.sinks=[]")))
    assert not (plain / "samples.jsonl").exists() and not (plain / "tensorboard").exists()
    for a, b in zip(metrics(plain), rows, strict=True):
        untimed = {k: v for k, v in flat(a).items() if not k.startswith(TIMING_KEYS)}
        assert untimed == {k: v for k, v in flat(b).items() if not k.startswith(TIMING_KEYS)}


# -- failures are one line ---------------------------------------------------------------------------------------


def test_sinks_that_cannot_start_are_one_line_each_and_sft_trains_on(data, offline, monkeypatch, capsys):
    """wandb not installed (its import fails) and an MLflow store under a file: one line each, TensorBoard and
    metrics.jsonl as usual."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    blocker = offline / "not-a-directory"
    blocker.write_text("")
    args = [f"output_dir={offline / 'run'}", f"data.train=[{data / 'sft.jsonl'}]", "train.global_batch_samples=12"]
    args += ["train.max_steps=2", "train.progress=false", "train.export=false"]
    args += ["logging.sinks=[wandb,tensorboard,mlflow]", f"logging.mlflow_uri=file:{blocker / 'mlruns'}"]
    run = train_sft(load_config(SFTConfig, DEMO_SFT, args))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("logging:")]
    assert len(lines) == 2, lines
    assert lines[0].startswith("logging: wandb did not start (ModuleNotFoundError: ")  # an ImportError
    assert lines[0].endswith("pip install 'r4b[wandb]'); the run goes on without it")
    assert lines[1].startswith("logging: mlflow did not start (") and lines[1].endswith("the run goes on without it")
    assert [r["step"] for r in metrics(run)] == [1, 2]
    assert set(tensorboard_scalars(run)) == set(flat(metrics(run)[0]))


class Broken(Sink):
    name = "broken"

    def __init__(self, context) -> None:
        random.random()  # a tracker that draws from the run's generators
        torch.rand(3)

    def log(self, step, scalars) -> None:
        random.random()
        torch.rand(3)
        if step == 2:
            raise ConnectionError("the server went away\nTraceback ...")

    def close(self) -> None:
        pass


def test_a_sink_that_fails_later_is_dropped_with_one_line_and_never_moves_the_generators(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sinks_module.FACTORIES, "tensorboard", Broken)
    random.seed(1)
    torch.manual_seed(1)
    expected = random.random(), torch.rand(2)
    random.seed(1)
    torch.manual_seed(1)
    logger = RunLogger(tmp_path, 3, progress=False)
    for step in (1, 2, 3):
        logger.log({"step": step, "loss": 1.0 / step})
    logger.close()
    assert (random.random(), *torch.rand(2).tolist()) == (expected[0], *expected[1].tolist())
    err = capsys.readouterr().err.splitlines()
    line = "logging: broken failed at step 2 (ConnectionError: the server went away Traceback ...); the run goes on"
    assert err == [f"{line} without it"]
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3] and logger.sinks == []


def test_a_resumed_logger_drops_sample_lines_past_its_step(tmp_path):
    logger = RunLogger(tmp_path, 3, tensorboard=False, progress=False, settings=LoggingSection(samples_every=1))
    for step in (1, 2, 3):
        logger.log({"step": step})
        assert logger.samples_due(step)
        logger.log_samples(step, [{"prompt": "p", "images": [], "answer": "1", "responses": []}])
    logger.close()
    RunLogger(tmp_path, 3, start_step=1, tensorboard=False, progress=False).close()
    assert [json.loads(line)["step"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()] == [1]
    assert not RunLogger(
        tmp_path, 3, start_step=1, enabled=False, settings=LoggingSection(samples_every=1)
    ).samples_due(2)


# -- ranks ---------------------------------------------------------------------------------------------------------


@trackers
@pytest.mark.multiprocess
def test_only_rank_0_logs_to_the_sinks(data, offline):
    """Every tracker's files inside the run directory, which run_two_ranks deletes before it reruns a launch that
    gloo's teardown aborted: a rerun's count is not the aborted launch's plus its own."""
    run = offline / "two"
    store = run / "mlruns"
    args = ["-m", "r4b", "sft", "--config", str(DEMO_SFT), f"output_dir={run}", f"data.train=[{data / 'sft.jsonl'}]"]
    args += ["train.global_batch_samples=12", "train.max_steps=2", "train.progress=false", "train.export=false"]
    args += ["engine.kind=fsdp2", "logging.sinks=[tensorboard,wandb,mlflow]", f"logging.mlflow_uri=file:{store}"]
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env["MLFLOW_ALLOW_FILE_STORE"] = "true"
    env.pop("WANDB_DIR")  # W&B's files go to output_dir/wandb
    run_two_ranks(args, env=env, cwd=ROOT, timeout=240, fresh=run)
    files = wandb_runs(run)
    assert len(files) == 1
    assert [h["_step"] for h in wandb_history(files[0])] == [1, 2]
    client = mlflow_client(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and len(client.get_metric_history(runs[0].info.run_id, "loss")) == 2
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert [r["step"] for r in metrics(run)] == [1, 2]
