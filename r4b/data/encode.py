"""Samples to token ids and labels: the chat template for the prompt, R-4B's format for the responses.

The text of a sample is exactly what the tokenizer's chat template renders for the whole conversation:
each assistant turn is ``<|im_start|>assistant\\n`` + formatted content + ``<|im_end|>\\n``, and the text
before it is ``tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, thinking_mode=...)``
without the trailing mode suffix (the suffix opens the assistant content). Loss is on every assistant
turn's content and its ``<|im_end|>``; never on system or user turns or template tokens. With
``mask_empty_think`` (the paper's non-thinking loss masking), a non-thinking turn's
``<think>\\n\\n</think>\\n\\n`` is input only.

Each assistant turn is tokenized as two pieces, the think block through ``</think>\\n\\n`` and the answer
through ``<|im_end|>``, so the masked span always ends on a token boundary; both pieces start at a special
token, so this is what tokenizing the whole text gives in all ordinary cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from r4b.data.errors import DataError
from r4b.data.image import ImageProcessor, image_token_counts
from r4b.data.report import DataReport
from r4b.data.schema import Sample
from r4b.format import MODE_SUFFIX, THINK_CLOSE
from r4b.models.tokenizer import IMAGE_TOKEN, TEMPLATE_MODE

__all__ = [
    "IGNORE_INDEX",
    "EncodedSample",
    "encode_sample",
    "encode_samples",
    "expand_image_tokens",
    "image_placeholder",
    "render_segments",
]

IGNORE_INDEX = -100
IM_END = "<|im_end|>"

# A piece of the rendered text and its role: "prompt" (no loss), "think" (loss unless masked), "answer" (loss).
Segment = tuple[str, Literal["prompt", "think", "answer"]]


@dataclass
class EncodedSample:
    """A tokenized sample. ``labels[t]`` is ``input_ids[t]`` where token t is trained on, else -100 (unshifted).

    ``input_ids`` has each ``<image>`` expanded to ``image_token_counts[k]`` copies of the ``<image>`` id.
    """

    input_ids: list[int]
    labels: list[int]
    images: list[Path] = field(default_factory=list)
    image_token_counts: list[int] = field(default_factory=list)
    mode: str = "non_thinking"
    source: str = "<memory>"

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def render_segments(sample: Sample, tokenizer: Any) -> list[Segment]:
    """The sample's full text, cut into prompt / think / answer pieces (their concatenation is the text)."""
    if not sample.has_response:
        raise DataError(sample.source, "no assistant turn to train on", field="messages", reason="no_response")
    suffix, template_mode = MODE_SUFFIX[sample.mode], TEMPLATE_MODE[sample.mode]
    segments: list[Segment] = []
    rendered = ""
    for i, message in enumerate(sample.messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(
            sample.messages[:i], tokenize=False, add_generation_prompt=True, thinking_mode=template_mode
        )
        if not prompt.startswith(rendered) or not prompt.endswith(suffix):
            raise DataError(
                sample.source,
                f"the chat template's prompt for this turn does not extend the previous turns and end with {suffix!r}",
                field=f"messages[{i}]",
                reason="template_mismatch",
            )
        content = message["content"]  # validated by the schema: starts with the mode suffix
        think_end = content.index(THINK_CLOSE) + len(THINK_CLOSE) + 2  # through "</think>\n\n"
        segments.append((prompt[len(rendered) : len(prompt) - len(suffix)], "prompt"))
        segments.append((content[:think_end], "think"))
        segments.append((content[think_end:] + IM_END, "answer"))
        segments.append(("\n", "prompt"))
        rendered = prompt[: len(prompt) - len(suffix)] + content + IM_END + "\n"
    return segments


def image_placeholder(processor: ImageProcessor | None) -> str:
    """The token the chat template renders once per image and that is expanded to the image's token count:
    ``processor.image_token`` when the processor has one (Qwen-VL: ``<|image_pad|>``), else R-4B's ``<image>``."""
    return getattr(processor, "image_token", IMAGE_TOKEN)


def expand_image_tokens(ids: Sequence[int], image_id: int, counts: Sequence[int]) -> tuple[list[int], int]:
    """``ids`` with the k-th ``image_id`` repeated ``counts[k]`` times, and how many placeholders there were.

    Placeholders beyond ``len(counts)`` are dropped but counted, so that the caller can report the mismatch
    (it compares the count with its number of images).
    """
    out: list[int] = []
    found = 0
    for token in ids:
        if token != image_id:
            out.append(token)
            continue
        if found < len(counts):
            out.extend([image_id] * int(counts[found]))
        found += 1
    return out, found


def encode_sample(
    sample: Sample,
    tokenizer: Any,
    image_token_counts: Sequence[int],
    *,
    mask_empty_think: bool = False,
    image_token: str = IMAGE_TOKEN,
) -> EncodedSample:
    """Tokenize ``sample`` for supervised training.

    Args:
        sample: a validated sample with at least one assistant turn.
        tokenizer: a Hugging Face tokenizer with the R-4B chat template (``thinking_mode`` switch).
        image_token_counts: tokens per image, in order (from ``ImageProcessor.num_image_tokens``).
        mask_empty_think: no loss on ``<think>\\n\\n</think>\\n\\n`` of non-thinking turns.
        image_token: the placeholder token the chat template renders once per image and that is expanded to
            the image's count (R-4B: ``<image>``; Qwen-VL: ``<|image_pad|>``, the processor's ``image_token``).
    """
    counts = [int(count) for count in image_token_counts]
    if len(counts) != len(sample.images) or any(count <= 0 for count in counts):
        raise DataError(
            sample.source,
            f"{len(counts)} image token count(s) {counts} for {len(sample.images)} image(s); each must be positive",
            field="images",
            reason="image_count_mismatch",
        )
    segments = render_segments(sample, tokenizer)
    pieces = tokenizer([text for text, _ in segments], add_special_tokens=False)["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    mask_think = mask_empty_think and sample.mode == "non_thinking"
    input_ids: list[int] = []
    labels: list[int] = []
    images_seen = 0
    for (_, role), ids in zip(segments, pieces, strict=True):
        trained = role == "answer" or (role == "think" and not mask_think)
        if image_id in ids and role != "prompt":  # the schema rules this out; a check, not a branch
            raise DataError(sample.source, "image token in a response", field="messages", reason="bad_format")
        expanded, found = expand_image_tokens(ids, image_id, counts[images_seen:])
        images_seen += found
        input_ids.extend(expanded)
        labels.extend(expanded if trained else [IGNORE_INDEX] * len(expanded))  # trained pieces hold no image
    if images_seen != len(counts):
        raise DataError(
            sample.source,
            f"the rendered text has {images_seen} {image_token} token(s) for {len(counts)} image(s)",
            field="images",
            reason="image_count_mismatch",
        )
    return EncodedSample(input_ids, labels, list(sample.images), counts, sample.mode, sample.source)


def encode_samples(
    samples: Sequence[Sample],
    tokenizer: Any,
    processor: ImageProcessor,
    *,
    mask_empty_think: bool = False,
    on_error: Literal["raise", "skip"] = "raise",
) -> tuple[list[EncodedSample], DataReport]:
    """Encode many samples, reading each image's size to count its tokens with ``processor``.

    With ``on_error="skip"`` a sample that fails (unreadable image, no assistant turn, ...) is counted in
    the report by reason instead of raising. The placeholder token is ``processor.image_token`` when the
    processor has one, else ``<image>``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    encoded: list[EncodedSample] = []
    report = DataReport()
    image_token = image_placeholder(processor)
    for sample in samples:
        try:
            counts = image_token_counts(sample.images, processor, where=sample.source)
            encoded.append(
                encode_sample(sample, tokenizer, counts, mask_empty_think=mask_empty_think, image_token=image_token)
            )
        except DataError as error:
            if on_error == "raise":
                raise
            report.skip(error)
    report.loaded = len(encoded)
    return encoded, report
