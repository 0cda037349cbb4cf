"""One call to get (model, tokenizer, image processor) for training, and the matching export."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import load_r4b, save_pretrained_r4b
from .image_processing import RImageProcessor
from .r4b_model import RForConditionalGeneration
from .tiny import build_tiny_r4b
from .tokenizer import IMAGE_TOKEN, load_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_model_and_processor(
    path: str | Path | None = None, tokenizer: str | Path | None = None, seed: int = 0, **kwargs
) -> tuple[RForConditionalGeneration, object, RImageProcessor]:
    """``path=None``: the tiny R-4B initialised from ``seed``; else an R-4B directory through :func:`load_r4b`
    (``kwargs`` pass to ``from_pretrained``). The tokenizer comes from ``tokenizer``, else the model directory
    when it has one, else the shipped tiny tokenizer; the processor from the config (and preprocessor_config.json)."""
    if tokenizer is None and path is not None and any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        tokenizer = path
    tok = load_tokenizer(tokenizer)
    if path is None:
        model = build_tiny_r4b(seed, tok)
        processor = RImageProcessor.from_config(model.config)
    else:
        model = load_r4b(path, **kwargs)
        processor = RImageProcessor.from_pretrained(path, model.config)
    if len(tok) > model.config.text_config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tok)} tokens, more than the model's vocab_size {model.config.text_config.vocab_size}"
        )
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id != model.config.image_token_id:
        raise ValueError(
            f"tokenizer's <image> id {image_id} != the model's image_token_index {model.config.image_token_id}"
        )
    return model, tok, processor


def save_model(
    model: RForConditionalGeneration, out: str | Path, tokenizer=None, processor: RImageProcessor | None = None
) -> Path:
    """Export a self-contained R-4B directory (weights in R-4B's layout, config, tokenizer, preprocessor config)."""
    processor = processor if processor is not None else RImageProcessor.from_config(model.config)
    return save_pretrained_r4b(model, out, tokenizer, processor=processor)
