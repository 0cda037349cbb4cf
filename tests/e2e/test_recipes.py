"""The paper's recipes (configs/recipes/<model>/{sft,bpo}.yaml): each loads through the strict loader, names the
hardware it was sized for, and runs one step with model.path pointed at a tiny random model of its family.

Beside model.path, what a CPU needs and nothing else: the test's data (8 annealing samples, 2 RL prompts; so a global
batch of 4 and 2 prompts a step), fp32 (engine.mixed_precision=no: no bf16 on gloo), transformers' generate for the
rollouts (rollout.engine=hf, without vLLM's keys: vLLM needs a GPU) with 2 + 2 rollouts of 6 tokens, one step, no
evaluation, progress, TensorBoard or export. Engines (DeepSpeed ZeRO-2 / FSDP2), activation checkpointing, pack
sizes, learning rates, the KL term and the rewards stay as the recipe has them. The six runs share one child process
(its own process group, the environment torchrun gives one rank), which this file is the worker of."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from r4b.config import load_config
from r4b.config.loading import SHIPPED_CONFIGS
from r4b.config.sections import BPOConfig, SFTConfig

ROOT = Path(__file__).resolve().parents[2]
RECIPES = SHIPPED_CONFIGS / "recipes"
FAMILIES = {"r4b": "rvl", "qwen3_vl_4b": "qwen3_vl", "qwen2_5_vl_7b": "qwen2_5_vl"}
STAGES = {"sft": SFTConfig, "bpo": BPOConfig}
CASES = [f"{model}/{stage}" for model in FAMILIES for stage in STAGES]
CPU_NEEDS = {
    "sft": ["train.global_batch_samples=4"],
    "bpo": ["data.eval=null", "rollout.engine=hf", "rollout.vllm={}", "rollout.vllm_sleep_level=null",
            "rollout.group_size=2", "rollout.max_new_tokens=6",
            "rollout.prompts_per_call=2", "train.prompts_per_step=2"],
}  # fmt: skip
COMMON = ["train.max_steps=1", "engine.mixed_precision='no'", "engine.timeout_minutes=3", "train.progress=false",
          "train.tensorboard=false", "train.export=false"]  # fmt: skip


def test_the_recipes_are_the_six_and_load_strictly():
    found = sorted(str(p.relative_to(RECIPES).with_suffix("")) for p in RECIPES.rglob("*.yaml"))
    assert found == sorted(CASES)
    for case in CASES:
        stage = case.split("/")[1]
        path = RECIPES / f"{case}.yaml"
        config = load_config(STAGES[stage], path)
        assert config.engine.mixed_precision == "bf16" and config.engine.activation_checkpointing
        assert "Sized for " in path.read_text().split("\noutput_dir:")[0], f"{path}: no hardware in its header"
        if stage == "sft":  # the paper's annealing settings
            assert (config.optim.lr_llm, config.optim.lr_vision, config.optim.lr_projector) == (4e-5, 4e-6, 4e-6)
            assert (config.data.max_tokens, config.train.global_batch_samples) == (16384, 1024)
            assert config.data.mask_empty_think and config.model.train == ["vision", "projector", "llm"]
        else:
            assert config.rollout.strategy == "bpo" and config.advantages.grouping == "joint"
            assert config.train.steps == 300 and config.reward.format_weight == 0


def overrides(case: str, model_dir: Path, data: Path, out: Path) -> list[str]:
    stage = case.split("/")[1]
    inputs = [f"data.train=[{data / 'sft.jsonl'}]"] if stage == "sft" else [f"data.prompts=[{data / 'rl.jsonl'}]"]
    return [f"output_dir={out / case}", f"model.path={model_dir}", *inputs, *CPU_NEEDS[stage], *COMMON]


def worker(out: Path, data: Path, models: Path) -> None:
    """Each recipe's one step; the exit codes to ``out/codes.json``."""
    from r4b.cli import main

    codes = {}
    for case in CASES:
        model, stage = case.split("/")
        argv = [stage, "--config", str(RECIPES / f"{case}.yaml"), *overrides(case, models / model, data, out)]
        codes[case] = main(argv)
    (out / "codes.json").write_text(json.dumps(codes))


def save_tiny_models(out: Path) -> Path:
    """A tiny random model directory of each recipe's family under ``out/<model>``."""
    from qwen_vl_models import save_tiny_qwen_vl

    from r4b.models.image_processing import RImageProcessor
    from r4b.models.loading import save_model
    from r4b.models.tiny import build_tiny_r4b
    from r4b.models.tokenizer import load_tokenizer

    tiny = build_tiny_r4b(seed=0)
    save_model(tiny, out / "r4b", load_tokenizer(), RImageProcessor.from_config(tiny.config))
    save_tiny_qwen_vl("qwen3_vl", out / "qwen3_vl_4b")
    save_tiny_qwen_vl("qwen2_5_vl", out / "qwen2_5_vl_7b")
    return out


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory) -> Path:
    from helpers import synthetic_data

    from r4b.train.engine import _free_port

    data = synthetic_data(tmp_path_factory, n_sft=8, n_rl=2)
    models = save_tiny_models(tmp_path_factory.mktemp("models"))
    out = tmp_path_factory.mktemp("recipes")
    one_rank = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(_free_port())}  # fmt: skip
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **one_rank}
    command = [sys.executable, __file__, str(out), str(data), str(models)]
    proc = subprocess.run(command, env=env, cwd=ROOT, timeout=600, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert json.loads((out / "codes.json").read_text()) == dict.fromkeys(CASES, 0), proc.stderr[-6000:]
    return out


@pytest.mark.subprocess
@pytest.mark.parametrize("case", CASES)
def test_each_recipe_runs_a_step_on_a_tiny_model_of_its_family(recipe_runs, case):
    run = recipe_runs / case
    (step,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert step["step"] == 1 and math.isfinite(step["loss"]), step
    saved = load_config(STAGES[case.split("/")[1]], run / "config.yaml")
    assert saved.engine.kind == load_config(STAGES[case.split("/")[1]], RECIPES / f"{case}.yaml").engine.kind
    family = json.loads((Path(saved.model.path) / "config.json").read_text())["model_type"]
    assert family == FAMILIES[case.split("/")[0]]


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    worker(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
