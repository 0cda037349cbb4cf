"""Prompts to token ids: the chat template in a forced mode, with each image placeholder expanded to its token count.

The placeholder is the processor's (:func:`r4b.data.encode.image_placeholder`): R-4B's ``<image>``, or Qwen-VL's
``<|image_pad|>`` (its chat template renders ``<|vision_start|><|image_pad|><|vision_end|>`` per image), expanded
exactly as the SFT encoder does (:func:`r4b.data.encode.expand_image_tokens`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from r4b.data.encode import expand_image_tokens, image_placeholder
from r4b.data.image import ImageProcessor, decode_images
from r4b.format import MODE_SUFFIX, check_mode
from r4b.models.tokenizer import TEMPLATE_MODE

from .base import Prompt

__all__ = ["EncodedPrompt", "encode_for_generation", "encode_prompt", "render_prompt", "stop_token_ids"]


@dataclass
class EncodedPrompt:
    """A prompt ready for the model: ``ids`` with image tokens expanded, the decoded RGB ``images``, and
    ``template_ids``, the same prompt with one placeholder per image (``<image>``; Qwen-VL: ``<|image_pad|>``),
    what engines that expand images themselves, such as vLLM, take."""

    ids: list[int]
    images: list[Image.Image]
    template_ids: list[int] = field(default_factory=list)


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, Any]], mode: str, suffix: str | None = None) -> str:
    """The chat template's generation prompt in ``mode``; it ends with ``MODE_SUFFIX[mode]`` (checked), which
    ``suffix``, when given, replaces."""
    check_mode(mode)
    if messages and messages[-1]["role"] == "assistant":
        raise ValueError("the prompt's last message is an assistant turn: nothing left to generate")
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=True, thinking_mode=TEMPLATE_MODE[mode]
    )
    if not text.endswith(MODE_SUFFIX[mode]):
        raise ValueError(
            f"the tokenizer's chat template does not end the {mode} prompt with {MODE_SUFFIX[mode]!r}: "
            f"...{text[-40:]!r} (does it support thinking_mode={TEMPLATE_MODE[mode]!r}?)"
        )
    return text if suffix is None else text[: -len(MODE_SUFFIX[mode])] + suffix


def encode_prompt(
    tokenizer: Any, processor: ImageProcessor, prompt: Prompt, mode: str, suffix: str | None = None
) -> EncodedPrompt:
    """Token ids of ``prompt`` in ``mode``; each image placeholder becomes ``processor.num_image_tokens(h, w)``
    copies."""
    text = render_prompt(tokenizer, prompt.messages, mode, suffix)
    images = decode_images(prompt.images, where="prompt")  # already decoded ones are kept as they are
    placeholder = image_placeholder(processor)
    template_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    counts = [processor.num_image_tokens(image.height, image.width) for image in images]
    ids, seen = expand_image_tokens(template_ids, tokenizer.convert_tokens_to_ids(placeholder), counts)
    if seen != len(images):
        raise ValueError(f"the prompt has {seen} {placeholder} placeholder(s) for {len(images)} image(s)")
    return EncodedPrompt(ids, images, list(template_ids))


def encode_for_generation(
    tokenizer: Any, processor: ImageProcessor, prompts: Sequence[Prompt], *, n: int, mode: str, suffix: str | None
) -> list[EncodedPrompt]:
    """What every engine's ``generate`` starts with: ``mode`` and ``n`` checked, each prompt encoded in ``mode``
    (ending with ``suffix`` instead of the template's mode suffix when one is given)."""
    check_mode(mode)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [encode_prompt(tokenizer, processor, prompt, mode, suffix) for prompt in prompts]


def stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """The tokens that end a response: ``<|im_end|>`` and the tokenizer's eos (once each)."""
    stops = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    return tuple(dict.fromkeys(t for t in stops if t is not None))
