"""r4b.curate: R-4B's performance-based split (N answers, all wrong -> thinking), its files and its CLI."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from r4b.curate import add_parser, curate, load_model, read_questions, split_mode
from r4b.data import DataError, read_jsonl
from r4b.rollout import Prompt, Rollout, RolloutEngine, SamplingParams
from r4b.synth import write_synthetic


class StubEngine(RolloutEngine):
    """Question i gets ``i % (n + 1)`` answers "right" and the rest "wrong"; records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, str, SamplingParams]] = []
        self.seen = 0

    def generate(self, prompts, *, n, mode, sampling):
        self.calls.append((len(prompts), n, mode, sampling))
        out = []
        for _ in prompts:
            right = self.seen % (n + 1)
            self.seen += 1
            out.append([Rollout([1], [2], "right" if k < right else "wrong", True, mode) for k in range(n)])
        return out


def right_reward(response: str, answer: str) -> float:
    return float(response.endswith("right"))


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, n_sft=2, n_rl=10, n_eval=2, seed=0)
    return root


def _id(record: dict) -> str:
    return record.get("meta", record)["id"]  # synthetic prompts carry their id in meta


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_split_rule():
    assert split_mode(0) == "thinking"
    assert all(split_mode(k) == "non_thinking" for k in range(1, 9))


@pytest.mark.parametrize(("value", "expected"), [(0.0, "thinking"), (1.0, "non_thinking")])
def test_constant_reward_sends_everything_one_way(synth, tmp_path, value, expected):
    report = curate(StubEngine(), synth / "rl.jsonl", tmp_path, n=3, reward=lambda response, answer: value)
    assert report["questions"] == 10 and report[expected] == 10
    assert len(_read(tmp_path / f"{expected}.jsonl")) == 10
    other = "non_thinking" if expected == "thinking" else "thinking"
    assert _read(tmp_path / f"{other}.jsonl") == []
    correct = 0 if value == 0 else 3
    assert report["correct_histogram"] == {str(correct): 10}


def test_split_by_correct_count(synth, tmp_path):
    engine = StubEngine()
    sampling = SamplingParams(temperature=0.7, max_new_tokens=5, seed=11)
    out = tmp_path / "curated"
    report = curate(engine, synth / "rl.jsonl", out, n=4, sampling=sampling, reward=right_reward, chunk_size=4)
    questions = _read(synth / "rl.jsonl")
    thinking, direct = _read(out / "thinking.jsonl"), _read(out / "non_thinking.jsonl")
    # every question in exactly one file, the counts add up, the record is carried along
    ids = [_id(r) for r in thinking + direct]
    assert sorted(ids) == sorted(_id(q) for q in questions) and len(set(ids)) == len(ids)
    assert report["thinking"] + report["non_thinking"] == report["questions"] == len(questions)
    assert (report["thinking"], report["non_thinking"]) == (len(thinking), len(direct))
    for i, question in enumerate(questions):
        record = next(r for r in thinking + direct if _id(r) == _id(question))
        assert record["curate"] == {"correct": i % 5, "n": 4}
        assert record["mode"] == ("thinking" if i % 5 == 0 else "non_thinking")
        assert (record in thinking) == (i % 5 == 0)
        assert {k: v for k, v in record.items() if k not in ("images", "mode", "curate")} == {
            k: v for k, v in question.items() if k != "images"
        }
        pairs = zip(record["images"], question["images"], strict=True)
        assert all((out / image).resolve() == (synth / original).resolve() for image, original in pairs)
    assert json.loads((out / "curate_report.json").read_text()) == json.loads(json.dumps(report))
    assert report["correct_histogram"] == {"0": 2, "1": 2, "2": 2, "3": 2, "4": 2}
    # the engine saw chunks of 4 questions in non-thinking mode with the seed advanced per chunk
    assert [(c[0], c[1], c[2], c[3].seed) for c in engine.calls] == [(4, 4, "non_thinking", 11 + k) for k in (0, 1)] + [
        (2, 4, "non_thinking", 13)
    ]


def test_output_files_read_back(synth, tmp_path):
    """Curated records keep valid image paths: r4b.data reads them back once given an assistant turn."""
    curate(StubEngine(), synth / "rl.jsonl", tmp_path / "out", n=2, reward=right_reward)
    records = _read(tmp_path / "out" / "thinking.jsonl") + _read(tmp_path / "out" / "non_thinking.jsonl")
    sft = tmp_path / "out" / "sft.jsonl"
    sft.write_text(
        "".join(
            json.dumps({"messages": [*r["messages"], {"role": "assistant", "content": r["answer"]}],
                        "images": r["images"], "mode": "non_thinking"}) + "\n"
            for r in records
        )
    )  # fmt: skip
    samples, _ = read_jsonl(sft)
    assert len(samples) == 10 and all(sample.images[0].is_file() for sample in samples)


def test_bad_questions_are_located(tmp_path):
    good = {"messages": [{"role": "user", "content": "1+1?"}], "answer": "2"}
    cases = [
        ({"messages": [{"role": "user", "content": "1+1?"}]}, "field 'answer'"),
        ({**good, "answer": 2}, "field 'answer'"),
        (
            {**good, "mode": "non_thinking", "messages": [*good["messages"], {"role": "assistant", "content": "2"}]},
            "field 'messages[1]'",
        ),
        # the shared reader wants a mode with an assistant turn before check_prompt refuses the turn
        ({**good, "messages": [*good["messages"], {"role": "assistant", "content": "2"}]}, "field 'mode'"),
        (
            {**good, "images": ["missing.png"], "messages": [{"role": "user", "content": "<image>\nx"}]},
            "field 'images[0]'",
        ),
        ({**good, "messages": [{"role": "robot", "content": "x"}]}, "field 'messages[0].role'"),
    ]
    for record, field in cases:
        path = tmp_path / "q.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
        with pytest.raises(DataError, match=re.escape(f"{path}:2: {field}")):
            read_questions(path)
    path.write_text(json.dumps(good) + "\n\n" + "{not json\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:3: malformed JSON")):
        read_questions(path)


def test_bad_questions_are_skipped_and_counted(tmp_path):
    """on_error="skip": the shared prompt reader counts each bad line by reason, with its file:line:field."""
    good = {"messages": [{"role": "user", "content": "1+1?"}], "answer": "2"}
    path = tmp_path / "q.jsonl"
    lines = [good, {**good, "answer": " "}, "{not json", {**good, "messages": [{"role": "robot", "content": "x"}]}]
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in [*lines, good]))
    questions, report = read_questions(path, on_error="skip")
    assert [q.source for q in questions] == [f"{path}:1", f"{path}:5"] and questions[0].answer == "2"
    assert report.loaded == 2 and report.skipped == {"missing_field": 1, "malformed_json": 1, "bad_role": 1}
    assert report.examples["missing_field"] == [f"{path}:2: field 'answer': missing reference answer"]
    assert report.examples["bad_role"][0].startswith(f"{path}:4: field 'messages[0].role': ")
    out = curate(StubEngine(), path, tmp_path / "out", n=2, reward=right_reward, on_error="skip")
    assert out["questions"] == 2 and out["data_report"]["skipped"] == report.skipped


def test_a_corrupt_image_is_skipped_by_line_or_names_it(tmp_path):
    """A question whose image cannot be read is a bad line like any other: counted under skip, with
    its file:line, else the error names them; curate stops at the reader, before a model runs."""
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    good = {"messages": [{"role": "user", "content": "1+1?"}], "answer": "2"}
    corrupt = {**good, "images": ["bad.png"], "messages": [{"role": "user", "content": "<image>\n1+1?"}]}
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in [good, corrupt, good]))
    out = curate(StubEngine(), path, tmp_path / "out", n=2, reward=right_reward, on_error="skip")
    assert out["questions"] == 2 and out["data_report"]["skipped"] == {"bad_image": 1}
    assert out["data_report"]["examples"]["bad_image"][0].startswith(f"{path}:2: field 'images[0]': cannot read image")
    with pytest.raises(DataError, match=re.escape(f"{path}:2: field 'images[0]': cannot read image")):
        curate(StubEngine(), path, tmp_path / "out2", n=2, reward=right_reward)


def test_unknown_fields_are_carried_along(tmp_path):
    """Fields r4b.data does not know are a question's own: not refused, written back unchanged."""
    question = {"messages": [{"role": "user", "content": "1+1?"}], "answer": "2", "id": 7, "source": {"set": "x"}}
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(question) + "\n")
    curate(StubEngine(), path, tmp_path / "out", n=2, reward=lambda response, answer: 0.0)
    (record,) = _read(tmp_path / "out" / "thinking.jsonl")
    assert record == {**question, "mode": "thinking", "curate": {"correct": 0, "n": 2}}


def test_cli_real_run_with_tiny_model(synth, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="r4b")
    add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli"
    args = parser.parse_args(
        ["curate", "--model", "tiny", "--data", str(synth / "rl.jsonl"), "--out", str(out), "--n", "2",
         "--max-new-tokens", "4", "--batch-size", "8", "--seed", "3"]
    )  # fmt: skip
    assert args.run(args) == 0
    assert "curated 10 questions" in capsys.readouterr().out
    report = json.loads((out / "curate_report.json").read_text())
    thinking, direct = _read(out / "thinking.jsonl"), _read(out / "non_thinking.jsonl")
    assert report["questions"] == 10 == len(thinking) + len(direct)
    assert (report["thinking"], report["non_thinking"]) == (len(thinking), len(direct))
    assert sum(report["correct_histogram"].values()) == 10 and report["n"] == 2
    for record in thinking + direct:
        assert record["curate"]["n"] == 2 and (record["curate"]["correct"] == 0) == (record["mode"] == "thinking")


def test_cli_bad_data_is_an_input_error(tmp_path):
    from r4b.errors import InputError

    parser = argparse.ArgumentParser(prog="r4b")
    add_parser(parser.add_subparsers(dest="command"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    args = parser.parse_args(["curate", "--model", "tiny", "--data", str(bad), "--out", str(tmp_path / "o")])
    with pytest.raises(InputError, match=r"bad\.jsonl:1: field 'answer'"):
        args.run(args)


def test_load_model_from_directory(tmp_path):
    from r4b.models.checkpoint import save_pretrained_r4b

    model, tokenizer = load_model("tiny")
    save_pretrained_r4b(model, tmp_path / "ckpt", tokenizer)
    loaded, loaded_tokenizer = load_model(tmp_path / "ckpt")
    assert type(loaded) is type(model) and len(loaded_tokenizer) == len(tokenizer)
    prompt = [Prompt([{"role": "user", "content": "Hi"}])]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    from r4b.rollout import HFRolloutEngine

    a = HFRolloutEngine(model, tokenizer).generate(prompt, n=1, mode="auto", sampling=greedy)
    b = HFRolloutEngine(loaded, loaded_tokenizer).generate(prompt, n=1, mode="auto", sampling=greedy)
    assert a[0][0].response_ids == b[0][0].response_ids
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_model(tmp_path / "nope")
