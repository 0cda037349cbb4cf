"""`r4b data prepare` and training on a prepared DIR: same samples, report and losses as the JSONL; any worker count."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from r4b.cli import main
from r4b.config import load_config
from r4b.data.prepare import MANIFEST, load_data_tools, prepare, processor_fingerprint, tokenizer_fingerprint
from r4b.errors import InputError
from r4b.synth import write_synthetic
from r4b.train.sft import SFTConfig, train_sft
from r4b.train.sft_data import SFTDataset

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo" / "sft.yaml"


pytestmark = pytest.mark.usefixtures("torch_reference_kernels")  # tests/conftest.py


@pytest.fixture(scope="module")
def tools():
    return load_data_tools(None, None)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The synthetic annealing set plus a bad line and a blank line in the middle."""
    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, n_sft=40, n_rl=2, n_eval=2, seed=0)
    lines = (out / "sft.jsonl").read_text().splitlines()
    lines[7:7] = ['{"messages": [], "mode": "thinking"}', ""]
    (out / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    return out / "mixed.jsonl"


def _same(a, b) -> None:
    assert (a.input_ids, a.labels, a.image_token_counts, a.mode, a.source) == (
        b.input_ids,
        b.labels,
        b.image_token_counts,
        b.mode,
        b.source,
    )
    assert [Path(p).resolve() for p in a.images] == [Path(p).resolve() for p in b.images]


def test_prepared_dir_holds_the_jsonl_samples_and_report_whatever_the_workers(data, tools, tmp_path):
    tokenizer, processor = tools
    one = prepare([data], tmp_path / "one", tokenizer, processor, workers=1, shard_lines=9)
    two = prepare([data], tmp_path / "two", tokenizer, processor, workers=2, shard_lines=9)
    assert one["shards"] == two["shards"] and len(one["shards"]) == 5
    for name in [*one["shards"], "lengths.npy", "loss_tokens.npy", "data_report.json"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    kwargs = {"max_tokens": 60, "on_error": "skip"}  # some synthetic samples are over 60 tokens
    jsonl = SFTDataset.from_files([str(data)], tokenizer, processor, **kwargs)
    prepared = SFTDataset.from_files([str(tmp_path / "two")], tokenizer, processor, **kwargs)
    assert 0 < jsonl.report.skipped["overlong"] < 40 and jsonl.report.skipped["bad_type"] == 1
    assert prepared.report.to_dict() == jsonl.report.to_dict()
    assert f"{data}:8" in json.dumps(prepared.report.to_dict())  # file:line of the bad record
    assert list(prepared.lengths) == jsonl.lengths and list(prepared.loss_tokens) == jsonl.loss_tokens
    assert len(prepared.samples) == len(jsonl.samples)
    for a, b in zip(prepared.samples, jsonl.samples, strict=True):
        _same(a, b)
    batch_a, batch_b = prepared.collate([0, 3, 5], "cpu"), jsonl.collate([0, 3, 5], "cpu")
    inputs_a, inputs_b = batch_a.inputs(), batch_b.inputs()
    assert inputs_a.keys() == inputs_b.keys() and batch_a.cu_seqlens_host == batch_b.cu_seqlens_host
    for key, value in inputs_a.items():
        assert value.equal(inputs_b[key]) if hasattr(value, "equal") else value == inputs_b[key], key
    # on_error=raise refuses a DIR whose preparation skipped records, as it refuses the bad JSONL line
    with pytest.raises(InputError, match="skipped record"):
        SFTDataset.from_files([str(tmp_path / "two")], tokenizer, processor, max_tokens=4096)


def test_another_tokenizer_or_processor_is_refused_naming_the_dir(data, tools, tmp_path):
    tokenizer, processor = tools
    prepare([data], tmp_path / "p", tokenizer, processor, workers=1)
    from r4b.models.image_processing import RImageProcessor

    other = RImageProcessor(
        image_size=processor.image_size,
        patch_size=processor.patch_size,
        image_grid_pinpoints=processor.image_grid_pinpoints,
        image_mean=(0.1, 0.2, 0.3),
    )
    assert processor_fingerprint(other) != processor_fingerprint(processor)
    with pytest.raises(InputError, match=f"^{tmp_path / 'p'}: prepared with another image processor") as error:
        SFTDataset.from_files([str(tmp_path / "p")], tokenizer, other, max_tokens=4096, on_error="skip")
    assert "\n" not in str(error.value)
    manifest = json.loads((tmp_path / "p" / MANIFEST).read_text())
    assert manifest["tokenizer_sha256"] == tokenizer_fingerprint(tokenizer)
    manifest["tokenizer_sha256"] = "0" * 64
    (tmp_path / "p" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="prepared with another tokenizer"):
        SFTDataset.from_files([str(tmp_path / "p")], tokenizer, processor, max_tokens=4096, on_error="skip")


def test_cli_prepares_and_training_gives_the_jsonl_losses(data, tmp_path, capsys):
    out = tmp_path / "prepared"
    assert main(["data", "prepare", "--data", str(data), "--out", str(out), "--workers", "2"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["samples"] == 40 and np.load(out / "lengths.npy").shape == (40,)
    assert main(["data", "prepare", "--data", str(data), "--out", str(out)]) == 2  # never over a DIR silently

    def run(train: Path, name: str) -> list[tuple]:
        config = load_config(
            SFTConfig,
            DEMO,
            [
                f"output_dir={tmp_path / name}",
                f"data.train=[{train}]",
                "data.on_error=skip",
                "train.global_batch_samples=12",
                "train.max_steps=2",
                "train.progress=false",
                "train.tensorboard=false",
                "train.export=false",
            ],
        )
        rows = [json.loads(line) for line in (train_sft(config) / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["grad_norm"], r["loss_tokens"], r["tokens"]) for r in rows]

    from_jsonl = run(data, "jsonl")
    assert len(from_jsonl) == 2
    assert run(out, "run-prepared") == from_jsonl
    assert json.loads((tmp_path / "run-prepared" / "data_report.json").read_text())["skipped"] == {"bad_type": 1}


def test_data_pipeline_benchmark_smoke(tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import data_pipeline

    assert data_pipeline.main(["--smoke", "--out", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("data_pipeline-*.json")
    rows = json.loads(result.read_text())["rows"]
    assert [r["workers"] for r in rows if r["what"] == "prepare"] == [1, 2]
    assert {r["format"] for r in rows if r["what"] == "startup"} == {"jsonl", "prepared"}
    assert all(r["samples"] == 60 for r in rows if r["what"] == "startup")
    loader = [r for r in rows if r["what"] == "loader"]
    assert [r["workers"] for r in loader] == [0, 2]
    assert all(r["images"] >= 1 and r["tokens"] > 4725 and r["x_h100"] > 0 for r in loader)  # R-4B-size photos


def test_llava_json_gives_the_samples_of_the_same_jsonl(data, tools, tmp_path):
    tokenizer, processor = tools
    records = [json.loads(line) for line in data.read_text().splitlines()[:6]]
    image = next(r for r in records if r.get("images"))["images"][0]
    llava = [
        {"id": "a", "image": str(data.parent / image), "conversations": [
            {"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "7"}]},
        {"id": "b", "conversations": [
            {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "<think>\n2 and 2.\n</think>\n\n4"}]},
        {"id": "c", "conversations": [{"from": "robot", "value": "?"}]},
    ]  # fmt: skip
    same = [
        {"messages": [{"role": "user", "content": "<image>\nHow many?"}, {"role": "assistant", "content": "7"}],
         "images": [str(data.parent / image)], "mode": "non_thinking"},
        {"messages": [{"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "<think>\n2 and 2.\n</think>\n\n4"}], "mode": "thinking"},
    ]  # fmt: skip
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    (tmp_path / "same.jsonl").write_text("".join(json.dumps(r) + "\n" for r in same))
    prepare([tmp_path / "llava.json"], tmp_path / "a", tokenizer, processor, workers=2, shard_lines=1)
    report = json.loads((tmp_path / "a" / "data_report.json").read_text())
    assert report["loaded"] == 2 and report["skipped"] == {"bad_type": 1}
    assert report["examples"]["bad_type"][0].startswith(f"{tmp_path / 'llava.json'}:3: field 'conversations[0]'")
    jsonl = SFTDataset.from_files([str(tmp_path / "same.jsonl")], tokenizer, processor, max_tokens=4096)
    prepared = SFTDataset.from_files([str(tmp_path / "a")], tokenizer, processor, max_tokens=4096, on_error="skip")
    assert [s.mode for s in prepared.samples] == ["non_thinking", "thinking"]
    for a, b in zip(prepared.samples, jsonl.samples, strict=True):
        assert (a.input_ids, a.labels, a.image_token_counts, a.images) == (
            b.input_ids,
            b.labels,
            b.image_token_counts,
            [Path(p).resolve() for p in b.images],
        )
