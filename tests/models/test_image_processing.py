"""AnyRes preprocessing without torchvision; num_image_tokens equals the features the model really produces."""

import numpy as np
import pytest
import torch
from PIL import Image

from r4b.models.image_processing import RImageProcessor
from r4b.models.tiny import TINY_IMAGE_SIZE, tiny_r4b_config


@pytest.fixture(scope="module")
def model(tiny_r4b):
    return tiny_r4b


def random_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def random_sizes(count, seed):
    rng = np.random.default_rng(seed)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 400, (count, 2))]
    extreme = [(1, 1), (1, 500), (500, 1), (3, 900), (900, 3), (10, 100), (100, 10), (28, 28), (56, 28), (29, 57)]
    return sizes + extreme


def produced_feature_counts(model, processor, sizes):
    """Features per image from the model's own get_image_features; also runs a full forward with every
    ``<image>`` expanded to ``num_image_tokens`` (LLaVA-OneVision checks the placeholder count)."""
    inputs = processor.preprocess(random_images(sizes))
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
        image_id = model.config.image_token_id
        ids = torch.cat([torch.tensor([10] + [image_id] * processor.num_image_tokens(h, w)) for h, w in sizes])
        logits = model(input_ids=ids[None], **inputs).logits
    assert logits.shape == (1, len(ids), model.config.text_config.vocab_size) and torch.isfinite(logits).all()
    return [f.shape[0] for f in features.pooler_output]


@pytest.mark.parametrize("aspect", ["anyres_max_9", "anyres_max_1"])
def test_num_image_tokens_matches_pack_image_features(model, aspect):
    """anyres_max_1 exercises LLaVA-OneVision's downscale branch (ratio > 1.1) as well."""
    if aspect != model.config.vision_aspect_ratio:
        config = tiny_r4b_config()
        config.vision_aspect_ratio = aspect
        model = type(model)(config).eval()
    processor = RImageProcessor.from_config(model.config)
    sizes = random_sizes(40, seed=len(aspect))
    expected = [processor.num_image_tokens(h, w) for h, w in sizes]
    assert produced_feature_counts(model, processor, sizes) == expected
    assert len(set(expected)) > 3  # the sizes really cover different grids
    if aspect == "anyres_max_1":  # the downscale branch was taken for some images
        no_downscale = RImageProcessor.from_config(model.config, vision_aspect_ratio="anyres_max_9")
        assert any(n < no_downscale.num_image_tokens(h, w) for n, (h, w) in zip(expected, sizes, strict=True))


def test_preprocess_shapes_and_values():
    processor = RImageProcessor.from_config(tiny_r4b_config())
    sizes = [(10, 100), (50, 40), (20, 20)]
    out = processor.preprocess(random_images(sizes))
    tiles = [processor.num_tiles(h, w) for h, w in sizes]
    assert out["pixel_values"].shape == (3, max(tiles), 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    assert out["pixel_values"].dtype == torch.float32
    assert out["image_sizes"].tolist() == [list(s) for s in sizes]
    for i, n in enumerate(tiles):  # padding tiles are zero, real tiles normalised into [-1, 1]
        assert out["pixel_values"][i, n:].abs().sum() == 0
        assert out["pixel_values"][i, :n].abs().max() <= 1.0 + 1e-6


def test_preprocess_converts_to_rgb_and_refuses_bad_input():
    processor = RImageProcessor.from_config(tiny_r4b_config())
    gray = Image.fromarray(np.zeros((30, 40), dtype=np.uint8))
    assert processor.preprocess([gray])["pixel_values"].shape[2] == 3
    with pytest.raises(ValueError, match="at least one image"):
        processor.preprocess([])
    with pytest.raises(TypeError, match=r"not a PIL\.Image"):
        processor.preprocess([np.zeros((4, 4, 3))])
    with pytest.raises(ValueError, match="not a multiple of the tile size"):
        RImageProcessor(image_size=28, patch_size=14, image_grid_pinpoints=[[28, 30]])
