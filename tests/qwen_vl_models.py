"""Tiny random Qwen2.5-VL / Qwen3-VL models (no download) for the model, SFT and BPO tests: 2 text layers (hidden
64), a 2-block vision tower (hidden 32, patch 2, spatial merge 2; Qwen2.5-VL with window attention in block 0,
Qwen3-VL with a deepstack layer). ``make_samples`` builds packed-forward inputs for the bare models;
``save_tiny_qwen_vl`` writes a Hugging Face directory on r4b's tiny tokenizer plus Qwen's vision tokens."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import DEVICE
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from r4b.models.tokenizer import load_tokenizer

KINDS = ("qwen2_5_vl", "qwen3_vl")
TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, bos_token_id=None, eos_token_id=None,
)  # fmt: skip
VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2, spatial_merge_size=2,
              temporal_patch_size=2, out_hidden_size=64)  # fmt: skip
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# The bare models' vocabulary and vision tokens (make_samples)
VOCAB, IMAGE, VIDEO, VISION_START, VISION_END = 100, 90, 93, 91, 92
TOKENS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
              vision_end_token_id=VISION_END)  # fmt: skip
# Per sample: text before, image grids (t, h, w) in patches, text after. Sample 1 has no image.
SAMPLES = [(3, [(1, 4, 6)], 5), (2, [], 7), (1, [(1, 2, 2), (1, 4, 4)], 4)]


def tiny_qwen_vl(kind: str, *, vocab_size: int, max_position_embeddings: int, **tokens: int) -> torch.nn.Module:
    """A randomly initialised model of ``kind`` (the caller seeds torch)."""
    text = dict(TEXT, vocab_size=vocab_size, max_position_embeddings=max_position_embeddings)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    if kind == "qwen2_5_vl":
        config = Qwen2_5_VLConfig(
            text_config=dict(text, rope_parameters=rope),
            vision_config=dict(VISION, window_size=8, fullatt_block_indexes=[1]),  # 2x2 merged-token windows
            **tokens,
        )
        return Qwen2_5_VLForConditionalGeneration(config)
    config = Qwen3VLConfig(
        text_config=dict(text, rope_parameters=dict(rope, mrope_interleaved=True)),
        vision_config=dict(VISION, num_position_embeddings=16, deepstack_visual_indexes=[0]),
        **tokens,
    )
    return Qwen3VLForConditionalGeneration(config)


def qwen2_5_vl() -> torch.nn.Module:
    return tiny_qwen_vl("qwen2_5_vl", vocab_size=VOCAB, max_position_embeddings=512, **TOKENS)


def qwen3_vl() -> torch.nn.Module:
    return tiny_qwen_vl("qwen3_vl", vocab_size=VOCAB, max_position_embeddings=512, **TOKENS)


def make_samples(config, seed=1):
    """[(input_ids[n], image_grid_thw[k, 3] | None, pixel_values[patches, dim] | None)]: text, images, text."""
    gen = torch.Generator().manual_seed(seed)
    vision = config.vision_config
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    merge = vision.spatial_merge_size**2
    samples = []
    for before, grids, after in SAMPLES:
        ids = [torch.randint(0, 80, (before,), generator=gen)]
        for t, h, w in grids:
            image = [torch.tensor([VISION_START]), torch.full((t * h * w // merge,), IMAGE), torch.tensor([VISION_END])]
            ids += [*image, torch.randint(0, 80, (2,), generator=gen)]
        ids.append(torch.randint(0, 80, (after,), generator=gen))
        thw = torch.tensor(grids) if grids else None
        pixels = torch.randn(int(thw.prod(-1).sum()), patch_dim, generator=gen) if grids else None
        samples.append(tuple(None if x is None else x.to(DEVICE) for x in (torch.cat(ids), thw, pixels)))
    return samples


def save_tiny_qwen_vl(kind: str, out: Path, seed: int = 0) -> Path:
    """A Hugging Face directory of ``kind`` on the tiny tokenizer plus :data:`VISION_TOKENS`, with an image
    processor that shrinks the synthetic 56x56 pictures to 16x16 (8x8 patches: 16 image tokens)."""
    tokenizer = load_tokenizer()
    tokenizer.add_tokens(VISION_TOKENS, special_tokens=True)
    start, end, image, video = tokenizer.convert_tokens_to_ids(VISION_TOKENS)
    tokens = dict(image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end)
    torch.manual_seed(seed)
    model = tiny_qwen_vl(kind, vocab_size=912, max_position_embeddings=2048, **tokens)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    Qwen2VLImageProcessorPil(
        patch_size=2, merge_size=2, temporal_patch_size=2, min_pixels=64, max_pixels=256
    ).save_pretrained(out)
    return out
