"""LoRA (``model.lora``) through vLLM itself: ``make test-vllm`` runs this file in ``.venv-vllm``; skipped where vLLM is
not installed. vLLM never sees an adapter: the weight sync streams the merged weights (base + alpha/rank x BA) under
the base names (r4b.models.lora.merged_tensors), which vLLM reloads as it reloads full training's.

The model is the embedded tiny R-4B (text head dimension 32, which vLLM's CPU attention takes) with sharpened logits,
so greedy choices have clear margins, as in test_vllm_engine.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (make test-vllm)"),
    pytest.mark.usefixtures("torch_reference_kernels"),  # the trainer's log-probs: the kernels have their own tests
]

from r4b.config import EngineConfig  # noqa: E402
from r4b.config.sections import LoraSection  # noqa: E402
from r4b.models.image_processing import RImageProcessor  # noqa: E402
from r4b.models.loading import save_model  # noqa: E402
from r4b.models.lora import apply_lora, is_adapter_parameter  # noqa: E402
from r4b.models.tiny import build_tiny_r4b  # noqa: E402
from r4b.rollout import HFRolloutEngine, Prompt, SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
KV_CACHE_GIB = 0.25  # a few thousand tokens of the tiny model
RANK, ALPHA = 4, 8.0
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)


def _base(tokenizer) -> torch.nn.Module:
    model = build_tiny_r4b(seed=1, tokenizer=tokenizer)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model


def _prompts() -> list[Prompt]:
    question = [{"type": "image"}, {"type": "text", "text": "How many?"}]
    return [
        Prompt([{"role": "user", "content": question}], [Image.new("RGB", (56, 28), "red")]),
        Prompt([{"role": "user", "content": "Seven plus five?"}]),
    ]


def _responses(rollout_engine, mode: str) -> list[list[list[int]]]:
    rows = rollout_engine.generate(_prompts(), n=1, mode=mode, sampling=GREEDY)
    return [[r.response_ids for r in row] for row in rows]


@pytest.fixture(scope="module")
def base(tokenizer, tmp_path_factory) -> Path:
    """The base model's directory: what vLLM starts from, as ``r4b bpo`` starts it from ``run_dir/rollout-init``."""
    return save_model(_base(tokenizer), tmp_path_factory.mktemp("tiny") / "model", tokenizer)


def test_a_sync_of_a_lora_policy_gives_vllm_its_merged_weights(base, tokenizer):
    """The single engine training a LoRA policy (B random, so the merge changes the weights) synced into vLLM: vLLM's
    greedy tokens in every mode become the LoRA policy's (transformers, adapters unmerged) and its sampled log-probs
    the trainer's (the sync probe, fp32 tolerance); synced back to B = 0 it answers as the base again."""
    from r4b.rl.update import BPOObjective
    from r4b.rollout.vllm import VLLMRolloutEngine
    from r4b.train.engine import build_engine
    from r4b.train.schedule import parameter_groups
    from r4b.train.sync_probe import check_rollout_sync
    from r4b.train.weight_sync import sync_rollout_weights

    model = _base(tokenizer)
    apply_lora(model, LoraSection(rank=RANK, alpha=ALPHA))
    objective = BPOObjective(model)
    lrs = {"llm": 1e-3, "vision": 1e-3, "projector": 1e-3}
    engine = build_engine(objective, parameter_groups(objective, lrs, list(lrs)), lambda step: 1.0, EngineConfig())
    processor = RImageProcessor.from_config(model.config)
    vllm = VLLMRolloutEngine.from_pretrained(
        base, tokenizer, processor, dtype="float32", seed=0, enforce_eager=True, kv_cache_gib=KV_CACHE_GIB
    )
    try:
        policy = HFRolloutEngine(model, tokenizer, processor)
        modes = ("auto", "thinking", "non_thinking")
        before = {mode: _responses(vllm, mode) for mode in modes}
        assert before == {mode: _responses(policy, mode) for mode in modes}  # B = 0: the base
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
        sync_rollout_weights(engine, vllm)
        after = {mode: _responses(vllm, mode) for mode in modes}
        assert after == {mode: _responses(policy, mode) for mode in modes} and after != before
        assert check_rollout_sync(engine, vllm) < 1e-3
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.zero_()
        sync_rollout_weights(engine, vllm)
        assert {mode: _responses(vllm, mode) for mode in modes} == before
    finally:
        vllm.close()


@pytest.mark.subprocess
def test_bpo_with_lora_on_vllm(base, tmp_path):
    """``r4b bpo`` with model.lora and rollout.engine=vllm for 2 steps: each step's sync is probed against the trainer
    (a merged stream vLLM did not take stops the run), the KL to the base (the adapters off) grows from 0, and the
    merged export differs from the base in the targeted layers only."""
    from safetensors.torch import load_file

    from r4b.synth import write_synthetic

    write_synthetic(tmp_path / "data", n_sft=2, n_rl=4, n_eval=2, seed=0)
    run = tmp_path / "run"
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}  # the kernels' torch references
    argv = [
        sys.executable, "-m", "r4b", "bpo", "--config", str(ROOT / "configs" / "demo" / "bpo.yaml"),
        f"output_dir={run}", f"model.path={base}", f"data.prompts=[{tmp_path / 'data' / 'rl.jsonl'}]", "data.eval=null",
        "rollout.engine=vllm", "rollout.vllm={enforce_eager: true, dtype: float32}",
        f"rollout.vllm_kv_cache_gib={KV_CACHE_GIB}", "rollout.group_size=2", "rollout.max_new_tokens=6",
        "train.prompts_per_step=2", "train.steps=2", "train.progress=false", "train.tensorboard=false",
        f"model.lora.rank={RANK}", f"model.lora.alpha={ALPHA}", "optim.lr_llm=1e-2", "export.lora=both",
    ]  # fmt: skip
    result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"lora: rank {RANK} on 14 layers" in result.stdout
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in metrics] == [1, 2]
    assert metrics[0]["kl"] == 0.0 and metrics[1]["kl"] > 0.0  # step 1's policy is the base (B = 0)

    def weights(directory: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}

    start, merged = weights(base), weights(run / "model")
    assert set(start) == set(merged)
    changed = {k for k in start if not torch.equal(start[k].float(), merged[k].float())}
    assert changed and all(k.endswith("_proj.weight") and "language_model" in k for k in changed), sorted(changed)
    adapters = load_file(run / "adapter" / "adapter_model.safetensors")
    assert adapters and all(is_adapter_parameter(k.replace(".weight", ".default.weight")) for k in adapters)
