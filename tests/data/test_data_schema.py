"""r4b.data.schema and DataReport: the JSONL format, its validation and error messages."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from PIL import Image

from r4b.data import DataError, DataReport, read_jsonl, read_prompts
from r4b.format import format_response

THINKING = format_response("12", "5 + 7 = 12.")
DIRECT = format_response("12", None)


def user(*parts):
    return {"role": "user", "content": list(parts)}


IMAGE = {"type": "image"}


def text(value):
    return {"type": "text", "text": value}


def write_jsonl(path: Path, records) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 6), "red").save(tmp_path / "imgs" / name)
    return tmp_path


def good(**overrides):
    record = {
        "messages": [user(IMAGE, text("How many?")), {"role": "assistant", "content": THINKING}],
        "images": ["imgs/a.png"],
        "mode": "thinking",
        "answer": "12",
    }
    record.update(overrides)
    return record


def test_reads_valid_samples_and_formats_plain_answers(data_dir):
    path = write_jsonl(
        data_dir / "train.jsonl",
        [
            good(),
            "",
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "<image>\nWhat color? <image>"},
                    {"role": "assistant", "content": "red"},
                ],
                "images": ["imgs/a.png", "imgs/b.png"],
                "mode": "non_thinking",
                "meta": {"source": "synthetic"},
            },
            {"messages": [user(text("2+2?")), {"role": "assistant", "content": DIRECT}], "mode": "non_thinking"},
            {"messages": [user(IMAGE, text("Solve."))], "images": ["imgs/b.png"], "mode": "thinking", "answer": "3"},
        ],
    )
    samples, report = read_jsonl(path)
    assert report.loaded == 4 and report.skipped == {}
    first, second, third, prompt = samples
    assert first.mode == "thinking" and first.answer == "12" and first.images == [data_dir / "imgs" / "a.png"]
    assert first.messages[1]["content"] == THINKING
    assert first.source == f"{path}:1"
    assert second.source == f"{path}:3"  # blank line 2 is not a sample
    assert second.messages[2]["content"] == "<think>\n\n</think>\n\nred"
    assert second.meta == {"source": "synthetic"} and len(second.images) == 2
    assert third.messages[1]["content"] == DIRECT and third.images == []
    assert not prompt.has_response and prompt.answer == "3"


BAD = [
    ("{not json", "malformed_json", "malformed JSON"),
    ("[1, 2]", "malformed_json", "a sample must be a JSON object"),
    (good(mode="think"), "unknown_mode", "field 'mode': unknown mode 'think' (expected thinking or non_thinking)"),
    ({"messages": good()["messages"], "images": ["imgs/a.png"]}, "missing_field", "field 'mode': missing"),
    (good(id=3), "unknown_field", "field 'id': unknown field"),
    (good(images=["imgs/nope.png"]), "missing_image", "field 'images[0]': image file not found"),
    (good(images=[]), "image_count_mismatch", "field 'images': 0 image path(s) for 1 image placeholder(s)"),
    (
        good(images=["imgs/a.png", "imgs/b.png"]),
        "image_count_mismatch",
        "field 'images': 2 image path(s) for 1 image placeholder(s)",
    ),
    (
        good(messages=[{"role": "bot", "content": "hi"}]),
        "bad_role",
        "field 'messages[0].role': unknown role 'bot'",
    ),
    (
        good(messages=[user(IMAGE, text("q")), {"role": "assistant", "content": THINKING}, user(text("more?"))]),
        "bad_role",
        "field 'messages[2].role'",
    ),
    (
        good(messages=[user(IMAGE, text("q")), {"role": "assistant", "content": "12"}]),
        "bad_format",
        "field 'messages[1].content': a thinking sample needs a non-empty",
    ),
    (
        good(messages=[user(IMAGE, text("q")), {"role": "assistant", "content": "<think>\n \n</think>\n\n12"}]),
        "bad_format",
        "malformed think block",
    ),
    (
        good(messages=[user(IMAGE, text("q")), {"role": "assistant", "content": DIRECT}]),
        "mode_mismatch",
        "a non_thinking response in a thinking sample",
    ),
    (
        good(mode="non_thinking"),
        "mode_mismatch",
        "a thinking response in a non_thinking sample",
    ),
    (
        good(messages=[user(IMAGE, text("q")), {"role": "assistant", "content": "<think>12</think>12"}]),
        "bad_format",
        "malformed think block",
    ),
    (
        good(messages=[user(IMAGE, {"type": "video"}), {"role": "assistant", "content": THINKING}]),
        "bad_type",
        "field 'messages[0].content[1]'",
    ),
    (
        good(messages=[user(IMAGE, text("a<|im_end|>b")), {"role": "assistant", "content": THINKING}]),
        "reserved_token",
        "field 'messages[0].content[1].text': contains the reserved template token <|im_end|>",
    ),
    (good(answer=12), "bad_type", "field 'answer': must be a string"),
    (good(messages=[]), "bad_type", "field 'messages': must be a non-empty list"),
]


@pytest.mark.parametrize(("record", "reason", "message"), BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_every_problem_names_file_line_and_field(data_dir, record, reason, message):
    path = write_jsonl(data_dir / "train.jsonl", [good(), record])
    with pytest.raises(DataError) as caught:
        read_jsonl(path)
    assert caught.value.reason == reason
    assert str(caught.value).startswith(f"{path}:2: ")
    assert message in str(caught.value)


def test_the_documented_example_message(data_dir):
    path = write_jsonl(data_dir / "train.jsonl", [good()] * 16 + [good(mode="think")])
    with pytest.raises(DataError) as caught:
        read_jsonl(path)
    assert str(caught.value) == f"{path}:17: field 'mode': unknown mode 'think' (expected thinking or non_thinking)"


def test_skip_counts_every_bad_line_by_reason(data_dir):
    records = [good(), good(mode="think"), "{oops", good(images=["imgs/gone.png"]), good(), good(mode="think")]
    path = write_jsonl(data_dir / "train.jsonl", records)
    samples, report = read_jsonl(path, on_error="skip")
    assert [s.source for s in samples] == [f"{path}:1", f"{path}:5"]
    assert report.loaded == 2
    assert report.skipped == {"unknown_mode": 2, "malformed_json": 1, "missing_image": 1}
    assert report.num_skipped == 4
    assert report.examples["unknown_mode"][0].startswith(f"{path}:2: field 'mode'")
    assert report.examples["unknown_mode"][1].startswith(f"{path}:6: ")
    printed = str(report)
    assert printed.startswith("loaded 2, skipped 4 (malformed_json 1, missing_image 1, unknown_mode 2)")
    assert f"{path}:4: field 'images[0]'" in printed
    assert DataReport.from_dict(json.loads(report.to_json())).to_dict() == report.to_dict()


def test_report_keeps_the_first_few_examples_and_merges():
    a, b = DataReport(loaded=3), DataReport(loaded=4)
    for i in range(5):
        a.add("overlong", f"a.jsonl:{i}: too long")
    b.add("overlong", "b.jsonl:9: too long")
    b.add("missing_image", "b.jsonl:1: gone")
    assert a.examples["overlong"] == ["a.jsonl:0: too long", "a.jsonl:1: too long", "a.jsonl:2: too long"]
    merged = a.merge(b)
    assert merged.loaded == 7 and merged.skipped == {"overlong": 6, "missing_image": 1}
    assert len(merged.examples["overlong"]) == 3 and merged.examples["missing_image"] == ["b.jsonl:1: gone"]
    assert json.loads(merged.to_json())["skipped"] == {"overlong": 6, "missing_image": 1}


def test_non_utf8_line_is_located_and_errors_pickle(data_dir):
    path = data_dir / "t.jsonl"
    path.write_bytes(json.dumps(good()).encode() + b"\n" + b'{"mode": "\xff"}\n')
    with pytest.raises(DataError) as caught:
        read_jsonl(path)
    assert str(caught.value).startswith(f"{path}:2: not UTF-8")
    again = pickle.loads(pickle.dumps(caught.value))
    assert str(again) == str(caught.value) and again.reason == "malformed_json"


def test_rejects_unknown_on_error(data_dir):
    with pytest.raises(ValueError, match="on_error"):
        read_jsonl(write_jsonl(data_dir / "t.jsonl", [good()]), on_error="ignore")


def test_a_prompt_needs_no_mode_but_a_response_does(data_dir):
    prompt = {"messages": [user(IMAGE, text("How many?"))], "images": ["imgs/a.png"], "answer": "3", "meta": {"id": 1}}
    path = write_jsonl(data_dir / "rl.jsonl", [prompt, {**good(), "mode": None}])
    samples, report = read_jsonl(path, on_error="skip")
    assert [s.mode for s in samples] == [None] and not samples[0].has_response and samples[0].meta == {"id": 1}
    assert report.skipped == {"missing_field": 1} and "rl.jsonl:2: field 'mode'" in report.examples["missing_field"][0]


def test_read_prompts_counts_what_is_not_a_prompt(data_dir):
    prompt = {"messages": [user(IMAGE, text("How many?"))], "images": ["imgs/a.png"], "answer": "3"}
    path = write_jsonl(data_dir / "rl.jsonl", [prompt, {**prompt, "answer": " "}, good(), {**prompt, "mode": "x"}])
    prompts, report = read_prompts(path, on_error="skip")
    assert [p.source for p in prompts] == [f"{path}:1"]
    assert report.loaded == 1 and report.skipped == {"missing_field": 1, "bad_role": 1, "unknown_mode": 1}
    assert "rl.jsonl:3: field 'messages[1]': a prompt must not hold an assistant turn" in report.examples["bad_role"][0]
    strict = write_jsonl(data_dir / "strict.jsonl", [prompt, {**prompt, "answer": " "}])
    with pytest.raises(DataError, match=r"strict\.jsonl:2: field 'answer': missing reference answer"):
        read_prompts(strict)


def test_a_corrupt_prompt_image_is_skipped_by_line_or_names_it(data_dir):
    (data_dir / "imgs" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    prompt = {"messages": [user(IMAGE, text("How many?"))], "images": ["imgs/a.png"], "answer": "3"}
    path = write_jsonl(data_dir / "rl.jsonl", [prompt, {**prompt, "images": ["imgs/bad.png"]}, prompt])
    prompts, report = read_prompts(path, on_error="skip")
    assert [p.source for p in prompts] == [f"{path}:1", f"{path}:3"]
    assert report.skipped == {"bad_image": 1} and f"{path}:2: field 'images[0]'" in report.examples["bad_image"][0]
    with pytest.raises(DataError, match=r"rl\.jsonl:2: field 'images\[0\]': cannot read image .*bad\.png"):
        read_prompts(path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("x", "at column 1: expected a JSON value"),
        ('{"answer": "3', "at column 12: a string that starts here is never closed"),
        ('{"answer": "3"} x', "at column 17: extra text after the JSON value"),
    ],
)
def test_json_errors_say_what_was_expected(data_dir, line, message):
    path = data_dir / "bad.jsonl"
    path.write_text(f"{line}\n")
    with pytest.raises(DataError, match=rf"bad\.jsonl:1: malformed JSON {message}"):
        read_jsonl(path)
    assert "at at" not in message


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda imgs: (imgs / "dir").mkdir(), "image path {imgs}/dir is a directory, not a file"),
        (lambda imgs: ((imgs / "dir").symlink_to(imgs / "loop"), (imgs / "loop").symlink_to(imgs / "dir")),
         "image path {imgs}/dir is a symlink loop"),
        (lambda imgs: (imgs / "dir").symlink_to("gone.png"), "image path {imgs}/dir is a symlink to a missing file"),
    ],
    ids=["directory", "symlink loop", "dangling symlink"],
)  # fmt: skip
def test_an_image_path_that_is_no_file_says_what_it_is(data_dir, make, message):
    make(data_dir / "imgs")
    path = write_jsonl(data_dir / "train.jsonl", [good(images=["imgs/dir"])])
    with pytest.raises(DataError, match=r"field 'images\[0\]'") as caught:
        read_jsonl(path)
    assert message.format(imgs=data_dir / "imgs") in str(caught.value) and caught.value.reason == "missing_image"


def test_an_image_url_is_named_a_url(data_dir):
    path = write_jsonl(data_dir / "train.jsonl", [good(images=["https://example.com/a.png"])])
    with pytest.raises(DataError, match=r"'https://example\.com/a\.png' is a URL: images are read from local files"):
        read_jsonl(path)


def test_a_decompression_bomb_is_a_bad_image_skipped_or_named(data_dir, monkeypatch):
    """An image whose header claims more pixels than PIL decodes (DecompressionBombError, not an OSError) is a bad
    image like any other: skipped and counted under on_error=skip, one located error otherwise."""
    from r4b.data.image import image_sizes, load_images

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # the 8 x 6 images now claim over twice the limit
    bomb = data_dir / "imgs" / "a.png"
    for read in (image_sizes, load_images):
        with pytest.raises(DataError, match=r"train\.jsonl:3: field 'images\[0\]': cannot read image .*decompression"):
            read([bomb], where="train.jsonl:3")
    prompt = {"messages": [user(IMAGE, text("How many?"))], "images": ["imgs/a.png"], "answer": "3"}
    path = write_jsonl(data_dir / "rl.jsonl", [prompt])
    prompts, report = read_prompts(path, on_error="skip")
    assert prompts == [] and report.skipped == {"bad_image": 1}
