"""A prepared DIR is checked, not trusted: an edited index, a truncated shard, index or manifest, a damaged row are
one line naming the file (the DIR must be prepared again), never a wrong packing or a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from r4b.cli import main
from r4b.data.prepare import MANIFEST, load_data_tools, prepare
from r4b.errors import InputError
from r4b.synth import write_synthetic
from r4b.train.sft_data import SFTDataset

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("torch_reference_kernels")  # tests/conftest.py


@pytest.fixture(scope="module")
def tools():
    return load_data_tools(None, None)


@pytest.fixture(scope="module")
def prepared_once(tmp_path_factory, tools) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    write_synthetic(out, n_sft=12, n_rl=1, n_eval=1, seed=0)
    prepare([out / "sft.jsonl"], out / "dir", *tools, workers=1, shard_lines=5)
    return out / "dir"


@pytest.fixture
def prepared(prepared_once, tmp_path) -> Path:
    """A fresh copy of the DIR for each test to damage."""
    return Path(shutil.copytree(prepared_once, tmp_path / "dir"))


def open_dir(path: Path, tools, max_tokens: int = 4096) -> SFTDataset:
    return SFTDataset.from_files([str(path)], *tools, max_tokens=max_tokens, on_error="raise")


def test_the_manifest_lists_every_file_with_its_size_and_hash(prepared, tools):
    files = json.loads((prepared / MANIFEST).read_text())["files"]
    assert {"lengths.npy", "loss_tokens.npy", "data_report.json"} <= set(files) and len(files) == 3 + 3  # 3 shards
    assert all(set(entry) == {"bytes", "sha256"} for entry in files.values())
    assert len(open_dir(prepared, tools).samples) == 12


def test_an_edited_lengths_index_is_refused(prepared, tools):
    """Shorter lengths would let the planner pack more samples than data.max_tokens holds."""
    lengths = np.load(prepared / "lengths.npy")
    np.save(prepared / "lengths.npy", np.full_like(lengths, 12))
    with pytest.raises(InputError, match=r"lengths\.npy: .*run `r4b data prepare` again") as caught:
        open_dir(prepared, tools)
    assert "\n" not in str(caught.value)


def test_an_edit_keeping_size_and_total_is_caught_by_its_hash(prepared, tools):
    lengths = np.load(prepared / "lengths.npy")
    np.save(prepared / "lengths.npy", lengths[::-1].copy())
    with pytest.raises(InputError, match=r"lengths\.npy: its sha256 differs from the manifest's"):
        open_dir(prepared, tools)


@pytest.mark.parametrize("name", ["data/shard-00001.arrow", "lengths.npy", "loss_tokens.npy", MANIFEST])
def test_a_truncated_file_is_named(prepared, tools, name):
    data = (prepared / name).read_bytes()
    (prepared / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=f"{prepared / name}: .*edited or damaged"):
        open_dir(prepared, tools)


def test_without_the_file_list_rows_are_checked_against_the_index(prepared, tools):
    """A DIR whose manifest lists no files (prepared before it did): a row that disagrees with the index is named."""
    manifest = json.loads((prepared / MANIFEST).read_text())
    del manifest["files"]
    (prepared / MANIFEST).write_text(json.dumps(manifest))
    lengths = np.load(prepared / "lengths.npy")
    lengths[0], lengths[1] = lengths[0] + 1, lengths[1] - 1  # the same size and total
    np.save(prepared / "lengths.npy", lengths)
    samples = open_dir(prepared, tools).samples
    with pytest.raises(InputError, match=r"shard-00000\.arrow: row 0 holds \d+ tokens, lengths\.npy says"):
        samples[0]


def test_a_damaged_dir_is_one_line_from_the_cli(prepared, tmp_path, capsys):
    np.save(prepared / "lengths.npy", np.zeros(3, np.int32))
    argv = ["sft", "--config", str(ROOT / "configs" / "demo" / "sft.yaml"), "--output-dir", str(tmp_path / "run")]
    assert main([*argv, f"data.train=[{prepared}]", "train.max_steps=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"r4b sft: error: {prepared / 'lengths.npy'}: ")


def test_prepare_refuses_zero_workers_in_one_line(tmp_path, capsys):
    (tmp_path / "data.jsonl").write_text("")
    argv = ["data", "prepare", "--data", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "out")]
    assert main([*argv, "--workers", "0"]) == 2
    assert capsys.readouterr().err.strip() == "r4b data: error: --workers 0: must be at least 1"
