"""r4b.data.encode: the exact token layout and loss mask on the shipped tiny tokenizer."""

from __future__ import annotations

import pytest
from PIL import Image

from r4b.data import (
    IGNORE_INDEX,
    DataError,
    ImageProcessor,
    encode_sample,
    encode_samples,
    parse_sample,
    render_segments,
)
from r4b.format import MODE_SUFFIX, format_response
from r4b.models.tokenizer import TEMPLATE_MODE, load_tokenizer

IM_START, IM_END, IMAGE, THINK, THINK_CLOSE, NL, NL2 = 1, 2, 3, 902, 903, 202, 659


class SizeProcessor:
    """A test-local ImageProcessor: one token per 2x2 pixels."""

    def num_image_tokens(self, height: int, width: int) -> int:
        return (height // 2) * (width // 2)

    def preprocess(self, images):
        return {"pixel_values": [image.size for image in images], "image_sizes": [image.size[::-1] for image in images]}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture
def root(tmp_path):
    Image.new("RGB", (8, 6), "blue").save(tmp_path / "a.png")  # width 8, height 6: 12 tokens with SizeProcessor
    Image.new("RGB", (4, 4), "blue").save(tmp_path / "b.png")
    return tmp_path


def sample(root, messages, mode, images=()):
    return parse_sample({"messages": messages, "mode": mode, "images": list(images)}, where="t.jsonl:1", root=root)


def question(text="Q?"):
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}


def test_the_tiny_tokenizer_ids_this_file_relies_on(tok):
    ids = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<image>", "<think>", "</think>"])
    assert ids == [IM_START, IM_END, IMAGE, THINK, THINK_CLOSE]
    assert tok.encode("\n") == [NL] and tok.encode("\n\n") == [NL2]


@pytest.mark.parametrize("mask", [False, True])
def test_non_thinking_layout(tok, root, mask):
    s = sample(root, [question(), {"role": "assistant", "content": "12"}], "non_thinking", ["a.png"])
    enc = encode_sample(s, tok, [5], mask_empty_think=mask)
    prompt = [IM_START, *tok.encode("user"), NL, *[IMAGE] * 5, *tok.encode("\nQ?"), IM_END, NL]
    prompt += [IM_START, *tok.encode("assistant"), NL]
    answer = tok.encode("12")
    assert enc.input_ids == [*prompt, THINK, NL2, THINK_CLOSE, NL2, *answer, IM_END, NL]
    think_labels = [IGNORE_INDEX] * 4 if mask else [THINK, NL2, THINK_CLOSE, NL2]
    assert enc.labels == [IGNORE_INDEX] * len(prompt) + think_labels + [*answer, IM_END, IGNORE_INDEX]
    assert enc.length == len(enc.input_ids) and enc.num_loss_tokens == len(answer) + 1 + (0 if mask else 4)
    assert enc.image_token_counts == [5] and enc.images == [root / "a.png"] and enc.source == "t.jsonl:1"


@pytest.mark.parametrize("mask", [False, True])
def test_thinking_layout_keeps_loss_on_the_think_block(tok, root, mask):
    content = format_response("12", "5 + 7 = 12.")
    s = sample(root, [question(), {"role": "assistant", "content": content}], "thinking", ["a.png"])
    enc = encode_sample(s, tok, [2], mask_empty_think=mask)
    start = enc.input_ids.index(THINK)
    assert enc.input_ids[start - 3 : start + 2] == [IM_START, *tok.encode("assistant"), NL, THINK, NL]
    close = enc.input_ids.index(THINK_CLOSE)
    assert enc.input_ids[close + 1] == NL2 and enc.input_ids[-2:] == [IM_END, NL]
    assert enc.labels[:start] == [IGNORE_INDEX] * start
    assert enc.labels[start:-1] == enc.input_ids[start:-1]  # mask_empty_think never touches thinking samples
    assert enc.labels[-1] == IGNORE_INDEX
    assert tok.decode(enc.input_ids[start:-1]) == content + "<|im_end|>"


@pytest.mark.parametrize("mode", ["thinking", "non_thinking"])
def test_rendering_is_the_chat_template_text(tok, root, mode):
    reply = format_response("red", "It is red." if mode == "thinking" else None)
    messages = [
        {"role": "system", "content": "Be brief."},
        question("Color?"),
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "And this one? <image>"},
        {"role": "assistant", "content": reply},
    ]
    s = sample(root, messages, mode, ["a.png", "b.png"])
    segments = render_segments(s, tok)
    text = "".join(t for t, _ in segments)
    assert text == tok.apply_chat_template(s.messages, tokenize=False)
    # The prompt part of each turn is the template's generation prompt, whose mode suffix opens the response.
    prompt = tok.apply_chat_template(
        s.messages[:4], tokenize=False, add_generation_prompt=True, thinking_mode=TEMPLATE_MODE[mode]
    )
    assert prompt.endswith(MODE_SUFFIX[mode]) and text.startswith(prompt)
    # With one token per image, the ids are the tokenization of the whole text.
    enc = encode_sample(s, tok, [1, 1])
    assert enc.input_ids == tok.encode(text)
    # Loss on both assistant turns (content + <|im_end|>) and nothing else.
    trained = [t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label != IGNORE_INDEX]
    assert tok.decode(trained) == (reply + "<|im_end|>") * 2
    assert [label for label in enc.labels if label != IGNORE_INDEX] == trained


def test_images_expand_in_order(tok, root):
    messages = [{"role": "user", "content": "<image> vs <image>"}, {"role": "assistant", "content": "same"}]
    s = sample(root, messages, "non_thinking", ["a.png", "b.png"])
    enc = encode_sample(s, tok, [3, 7])
    first = enc.input_ids.index(IMAGE)
    assert enc.input_ids[first : first + 3] == [IMAGE] * 3 and enc.input_ids[first + 3] != IMAGE
    assert enc.input_ids.count(IMAGE) == 10
    second = first + 3 + enc.input_ids[first + 3 :].index(IMAGE)
    assert enc.input_ids[second : second + 7] == [IMAGE] * 7


def test_encode_samples_counts_tokens_with_the_processor(tok, root):
    processor = SizeProcessor()
    assert isinstance(processor, ImageProcessor)
    good = sample(root, [question(), {"role": "assistant", "content": "x"}], "non_thinking", ["a.png"])
    prompt_only = sample(root, [question()], "thinking", ["b.png"])
    (enc,), report = encode_samples([good, prompt_only], tok, processor, on_error="skip")
    assert enc.image_token_counts == [12] and enc.input_ids.count(IMAGE) == 12
    assert report.loaded == 1 and report.skipped == {"no_response": 1}
    with pytest.raises(DataError, match=r"^t\.jsonl:1: field 'messages': no assistant turn"):
        encode_samples([prompt_only], tok, processor)


def test_wrong_image_token_counts_raise(tok, root):
    s = sample(root, [question(), {"role": "assistant", "content": "x"}], "non_thinking", ["a.png"])
    with pytest.raises(DataError, match=r"^t\.jsonl:1: field 'images': 2 image token count\(s\)"):
        encode_sample(s, tok, [4, 4])
    with pytest.raises(DataError, match="each must be positive"):
        encode_sample(s, tok, [0])


def test_unreadable_image_is_located(tok, root):
    (root / "bad.png").write_bytes(b"not an image")
    s = sample(root, [question(), {"role": "assistant", "content": "x"}], "non_thinking", ["bad.png"])
    with pytest.raises(DataError, match=r"^t\.jsonl:1: field 'images\[0\]': cannot read image"):
        encode_samples([s], tok, SizeProcessor())
