"""Packed Qwen2.5-VL / Qwen3-VL forward (one row, mRoPE positions per sample) equals each sample run alone.

Tiny random configs, no download: 2 text layers (hidden 64), a 2-block vision tower (hidden 32, patch 2,
spatial merge 2; Qwen2.5-VL with window attention in block 0, Qwen3-VL with a deepstack layer).
"""

import pytest
import torch
from helpers import DEVICE, rel_err
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from r4b.models import mrope
from r4b.models.mrope import mm_token_type_ids, packed_mrope_position_ids, packed_vl_forward, use_varlen_attention

VOCAB, IMAGE, VIDEO, VISION_START, VISION_END = 100, 90, 93, 91, 92
TEXT = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
)  # fmt: skip
VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2, spatial_merge_size=2,
              temporal_patch_size=2, out_hidden_size=64)  # fmt: skip
TOKENS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
              vision_end_token_id=VISION_END)  # fmt: skip
# Per sample: text before, image grids (t, h, w) in patches, text after. Sample 1 has no image.
SAMPLES = [(3, [(1, 4, 6)], 5), (2, [], 7), (1, [(1, 2, 2), (1, 4, 4)], 4)]


def qwen2_5_vl():
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    config = Qwen2_5_VLConfig(
        text_config=dict(TEXT, rope_parameters=rope),
        vision_config=dict(VISION, window_size=8, fullatt_block_indexes=[1]),  # 2x2 merged-token windows
        **TOKENS,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def qwen3_vl():
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    config = Qwen3VLConfig(
        text_config=dict(TEXT, rope_parameters=rope),
        vision_config=dict(VISION, num_position_embeddings=16, deepstack_visual_indexes=[0]),
        **TOKENS,
    )
    return Qwen3VLForConditionalGeneration(config)


@pytest.fixture(scope="module", params=[qwen2_5_vl, qwen3_vl], ids=["qwen2_5_vl", "qwen3_vl"])
def model(request):
    torch.manual_seed(0)
    return request.param().to(DEVICE).float()


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


def per_sample_reference(model, samples):
    """Each sample alone through the stock model (sdpa everywhere, positions from the model's own get_rope_index)."""
    model.set_attn_implementation("sdpa")
    hidden = []
    for ids, thw, pixels in samples:
        extra = {}
        if thw is not None:
            extra = dict(
                pixel_values=pixels, image_grid_thw=thw, mm_token_type_ids=mm_token_type_ids(model.config, ids)[None]
            )
        hidden.append(model.model(input_ids=ids[None], **extra).last_hidden_state[0])
    return torch.cat(hidden)


def packed(model, samples, position_ids):
    ids = torch.cat([s[0] for s in samples])
    lengths = torch.tensor([len(s[0]) for s in samples])
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)]).to(DEVICE)
    thw = torch.cat([s[1] for s in samples if s[1] is not None])
    pixels = torch.cat([s[2] for s in samples if s[2] is not None])
    out = packed_vl_forward(model, ids, position_ids, cu, int(lengths.max()), pixel_values=pixels, image_grid_thw=thw)
    return out.last_hidden_state[0]


@pytest.fixture(params=["mm_encoder_outputs", "own_scatter"])
def vision_path(request, monkeypatch):
    """How packed_vl_forward hands the images over: ``mm_encoder_outputs`` to the model's forward where it takes them
    (transformers 5.24), else its own scatter into the embeddings and the language model call (5.17; forced here)."""
    if request.param == "own_scatter":
        monkeypatch.setattr(mrope, "accepts_mm_encoder_outputs", lambda base: False)
    elif not mrope.accepts_mm_encoder_outputs(mrope.base_vl_model(request.getfixturevalue("model"))):
        pytest.skip("this transformers' Qwen-VL forward has no mm_encoder_outputs")
    return request.param


def test_packed_forward_and_backward_match_per_sample(model, vision_path):
    samples = make_samples(model.config)
    n = sum(len(s[0]) for s in samples)
    weights = torch.randn(n, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(2)).to(
        DEVICE
    )

    model.zero_grad()
    reference = per_sample_reference(model, samples)
    (reference * weights).sum().backward()
    grads_ref = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert any(name.startswith("model.visual.") for name in grads_ref)

    model.zero_grad()
    use_varlen_attention(model)  # language model and vision tower on r4b_varlen
    positions = packed_mrope_position_ids(model, [s[0] for s in samples], [s[1] for s in samples])
    hidden = packed(model, samples, positions)
    (hidden * weights).sum().backward()

    assert rel_err(hidden, reference) < 1e-5
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads_ref.items():
        assert rel_err(grads[name], grad) < 1e-5, name


def test_stock_sdpa_packs_with_text_position_row(model):
    """[4, N] positions (text row first) let the stock sdpa path see the packing too; r4b_varlen ignores the row."""
    samples = make_samples(model.config, seed=3)
    with torch.no_grad():
        reference = per_sample_reference(model, samples)
        positions = packed_mrope_position_ids(
            model.config, [s[0] for s in samples], [s[1] for s in samples], text_positions=True
        )
        model.set_attn_implementation("sdpa")
        assert rel_err(packed(model, samples, positions), reference) < 1e-5
        assert rel_err(packed(model, samples, positions[1:]), reference) > 1e-2  # [3, N]: sdpa attends across samples
        use_varlen_attention(model, vision="sdpa")
        assert rel_err(packed(model, samples, positions), reference) < 1e-5
        assert rel_err(packed(model, samples, positions[1:]), reference) < 1e-5


def test_positions_restart_per_sample_and_matter(model):
    samples = make_samples(model.config, seed=4)
    ids, grids = [s[0] for s in samples], [s[1] for s in samples]
    positions = packed_mrope_position_ids(model, ids, grids)
    assert torch.equal(positions, packed_mrope_position_ids(model.config, ids, grids))
    start = 0
    for sample_ids, thw, _ in samples:
        span = positions[:, start : start + len(sample_ids)]
        if thw is None:
            assert torch.equal(span, torch.arange(len(sample_ids), device=DEVICE).expand(3, -1))
        else:
            own, _ = model.model.get_rope_index(
                sample_ids[None], mm_token_type_ids(model.config, sample_ids)[None], image_grid_thw=thw
            )
            assert torch.equal(span, own[:, 0])
            assert not torch.equal(span[0], span[1])  # image tokens really get 3-D positions
        start += len(sample_ids)
    # The test above is sensitive to positions: plain 1-D positions over the row give other hidden states.
    with torch.no_grad():
        use_varlen_attention(model)
        good = packed(model, samples, positions)
        flat = torch.cat([torch.arange(len(i), device=DEVICE) for i in ids]).expand(3, -1)
        assert rel_err(packed(model, samples, flat), good) > 1e-3


def test_bad_grids_are_reported(model):
    ids, thw, _ = make_samples(model.config)[0]
    with pytest.raises(ValueError, match="sample 1: 6 image placeholder tokens but image_grid_thw None needs 0"):
        packed_mrope_position_ids(model, [ids[:3], ids], [None, None])
    with pytest.raises(ValueError, match="sample 0: 6 image placeholder tokens"):
        packed_mrope_position_ids(model, [ids], [thw.repeat(2, 1)])
    with pytest.raises(ValueError, match="image_grid_thw_per_sample has 1 entries for 2 samples"):
        packed_mrope_position_ids(model, [ids, ids], [thw])


def test_images_change_the_hidden_states(model, vision_path):
    """The packed forward feeds the images in: other pixel_values, other hidden states in the samples with images
    (and the same in the text-only one). Transformers 5.17's Qwen-VL forward has no ``mm_encoder_outputs``: handed
    to it, they vanished into ``**kwargs`` and the hidden states did not depend on the pixels."""
    samples = make_samples(model.config, seed=5)
    gen = torch.Generator().manual_seed(6)
    perturbed = [
        (ids, thw, None if px is None else px + torch.randn(px.shape, generator=gen).to(DEVICE))
        for ids, thw, px in samples
    ]
    use_varlen_attention(model)
    positions = packed_mrope_position_ids(model, [s[0] for s in samples], [s[1] for s in samples])
    with torch.no_grad():
        hidden, other = packed(model, samples, positions), packed(model, perturbed, positions)
    start = 0
    for ids, thw, _ in samples:
        span = slice(start, start + len(ids))
        first_image = int((ids == IMAGE).nonzero()[0]) if thw is not None else len(ids)
        before = slice(start, start + first_image)
        assert torch.equal(hidden[before], other[before])  # causal: nothing before the first image moves
        if thw is not None:
            assert rel_err(other[span], hidden[span]) > 1e-2
        start += len(ids)
