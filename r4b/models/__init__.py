"""Model-side glue: r4b's kernels plugged into stock transformers model classes."""

from .attention import ATTENTION_NAME, register_varlen_attention
from .checkpoint import (
    LEGACY_KEY_MAPPING,
    R4B_KEY_PREFIXES,
    checkpoint_keys,
    load_r4b,
    r4b_state_dict,
    save_pretrained_r4b,
)
from .image_processing import RImageProcessor
from .loading import load_model_and_processor, save_model
from .model_card import update_model_card, write_model_card
from .packed import packed_hidden_states, use_varlen_language_model
from .r4b_model import RConfig, RForConditionalGeneration, RModel, RMultiModalProjector, register_r4b_model
from .tiny import build_tiny_r4b, tiny_r4b_config

__all__ = [
    "ATTENTION_NAME",
    "LEGACY_KEY_MAPPING",
    "R4B_KEY_PREFIXES",
    "RConfig",
    "RForConditionalGeneration",
    "RImageProcessor",
    "RModel",
    "RMultiModalProjector",
    "build_tiny_r4b",
    "checkpoint_keys",
    "load_model_and_processor",
    "load_r4b",
    "packed_hidden_states",
    "r4b_state_dict",
    "register_r4b_model",
    "register_varlen_attention",
    "save_model",
    "save_pretrained_r4b",
    "tiny_r4b_config",
    "update_model_card",
    "use_varlen_language_model",
    "write_model_card",
]
