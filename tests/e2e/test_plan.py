"""``r4b plan`` against what is measured: the tiny model's parameter, gradient and AdamW bytes on the single engine
(exactly), its saved activations on the CPU (within a factor of 1.5), DeepSpeed's own ZeRO-2/3 estimator (exactly),
the fused loss's and the attention's peaks on the H100 (bench/results/h100-2026-11-27, within 2%); and the command's
table, JSON, its verdict on a config that does not fit, and its one-line errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from r4b.cli import main
from r4b.config import load_config
from r4b.config.sections import EngineConfig, SFTConfig
from r4b.plan.estimate import activation_bytes, attention_workspace, loss_workspace, model_state
from r4b.plan.shapes import Shapes, Tower, model_shapes

ROOT = Path(__file__).resolve().parents[2]
H100 = ROOT / "bench" / "results" / "h100-2026-11-27"
GIB = 1 << 30


@pytest.fixture(scope="module")
def tiny() -> Shapes:
    return model_shapes(None)


def items(listed) -> dict[str, float]:
    return {item.name: item.bytes for item in listed}


def one_step_state(model, train: list[str]) -> tuple[int, int, int, int]:
    """(weight bytes, gradient bytes, AdamW state bytes, trained parameters) of ``model`` on the single engine after
    one optimizer step."""
    from r4b.train.engine import build_engine
    from r4b.train.schedule import parameter_groups

    lrs = {"vision": 1e-3, "projector": 1e-3, "llm": 1e-3}
    engine = build_engine(model, parameter_groups(model, lrs, train), lambda step: 1.0, EngineConfig(kind="single"))
    trained = [p for p in model.parameters() if p.requires_grad]
    for p in trained:
        p.grad = torch.ones_like(p)
    grads = sum(p.grad.nbytes for p in trained)
    engine.step()
    state = sum(t.nbytes for s in engine.optimizer.state.values() for t in s.values())
    return sum(p.nbytes for p in model.parameters()), grads, state, sum(p.numel() for p in trained)


@pytest.mark.parametrize("train", [["vision", "projector", "llm"], ["projector", "llm"]])
def test_parameter_gradient_and_optimizer_bytes_are_exact(tiny, train):
    """The single engine after one step of the tiny model: every trained parameter with a gradient and AdamW state."""
    from r4b.models.tiny import build_tiny_r4b

    model = build_tiny_r4b(0)
    measured = one_step_state(model, train)
    planned = items(model_state(tiny, train, EngineConfig(kind="single"), 1))
    assert (planned["weights"], planned["gradients"], planned["optimizer"]) == measured[:3]
    assert sum(tiny.params[m] for m in train) == measured[3]


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_lora_parameter_gradient_and_optimizer_bytes_are_exact(mixed_precision):
    """model.lora on the single engine after one step of the tiny model: the frozen base in the training dtype beside
    fp32 adapters, and gradients and AdamW state of the adapters alone."""
    from r4b.config.sections import LoraSection
    from r4b.models.lora import apply_lora
    from r4b.models.tiny import build_tiny_r4b
    from r4b.train.runtime import lora_base_dtype

    config, section = EngineConfig(kind="single", mixed_precision=mixed_precision), LoraSection(rank=4)
    model = build_tiny_r4b(0)
    apply_lora(model, section, lora_base_dtype(config))
    measured = one_step_state(model, ["vision", "projector", "llm"])
    shapes = model_shapes(None, section)
    planned = items(model_state(shapes, ["llm"], config, 1))
    assert (planned["weights"], planned["gradients"], planned["optimizer"]) == measured[:3]
    assert shapes.adapters == {"vision": 0, "projector": 0, "llm": measured[3]}


def r4b_config(directory: Path) -> Path:
    """R-4B's config.json at bench/lora_memory.py's shapes (SigLIP-so400m, the projector, Qwen3-4B), lm_head apart
    from the input embedding as README's LoRA table counts it."""
    import sys

    from helpers import bench_module

    sys.path.insert(0, str(ROOT / "scripts"))
    from make_random_model import PRESETS, build_config

    bench = bench_module("lora_memory")
    PRESETS["r4b"] = {
        "text": bench.QWEN3_4B,
        "vision": bench.SIGLIP_SO400M,
        "grid_pinpoints": PRESETS["1b"]["grid_pinpoints"],
    }
    config = build_config("r4b")
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = False
    config.save_pretrained(directory)
    return directory


def test_lora_states_of_r4b_are_readmes_table(tmp_path):
    """README's LoRA table (bench/lora_memory.py): weights, gradients and AdamW state of a bf16 R-4B run on one GPU,
    full training against LoRA ranks 8 and 64 on the default targets, to the table's 0.01 GiB."""
    from r4b.config.sections import LoraSection

    path = str(r4b_config(tmp_path / "r4b"))
    engine = EngineConfig(kind="fsdp2", mixed_precision="bf16")
    expected = {0: (4833.9e6, 72.03), 8: (16.5e6, 9.25), 64: (132.1e6, 10.97)}
    for rank, (trainable, gib) in expected.items():
        shapes = model_shapes(path, LoraSection(rank=rank))
        trained = ["llm"] if rank else ["vision", "projector", "llm"]
        planned = items(model_state(shapes, trained, engine, 1))
        state = planned["weights"] + planned["gradients"] + planned["optimizer"]
        assert round(state / GIB, 2) == gib, rank
        assert round(sum(shapes.adapters.values()) if rank else shapes.total, -5) == trainable


def test_lora_in_the_plan_and_as_a_fix(tmp_path, capsys):
    """r4b plan with model.lora: the adapters alone train, BPO's reference is no copy; a full R-4B SFT that does not
    fit one H100 names model.lora.rank=16 among its fixes, and with it fits."""
    assert main(["plan", "--config", "configs/demo/bpo.yaml", "--gpus", "1", "model.path=null", "model.lora.rank=8",
                 "--json"]) == 0  # fmt: skip
    plan = json.loads(capsys.readouterr().out)
    assert plan["trained"] == ["llm"] and plan["lora"]["rank"] == 8 and "reference model" not in plan["memory_gib"]
    assert plan["lora"]["trainable"] == plan["lora"]["adapters"]["llm"] > 0
    assert any("adapters off" in note for note in plan["notes"])
    path = r4b_config(tmp_path / "r4b")
    argv = ["plan", "--config", "configs/demo/sft.yaml", "--gpus", "1", "--json", f"model.path={path}"]
    assert main(argv) == 1
    assert "model.lora.rank=16" in json.loads(capsys.readouterr().out)["fixes"]
    assert main([*argv, "model.lora.rank=16"]) == 0
    fits = json.loads(capsys.readouterr().out)
    assert fits["fits"] and fits["lora"]["trainable"] == fits["lora"]["adapters"]["total"]
    # a vision target while model.train leaves vision out: refused as the stages refuse it
    frozen = ["plan", "--config", "configs/demo/sft.yaml", "--gpus", "1", "model.lora.rank=8", "model.train=[llm]",
              r"model.lora.targets=[q_proj, .*vision_tower.*\.fc1]"]  # fmt: skip
    assert main(frozen) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .startswith(
            "r4b plan: error: model.lora.targets: 2 targeted layer(s) are in the vision module "
            "(model.vision_tower.encoder.layers.0.mlp.fc1, ...), which does not train"
        )
    )


def test_activations_are_within_a_factor_of_what_the_forward_saves(tiny, torch_reference_kernels, tmp_path):
    """Bytes autograd saves in the tiny model's packed forward (fp32, parameters aside), less what only the CPU's
    reference kernels save (the [heads, N, N] attention probabilities and masks, the [N, V] logits), against the
    plan at the row's length and image share."""
    from r4b.models.loading import load_model_and_processor
    from r4b.synth import write_synthetic
    from r4b.train.objective import PackedSFTObjective
    from r4b.train.sft_data import SFTDataset

    write_synthetic(tmp_path, n_sft=16, n_rl=1, n_eval=1, seed=0)
    model, tokenizer, processor = load_model_and_processor(None, dtype=torch.float32)
    dataset = SFTDataset.from_files([str(tmp_path / "sft.jsonl")], tokenizer, processor, max_tokens=4096)
    inputs = dataset.host_batch(list(range(16))).inputs()
    n = inputs["input_ids"].numel()
    images = int((inputs["input_ids"] == model.config.image_token_index).sum())
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        dense = t.dim() >= 2 and t.shape[-1] in (n, tiny.vocab) and t.shape[-2] == n  # reference kernels only
        if t.untyped_storage().data_ptr() not in params and not dense:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        PackedSFTObjective(model.train())(**inputs)
    planned = activation_bytes(tiny, ["vision", "projector", "llm"], n, images / n, 4, ckpt=False)
    measured = sum(saved.values())
    assert 1 / 1.5 <= planned / measured <= 1.5, (planned, measured)
    assert activation_bytes(tiny, ["vision", "projector", "llm"], n, images / n, 4, ckpt=True) < planned


def h100_rows(name: str, impl: str, mode: str) -> list[dict]:
    (path,) = H100.glob(f"{name}-nvidia-h100*.json")
    return [r for r in json.loads(path.read_text())["rows"] if r["impl"] == impl and r["mode"] == mode]


def qwen3_4b(tiny: Shapes) -> Shapes:
    """The H100 benchmarks' shapes: Qwen3-4B's hidden 2560, vocabulary 151,936, GQA 32/8 of 128."""
    return replace(tiny, vocab=151936, llm=Tower(36, 2560, 9728, 32, 8, 128))


def test_the_fused_loss_workspace_is_the_h100_benchmarks_peak(tiny):
    rows = h100_rows("fused_loss", "r4b", "fwd+bwd")
    assert {r["N"] for r in rows} == {4096, 16384}
    for row in rows:
        planned = loss_workspace(qwen3_4b(tiny), row["N"], 2) / GIB
        assert planned == pytest.approx(row["peak_gib"], rel=0.02), row


def test_the_attention_workspace_is_the_h100_benchmarks_peak(tiny):
    rows = [r for r in h100_rows("attention", "r4b", "fwd+bwd") if r["mask"] == "causal-docs"]
    assert {r["tokens"] for r in rows} == {16384, 65536}
    for row in rows:
        planned = attention_workspace(qwen3_4b(tiny).llm, row["tokens"], 2) / GIB
        assert planned == pytest.approx(row["peak_gib"], rel=0.02), row


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_states_are_deepspeeds_own_estimate(tiny, stage):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    engine = EngineConfig(kind="deepspeed", zero_stage=stage, mixed_precision="bf16")
    planned = items(model_state(tiny, ["vision", "projector", "llm"], engine, 8))
    planned.pop("reduce bucket")
    total, layer = tiny.total, tiny.largest_layer
    if stage == 2:
        _, expected = estimate_zero2_model_states_mem_needs(total, 8, cpu_offload=False)
    else:
        _, expected, _ = estimate_zero3_model_states_mem_needs(total, layer, 8, cpu_offload=False)
    assert sum(planned.values()) == pytest.approx(expected, abs=2)  # DeepSpeed rounds to whole bytes


def test_the_table_and_the_json(capsys):
    assert main(["plan", "--config", "configs/demo/bpo.yaml", "--gpus", "1", "model.path=null", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["stage"] == "bpo" and plan["fits"] and plan["parameters"]["total"] == 256992
    assert {"weights", "gradients", "optimizer", "activations", "reference model"} <= set(plan["memory_gib"])
    assert set(plan["step_seconds_by_part"]) == {"update", "prefill", "decode"}
    assert main(["plan", "--config", "configs/demo/sft.yaml", "--gpus", "1"]) == 0
    table = capsys.readouterr().out
    assert "memory per GPU" in table and "fits" in table and "tokens per step: 65,536" in table


def test_a_config_that_does_not_fit_says_so_and_what_to_change(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from make_random_model import build_config

    build_config("1b").save_pretrained(tmp_path)
    argv = ["plan", "--config", "configs/demo/sft.yaml", "--gpus", "1", f"model.path={tmp_path}",
            "data.max_tokens=65536", "--json"]  # fmt: skip
    assert main(argv) == 1
    plan = json.loads(capsys.readouterr().out)
    assert not plan["fits"] and plan["peak_gib"] > plan["budget_gib"]
    assert "engine.activation_checkpointing=true" in plan["fixes"]
    config = load_config(SFTConfig, "configs/demo/sft.yaml", [f"model.path={tmp_path}"])
    assert config.engine.kind == "single"  # the fixes name changes to this config, the engine stays


def test_one_line_errors(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["plan", "--config", "configs/demo/sft.yaml", "--gpus", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("engine.kind = 'single' runs on one GPU, not 2: plan engine.kind=fsdp2") and "\n" not in err
    assert main(["plan", "--config", "configs/demo/sft.yaml", "--gpus", "1", "model.path=nobody/no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "r4b plan: error: model.path nobody/no-such-model: no such directory (download the model first; r4b plan "
        "reads its config.json only)"
    )
    assert "\n" not in err
