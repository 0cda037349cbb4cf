"""RL prompts from where other trainers keep them: verl's Parquet layout, EasyR1's (a datasets directory, a JSON
list, JSONL under its column names) give the prompts of the equivalent r4b JSONL, with file:ROW errors and
data.on_error as for JSONL lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from prompt_layouts import EASYR1, QUESTIONS, VERL, easyr1_rows, png, verl_rows

from r4b.data import DataError, read_prompts


@pytest.fixture
def r4b_jsonl(tmp_path) -> Path:
    lines = []
    for k, (question, answer, color) in enumerate(QUESTIONS):
        record = {"messages": [{"role": "user", "content": ("<image>" if color else "") + question}], "answer": answer}
        if color:
            (tmp_path / f"img{k}.png").write_bytes(png(color))
            record["images"] = [f"img{k}.png"]
        lines.append(json.dumps(record))
    (tmp_path / "rl.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "rl.jsonl"


def same_prompts(ours, theirs) -> None:
    assert [(p.messages, p.answer) for p in ours] == [(p.messages, p.answer) for p in theirs]
    for a, b in zip(ours, theirs, strict=True):
        pixels = lambda paths: [Image.open(p).convert("RGB").tobytes() for p in paths]
        assert pixels(a.images) == pixels(b.images)


def test_verl_parquet_gives_the_jsonl_prompts(r4b_jsonl, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(verl_rows()), tmp_path / "train.parquet")
    expected, _ = read_prompts(r4b_jsonl)
    prompts, report = read_prompts(tmp_path / "train.parquet", keys=VERL, images_dir=tmp_path / "stored")
    same_prompts(prompts, expected)
    assert [p.source for p in prompts] == [f"{tmp_path / 'train.parquet'}:{k}" for k in (1, 2, 3)]
    assert report.loaded == 3 and all(p.is_relative_to(tmp_path / "stored") for p in prompts[0].images)


@pytest.mark.parametrize("layout", ["datasets", "json", "jsonl"])
def test_easyr1_layouts_give_the_jsonl_prompts(layout, r4b_jsonl, tmp_path):
    rows = easyr1_rows()
    if layout == "datasets":
        from datasets import Dataset, Features, Sequence, Value
        from datasets import Image as ImageFeature

        features = Features({"problem": Value("string"), "answer": Value("string"),
                             "images": Sequence(ImageFeature())})  # fmt: skip
        rows = [{**row, "images": [{"bytes": b, "path": None} for b in row["images"]]} for row in rows]
        Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "train"))
        path = tmp_path / "train"
    else:  # JSON has no bytes: the images are paths next to the file
        for k, row in enumerate(rows):
            for j, data in enumerate(row["images"]):
                (tmp_path / f"e{k}-{j}.png").write_bytes(data)
            row["images"] = [f"e{k}-{j}.png" for j in range(len(row["images"]))]
        path = tmp_path / f"train.{layout}"
        text = json.dumps(rows) if layout == "json" else "".join(json.dumps(r) + "\n" for r in rows)
        path.write_text(text)
    expected, _ = read_prompts(r4b_jsonl)
    prompts, _ = read_prompts(path, keys=EASYR1, images_dir=tmp_path / "stored")
    same_prompts(prompts, expected)


def test_a_bad_row_is_named_by_file_row_and_key_or_skipped(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = verl_rows()
    rows[1]["reward_model"]["ground_truth"] = ""
    rows[2]["images"] = [{"bytes": b"not an image", "path": None}]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=rf"^{path}:2: field 'reward_model.ground_truth': missing reference answer$"):
        read_prompts(path, keys=VERL, images_dir=tmp_path / "stored")
    prompts, report = read_prompts(path, keys=VERL, images_dir=tmp_path / "stored", on_error="skip")
    assert [p.source for p in prompts] == [f"{path}:1"]
    assert report.skipped == {"missing_field": 1, "bad_image": 1}
    assert report.examples["bad_image"][0].startswith(f"{path}:3: field 'images[0]': cannot decode the image bytes")


def test_bpo_reads_a_verl_parquet_through_the_config_keys(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from r4b.config import load_config
    from r4b.config.sections import BPOConfig
    from r4b.train.bpo import read_prompt_files

    pq.write_table(pa.Table.from_pylist(verl_rows()), tmp_path / "train.parquet")
    keys = ["data.prompt_key=prompt", "data.answer_key=reward_model.ground_truth", "data.image_key=images"]
    config = load_config(BPOConfig, None, [f"data.prompts=[{tmp_path / 'train.parquet'}]", *keys])
    prompts, report = read_prompt_files(config.data.prompts, config.data, tmp_path / "run" / "prompt_images")
    assert [p.answer for p in prompts] == ["3", "4", "7"] and report.loaded == 3
