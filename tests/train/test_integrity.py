"""Checkpoints and exports carry checksums (r4b.train.integrity): resume names a damaged file and falls back to the
newest intact checkpoint, a full disk mid-save is one line naming the file, an interrupted export leaves the previous
``model/`` (never a half one), and ``r4b eval`` refuses a damaged or unfinished export."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from helpers import ROOT, run_two_ranks, sft_argv, synthetic_data

from r4b.cli import main
from r4b.errors import InputError, RunInterrupted
from r4b.train import checkpoint as checkpoint_module
from r4b.train import integrity
from r4b.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from r4b.train.integrity import MANIFEST, check_export
from r4b.train.runtime import export_model, resume

pytestmark = pytest.mark.usefixtures("torch_reference_kernels")  # tests/conftest.py

NO_SPACE = os.strerror(errno.ENOSPC)


class FakeEngine:
    """An engine's save/load: a small state file and a 64 KiB shard (the engines are tested in test_engine.py)."""

    def __init__(self, value):
        self.value = value

    def save(self, path: Path) -> None:
        path.mkdir(parents=True)
        (path / "state.json").write_text(json.dumps(self.value))
        (path / "shard.bin").write_bytes(os.urandom(1 << 16))

    def load(self, path: Path) -> None:
        self.value = json.loads((path / "state.json").read_text())


def saved(run: Path, steps=(1, 2, 3)) -> Path:
    for step in steps:
        save_checkpoint(run, step, FakeEngine(step), {"epoch": 0}, keep=3)
    return run


def flip(path: Path, count: int = 4000) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 4
    for i in range(start, min(len(data), start + count)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_checkpoint_lists_every_file_with_its_checksum(tmp_path):
    run = saved(tmp_path, steps=(1,))
    checkpoint = run / "checkpoint-1"
    files = json.loads((checkpoint / MANIFEST).read_text())["files"]
    on_disk = {str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert set(files) == on_disk == {"engine/state.json", "engine/shard.bin", "rng-0.pt", "trainer_state.json"}
    assert all(len(entry["sha256"]) == 64 and entry["size"] > 0 for entry in files.values())
    assert not list(run.glob(".*.partial"))


@pytest.mark.parametrize(
    ("damage", "wording"),
    [
        ("flip", "its contents differ from its checksum"),
        ("truncate", "bytes where 65536 were written"),
        ("delete", "missing"),
    ],
)
def test_resume_names_the_damaged_file_and_falls_back_to_the_newest_intact_one(tmp_path, damage, wording, capsys):
    run = saved(tmp_path)
    target = run / "checkpoint-3" / ("rng-0.pt" if damage == "delete" else "engine/shard.bin")
    if damage == "flip":
        flip(target)
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:1000])
    else:
        target.unlink()
    engine = FakeEngine(None)
    assert resume("auto", run, engine) == 2 and engine.value == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(target) in err[0] and wording in err[0] and "resuming from checkpoint-2" in err[0]
    with pytest.raises(InputError, match=rf"^train\.resume={run / 'checkpoint-3'}: {target}: .*{wording}"):
        resume(str(run / "checkpoint-3"), run, FakeEngine(None))  # a named checkpoint: no fallback


def test_no_intact_checkpoint_is_one_error_naming_each_damaged_file(tmp_path):
    run = saved(tmp_path, steps=(1, 2))
    for step in (1, 2):
        flip(run / f"checkpoint-{step}" / "engine" / "shard.bin")
    with pytest.raises(InputError, match=r"^no intact checkpoint to resume in .*checkpoint-2/engine/shard\.bin.*"):
        resume("auto", run, FakeEngine(None))


def test_a_missing_rng_file_is_explained(tmp_path, monkeypatch):
    run = saved(tmp_path, steps=(1,))
    checkpoint = run / "checkpoint-1"
    (checkpoint / MANIFEST).unlink()  # as an older r4b wrote it: only load_checkpoint can tell
    monkeypatch.setattr(checkpoint_module, "rank", lambda: 1)  # resumed on more ranks: rank 1 takes rank 0's RNG
    loaded = []
    monkeypatch.setattr(checkpoint_module.torch, "load", lambda file, **kw: loaded.append(Path(file).name) or {})
    monkeypatch.setattr(checkpoint_module, "set_rng_state", lambda state: None)
    load_checkpoint(checkpoint, FakeEngine(None))
    assert loaded == ["rng-0.pt"]
    monkeypatch.undo()
    monkeypatch.setattr(checkpoint_module, "rank", lambda: 0)
    (checkpoint / "rng-0.pt").unlink()
    with pytest.raises(InputError, match=r"rng-0\.pt: missing: the checkpoint is damaged"):
        load_checkpoint(checkpoint, FakeEngine(None))


class FullDisk(FakeEngine):
    """Writes half of a shard, then the disk is full: plainly, or wrapped as torch.distributed.checkpoint does."""

    def __init__(self, value, wrapped: bool):
        super().__init__(value)
        self.wrapped = wrapped

    def save(self, path: Path) -> None:
        path.mkdir(parents=True)
        (path / "shard.bin").write_bytes(b"\0" * 1000)
        full = OSError(errno.ENOSPC, NO_SPACE, str(path / "shard.bin"))
        if self.wrapped:
            from torch.distributed.checkpoint.api import CheckpointException

            raise CheckpointException("save failed", {0: (full, None)})
        raise full


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_full_disk_mid_checkpoint_is_one_line_naming_the_file(tmp_path, wrapped):
    run = saved(tmp_path, steps=(1,))
    with pytest.raises(InputError) as caught:
        save_checkpoint(run, 2, FullDisk(2, wrapped), {"epoch": 0})
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{run / 'checkpoint-2'} not written: no space left on device")
    assert str(run / ".checkpoint-2.partial" / "engine" / "shard.bin") in message
    assert message.endswith(f"free space and rerun the same command to resume from {run / 'checkpoint-1'}")
    assert not (run / ".checkpoint-2.partial").exists()  # its space given back
    assert list_checkpoints(run) == [run / "checkpoint-1"]


def test_an_error_with_free_space_left_is_not_called_a_full_disk(tmp_path):
    with pytest.raises(RuntimeError, match="a bug"), integrity.disk_full_is_said(tmp_path):
        raise RuntimeError("a bug")


# -- end to end: r4b sft ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthetic_data(tmp_path_factory, n_sft=24) / "sft.jsonl"


def sft(data: Path, out: Path, *extra: str) -> list[str]:
    return sft_argv(data, out, "train.keep_checkpoints=3", *extra)


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def test_sft_resumes_past_a_damaged_checkpoint_exactly(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*sft(data, run), "train.max_steps=2"]) == 0
    first = losses(run)
    engine_file = next(p for p in sorted((run / "checkpoint-2" / "engine").rglob("*")) if p.is_file())
    flip(engine_file)
    capsys.readouterr()
    assert main([*sft(data, run), "train.max_steps=2"]) == 0
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if "damaged" in line]
    assert len(skipped) == 1 and str(engine_file) in skipped[0] and "resuming from checkpoint-1" in skipped[0]
    assert f"resumed from {run / 'checkpoint-1'} at step 1" in captured.out
    assert losses(run) == first  # step 2 again, bit for bit


@pytest.mark.parametrize("how", ["OSError", "torch.save"])
def test_sft_out_of_space_in_a_checkpoint_is_one_line_then_resumes(data, tmp_path, monkeypatch, capsys, how):
    run = tmp_path / "run"
    real_save = torch.save

    def disk_full_at_step_2(obj, f, *args, **kwargs):
        if str(f).endswith(".checkpoint-2.partial/rng-0.pt"):
            if how == "OSError":
                raise OSError(errno.ENOSPC, NO_SPACE, str(f))
            monkeypatch.setattr(integrity, "_free_bytes", lambda path: 4096)  # the disk is full now
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # torch's way
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_2)
    assert main([*sft(data, run), "train.max_steps=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1] == (
        f"r4b sft: error: {run / 'checkpoint-2'} not written: no space left on device writing "
        f"{run / '.checkpoint-2.partial' / 'rng-0.pt'}; free space and rerun the same command to resume from "
        f"{run / 'checkpoint-1'}"
    )
    assert list_checkpoints(run) == [run / "checkpoint-1"] and not (run / ".checkpoint-2.partial").exists()
    if how == "OSError":  # space freed: the same command carries on
        monkeypatch.setattr(torch, "save", real_save)
        assert main([*sft(data, run), "train.max_steps=2"]) == 0
        assert list_checkpoints(run)[-1] == run / "checkpoint-2"


@pytest.mark.multiprocess
def test_two_ranks_hash_their_shares_and_fall_back_together(data, tmp_path):
    """FSDP2 on 2 gloo ranks: each rank hashes its share of the files when saving and when resuming (collectives
    that must pair up), and both ranks skip the damaged checkpoint."""
    run = tmp_path / "run"
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    args = ["-m", "r4b", *sft(data, run, "engine.kind=fsdp2", "model.train=[projector,llm]", "train.max_steps=2")]
    run_two_ranks(args, env=env, cwd=ROOT, timeout=300, fresh=run)
    first = losses(run)
    shard = max((run / "checkpoint-2" / "engine").glob("*.distcp"), key=lambda p: p.stat().st_size)
    flip(shard)
    again = run_two_ranks(args, env=env, cwd=ROOT, timeout=300)
    skipped = [line for line in again.stderr.splitlines() if "damaged" in line]
    assert len(skipped) == 1 and str(shard) in skipped[0] and "resuming from checkpoint-1" in skipped[0]
    assert losses(run) == first


# -- exports --------------------------------------------------------------------------------------------------


class ExportEngine:
    """What export_model asks of an engine: the full state dict, keyed as the objective holds the model."""

    def __init__(self, model):
        self.model = model

    def full_state_dict(self):
        return {f"model.{k}": v.clone() for k, v in self.model.state_dict().items()}


@pytest.fixture
def exported(tiny_r4b, tokenizer, tmp_path) -> Path:
    out = tmp_path / "run" / "model"
    export_model(ExportEngine(tiny_r4b), tiny_r4b, tokenizer, out, True)
    return out


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_an_export_is_checksummed_and_its_model_card_may_change(exported):
    files = json.loads((exported / MANIFEST).read_text())["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    (exported / "README.md").write_text("# the model card, rewritten by r4b eval")
    check_export(exported)
    assert not list(exported.parent.glob(".model.*"))


@pytest.mark.parametrize("how", ["SIGTERM", "error", "full disk"])
def test_an_interrupted_export_leaves_the_previous_model(exported, tiny_r4b, tokenizer, monkeypatch, how):
    import r4b.models.loading as loading

    before = snapshot(exported)
    handler = signal.getsignal(signal.SIGTERM)
    real_save = loading.save_model

    def save_then_fail(model, out, *args, **kwargs):
        real_save(model, out, *args, **kwargs)  # the weights are written, then:
        if how == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)
        elif how == "error":
            raise RuntimeError("killed mid-export")
        raise OSError(errno.ENOSPC, NO_SPACE, str(Path(out) / "model.safetensors"))

    monkeypatch.setattr(loading, "save_model", save_then_fail)
    with torch.no_grad():
        next(tiny_r4b.parameters()).add_(1.0)  # a different model: the old export must stay whole
    expected = {
        "SIGTERM": (RunInterrupted, f"stopped by SIGTERM during the export; {exported} was not written"),
        "error": (RuntimeError, "killed mid-export"),
        "full disk": (InputError, f"{exported} not written: no space left on device writing .*model.safetensors"),
    }[how]
    with pytest.raises(expected[0], match=expected[1]):
        export_model(ExportEngine(tiny_r4b), tiny_r4b, tokenizer, exported, True)
    assert snapshot(exported) == before and not list(exported.parent.glob(".model.*"))
    assert signal.getsignal(signal.SIGTERM) is handler


def test_eval_refuses_a_damaged_or_unfinished_export(exported, tmp_path, capsys):
    data = tmp_path / "eval.jsonl"
    data.write_text("")

    def eval_error(model: Path) -> str:
        assert main(["eval", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "eval")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1
        return err[0]

    unfinished = exported.parent / ".model.partial"
    unfinished.mkdir()
    for name, content in snapshot(exported).items():
        if name != MANIFEST:
            (unfinished / name).parent.mkdir(parents=True, exist_ok=True)
            (unfinished / name).write_bytes(content)
    assert "an unfinished export" in eval_error(unfinished)
    flip(exported / "model.safetensors", 100)
    line = eval_error(exported)
    assert f"{exported / 'model.safetensors'}: its contents differ from its checksum" in line
