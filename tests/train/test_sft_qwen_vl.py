"""`r4b sft` on Qwen2.5-VL / Qwen3-VL directories: the packed collate equals per-sample stock forwards, training
runs and falls, the export reloads with plain transformers.

Tiny random models, no download: the configs of tests/models/test_mrope.py (2 text layers, hidden 64; a 2-block vision
tower, patch 2, spatial merge 2) with a vocabulary sized for the tokenizer, which is r4b's shipped tiny tokenizer
plus Qwen's four vision special tokens (``<|vision_start|>``, ``<|vision_end|>``, ``<|image_pad|>``,
``<|video_pad|>``), all written to tmp_path as Hugging Face directories with a preprocessor_config.json that
shrinks the 56x56 synthetic pictures to 16x16 (8x8 patches: 16 image tokens).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import DEMO_SFT, ROOT, rel_err, run_two_ranks, synthetic_data
from PIL import Image
from qwen_vl_models import KINDS, VISION_TOKENS, save_tiny_qwen_vl
from transformers import (
    AutoModelForImageTextToText,
    AutoTokenizer,
)

# From its module: transformers 5.17's top-level ``AutoImageProcessor`` is a placeholder demanding torchvision.
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from r4b.config import load_config
from r4b.models.loading import load_model_and_processor
from r4b.models.mrope import mm_token_type_ids
from r4b.models.qwen_vl import QWEN_VL_CHAT_TEMPLATE, QwenVLImageProcessor
from r4b.train.objective import PackedSFTObjective
from r4b.train.sft import SFTConfig, train_sft
from r4b.train.sft_data import SFTDataset

DEMO = DEMO_SFT


pytestmark = pytest.mark.usefixtures("torch_reference_kernels")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthetic_data(tmp_path_factory, n_sft=24) / "sft.jsonl"


@pytest.fixture(scope="module", params=KINDS)
def model_dir(request, tmp_path_factory) -> Path:
    return save_tiny_qwen_vl(request.param, tmp_path_factory.mktemp(request.param))


def test_loader_prompt_and_image_tokens(model_dir, data):
    model, tokenizer, processor = load_model_and_processor(model_dir, dtype=torch.float32)
    assert type(model).__name__.startswith(("Qwen2_5_VL", "Qwen3VL")) and isinstance(processor, QwenVLImageProcessor)
    assert tokenizer.chat_template == QWEN_VL_CHAT_TEMPLATE
    dataset = SFTDataset.from_files([str(data)], tokenizer, processor, max_tokens=1024)
    sample = dataset.samples[0]
    ids = sample.input_ids
    start, end, pad = tokenizer.convert_tokens_to_ids(VISION_TOKENS[:3])
    assert sample.image_token_counts == [16]  # 56x56 -> 16x16 pixels -> 8x8 patches -> 4x4 merged tokens
    first = ids.index(pad)
    assert ids[first - 1] == start and ids[first : first + 16] == [pad] * 16 and ids[first + 16] == end
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\n<|vision_start|>") and "<|im_start|>assistant\n<think>\n" in text
    vision = processor.preprocess([Image.new("RGB", (56, 56))])
    assert vision["image_grid_thw"].tolist() == [[1, 8, 8]] and vision["pixel_values"].shape == (64, 3 * 2 * 2 * 2)


def per_sample_loss(model, dataset: SFTDataset, index: int) -> torch.Tensor:
    """The stock model on one sample (sdpa, its own get_rope_index): sum of token cross-entropies."""
    sample = dataset.samples[index]
    ids = torch.tensor(sample.input_ids)
    extra = {"mm_token_type_ids": mm_token_type_ids(model.config, ids)[None]}
    if sample.images:
        from r4b.data import load_images

        extra.update(dataset.processor.preprocess(load_images(sample.images)))
    logits = model(input_ids=ids[None], **extra).logits[0].float()
    labels = torch.tensor(sample.labels[1:])
    return F.cross_entropy(logits[:-1], labels, ignore_index=-100, reduction="sum")


def test_packed_collate_equals_per_sample_stock_forwards(model_dir, data):
    model, tokenizer, processor = load_model_and_processor(model_dir, dtype=torch.float32)
    dataset = SFTDataset.from_files([str(data)], tokenizer, processor, max_tokens=1024)
    # a thinking and a non-thinking sample with images, and a text-only one (its image dropped from the row)
    indices = [0, 1, 2]
    text_only = dataset.samples[2]
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    start, end = tokenizer.convert_tokens_to_ids(VISION_TOKENS[:2])
    keep = [k for k, t in enumerate(text_only.input_ids) if t not in (pad, start, end)]
    text_only.input_ids = [text_only.input_ids[k] for k in keep]
    text_only.labels = [text_only.labels[k] for k in keep]
    text_only.images, text_only.image_token_counts = [], []

    model.set_attn_implementation("sdpa")
    model.zero_grad()
    reference = sum(per_sample_loss(model, dataset, i) for i in indices)
    reference.backward()
    grads_ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any(".visual." in n for n in grads_ref)

    model.zero_grad()
    batch = dataset.collate(indices, torch.device("cpu"))
    assert batch.position_ids.shape == (3, batch.num_tokens)
    assert batch.image_grid_thw.tolist() == [[1, 8, 8], [1, 8, 8]]
    loss = PackedSFTObjective(model)(**batch.inputs())
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(reference.item(), rel=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads_ref.items():
        assert rel_err(grads[name], grad) < 1e-4, name


def test_sft_trains_and_exports_a_reloadable_model(model_dir, data, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        f"output_dir={run_dir}",
        f"data.train=[{data}]",
        f"model.path={model_dir}",
        "train.global_batch_samples=8",
        "train.epochs=2",
        "train.save_every=0",
        "train.progress=false",
        "train.tensorboard=false",
    ]
    run = train_sft(load_config(SFTConfig, DEMO, args))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert sum(r["samples"] for r in rows) == 2 * 24
    assert rows[-1]["loss"] < 0.9 * rows[0]["loss"]

    exported = AutoModelForImageTextToText.from_pretrained(run / "model")
    assert exported.config.model_type == json.loads((model_dir / "config.json").read_text())["model_type"]
    assert "r4b_varlen" not in (run / "model" / "config.json").read_text()
    trained = torch.load(run / "checkpoint-6" / "engine" / "engine_state.pt", weights_only=False)["model"]
    state = exported.state_dict()
    assert state.keys() == {k.removeprefix("model.") for k in trained}
    for name, tensor in state.items():
        assert torch.equal(tensor, trained[f"model.{name}"]), name
    assert AutoTokenizer.from_pretrained(run / "model").chat_template == QWEN_VL_CHAT_TEMPLATE
    assert AutoImageProcessor.from_pretrained(run / "model").size["longest_edge"] == 256
    # and r4b loads it again, with the directory's image processor
    _, _, processor = load_model_and_processor(run / "model")
    assert processor.num_image_tokens(56, 56) == 16


@pytest.mark.multiprocess
@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed"])
def test_two_processes_give_the_one_process_losses(model_dir, data, tmp_path, engine):
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    common = [f"data.train=[{data}]", f"model.path={model_dir}", "train.global_batch_samples=8", "train.max_steps=2"]
    common += ["train.export=false", "train.progress=false", "train.tensorboard=false"]
    train_sft(load_config(SFTConfig, DEMO, [f"output_dir={tmp_path / 'one'}", *common]))
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    two = [f"output_dir={tmp_path / 'two'}", *common, f"engine.kind={engine}"]
    run_two_ranks(
        ["-m", "r4b", "sft", "--config", str(DEMO), *two], env=env, cwd=ROOT, timeout=240, fresh=tmp_path / "two"
    )
    one, two = (
        [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("one", "two")
    )
    assert [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["tokens"] == a["tokens"] and b["samples"] == a["samples"]
