"""`r4b sft` end to end on the embedded tiny model: loss falls, exact resume, 2 processes = 1, bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import DEMO_SFT, ROOT, run_two_ranks, synthetic_data

from r4b.cli import main
from r4b.config import load_config
from r4b.data import DataError
from r4b.train.sft import SFTConfig, train_sft

DEMO = DEMO_SFT


pytestmark = pytest.mark.usefixtures("torch_reference_kernels")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthetic_data(tmp_path_factory, n_sft=48) / "sft.jsonl"


def overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={out}",
        f"data.train=[{data}]",
        "train.global_batch_samples=12",
        "train.progress=false",
        "train.tensorboard=false",
        *extra,
    ]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_demo_config_trains_logs_checkpoints_and_exports(data, tmp_path):
    config = load_config(SFTConfig, DEMO, overrides(data, tmp_path / "run", "train.epochs=2", "train.tensorboard=true"))
    run = train_sft(config)
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all({"step", "loss", "lr", "tokens_per_s", "grad_norm", "lrs"} <= set(r) for r in rows)
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    assert rows[0]["lrs"]["llm"] / rows[0]["lrs"]["vision"] == pytest.approx(3.0)  # per-module rates
    assert sum(r["samples"] for r in rows) == 2 * 48
    assert [p.name for p in sorted(run.glob("checkpoint-*"))] == ["checkpoint-8"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((run / "data_report.json").read_text())["loaded"] == 48

    from transformers import AutoModelForImageTextToText

    from r4b.models import register_r4b_model

    register_r4b_model()
    exported = AutoModelForImageTextToText.from_pretrained(run / "model")
    trained = torch.load(run / "checkpoint-8" / "engine" / "engine_state.pt", weights_only=False)["model"]
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, trained[f"model.{name}"]), name


def test_resume_gives_the_uninterrupted_losses(data, tmp_path):
    common = ("train.epochs=2", "train.save_every=3", "train.keep_checkpoints=5", "train.export=false")
    straight = train_sft(load_config(SFTConfig, DEMO, overrides(data, tmp_path / "a", *common)))
    stopped = load_config(SFTConfig, DEMO, overrides(data, tmp_path / "b", *common, "train.max_steps=4"))
    train_sft(stopped)
    assert [p.name for p in sorted((tmp_path / "b").glob("checkpoint-*"))] == ["checkpoint-3", "checkpoint-4"]
    # resume from step 3 (drop the later checkpoint) so the run repeats step 4 and carries on
    shutil.rmtree(tmp_path / "b" / "checkpoint-4")
    train_sft(load_config(SFTConfig, DEMO, overrides(data, tmp_path / "b", *common)))
    keys = ("step", "loss", "grad_norm", "lr", "loss_tokens")
    assert [tuple(r[k] for k in keys) for r in metrics(tmp_path / "b")] == [
        tuple(r[k] for k in keys) for r in metrics(straight)
    ]


@pytest.mark.multiprocess
@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed"])
def test_two_processes_give_the_one_process_losses(data, tmp_path, engine):
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    args = overrides(data, tmp_path / "one", "train.max_steps=3", "train.export=false")
    train_sft(load_config(SFTConfig, DEMO, args))
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    two = overrides(data, tmp_path / "two", "train.max_steps=3", "train.export=false", f"engine.kind={engine}")
    run_two_ranks(
        ["-m", "r4b", "sft", "--config", str(DEMO), *two], env=env, cwd=ROOT, timeout=240, fresh=tmp_path / "two"
    )
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["tokens"] == a["tokens"] and b["samples"] == a["samples"]


def test_bad_line_stops_the_run_naming_file_line_and_field(data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = data.read_text().splitlines()[:3]
    lines[1] = (
        lines[1].replace('"mode": "non_thinking"', '"mode": "think"').replace('"mode": "thinking"', '"mode": "think"')
    )
    bad.write_text("\n".join(lines) + "\n")
    (tmp_path / "images").symlink_to(data.parent / "images")
    code = main(["sft", "--config", str(DEMO), *overrides(bad, tmp_path / "run")])
    assert code == 2
    assert f"{bad}:2: field 'mode': unknown mode 'think'" in capsys.readouterr().err


def test_skipped_and_over_long_samples_are_counted_not_lost(data, tmp_path):
    bad = tmp_path / "mixed.jsonl"
    lines = data.read_text().splitlines()[:12]
    lines[3] = "{not json"
    bad.write_text("\n".join(lines) + "\n")
    (tmp_path / "images").symlink_to(data.parent / "images")
    lengths_budget = "data.max_tokens=60"  # the thinking samples are longer than this
    config = load_config(
        SFTConfig, DEMO, overrides(bad, tmp_path / "run", "data.on_error=skip", lengths_budget, "train.max_steps=1")
    )
    run = train_sft(config)
    report = json.loads((run / "data_report.json").read_text())
    assert report["skipped"]["malformed_json"] == 1 and report["skipped"]["overlong"] >= 1
    assert report["loaded"] + sum(report["skipped"].values()) == 12
    assert "mixed.jsonl:4" in report["examples"]["malformed_json"][0]
    # without skipping, the first over-long sample stops the run, naming it
    strict = tmp_path / "strict.jsonl"
    strict.write_text("".join(line + "\n" for line in lines if line != "{not json"))
    with pytest.raises(DataError, match=r"strict.jsonl:\d+: sample has \d+ tokens, over the packing budget of 60"):
        train_sft(load_config(SFTConfig, DEMO, overrides(strict, tmp_path / "strict", lengths_budget)))


def test_activation_checkpointing_gives_the_same_losses(data, tmp_path):
    common = ("train.max_steps=2", "train.export=false")
    plain = train_sft(load_config(SFTConfig, DEMO, overrides(data, tmp_path / "plain", *common)))
    recompute = overrides(data, tmp_path / "ckpt", *common, "engine.activation_checkpointing=true")
    checkpointed = train_sft(load_config(SFTConfig, DEMO, recompute))
    for a, b in zip(metrics(plain), metrics(checkpointed), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["grad_norm"] == pytest.approx(
            a["grad_norm"], rel=1e-5
        )
