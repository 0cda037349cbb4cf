"""R-4B in transformers' LLaVA-OneVision family: architecture, checkpoint layout, packed training forward."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import max_abs, rel_err
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForImageTextToText

from r4b.models import (
    R4B_KEY_PREFIXES,
    RConfig,
    RForConditionalGeneration,
    RImageProcessor,
    RMultiModalProjector,
    build_tiny_r4b,
    checkpoint_keys,
    load_model_and_processor,
    load_r4b,
    packed_hidden_states,
    r4b_state_dict,
    register_r4b_model,
    save_model,
    save_pretrained_r4b,
    tiny_r4b_config,
)
from r4b.models.tokenizer import load_tokenizer

IMAGE_ID = 3


@pytest.fixture(scope="module")
def model(tiny_r4b):
    return tiny_r4b


@pytest.fixture(scope="module")
def processor(model):
    return RImageProcessor.from_config(model.config)


def make_samples(processor, specs, seed=0):
    """specs: per sample, (text length, [image (h, w), ...]); each <image> expanded to its token count."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    samples, images = [], []
    for text_len, sizes in specs:
        parts = [torch.randint(10, 900, (text_len,), generator=gen)]
        for h, w in sizes:
            images.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
            parts += [torch.full((processor.num_image_tokens(h, w),), IMAGE_ID), torch.randint(10, 900, (2,))]
        samples.append(torch.cat(parts))
    vision = processor.preprocess(images) if images else {}
    return samples, vision


def padded_batch(samples):
    width = max(len(s) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return ids, mask


def packed_batch(samples):
    lengths = [len(s) for s in samples]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])
    return dict(input_ids=torch.cat(samples), position_ids=positions, cu_seqlens=cu, max_seqlen=max(lengths))


def test_architecture(model):
    assert isinstance(model.config, RConfig) and model.config.model_type == "rvl"
    assert model.config.text_config.model_type == "qwen3"
    assert model.config.vision_config.model_type == "siglip_vision_model"
    assert model.config.vision_feature_select_strategy == "full"
    projector = model.model.multi_modal_projector
    assert isinstance(projector, RMultiModalProjector)
    assert projector.pre_norm.eps == 1e-6 and projector.pre_norm.normalized_shape == (32,)
    assert (projector.linear_1.in_features, projector.linear_1.out_features) == (32, 64)
    assert projector.linear_2.bias is not None and projector.linear_1.bias is not None
    assert model.model.image_newline.shape == (64,)
    assert model.config.image_token_id == IMAGE_ID
    assert model.config.text_config.vocab_size == 904 == len(load_tokenizer())
    assert model.lm_head.weight is not model.get_input_embeddings().weight  # untied
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


def test_tiny_is_deterministic_in_the_seed():
    a, b, c = build_tiny_r4b(seed=0), build_tiny_r4b(seed=0), build_tiny_r4b(seed=1)
    state_a, state_b, state_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not torch.equal(state_a["model.image_newline"], state_c["model.image_newline"])


def test_register_is_idempotent():
    register_r4b_model()
    register_r4b_model()
    assert type(AutoConfig.for_model("rvl")) is RConfig
    assert AutoModelForImageTextToText.from_config(tiny_r4b_config()).__class__ is RForConditionalGeneration


def expected_key_names(model):
    """R-4B's checkpoint names, written out independently of r4b_state_dict."""
    names = set()
    for name in model.state_dict():
        if name.startswith("model.vision_tower."):
            name = "model.vision_tower.vision_model." + name[len("model.vision_tower.") :]
        names.add(name)
    return names


def test_save_load_round_trip(model, processor, tmp_path):
    register_r4b_model()
    tokenizer = load_tokenizer()
    first, second = tmp_path / "a", tmp_path / "b"
    save_pretrained_r4b(model, first, tokenizer, processor=processor)
    save_pretrained_r4b(model, second, tokenizer, processor=processor)

    config = json.loads((first / "config.json").read_text())
    assert config["architectures"] == ["RForConditionalGeneration"] and config["model_type"] == "rvl"
    keys = set(checkpoint_keys(first))
    assert keys == expected_key_names(model)
    projector = {
        f"model.multi_modal_projector.{m}.{p}" for m in ("pre_norm", "linear_1", "linear_2") for p in ("weight", "bias")
    }
    assert {k for k in keys if "multi_modal_projector" in k} == projector
    assert {"model.image_newline", "lm_head.weight", "model.language_model.embed_tokens.weight"} <= keys
    assert all(k.startswith(R4B_KEY_PREFIXES) for k in keys)
    files = sorted(p.name for p in first.iterdir())
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= set(files)
    assert files == sorted(p.name for p in second.iterdir())
    for name in files:  # saving twice gives identical files
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    reloaded = AutoModelForImageTextToText.from_pretrained(first).eval()
    assert type(reloaded) is RForConditionalGeneration
    assert reloaded.lm_head.weight is not reloaded.get_input_embeddings().weight
    samples, vision = make_samples(processor, [(5, [(40, 90)])])
    ids = samples[0][None]
    with torch.no_grad():
        expected = model(input_ids=ids, **vision).logits
        got = reloaded(input_ids=ids, **vision).logits
    assert torch.equal(got, expected)

    with torch.no_grad():  # and the packed forward of the reloaded model
        batch = packed_batch(samples)
        h_reloaded = packed_hidden_states(reloaded, **batch, **vision)
        h_model = packed_hidden_states(model, **batch, **vision)
    assert torch.equal(h_reloaded, h_model)
    model.model.language_model.set_attn_implementation("sdpa")


def test_tied_lm_head_round_trip(tmp_path):
    config = tiny_r4b_config()
    config.tie_word_embeddings = True
    tied = RForConditionalGeneration(config).eval()
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    save_pretrained_r4b(tied, tmp_path)
    assert "lm_head.weight" not in checkpoint_keys(tmp_path)
    reloaded = load_r4b(tmp_path).eval()
    assert reloaded.lm_head.weight is reloaded.get_input_embeddings().weight
    ids = torch.randint(10, 900, (1, 7))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, tied(input_ids=ids).logits)


def test_legacy_layout_loads(model, tmp_path):
    """transformers < 4.52 layout: language_model.model.*, vision_tower.*, ..., language_model.lm_head.*"""
    legacy = {}
    for name, tensor in r4b_state_dict(model).items():
        if name.startswith("model.language_model."):
            name = "language_model.model." + name[len("model.language_model.") :]
        elif name.startswith("lm_head."):
            name = "language_model." + name
        else:
            name = name[len("model.") :]
        legacy[name] = tensor.contiguous()
    assert not any(k.startswith("model.") for k in legacy) and "image_newline" in legacy
    model.config.save_pretrained(tmp_path)
    save_file(legacy, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    reloaded = load_r4b(tmp_path)
    state, expected = reloaded.state_dict(), model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_packed_forward_matches_padded_hf_forward(processor):
    """3 ragged samples (one image, no image, two images): packed r4b_varlen == stock padded sdpa, grads too."""
    model = build_tiny_r4b(seed=3).train()  # dropout is 0 in these configs: train mode is deterministic
    samples, vision = make_samples(processor, [(6, [(50, 30)]), (9, []), (3, [(20, 70), (60, 60)])], seed=1)
    ids, mask = padded_batch(samples)
    assert sum(len(s) for s in samples) < 200
    weights = torch.randn(int(mask.sum()), 64, generator=torch.Generator().manual_seed(2))

    model.model.language_model.set_attn_implementation("sdpa")
    model.zero_grad()
    out = model.model(input_ids=ids, attention_mask=mask, **vision)
    reference = out.last_hidden_state[mask.bool()]
    (reference * weights).sum().backward()
    grads_ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    logits_ref = model(input_ids=ids, attention_mask=mask, **vision).logits[mask.bool()].detach()

    model.zero_grad()
    packed = packed_hidden_states(model, **packed_batch(samples), **vision)
    (packed * weights).sum().backward()
    assert model.config.text_config._attn_implementation == "r4b_varlen"
    assert model.config.vision_config._attn_implementation == "sdpa"

    assert (packed - reference).abs().max().item() < 1e-5
    assert (packed.detach() @ model.lm_head.weight.detach().T - logits_ref).abs().max().item() < 1e-5
    assert any("vision_tower" in n for n in grads_ref) and any("pre_norm" in n for n in grads_ref)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == grads_ref.keys()
    largest = max(g.norm() for g in grads_ref.values())
    for name, grad in grads_ref.items():
        if grad.norm() > 1e-4 * largest:
            assert rel_err(grads[name], grad) < 1e-4, name
        else:  # zero up to rounding (e.g. key biases: softmax ignores them), compare absolutely
            assert max_abs(grads[name], grad) < 1e-5, name


def test_packed_forward_refuses_mismatched_image_tokens(model, processor):
    samples, vision = make_samples(processor, [(4, [(30, 30)])])
    batch = packed_batch([samples[0][:-3]])  # drops two text tokens and one image token
    with pytest.raises(ValueError, match="<image> tokens but its 1 images give"):
        packed_hidden_states(model, **batch, **vision)
    with pytest.raises(ValueError, match="no pixel_values"):
        packed_hidden_states(model, **packed_batch(samples))
    bad = packed_batch(samples)
    bad["cu_seqlens"] = bad["cu_seqlens"].long()
    with pytest.raises(ValueError, match="int32"):
        packed_hidden_states(model, **bad, **vision)


def test_load_model_and_processor_and_save_model(tmp_path):
    model, tokenizer, processor = load_model_and_processor(None, seed=4)
    assert torch.equal(model.model.image_newline, build_tiny_r4b(seed=4).model.image_newline)
    assert len(tokenizer) == 904 and processor.num_image_tokens(50, 40) == 24
    save_model(model, tmp_path, tokenizer)
    again, tokenizer2, processor2 = load_model_and_processor(tmp_path)
    assert type(again) is RForConditionalGeneration and len(tokenizer2) == len(tokenizer)
    assert (
        vars(processor2._pil) == vars(processor._pil)
        and processor2.image_grid_pinpoints == processor.image_grid_pinpoints
    )
    state = again.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.subprocess
def test_loading_a_checkpoint_in_a_fresh_process_warns_nothing(tmp_path):
    """transformers' AutoTokenizer reads the directory's config.json; were ``rvl`` unknown to AutoConfig there, it
    would fall back to the base config class and log "You are using a model of type `rvl` to instantiate a model
    of type ``". A fresh interpreter, because this test session has long registered ``rvl``."""
    model, tokenizer, _ = load_model_and_processor(None)
    save_model(model, tmp_path, tokenizer)
    code = f"from r4b.models import load_model_and_processor; load_model_and_processor({str(tmp_path)!r})"
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "warning"}  # the warning goes to stderr through this logger
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "to instantiate a model of type" not in done.stderr, done.stderr


def test_released_layout_with_a_transformers_4_config_and_auto_map_loads(tmp_path):
    """A directory as the released R-4B ships it: a transformers 4.x config.json (``torch_dtype``, ``rope_theta``
    in the text config, ``auto_map`` to the release's own remote code, absent here) beside R-4B's weights.
    r4b's loader reads it with r4b's classes, ignoring the auto_map."""
    model, tokenizer, _ = load_model_and_processor(None, seed=6)
    save_model(model, tmp_path, tokenizer)
    for name in ("configuration_r4b.py", "modeling_r4b.py", "image_processing_r4b.py", "processing_r4b.py"):
        (tmp_path / name).unlink()
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("dtype", None)
    config |= {"torch_dtype": "float32", "transformers_version": "4.55.0"}
    config["auto_map"] = {"AutoConfig": "configuration_r.RConfig", "AutoModel": "modeling_r.RForConditionalGeneration"}
    text = config["text_config"]
    text["rope_theta"] = text.pop("rope_parameters")["rope_theta"]
    text |= {"rope_scaling": None, "torch_dtype": "float32"}
    text.pop("dtype", None)
    (tmp_path / "config.json").write_text(json.dumps(config, indent=2))
    again, _, processor = load_model_and_processor(tmp_path)
    assert type(again) is RForConditionalGeneration
    assert again.config.text_config.model_type == "qwen3"
    state = again.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    samples, vision = make_samples(processor, [(5, [(40, 90)])])
    with torch.no_grad():
        got = again(input_ids=samples[0][None], **vision).logits
        expected = model(input_ids=samples[0][None], **vision).logits
    assert torch.equal(got, expected)
