"""What LoRA (``model.lora``) saves: R-4B's trainable parameters and training-state bytes computed from its shapes, and
the measured peak CPU memory of a tiny-model SFT step with and without LoRA.

    python bench/lora_memory.py            # prints both tables (CPU, about a minute)

R-4B's shapes, built on the meta device (no weights): the SigLIP-so400m tower (27 layers, hidden 1152, MLP 4304),
the projector and Qwen3-4B's language model (36 layers, hidden 2560, 32 query / 8 key-value heads of 128, SwiGLU
9728, vocabulary 151,936). Built in memory from these sizes, the model keeps ``lm_head`` as a matrix of its own (the
config's top-level ``tie_word_embeddings`` is false): 389 M of the 4,833.9 M parameters; r4b plan's test builds the
same shapes (tests/e2e/test_plan.py). The LoRA counts are those of peft's layers injected into that model with
r4b's default targets (the language model's q/k/v/o/gate/up/down projections), and they equal rank x (in + out)
summed over the targeted layers (checked here and, on the tiny model, by tests/train/test_lora.py).

Bytes of a bf16 run (engine.mixed_precision: bf16) on FSDP2: full training keeps fp32 masters, fp32 gradients and
AdamW's two fp32 moments (16 bytes a parameter); LoRA keeps the frozen base in bf16 (2 bytes a parameter) and those
16 bytes for each adapter parameter. Activations are not counted: they depend on the batch, not on LoRA.

The step's peak is measured with torch.profiler (the CPU allocator's total while the step runs, over the tensors
held before it: parameters and AdamW state, counted): one SFT micro-batch of the demo's synthetic task through
r4b's packed objective and single engine, fp32, after a first step so that AdamW's state exists.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from r4b.config import EngineConfig
from r4b.config.sections import LoraSection
from r4b.models.lora import apply_lora, lora_summary, lora_targets

RANKS = (8, 64)
SIGLIP_SO400M = dict(image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                     num_attention_heads=16)  # fmt: skip
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rope_theta=1_000_000.0, tie_word_embeddings=True)  # fmt: skip


def r4b_on_meta() -> torch.nn.Module:
    """R-4B's architecture at its real sizes, on the meta device."""
    from make_random_model import PRESETS, build_model

    PRESETS["r4b"] = {"text": QWEN3_4B, "vision": SIGLIP_SO400M, "grid_pinpoints": PRESETS["1b"]["grid_pinpoints"]}
    model = build_model("r4b", device="meta", dtype=torch.bfloat16)
    if model.config.text_config.tie_word_embeddings:
        model.tie_weights()
    return model


def lora_by_shapes(model: torch.nn.Module, rank: int) -> int:
    """rank x (in + out) over the layers r4b's default targets name."""
    return sum(rank * (m.in_features + m.out_features) for m in map(model.get_submodule, _targets(model)))


def _targets(model: torch.nn.Module) -> list[str]:
    return lora_targets(model, LoraSection().targets)


def r4b_table() -> list[dict]:
    rows = []
    full = sum(p.numel() for p in r4b_on_meta().parameters())
    rows.append({"training": "full", "trainable": full, "adamw_bytes": 8 * full, "state_bytes": 16 * full})
    for rank in RANKS:
        model = r4b_on_meta()
        counted = lora_by_shapes(model, rank)
        apply_lora(model, LoraSection(rank=rank, alpha=2.0 * rank))
        trainable = lora_summary(model)["trainable"]
        assert trainable == counted, (trainable, counted)
        rows.append({"training": f"LoRA rank {rank}", "trainable": trainable, "adamw_bytes": 8 * trainable,
                     "state_bytes": 2 * full + 16 * trainable})  # fmt: skip
    return rows


def tiny_step_peak(lora: bool, data: Path) -> dict:
    """One tiny-model SFT micro-batch step (after a first): resident bytes and the step's peak above them."""
    from torch.profiler import ProfilerActivity, profile

    from r4b.models.loading import load_model_and_processor
    from r4b.train.engine import build_engine
    from r4b.train.objective import PackedSFTObjective
    from r4b.train.schedule import parameter_groups
    from r4b.train.sft_data import SFTDataset

    torch.manual_seed(0)
    model, tokenizer, processor = load_model_and_processor(None)
    if lora:
        apply_lora(model, LoraSection(rank=8, alpha=16.0))
    dataset = SFTDataset.from_files([str(data)], tokenizer, processor, max_tokens=4096)
    objective = PackedSFTObjective(model)
    lrs = {"llm": 1e-3, "vision": 1e-3, "projector": 1e-3}
    engine = build_engine(objective, parameter_groups(objective, lrs, list(lrs)), lambda step: 1.0, EngineConfig())
    row = dataset.host_batch(list(range(len(dataset.lengths)))).to(engine.device)

    def step() -> None:
        engine.backward(objective(**row.inputs()) / max(1, row.loss_tokens))
        engine.step()

    step()
    held = [p for p in objective.parameters()] + [
        t for state in engine.optimizer.state.values() for t in state.values() if torch.is_tensor(t)
    ]
    resident = sum(t.numel() * t.element_size() for t in held)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    step_peak = max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")
    return {"training": "LoRA rank 8" if lora else "full", "tokens": int(row.input_ids.numel()),
            "trainable": lora_summary(objective)["trainable"], "resident_bytes": resident, "step_peak_bytes": step_peak,
            "peak_bytes": resident + step_peak}  # fmt: skip


def main() -> int:
    torch.set_num_threads(1)
    print("| R-4B | trainable parameters | AdamW state | weights + gradients + AdamW (bf16 run) |")
    print("|---|---:|---:|---:|")
    for r in r4b_table():
        print(f"| {r['training']} | {r['trainable'] / 1e6:,.1f} M | {r['adamw_bytes'] / 2**30:,.2f} GiB | "
              f"{r['state_bytes'] / 2**30:,.2f} GiB |")  # fmt: skip
    from r4b.synth import write_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic(Path(tmp), n_sft=16, n_rl=1, n_eval=1, seed=0)
        rows = [tiny_step_peak(lora, Path(tmp) / "sft.jsonl") for lora in (False, True)]
    print()
    print("| tiny R-4B, one SFT step (CPU, fp32) | tokens | trainable | parameters + AdamW | step's peak over them | "
          "peak |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['training']} | {r['tokens']} | {r['trainable']:,} | {r['resident_bytes'] / 2**20:.2f} MiB | "
              f"{r['step_peak_bytes'] / 2**20:.2f} MiB | {r['peak_bytes'] / 2**20:.2f} MiB |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
