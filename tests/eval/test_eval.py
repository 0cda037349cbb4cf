"""r4b eval end to end: the untrained tiny model over synthetic data in every mode (files, report schema,
predictions count), a VLMEvalKit TSV with a real base64 PNG, rescoring from predictions.jsonl, several models
in one report, merging runs, and the CLI with its input errors."""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from r4b.data import DataError
from r4b.errors import InputError
from r4b.eval import EvalError, add_parser, evaluate, load_items, mcq_prompt, merge_reports, rescore
from r4b.format import MODE_SUFFIX, MODES
from r4b.models.loading import load_model_and_processor
from r4b.rollout import Rollout, RolloutEngine
from r4b.synth import write_synthetic

MAX_NEW = 6
METRIC_KEYS = {"n", "accuracy", "trigger_rate", "mean_tokens", "median_tokens", "unfinished_rate"}
FILES = ("predictions.jsonl", "report.json", "report.md", "accuracy_tokens.png", "trigger_rate.png")


class ScriptedEngine(RolloutEngine):
    """A perfect auto-thinker: easy questions ("How many") answered directly, hard ones after a thought; forced
    modes follow their suffix. Records the prompts it saw."""

    def __init__(self, answers: dict[str, str], wrong_hard_direct: bool = True) -> None:
        self.answers, self.wrong_hard_direct = answers, wrong_hard_direct
        self.prompts = []

    def _text(self, prompt) -> str:
        parts = prompt.messages[-1]["content"]
        return parts if isinstance(parts, str) else "".join(p.get("text", "") for p in parts)

    def generate(self, prompts, *, n, mode, sampling):
        out = []
        for prompt in prompts:
            self.prompts.append((prompt, mode))
            question = self._text(prompt)
            answer = self.answers[str(prompt.images[0])]
            hard = not question.startswith("How many")
            thought = "\nLet me work it out.\n</think>\n\n"
            if mode == "auto":
                text = (thought if hard else "\n\n</think>\n\n") + answer
            elif mode == "thinking":
                text = thought[1:] + answer
            else:
                text = "\n\n" + ("0" if hard and self.wrong_hard_direct else answer)
            ids = list(range(len(text.split()) + 1))  # a token per word, plus the stop token
            out.append([Rollout([1], ids, text, True, mode) for _ in range(n)])
        return out


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, n_sft=2, n_rl=2, n_eval=6, seed=2)  # seed 2: 3 easy, 3 hard
    return root


@pytest.fixture(scope="module")
def tiny_run(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_run")
    report = evaluate("tiny", synth / "eval.jsonl", out, max_new_tokens=MAX_NEW, batch_size=4, progress=False)
    return out, report


def _answers(path: Path) -> dict[str, str]:
    """Reference answers by image path (questions repeat, pictures do not)."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {str(path.parent / r["images"][0]): r["answer"] for r in records}


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_tiny_model_end_to_end(synth, tiny_run):
    out, report = tiny_run
    for name in FILES:
        assert (out / name).is_file(), name
    for name in FILES[3:]:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 100
    items = _read(synth / "eval.jsonl")
    predictions = _read(out / "predictions.jsonl")
    assert len(predictions) == len(items) * len(MODES)
    assert report == json.loads((out / "report.json").read_text())
    assert report["benchmark"] == "eval" and report["items"] == len(items) and report["modes"] == list(MODES)
    assert report["group_keys"] == ["difficulty"] and list(report["models"]) == ["tiny"]
    assert report["settings"]["tiny"]["max_new_tokens"] == MAX_NEW and report["settings"]["tiny"]["temperature"] == 0
    difficulties = {item["meta"]["difficulty"] for item in items}
    for mode in MODES:
        metrics = report["models"]["tiny"][mode]
        assert set(metrics) >= METRIC_KEYS and metrics["n"] == len(items)
        assert set(metrics["by_difficulty"]) == difficulties == {"easy", "hard"}
        for group in metrics["by_difficulty"].values():
            assert set(group) >= METRIC_KEYS
        assert 0 <= metrics["accuracy"] <= 1 and 1 <= metrics["mean_tokens"] <= MAX_NEW
    assert report["models"]["tiny"]["non_thinking"]["trigger_rate"] == 0.0  # the suffix closes the think block
    for record in predictions:
        assert record["tokens"] == len(record["response_ids"]) <= MAX_NEW
        assert record["finished"] or record["tokens"] == MAX_NEW
        assert record["prompt"].endswith(MODE_SUFFIX[record["mode"]]) and "<image>" in record["prompt"]
        assert record["groups"]["difficulty"] in {"easy", "hard"} and record["id"].startswith("eval-")
        assert {"response", "extracted", "correct", "thinking", "think_state", "answer"} <= set(record)
    markdown = (out / "report.md").read_text()
    assert "| model | mode | n | accuracy (%) | trigger rate (%) | mean tokens | median tokens |" in markdown
    assert "| tiny | auto |" in markdown and "by difficulty" in markdown and "trigger_rate.png" in markdown


def test_rescore_equals_the_report(tiny_run, tmp_path):
    out, report = tiny_run
    rescored = rescore(out / "predictions.jsonl")
    assert rescored["models"] == report["models"] and rescored["rescored_changes"] == 0
    assert rescored["settings"] == report["settings"] and rescored["data"] == report["data"]
    # a tampered score is recomputed from the response, and counted
    records = _read(out / "predictions.jsonl")
    records[0]["correct"] = not records[0]["correct"]
    records[1]["tokens"] += 1
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    again = rescore(tmp_path / "predictions.jsonl", tmp_path / "out", plots=False)
    assert again["models"] == report["models"] and again["rescored_changes"] == 2
    assert (tmp_path / "out" / "report.md").is_file() and not (tmp_path / "out" / "trigger_rate.png").exists()


def test_rescore_reports_bad_lines(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"model": "m"}\n')
    with pytest.raises(EvalError, match=r"predictions.jsonl:1: missing field\(s\) benchmark, mode"):
        rescore(path)
    path.write_text("\n{not json\n")
    with pytest.raises(EvalError, match=r"predictions\.jsonl:2: malformed JSON"):
        rescore(path)


def test_scripted_auto_thinker_metrics_by_difficulty(synth, tmp_path):
    engine = ScriptedEngine(_answers(synth / "eval.jsonl"))
    report = evaluate(engine, synth / "eval.jsonl", tmp_path, name="auto-thinker", max_new_tokens=64, progress=False)
    metrics = report["models"]["auto-thinker"]
    auto = metrics["auto"]
    assert auto["accuracy"] == 1.0
    assert auto["by_difficulty"]["easy"]["trigger_rate"] == 0.0 and auto["by_difficulty"]["hard"]["trigger_rate"] == 1.0
    assert metrics["thinking"]["trigger_rate"] == 1.0 and metrics["thinking"]["accuracy"] == 1.0
    assert metrics["non_thinking"]["trigger_rate"] == 0.0
    assert metrics["non_thinking"]["by_difficulty"]["hard"]["accuracy"] == 0.0
    assert metrics["non_thinking"]["by_difficulty"]["easy"]["accuracy"] == 1.0
    hard = sum(p.messages[-1]["content"][1]["text"][:8] != "How many" for p, m in engine.prompts if m == "auto")
    assert auto["trigger_rate"] == hard / auto["n"]
    predictions = _read(tmp_path / "predictions.jsonl")
    tokens = [p["tokens"] for p in predictions if p["mode"] == "thinking"]
    assert metrics["thinking"]["mean_tokens"] == sum(tokens) / len(tokens)
    assert all(p["prompt"] is None for p in predictions)  # a bare engine has no tokenizer to render the prompt


def _b64_png(color: str, size=(30, 20)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _write_tsv(path: Path) -> Path:
    header = ["index", "image", "question", "hint", "A", "B", "C", "answer", "category"]
    rows = [
        ["0", _b64_png("red"), "What color is the picture?", "", "red", "blue", "green", "A", "color"],
        ["1", _b64_png("blue", (20, 30)), "Which color?", "Look closely.", "red", "blue", "", "B", "color"],
        ["2", "0", "Is it bright?", "", "yes", "no", "", "A", "brightness"],
    ]
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_vlmeval_tsv_items_and_prompt(tmp_path):
    items = load_items(_write_tsv(tmp_path / "MiniBench.tsv"))
    assert [item.id for item in items] == ["0", "1", "2"] and [item.answer for item in items] == ["A", "B", "A"]
    assert items[1].question == (
        "Hint: Look closely.\nQuestion: Which color?\nOptions:\nA. red\nB. blue\n"
        "Please select the correct answer from the options above. \n"
    )
    assert items[0].question == mcq_prompt("What color is the picture?", {"A": "red", "B": "blue", "C": "green"})
    assert items[0].options == {"A": "red", "B": "blue", "C": "green"} and items[1].options == {"A": "red", "B": "blue"}
    content = items[0].prompt.messages[0]["content"]
    assert content[0] == {"type": "image"} and content[1]["type"] == "text"
    assert items[0].prompt.images[0].size == (30, 20) and items[0].prompt.images[0].getpixel((0, 0)) == (255, 0, 0)
    assert items[2].prompt.images[0].size == (30, 20)  # the row references row 0's image
    assert [item.groups for item in items] == [{"category": "color"}, {"category": "color"}, {"category": "brightness"}]
    assert items[1].source == f"{tmp_path / 'MiniBench.tsv'}:3"


def test_vlmeval_tsv_evaluation(tmp_path):
    path = _write_tsv(tmp_path / "MiniBench.tsv")
    model, tokenizer, processor = load_model_and_processor(None, seed=0)

    class Letters(RolloutEngine):  # answers "The answer is B." to everything, sees the decoded images
        def __init__(self) -> None:
            self.sizes = []

        def generate(self, prompts, *, n, mode, sampling):
            self.sizes += [[image.size for image in p.images] for p in prompts]
            return [[Rollout([1], [5, 6, 7], "\n\n</think>\n\nThe answer is B.", True, mode)] for _ in prompts]

    letters = Letters()
    report = evaluate(
        {"tiny": (model, tokenizer, processor), "letters": letters}, path, tmp_path / "out",
        modes=("auto", "non_thinking"), max_new_tokens=4, batch_size=2, progress=False,
    )  # fmt: skip
    assert report["benchmark"] == "MiniBench" and report["group_keys"] == ["category"]
    assert report["models"]["letters"]["auto"]["accuracy"] == pytest.approx(1 / 3)
    assert report["models"]["letters"]["auto"]["by_category"]["color"]["accuracy"] == 0.5
    assert report["models"]["letters"]["auto"]["trigger_rate"] == 0.0
    assert letters.sizes == [[(30, 20)], [(20, 30)], [(30, 20)]] * 2
    predictions = _read(tmp_path / "out" / "predictions.jsonl")
    assert len(predictions) == 3 * 2 * 2
    tiny = [p for p in predictions if p["model"] == "tiny"]
    assert all(p["tokens"] <= 4 and "\nOptions:\nA. " in p["prompt"] and "<image>" in p["prompt"] for p in tiny)
    assert {p["extracted"] for p in predictions if p["model"] == "letters"} == {"B"}
    assert rescore(tmp_path / "out")["models"] == report["models"]


def test_several_models_in_one_report_and_merge(synth, tmp_path):
    answers = _answers(synth / "eval.jsonl")
    models = {"annealed": "tiny", "bpo": ScriptedEngine(answers), "grpo": ScriptedEngine(answers, False)}
    report = evaluate(models, synth / "eval.jsonl", tmp_path / "all", max_new_tokens=MAX_NEW, progress=False)
    assert list(report["models"]) == ["annealed", "bpo", "grpo"] and list(report["settings"]) == list(models)
    for name in models:
        for mode in MODES:
            metrics = report["models"][name][mode]
            assert set(metrics) >= METRIC_KEYS
            for group in ("easy", "hard"):
                assert {"accuracy", "trigger_rate", "mean_tokens"} <= set(metrics["by_difficulty"][group])
    assert report["models"]["grpo"]["non_thinking"]["accuracy"] == 1.0
    assert report["models"]["bpo"]["non_thinking"]["accuracy"] < 1.0
    assert len(_read(tmp_path / "all" / "predictions.jsonl")) == 3 * 6 * len(MODES)
    markdown = (tmp_path / "all" / "report.md").read_text()
    assert all(f"| {name} | {mode} |" in markdown for name in models for mode in MODES)

    # the same models run separately, then merged, give the same numbers
    for name, spec in models.items():
        evaluate(
            spec, synth / "eval.jsonl", tmp_path / name, name=name, max_new_tokens=MAX_NEW, progress=False, plots=False
        )
    merged = merge_reports([tmp_path / name for name in models], tmp_path / "merged")
    assert merged["models"] == report["models"] and merged["settings"] == report["settings"]
    assert (tmp_path / "merged" / "trigger_rate.png").is_file()
    with pytest.raises(EvalError, match="model name 'bpo' is in both"):
        merge_reports([tmp_path / "bpo", tmp_path / "bpo"], tmp_path / "twice")


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="r4b")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.run(args)


def test_cli(synth, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["eval", "--model", "tiny", "--model", "tiny", "--name", "a", "--name", "b", "--data",
            str(synth / "eval.jsonl"), "--modes", "auto,non_thinking", "--max-new-tokens", "3", "--limit", "2",
            "--batch-size", "2", "--out", str(out), "--no-progress"]  # fmt: skip
    assert _cli(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["models"]) == ["a", "b"] and report["modes"] == ["auto", "non_thinking"]
    assert report["models"]["a"]["auto"]["n"] == 2 and report["models"]["a"] == report["models"]["b"]
    assert "eval a auto: accuracy" in capsys.readouterr().out


def test_cli_input_errors(synth, tmp_path):
    data = str(synth / "eval.jsonl")
    base = ["eval", "--out", str(tmp_path / "x"), "--no-progress", "--max-new-tokens", "2"]
    with pytest.raises(InputError, match="1 --name for 2 --model"):
        _cli([*base, "--model", "tiny", "--model", "tiny", "--name", "a", "--data", data])
    with pytest.raises(InputError, match="clash"):
        _cli([*base, "--model", "tiny", "--model", "tiny", "--data", data])
    with pytest.raises(InputError, match="not a directory"):
        _cli([*base, "--model", str(tmp_path / "missing"), "--data", data])
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(InputError, match=r"empty_model/config.json: missing"):
        _cli([*base, "--model", str(tmp_path / "empty_model"), "--data", data])
    with pytest.raises(InputError, match="unknown mode 'think'"):
        _cli([*base, "--model", "tiny", "--data", data, "--modes", "auto,think"])
    with pytest.raises(InputError, match="no such data file"):
        _cli([*base, "--model", "tiny", "--data", str(tmp_path / "nope.jsonl")])
    with pytest.raises(InputError, match="unknown dtype"):
        _cli([*base, "--model", "tiny", "--data", data, "--dtype", "float7"])


def test_bad_data_is_located(synth, tmp_path):
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text('{"messages": [{"role": "user", "content": "hi"}], "answer": "1"}\n'
                         '{"messages": [{"role": "user", "content": "hi"}]}\n')  # fmt: skip
    with pytest.raises(DataError, match=r"no_answer.jsonl:2: field 'answer': missing reference answer"):
        evaluate("tiny", no_answer, tmp_path / "o", progress=False)
    with pytest.raises(DataError, match=r"sft.jsonl:1: field 'messages\[1\]': an evaluation prompt must not hold"):
        evaluate("tiny", synth / "sft.jsonl", tmp_path / "o", progress=False)
    bad_tsv = tmp_path / "bad.tsv"
    bad_tsv.write_text("index\timage\tquestion\tanswer\n0\t" + "not-base64!" * 10 + "\tQ?\tA\n")
    with pytest.raises(DataError, match=r"bad.tsv:2: column 'image': cannot decode image"):
        evaluate("tiny", bad_tsv, tmp_path / "o", progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(EvalError, match="no questions"):
        evaluate("tiny", empty, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()  # nothing written before the data is known good


def test_loaded_models_generate_on_the_gpu_by_default(monkeypatch):
    """On a GPU machine a model r4b loads must not generate on the CPU unless --device says so."""
    import torch

    from r4b.eval import runner

    moved = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *args, **kwargs: moved.append(args[0]) or self)
    runner._engine("tiny", batch_size=2, seed=0, device=None, dtype=None)
    runner._engine("tiny", batch_size=2, seed=0, device="cpu", dtype=None)
    assert moved == ["cuda", "cpu"]


def test_cli_adds_its_table_to_an_r4b_model_card(synth, tmp_path, capsys):
    """r4b eval on an r4b export updates its model card; a directory without an r4b card is never written."""
    from r4b.models.checkpoint import save_pretrained_r4b
    from r4b.models.model_card import read_card_data, write_model_card

    model, tokenizer, processor = load_model_and_processor(None, seed=0)
    carded, plain = tmp_path / "carded", tmp_path / "plain"
    for directory in (carded, plain):
        save_pretrained_r4b(model, directory, tokenizer, processor=processor)
    write_model_card(carded, stage="sft", config={"model": {"path": None}}, run_dir=tmp_path)
    plain_files = {p.name: p.read_bytes() for p in plain.iterdir() if p.is_file()}
    argv = ["eval", "--model", str(carded), "--model", str(plain), "--data", str(synth / "eval.jsonl"),
            "--modes", "auto", "--max-new-tokens", "2", "--limit", "2", "--out", str(tmp_path / "out"),
            "--no-progress", "--no-plots"]  # fmt: skip
    assert _cli(argv) == 0
    assert read_card_data(carded)["eval"]["modes"]["auto"]["accuracy"] is not None
    assert "model card:" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in plain.iterdir() if p.is_file()} == plain_files
