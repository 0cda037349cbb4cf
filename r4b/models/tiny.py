"""The tiny R-4B (a few hundred thousand parameters) that the demo and the tests run: same classes as the real one."""

from __future__ import annotations

import torch
from transformers import Qwen3Config, SiglipVisionConfig

from .r4b_model import RConfig, RForConditionalGeneration
from .tokenizer import IMAGE_TOKEN, load_tokenizer

TINY_IMAGE_SIZE = 28  # one tile: 2 x 2 patches of 14 pixels -> 4 tokens
TINY_GRID_PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]


def tiny_r4b_config(tokenizer=None, head_dim: int = 32) -> RConfig:
    """R-4B's architecture at toy size over the shipped tiny tokenizer (or ``tokenizer``); ``head_dim``: the text
    attention's, 32 by default so that vLLM's CPU attention (32 and up) runs it too."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    vocab_size = -(-len(tokenizer) // 8) * 8
    text = Qwen3Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    vision = SiglipVisionConfig(
        image_size=TINY_IMAGE_SIZE, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, vision_use_head=False,
    )  # fmt: skip
    return RConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=[list(p) for p in TINY_GRID_PINPOINTS],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
        architectures=["RForConditionalGeneration"],
    )


def build_tiny_r4b(seed: int = 0, tokenizer=None, head_dim: int = 32) -> RForConditionalGeneration:
    """A freshly initialised tiny R-4B in fp32; the weights depend only on ``seed`` (global RNG state untouched)."""
    config = tiny_r4b_config(tokenizer, head_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RForConditionalGeneration(config)
    return model.eval()
