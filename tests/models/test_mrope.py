"""Packed Qwen2.5-VL / Qwen3-VL forward (one row, mRoPE positions per sample) equals each sample run alone.

Tiny random configs, no download: 2 text layers (hidden 64), a 2-block vision tower (hidden 32, patch 2,
spatial merge 2; Qwen2.5-VL with window attention in block 0, Qwen3-VL with a deepstack layer).
"""

import pytest
import torch
from helpers import DEVICE, rel_err
from qwen_vl_models import IMAGE, make_samples, qwen2_5_vl, qwen3_vl

from r4b.models import mrope
from r4b.models.mrope import mm_token_type_ids, packed_mrope_position_ids, packed_vl_forward, use_varlen_attention


@pytest.fixture(scope="module", params=[qwen2_5_vl, qwen3_vl], ids=["qwen2_5_vl", "qwen3_vl"])
def model(request):
    torch.manual_seed(0)
    return request.param().to(DEVICE).float()


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
