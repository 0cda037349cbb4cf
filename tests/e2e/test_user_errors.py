"""Every user error is one line, ``r4b <command>: error: ...`` naming the file, line, field or key, with rc 2 and no
traceback; ``R4B_DEBUG=1`` keeps the traceback. The cases fail before a model loads (fast), but for the
empty-data ones (the tiny model's tokenizer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from r4b.cli import main
from r4b.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SFT = str(ROOT / "configs" / "demo" / "sft.yaml")
BPO = str(ROOT / "configs" / "demo" / "bpo.yaml")


pytestmark = pytest.mark.usefixtures("torch_reference_kernels")


@pytest.fixture(autouse=True)
def no_debug_tracebacks(monkeypatch):
    monkeypatch.delenv("R4B_DEBUG", raising=False)


@pytest.fixture
def paths(tmp_path) -> dict[str, str]:
    (tmp_path / "file").write_text("x")
    (tmp_path / "data.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    (tmp_path / "empty.yaml").write_text("")
    return {"tmp": str(tmp_path), "file": str(tmp_path / "file"), "run": str(tmp_path / "run")}


def sft(*extra: str) -> list[str]:
    return ["sft", "--config", SFT, "--output-dir", "{run}", "data.train=[{tmp}/data.jsonl]", *extra]


def bpo(*extra: str) -> list[str]:
    data = ["data.prompts=[{tmp}/data.jsonl]", "data.eval={tmp}/data.jsonl"]
    return ["bpo", "--config", BPO, "--output-dir", "{run}", *data, *extra]


CASES = {
    "missing --config": (["sft", "--config", "{tmp}/nope.yaml"], "--config {tmp}/nope.yaml: no such file"),
    "unknown data.on_error": (sft("data.on_error=maybe"), "data.on_error = 'maybe': expected one of 'raise', 'skip'"),
    "unknown engine.kind": (sft("engine.kind=tpu"), "engine.kind = 'tpu': expected one of 'single', 'fsdp2'"),
    "global batch 0": (sft("train.global_batch_samples=0"), "train.global_batch_samples = 0: must be positive"),
    "negative lr": (sft("optim.lr_llm=-1.0e-3"), "optim.lr_llm = -0.001: must not be negative"),
    "max steps 0": ([*sft(), "--max-steps", "0"], "--max-steps = 0: must be positive"),
    "max steps negative": ([*sft(), "--max-steps=-2"], "--max-steps = -2: must be positive"),
    "warmup ratio over 1": (sft("optim.warmup_ratio=2"), "optim.warmup_ratio = 2.0: must be between 0 and 1"),
    "missing data file": (sft("data.train=[{tmp}/no.jsonl]"), "data.train: {tmp}/no.jsonl: no such file"),
    "max_tokens not an integer": (sft("data.max_tokens=1e35"), "data.max_tokens = '1e35': expected an integer"),
    "empty sft config": (
        ["sft", "--config", "{tmp}/empty.yaml", "--output-dir", "{run}"],
        "data.train is empty: no training data",
    ),
    "empty bpo config": (
        ["bpo", "--config", "{tmp}/empty.yaml", "--output-dir", "{run}"],
        "data.prompts is empty: no prompts",
    ),
    "output dir is a file": (["sft", "--config", SFT, "--output-dir", "{file}"], "output_dir {file} is a file"),
    "output dir under a file": (
        ["sft", "--config", SFT, "--output-dir", "{file}/run"],
        "output_dir {file}/run is under a file, {file}",
    ),
    "bpo negative steps": (bpo("train.steps=-5"), "train.steps = -5: must be positive"),
    "bpo missing model.path": (bpo("model.path={tmp}/no-model"), "model.path {tmp}/no-model: no such model directory"),
    "bpo unknown data.on_error": (bpo("data.on_error=x"), "data.on_error = 'x': expected one of"),
    "bpo missing eval file": (bpo("data.eval={tmp}/no.jsonl"), "data.eval: {tmp}/no.jsonl: no such file"),
    "bpo unknown reward": (bpo("reward.name=foo"), "unknown reward 'foo'; registered: answer, format, or http"),
    "bpo reward server without url": (bpo("reward.name=http"), "reward.name=http needs reward.url"),
    "curate --n 0": (
        ["curate", "--model", "tiny", "--data", "{tmp}/data.jsonl", "--out", "{run}", "--n", "0"],
        "--n 0: must be at least 1",
    ),
    "curate --out a file": (
        ["curate", "--model", "tiny", "--data", "{tmp}/data.jsonl", "--out", "{file}"],
        "--out {file} is a file",
    ),
    "curate missing data": (
        ["curate", "--model", "tiny", "--data", "{tmp}/no.jsonl", "--out", "{run}"],
        "--data {tmp}/no.jsonl: no such file",
    ),
    "curate empty data": (
        ["curate", "--model", "tiny", "--data", "{tmp}/blank.jsonl", "--out", "{run}"],
        "{tmp}/blank.jsonl: no questions",
    ),
    "eval --out under a file": (
        ["eval", "--model", "tiny", "--data", "{tmp}/data.jsonl", "--out", "{file}/x"],
        "--out {file}/x is under a file",
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_user_error_is_one_line(case, paths, capsys):
    argv, expected = CASES[case]
    code = main([arg.format(**paths) for arg in argv])
    err = capsys.readouterr().err.strip().splitlines()
    command = argv[0]
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith(f"r4b {command}: error: "), err
    assert expected.format(**paths) in err[0]
    assert not Path(paths["run"]).exists() or "--out" in argv  # a refused run leaves no run directory behind


def test_debug_keeps_the_traceback(paths, monkeypatch):
    monkeypatch.setenv("R4B_DEBUG", "1")
    with pytest.raises(ConfigError, match=r"engine\.kind"):
        main([arg.format(**paths) for arg in sft("engine.kind=tpu")])


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_output_dir(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main(["sft", "--config", SFT, "--output-dir", str(locked / "run")]) == 2
    assert f"output_dir {locked / 'run'}: {locked} is not writable" in capsys.readouterr().err


@pytest.mark.subprocess
def test_console_message_has_no_traceback(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "r4b", "sft", "--config", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == f"r4b sft: error: --config {tmp_path / 'nope.yaml'}: no such file"


@pytest.mark.parametrize("content", ["", "\n \n", "overlong"])
def test_no_usable_sample_is_an_error_and_the_report_is_written(content, tmp_path, capsys):
    from r4b.synth import write_synthetic

    data = tmp_path / "data.jsonl"
    if content == "overlong":
        write_synthetic(tmp_path, n_sft=4, n_rl=1, n_eval=1, seed=0)
        data = tmp_path / "sft.jsonl"
    else:
        data.write_text(content)
    run = tmp_path / "run"
    argv = ["sft", "--config", SFT, "--output-dir", str(run), f"data.train=[{data}]", "data.on_error=skip"]
    assert main([*argv, "data.max_tokens=8", "train.progress=false", "train.tensorboard=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"r4b sft: error: data.train: no trainable samples in {data}: loaded 0")
    report = json.loads((run / "data_report.json").read_text())
    assert report["loaded"] == 0 and report["skipped"].get("overlong", 0) == (4 if content == "overlong" else 0)


def test_bpo_prompts_with_a_corrupt_image_are_skipped_or_named(tmp_path):
    """bpo reads training and evaluation prompts alike (data.on_error): a corrupt image is a counted bad line."""
    from r4b.config.sections import BPODataSection
    from r4b.errors import InputError
    from r4b.train.bpo import read_prompt_files

    skip = BPODataSection(on_error="skip")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    good = {"messages": [{"role": "user", "content": "1+1?"}], "answer": "2"}
    corrupt = {**good, "images": ["bad.png"], "messages": [{"role": "user", "content": "<image>\n1+1?"}]}
    path = tmp_path / "rl.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in [good, corrupt]))
    prompts, report = read_prompt_files([str(path)], skip)
    assert len(prompts) == 1 and report.skipped == {"bad_image": 1}
    assert report.examples["bad_image"][0].startswith(f"{path}:2: field 'images[0]': cannot read image")
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text(json.dumps(corrupt) + "\n")
    with pytest.raises(InputError, match=r"no RL prompts in .*bad\.jsonl: loaded 0, skipped 1 \(bad_image 1\)$"):
        read_prompt_files([str(only_bad)], skip)


def test_a_global_batch_larger_than_the_dataset_is_said(capsys):
    from r4b.train.batches import GlobalBatchPlanner

    planner = GlobalBatchPlanner([5, 6, 7], [1, 1, 1], global_batch_samples=8, max_tokens=64)
    assert planner.steps_per_epoch == 1
    assert "warning: train.global_batch_samples = 8 is larger than the dataset (3 samples)" in capsys.readouterr().err
