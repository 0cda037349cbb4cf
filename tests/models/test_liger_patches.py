"""apply_liger_patches: liger's RMSNorm / RoPE / SwiGLU on a model instance, never its fused cross-entropy.

On the CPU the function must do nothing. The patching itself (which modules, which module-level functions,
no class swaps left behind, forward untouched) is checked on the CPU with ``require_cuda=False``: liger's
Triton kernels do not run on CPU tensors, so the numerics are checked on a GPU only.
"""

import copy
import logging
import sys

import pytest
import torch
from qwen_vl_models import make_samples, qwen2_5_vl, qwen3_vl
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from r4b.models.liger import apply_configured_liger, apply_liger_patches
from r4b.models.mrope import mm_token_type_ids

pytest.importorskip("liger_kernel")

TEXT = dict(
    vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
)  # fmt: skip


def qwen3():
    return Qwen3ForCausalLM(Qwen3Config(**TEXT))


def llava_onevision():
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=28, patch_size=14)  # fmt: skip
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=dict(TEXT, model_type="qwen3"), image_token_index=99,
        image_grid_pinpoints=[[28, 28]], vision_feature_layer=-1,
    )  # fmt: skip
    return LlavaOnevisionForConditionalGeneration(config)


# model factory -> (modeling modules liger touches, expected entries of the returned list)
FAMILIES = {
    "qwen3": (qwen3, ["qwen3"], {"LigerRMSNorm: 9 modules", "LigerSwiGLUMLP: 2 modules"}, ["qwen3"]),
    "llava_onevision": (
        llava_onevision,
        ["qwen3", "llava_onevision"],
        {"LigerRMSNorm: 9 modules", "LigerSwiGLUMLP: 2 modules"},
        ["qwen3"],
    ),
    # text: 2 layers x 2 norms + final norm; vision: 2 blocks x 2 norms
    "qwen2_5_vl": (
        qwen2_5_vl,
        ["qwen2_5_vl"],
        {"LigerRMSNorm: 9 modules", "LigerSwiGLUMLP: 2 modules"},
        ["qwen2_5_vl"],
    ),
    # text: 2 layers x (2 norms + q/k norms) + final norm; SwiGLU filled in by r4b
    "qwen3_vl": (qwen3_vl, ["qwen3_vl"], {"LigerRMSNorm: 9 modules", "LigerSwiGLUMLP: 2 modules"}, ["qwen3_vl"]),
}


def modeling(name):
    return sys.modules[f"transformers.models.{name}.modeling_{name}"]


@pytest.fixture
def restore_modeling():
    """liger replaces module-level RoPE functions process-wide: put every modeling module back afterwards."""
    saved = {name: dict(vars(mod)) for name, mod in sys.modules.items() if name.startswith("transformers.models.")}
    yield
    for name, before in saved.items():
        module = sys.modules[name]
        for key in set(vars(module)) - set(before):
            delattr(module, key)
        for key, value in before.items():
            if vars(module).get(key) is not value:
                setattr(module, key, value)


def module_state(model):
    return [(name, type(m), m.__dict__.get("forward")) for name, m in model.named_modules()]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cpu_model_is_left_alone(family, caplog):
    torch.manual_seed(0)
    model = FAMILIES[family][0]()
    before = module_state(model)
    with caplog.at_level(logging.INFO, logger="r4b.models.liger"):
        assert apply_liger_patches(model) == []
    assert "not on a CUDA device" in caplog.text
    assert module_state(model) == before


def test_missing_liger_patches_nothing(monkeypatch, caplog):
    model = qwen3()
    before = module_state(model)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", None)
    with caplog.at_level(logging.INFO, logger="r4b.models.liger"):
        assert apply_liger_patches(model, require_cuda=False) == []
    assert "liger-kernel is not importable" in caplog.text
    assert module_state(model) == before


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patches_instance_layers_not_the_loss(family, restore_modeling):
    factory, modules, expected, rope_modules = FAMILIES[family]
    torch.manual_seed(0)
    model = factory()
    classes_before = {name: {k: v for k, v in vars(modeling(name)).items() if isinstance(v, type)} for name in modules}

    patched = apply_liger_patches(model, require_cuda=False)

    assert expected <= set(patched), patched
    assert any(entry.startswith("liger_rotary_pos_emb: ") for entry in patched), patched
    for name in rope_modules:
        assert modeling(name).apply_rotary_pos_emb.__name__ == "liger_rotary_pos_emb"
    assert "forward" not in model.__dict__  # no liger fused linear cross-entropy
    assert not any("cross_entropy" in entry for entry in patched)
    for name in modules:  # no class swapped at module level: models built later are stock
        assert {k: v for k, v in vars(modeling(name)).items() if isinstance(v, type)} == classes_before[name]
    fresh = factory()
    assert not any("forward" in m.__dict__ for m in fresh.modules())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="liger's Triton kernels need a CUDA device")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_model_matches_stock_on_gpu(family, restore_modeling):
    factory = FAMILIES[family][0]
    torch.manual_seed(0)
    stock = factory().cuda().float()
    if family in ("qwen2_5_vl", "qwen3_vl"):
        ids, thw, pixels = make_samples(stock.config)[0]
        inputs = dict(input_ids=ids[None].cuda(), pixel_values=pixels.cuda(), image_grid_thw=thw.cuda(),
                      mm_token_type_ids=mm_token_type_ids(stock.config, ids)[None].cuda())  # fmt: skip
    else:
        inputs = dict(input_ids=torch.randint(0, 99, (1, 23), device="cuda"))

    def run(model):
        hidden = model.model(**inputs).last_hidden_state
        hidden.square().mean().backward()
        return hidden.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    patched_model = copy.deepcopy(stock)
    h0, g0 = run(stock)  # before patching: liger's RoPE replaces a module-level function for every instance
    patched = apply_liger_patches(patched_model)
    assert {"LigerRMSNorm: 9 modules", "LigerSwiGLUMLP: 2 modules"} <= set(patched), patched
    h1, g1 = run(patched_model)
    torch.testing.assert_close(h1, h0, rtol=1e-4, atol=1e-4)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_process_wide_rope_patch_leaves_cpu_models_working(family, restore_modeling):
    """After a GPU run's patch (here: a CPU model patched with require_cuda=False), a fresh model of the same
    type evaluated on the CPU must still run: liger's RoPE is a module-level function, its kernel CUDA-only."""
    factory = FAMILIES[family][0]
    torch.manual_seed(0)
    stock = factory()
    if family in ("qwen2_5_vl", "qwen3_vl"):
        ids, thw, pixels = make_samples(stock.config)[0]
        inputs = dict(input_ids=ids[None], pixel_values=pixels, image_grid_thw=thw,
                      mm_token_type_ids=mm_token_type_ids(stock.config, ids)[None])  # fmt: skip
    else:
        inputs = dict(input_ids=torch.randint(0, 99, (1, 23)))
    with torch.no_grad():
        before = stock.model(**inputs).last_hidden_state
        apply_liger_patches(factory(), require_cuda=False)
        apply_liger_patches(factory(), require_cuda=False)  # twice: the dispatcher is not stacked
        after = stock.model(**inputs).last_hidden_state
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    for name in FAMILIES[family][3]:
        assert not hasattr(modeling(name).apply_rotary_pos_emb.stock, "stock")


def test_configured_liger_patches_only_where_a_gpu_will_run_the_model(monkeypatch, restore_modeling, capsys):
    model = qwen3()
    assert apply_configured_liger(model, True) == []  # no GPU here: nothing
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert apply_configured_liger(model, False) == []
    patched = apply_configured_liger(model, True)  # patched on the CPU, for the engine to move
    assert "LigerRMSNorm: 9 modules" in patched and "liger-kernel: " in capsys.readouterr().out
