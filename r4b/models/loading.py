"""One call to get (model, tokenizer, image processor) for training, and the matching export.

Model families, by the directory's config.json ``model_type``: R-4B (``rvl``, and the embedded tiny default when
there is no directory) and Qwen2.5-VL / Qwen3-VL (``qwen2_5_vl`` / ``qwen3_vl``, see :mod:`r4b.models.qwen_vl`).
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import load_r4b, save_pretrained_r4b
from .image_processing import RImageProcessor
from .qwen_vl import (
    QWEN_VL_MODEL_TYPES,
    QwenVLImageProcessor,
    is_qwen_vl,
    load_qwen_vl,
    model_type_of,
    prepare_qwen_vl_tokenizer,
    save_qwen_vl,
)
from .r4b_model import RForConditionalGeneration, register_r4b_model
from .tiny import build_tiny_r4b
from .tokenizer import IMAGE_TOKEN, load_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_model_and_processor(
    path: str | Path | None = None, tokenizer: str | Path | None = None, seed: int = 0, **kwargs
) -> tuple[RForConditionalGeneration, object, RImageProcessor | QwenVLImageProcessor]:
    """``path=None``: the tiny R-4B initialised from ``seed``; a Qwen2.5-VL / Qwen3-VL directory: the stock
    transformers model with r4b's prompt template on its tokenizer (:func:`~r4b.models.qwen_vl.load_qwen_vl`);
    else an R-4B directory through :func:`load_r4b` (``kwargs`` pass to ``from_pretrained``). The tokenizer comes
    from ``tokenizer``, else the model directory when it has one, else the shipped tiny tokenizer; the processor
    from the config (and preprocessor_config.json)."""
    tok = _tokenizer(path, tokenizer)
    if model_type_of(path) in QWEN_VL_MODEL_TYPES:
        return load_qwen_vl(path, tok, **kwargs)
    if path is None:
        model = build_tiny_r4b(seed, tok)
        processor = RImageProcessor.from_config(model.config)
    else:
        model = load_r4b(path, **kwargs)
        processor = RImageProcessor.from_pretrained(path, model.config)
    check_r4b_tokenizer(tok, model.config)
    return model, tok, processor


def load_tokenizer_and_processor(path: str | Path, tokenizer: str | Path | None = None) -> tuple[object, object]:
    """The tokenizer and image processor of a model directory, without its weights: what an engine that loads
    the weights itself (vLLM) needs from r4b. Same sources and checks as :func:`load_model_and_processor`."""
    from transformers import AutoConfig

    register_r4b_model()
    tok = _tokenizer(path, tokenizer)
    config = AutoConfig.from_pretrained(str(path))
    if is_qwen_vl(config):
        return prepare_qwen_vl_tokenizer(tok, config), QwenVLImageProcessor.from_pretrained(path, config)
    check_r4b_tokenizer(tok, config)
    return tok, RImageProcessor.from_pretrained(path, config)


def check_r4b_tokenizer(tokenizer: object, config: object) -> None:
    """The tokenizer must fit the R-4B model: vocabulary size and the ``<image>`` id."""
    vocab = config.text_config.vocab_size
    if len(tokenizer) > vocab:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size {vocab}")
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id != config.image_token_id:
        raise ValueError(f"tokenizer's <image> id {image_id} != the model's image_token_index {config.image_token_id}")


def _tokenizer(path: str | Path | None, tokenizer: str | Path | None) -> object:
    """``tokenizer``, else the model directory's when it has one, else the shipped tiny tokenizer."""
    if tokenizer is None and path is not None and any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        tokenizer = path
    return load_tokenizer(tokenizer)


def save_model(model, out: str | Path, tokenizer=None, processor=None) -> Path:
    """Export a self-contained directory: R-4B in R-4B's layout (weights, config, tokenizer, preprocessor config);
    Qwen2.5-VL / Qwen3-VL with their own ``save_pretrained`` (:func:`~r4b.models.qwen_vl.save_qwen_vl`)."""
    if is_qwen_vl(model):
        return save_qwen_vl(model, out, tokenizer, processor)
    processor = processor if processor is not None else RImageProcessor.from_config(model.config)
    return save_pretrained_r4b(model, out, tokenizer, processor=processor)
