"""A run directory holds one run: `r4b sft` resumes only the run it claims to be, end to end on the tiny
model with 1-2 steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import DEMO_SFT, sft_argv, synthetic_data

from r4b.cli import main
from r4b.train.integrity import checksum_files, write_manifest
from r4b.train.runtime import changed_keys

DEMO = DEMO_SFT


pytestmark = pytest.mark.usefixtures("torch_reference_kernels")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthetic_data(tmp_path_factory, n_sft=24) / "sft.jsonl"


def sft(data: Path, out: Path, *extra: str) -> list[str]:
    return sft_argv(data, out, *extra)


@pytest.fixture(scope="module")
def one_step(data, tmp_path_factory) -> Path:
    """A run stopped after step 1 (checkpoint-1)."""
    run = tmp_path_factory.mktemp("base") / "run"
    with pytest.MonkeyPatch.context() as patch:  # module scope: before the autouse fixture
        patch.setenv("TRITON_INTERPRET", "0")
        assert main([*sft(data, run), "--max-steps", "1"]) == 0
    return run


@pytest.fixture
def run(one_step, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(one_step, copy)
    return copy


def steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def test_resume_none_in_a_used_directory_refuses(data, run, capsys):
    assert main([*sft(data, run), "train.resume=none"]) == 2
    line = error_line(capsys)
    assert line.startswith("r4b sft: error: ") and f"output_dir {run} holds an earlier run" in line
    assert "train.resume=auto" in line and "--output-dir" in line
    assert steps(run) == [1] and sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1"]


def test_a_changed_config_stops_naming_every_changed_key(data, run, capsys):
    before = (run / "config.yaml").read_text()
    assert main([*sft(data, run), "optim.lr_llm=1.0e-3", "train.global_batch_samples=6", "data.max_tokens=900"]) == 2
    line = error_line(capsys)
    for key in ("optim.lr_llm: 0.003 -> 0.001", "train.global_batch_samples: 12 -> 6", "data.max_tokens"):
        assert key in line
    assert "train.allow_config_change=[data.max_tokens,optim.lr_llm,train.global_batch_samples]" in line
    assert (run / "config.yaml").read_text() == before  # nothing written
    assert main([*sft(data, run), f"data.train=[{data},{data}]"]) == 2
    assert "data.train" in error_line(capsys)


def test_logging_and_save_cadence_changes_pass_and_allowed_keys_pass(data, run, capsys):
    args = sft(data, run, "train.save_every=0", "train.keep_checkpoints=1", "train.tensorboard=true")
    assert main([*args, "train.max_steps=2"]) == 0
    assert steps(run) == [1, 2]
    assert main([*args, "train.max_steps=2", "optim.lr_llm=1.0e-3"]) == 2
    assert "optim.lr_llm" in error_line(capsys)
    assert main([*args, "train.max_steps=2", "optim.lr_llm=1.0e-3", "train.allow_config_change=[optim]"]) == 0


def test_a_torn_metrics_line_is_dropped_on_resume(data, run, capsys):
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 2, "loss": 1.2')  # killed mid-write
    assert main([*sft(data, run), "train.max_steps=2"]) == 0
    assert steps(run) == [1, 2]
    assert "torn line" in capsys.readouterr().out


def test_max_steps_below_the_newest_checkpoint_is_an_error(data, run, capsys):
    shutil.copytree(run / "checkpoint-1", run / "checkpoint-3")
    state = run / "checkpoint-3" / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "step": 3}))
    write_manifest(state.parent, checksum_files(state.parent))  # an intact checkpoint, not a damaged one
    assert main([*sft(data, run), "train.max_steps=2"]) == 2
    line = error_line(capsys)
    assert "--max-steps 2 is below the step of the newest checkpoint" in line and "checkpoint-3" in line
    assert not (run / "model").exists()


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_resume_pointing_nowhere_is_an_error(data, tmp_path, where, capsys):
    target = tmp_path / "ckpt"
    if where == "empty":
        target.mkdir()
    assert main([*sft(data, tmp_path / "run"), f"train.resume={target}"]) == 2
    line = error_line(capsys)
    assert f"train.resume={target}" in line
    assert ("no such checkpoint directory" if where == "missing" else "not a complete r4b checkpoint") in line


def test_changed_keys_skip_harmless_and_allowed_keys():
    old = {"output_dir": "a", "optim": {"lr_llm": 1.0, "betas": [0.9, 0.99]}, "train": {"save_every": 1}}
    new = {"output_dir": "b", "optim": {"lr_llm": 2.0, "betas": (0.9, 0.999)}, "train": {"save_every": 5}}
    assert [k for k, _, _ in changed_keys(old, new)] == ["optim.betas", "optim.lr_llm"]
    assert changed_keys(old, new, ["optim.betas", "optim.lr_llm"]) == []
    assert changed_keys(old, new, ["optim"]) == []


def test_ctrl_c_stops_at_the_step_boundary_with_a_checkpoint(data, tmp_path, monkeypatch, capsys):
    import os
    import signal

    from r4b.train import sft as sft_module

    real = sft_module._train_step

    def step_then_ctrl_c(*args):
        metrics = real(*args)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 1
        return metrics

    monkeypatch.setattr(sft_module, "_train_step", step_then_ctrl_c)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where pytest runs as a background job
    run = tmp_path / "run"
    assert main([*sft(data, run), "train.save_every=0"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"r4b sft: stopped by SIGINT after step 1; {run / 'checkpoint-1'} written: rerun the same command to resume"
    )
    assert steps(run) == [1] and (run / "checkpoint-1" / "trainer_state.json").is_file()
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_a_second_ctrl_c_stops_at_once(capsys):
    import os
    import signal

    from r4b.cli import run_command
    from r4b.train.signals import StopSignal

    stop = StopSignal()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == "SIGINT" and stop.should_stop()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        stop.restore()

    def interrupted():
        raise KeyboardInterrupt

    assert run_command("sft", interrupted) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "r4b sft: interrupted"


def test_a_data_file_rewritten_under_its_path_stops_the_resume(data, tmp_path, capsys):
    mine = tmp_path / "sft.jsonl"
    mine.write_text(data.read_text())
    (tmp_path / "images").symlink_to(data.parent / "images")
    run = tmp_path / "run"
    assert main([*sft(mine, run), "train.max_steps=1"]) == 0
    mine.write_text("".join(data.read_text().splitlines(keepends=True)[:-1]))  # one sample fewer
    assert main([*sft(mine, run), "train.max_steps=2"]) == 2
    line = error_line(capsys)
    assert f"data.train.content[{mine}]" in line and "train.allow_config_change=[data.train]" in line
    assert main([*sft(mine, run), "train.max_steps=2", "train.allow_config_change=[data.train]"]) == 0
    assert steps(run) == [1, 2]
