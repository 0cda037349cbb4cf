"""JSONL file to packed batches: the whole r4b.data path on the tiny tokenizer."""

from __future__ import annotations

import json

from PIL import Image

from r4b.data import IGNORE_INDEX, encode_samples, pack, read_jsonl
from r4b.format import format_response
from r4b.models.tokenizer import load_tokenizer

THINK, THINK_CLOSE, NL, NL2, IM_END = 902, 903, 202, 659, 2


class FixedProcessor:
    def num_image_tokens(self, height: int, width: int) -> int:
        return 6

    def preprocess(self, images):
        return {"pixel_values": None, "image_sizes": [im.size[::-1] for im in images]}


def test_jsonl_to_packed_batches(tmp_path):
    Image.new("RGB", (5, 5)).save(tmp_path / "a.png")
    records = []
    for i in range(24):
        thinking = i % 3 == 0
        reply = format_response(str(i), f"Count {i}.") if thinking else str(i)
        records.append(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"q{i}"}]},
                    {"role": "assistant", "content": reply},
                ],
                "images": ["a.png"],
                "mode": "thinking" if thinking else "non_thinking",
            }
        )
    records.insert(5, {"messages": [], "mode": "thinking"})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    samples, read_report = read_jsonl(tmp_path / "train.jsonl", on_error="skip")
    assert read_report.loaded == 24 and read_report.skipped == {"bad_type": 1}
    encoded, enc_report = encode_samples(samples, load_tokenizer(), FixedProcessor(), mask_empty_think=True)
    assert enc_report.loaded == 24

    # Shifted targets: the position before <think> predicts <think>; in a thinking sample the <think>
    # position predicts "\n" (the mode decision), in a masked non-thinking sample nothing until the answer.
    (batch,), _ = pack(encoded[:2], 4096)
    ids, labels = batch.input_ids.tolist(), batch.targets.tolist()
    for s, index in enumerate(batch.sample_indices):
        lo, hi = batch.cu_seqlens_host[s], batch.cu_seqlens_host[s + 1]
        think = ids.index(THINK, lo, hi)
        if encoded[index].mode == "thinking":
            assert labels[think - 1 : think + 1] == [THINK, NL]
        else:
            assert labels[think - 1 : think + 3] == [IGNORE_INDEX] * 4 and labels[think + 3] not in (IGNORE_INDEX,)
        assert labels[hi - 3 : hi] == [IM_END, IGNORE_INDEX, IGNORE_INDEX]  # <|im_end|> predicted, then "\n", end
