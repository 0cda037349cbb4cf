"""`r4b data prepare` on Parquet files and `datasets` directories: the samples of the same JSONL, images as paths
or bytes (stored once in the DIR), bad rows located by file:ROW, the same DIR whatever the worker count."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict, Features, Image, List, Value

from r4b.cli import main
from r4b.data.prepare import MANIFEST, load_data_tools, prepare
from r4b.data.tables import TableInput
from r4b.errors import InputError
from r4b.synth import write_synthetic
from r4b.train.sft_data import SFTDataset

TEXT = {"type": Value("string"), "text": Value("string")}
MESSAGES = List({"role": Value("string"), "content": List(TEXT)})
FEATURES = Features({"messages": MESSAGES, "images": List(Image()), "mode": Value("string"), "answer": Value("string")})
PATH_FEATURES = Features({**FEATURES, "images": List(Value("string"))})


def _dataset(rows: list[dict]) -> Dataset:
    """Images as the datasets.Image feature, or as plain strings when they are paths."""
    paths = all(isinstance(image, str) for row in rows for image in row["images"])
    return Dataset.from_list(rows, features=PATH_FEATURES if paths else FEATURES)


@pytest.fixture(scope="module")
def tools():
    return load_data_tools(None, None)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, n_sft=10, n_rl=1, n_eval=1, seed=0)
    return out


def _rows(synth: Path, images: str) -> list[dict]:
    """The synthetic JSONL's records as table rows: contents as lists of text / image parts (an Arrow column has
    one type), images as paths relative to ``synth``, or the datasets.Image feature's {"bytes", "path"}."""
    rows = []
    for line in (synth / "sft.jsonl").read_text().splitlines():
        row = json.loads(line)
        for message in row["messages"]:
            if isinstance(message["content"], str):
                message["content"] = [{"type": "text", "text": message["content"]}]
        if images == "bytes":
            row["images"] = [{"bytes": (synth / p).read_bytes(), "path": Path(p).name} for p in row["images"]]
        rows.append(row)
    return rows


def _bad_rows(rows: list[dict]) -> list[dict]:
    """Row 4 a bad record (unknown mode), row 7 undecodable image bytes (a missing file where images are paths)."""
    rows = copy.deepcopy(rows)
    rows[3]["mode"] = "think"
    paths = isinstance(rows[6]["images"][0], str)
    rows[6]["images"] = ["missing.png"] if paths else [{"bytes": b"\x89PNG\r\n\x1a\nnot really", "path": "x.png"}]
    return rows


def _write_parquet(rows: list[dict], path: Path, row_group_size: int) -> Path:
    pq.write_table(_dataset(rows).data.table, path, row_group_size=row_group_size)
    return path


def _samples(out: Path, tools) -> SFTDataset:
    tokenizer, processor = tools
    return SFTDataset.from_files([str(out)], tokenizer, processor, max_tokens=100_000, on_error="skip")


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every file of the DIR; the manifest without its worker count and timing."""
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    manifest = json.loads(files.pop(MANIFEST))
    del manifest["workers"], manifest["seconds"]
    return {**files, MANIFEST: json.dumps(manifest).encode()}


def _assert_same_samples(table: SFTDataset, jsonl: SFTDataset) -> None:
    assert len(table.samples) == len(jsonl.samples) > 0
    for a, b in zip(table.samples, jsonl.samples, strict=True):
        assert (a.input_ids, a.labels, a.image_token_counts, a.mode) == (
            b.input_ids,
            b.labels,
            b.image_token_counts,
            b.mode,
        )
        assert [Path(p).read_bytes() for p in a.images] == [Path(p).read_bytes() for p in b.images]


@pytest.fixture(scope="module")
def reference(synth, tools, tmp_path_factory) -> SFTDataset:
    """The synthetic JSONL with the bad record of row 4 and without row 7, prepared."""
    lines = (synth / "sft.jsonl").read_text().splitlines()
    lines[3] = json.dumps({**json.loads(lines[3]), "mode": "think"})
    del lines[6]
    (synth / "reference.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path_factory.mktemp("reference") / "p"
    prepare([synth / "reference.jsonl"], out, *tools, workers=1)
    return _samples(out, tools)


@pytest.mark.parametrize("images", ["paths", "bytes"])
def test_parquet_and_datasets_dir_give_the_jsonl_samples_and_locate_bad_rows(synth, tools, reference, tmp_path, images):
    rows = _bad_rows(_rows(synth, images))
    parquet = _write_parquet(rows, synth / f"{images}.parquet", row_group_size=3)
    datasets_dir = synth / f"{images}-ds"
    _dataset(rows).save_to_disk(str(datasets_dir))
    for source in (parquet, datasets_dir):
        out = tmp_path / source.name
        prepare([source], out, *tools, workers=2, shard_lines=4)
        report = json.loads((out / "data_report.json").read_text())
        bad_image = "bad_image" if images == "bytes" else "missing_image"
        assert report["loaded"] == 8 and report["skipped"] == {"unknown_mode": 1, bad_image: 1}, source
        assert report["examples"]["unknown_mode"][0].startswith(f"{source}:4: field 'mode'")
        detail = "cannot decode the image bytes" if images == "bytes" else "image file not found"
        assert report["examples"][bad_image][0].startswith(f"{source}:7: field 'images[0]': {detail}")
        prepared = _samples(out, tools)
        _assert_same_samples(prepared, reference)
        stored = {str(p.resolve()) for p in (out / "images").rglob("*") if p.is_file()}  # bytes, once each
        used = {str(p) for sample in prepared.samples for p in sample.images}
        assert used == stored if images == "bytes" else not stored and all(p.startswith(str(synth)) for p in used)
        # training reads the stored images: the batch's pixels are the JSONL's
        batch, expected = prepared.collate([0, 2], "cpu"), reference.collate([0, 2], "cpu")
        assert batch.pixel_values.equal(expected.pixel_values) and batch.input_ids.equal(expected.input_ids)
    # a DIR holding its images can be moved (copied to a node's disk): they are named relative to it
    moved = tmp_path / "moved"
    shutil.move(tmp_path / datasets_dir.name, moved)
    batch = _samples(moved, tools).collate([0, 2], "cpu")
    assert batch.pixel_values.equal(expected.pixel_values)


def test_parquet_shards_follow_row_groups(synth, tmp_path):
    rows = _rows(synth, "paths")
    table = TableInput(_write_parquet(rows, tmp_path / "t.parquet", row_group_size=3), "parquet")
    assert table.group_rows == [3, 3, 3, 1]
    assert table.ranges(4) == [(0, 3), (3, 3), (6, 4)]  # groups never split when they fit
    assert table.ranges(2) == [(0, 2), (2, 1), (3, 2), (5, 1), (6, 2), (8, 2)]  # a larger group is cut
    assert table.ranges(100) == [(0, 10)]
    modes = [row["mode"] for start, count in table.ranges(2) for row in table.rows(start, count)]
    assert modes == [row["mode"] for row in rows]


def test_same_dir_whatever_the_workers_and_images_stored_once(synth, tools, tmp_path):
    rows = _bad_rows(_rows(synth, "bytes"))
    rows[1]["images"] = rows[0]["images"]  # the same image in two rows: one file
    rows[3]["images"] = [{"bytes": (synth / "images/sft-00009.png").read_bytes(), "path": None}]  # a refused row's
    parquet = _write_parquet(rows, tmp_path / "t.parquet", row_group_size=2)
    _dataset(rows).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "p"
    snapshots = []
    for workers in (1, 2):
        prepare([parquet, tmp_path / "ds"], out, *tools, workers=workers, shard_lines=3, overwrite=True)
        snapshots.append(_snapshot(out))
    assert snapshots[0] == snapshots[1]
    assert json.loads(snapshots[0]["data_report.json"])["loaded"] == 16
    stored = sorted(data for name, data in snapshots[0].items() if name.startswith("images/"))
    kept = [row for k, row in enumerate(rows) if k not in (3, 6)]  # the refused rows' images are not kept
    assert stored == sorted({image["bytes"] for row in kept for image in row["images"]})


def test_llava_rows_with_raw_image_bytes(synth, tools, tmp_path):
    png = (synth / "images/sft-00000.png").read_bytes()
    turns = [{"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "7"}]
    llava = pa.table(
        {
            "id": ["a", "b", "c"],
            "image": [png, None, b"GIF89a-truncated"],
            "conversations": [turns, [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}], turns],
        }
    )
    pq.write_table(llava, tmp_path / "llava.parquet")
    same = [
        {"messages": [{"role": "user", "content": "<image>\nHow many?"}, {"role": "assistant", "content": "7"}],
         "images": ["images/sft-00000.png"], "mode": "non_thinking"},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
         "mode": "non_thinking"},
    ]  # fmt: skip
    (synth / "llava-same.jsonl").write_text("".join(json.dumps(r) + "\n" for r in same))
    prepare([tmp_path / "llava.parquet"], tmp_path / "a", *tools, workers=1)
    prepare([synth / "llava-same.jsonl"], tmp_path / "b", *tools, workers=1)
    report = json.loads((tmp_path / "a" / "data_report.json").read_text())
    assert report["skipped"] == {"bad_image": 1}
    assert report["examples"]["bad_image"][0].startswith(f"{tmp_path / 'llava.parquet'}:3: field 'images[0]'")
    _assert_same_samples(_samples(tmp_path / "a", tools), _samples(tmp_path / "b", tools))
    with pytest.raises(InputError, match=r"llava.parquet:3: field 'images\[0\]': cannot decode the image bytes"):
        prepare([tmp_path / "llava.parquet"], tmp_path / "c", *tools, workers=1, on_error="raise")
    assert not (tmp_path / "c").exists()


def test_cli_reads_tables_and_refuses_a_dataset_dict_in_one_line(synth, tmp_path, capsys):
    rows = _rows(synth, "bytes")
    parquet = _write_parquet(rows, tmp_path / "t.parquet", row_group_size=4)
    datasets_dir = tmp_path / "ds"
    _dataset(rows).save_to_disk(str(datasets_dir))
    out = tmp_path / "out"
    assert main(["data", "prepare", "--data", str(parquet), str(datasets_dir), "--out", str(out), "--workers=2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == 20
    distinct = {image["bytes"] for row in rows for image in row["images"]}
    assert sorted(p.read_bytes() for p in (out / "images").rglob("*.png")) == sorted(distinct)  # stored once each
    split_dir = tmp_path / "dd"
    DatasetDict({"train": _dataset(rows[:2])}).save_to_disk(str(split_dir))
    bad = [str(split_dir), str(tmp_path), str(tmp_path / "missing.parquet"), str(synth / "sft.jsonl.parquet")]
    (synth / "sft.jsonl.parquet").write_text("not parquet")
    capsys.readouterr()  # datasets' progress bars
    expected = [
        f"a datasets DatasetDict (splits: train); give one split's directory, e.g. {split_dir / 'train'}",
        "a directory that is not a datasets save_to_disk directory",
        "no such file",
        "not a Parquet file",
    ]
    for path, message in zip(bad, expected, strict=True):
        assert main(["data", "prepare", "--data", path, "--out", str(tmp_path / "x")]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"r4b data: error: {path}: {message}") and error.count("\n") == 1, error
        assert not (tmp_path / "x").exists()
