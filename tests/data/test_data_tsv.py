"""r4b.data.tsv: VLMEvalKit TSVs (base64 images, row references, image lists, options) and their errors."""

from __future__ import annotations

import base64
import csv
import io
from pathlib import Path

import pytest
from PIL import Image

from r4b.data import DataError, read_vlmeval_tsv

HEADER = ["index", "image", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category"]


def b64(color: str, size=(6, 4)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path: Path, rows, header=HEADER) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:  # pandas' to_csv(sep="\t") quoting
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def rows():
    red, blue = b64("red"), b64("blue", (3, 5))
    return [
        ["10", red, 'Which "color"?\nPick one.', "Look closely.", "red", "blue", "", "", "A", "color", "perception"],
        ["11", "10", "Same image, other question?", "", "yes", "no", "", "", "B", "color", ""],
        ["12", repr([red, blue]), "Compare.", "", "", "", "", "", "equal", "compare", ""],
    ]


def test_reads_images_references_lists_and_options(tmp_path):
    path = write_tsv(tmp_path / "bench.tsv", rows())
    first, second, third = read_vlmeval_tsv(path)
    assert first.index == 10 and first.question == 'Which "color"?\nPick one.' and first.answer == "A"
    assert first.options == {"A": "red", "B": "blue"} and first.hint == "Look closely."
    assert first.category == "color" and first.extra == {"l2-category": "perception"}
    assert first.source == f"{path}:2"
    assert [im.size for im in first.images] == [(6, 4)] and first.images[0].getpixel((0, 0)) == (255, 0, 0)
    assert second.source == f"{path}:4"  # the quoted question of row 10 spans two lines
    assert second.hint is None and [im.size for im in second.images] == [(6, 4)]  # shares row 10's image
    assert [im.size for im in third.images] == [(6, 4), (3, 5)] and third.options == {}


def test_image_path_column_and_unlabeled_split(tmp_path):
    Image.new("RGB", (2, 2)).save(tmp_path / "x.png")
    path = write_tsv(tmp_path / "t.tsv", [["0", "x.png", "Q?"]], header=["index", "image_path", "question"])
    with pytest.raises(DataError, match="column 'answer': missing column"):
        read_vlmeval_tsv(path)
    (sample,) = read_vlmeval_tsv(path, require_answer=False)
    assert sample.answer is None and sample.images[0].size == (2, 2)


def with_row(row_number, **cells):
    out = rows()
    row = out[row_number]
    for name, value in cells.items():
        row[HEADER.index(name)] = value
    return out


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (with_row(1, image="99"), r":4: column 'image': short cell '99' is not the index of a row with its own image"),
        (with_row(2, image="@@@" * 40), r":5: column 'image': cannot decode image"),
        (with_row(2, image=base64.b64encode(b"x" * 100).decode()), r":5: column 'image': cannot decode image"),
        (with_row(2, image=f"['{b64('red')}'"), r":5: column 'image': malformed list"),
        (with_row(1, answer=""), r":4: column 'answer': empty answer"),
        (with_row(2, index="10"), r":5: column 'index': duplicate index '10'"),
        ([*rows(), ["13", "x"]], r":6: row has 2 cells, the header 11"),
    ],
)
def test_errors_name_file_row_and_column(tmp_path, table, message):
    path = write_tsv(tmp_path / "bench.tsv", table)
    with pytest.raises(DataError) as caught:
        read_vlmeval_tsv(path)
    assert str(caught.value).startswith(str(path))
    assert message in str(caught.value)


def test_missing_columns(tmp_path):
    path = write_tsv(tmp_path / "bench.tsv", [["0", "Q?", "A"]], header=["index", "question", "answer"])
    with pytest.raises(DataError, match="column 'image': missing column"):
        read_vlmeval_tsv(path)
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(DataError, match="empty file"):
        read_vlmeval_tsv(tmp_path / "empty.tsv")
