"""LoRA (``model.lora``, r4b.models.lora) on the embedded tiny R-4B: the first loss is full training's, a step moves
the adapters alone, checkpoints hold the adapters and their AdamW state only and resume exactly, the merged export is
base + alpha/rank x BA (and loads without r4b with the greedy tokens of the unmerged policy), the adapter export loads
with peft, the rollout sync streams merged weights under the base names, and BPO's reference is the base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import DEMO_SFT, synthetic_data
from models.test_export_standalone import image_files  # noqa: F401 (a fixture: the pictures of its cases)

from r4b.cli import main
from r4b.config.sections import LoraSection
from r4b.errors import InputError
from r4b.models.lora import adapters_disabled, apply_lora, is_adapter_parameter, lora_targets, merged_tensors
from r4b.models.tiny import build_tiny_r4b

pytestmark = pytest.mark.usefixtures("torch_reference_kernels")  # tests/conftest.py

RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK
LORA = (f"model.lora.rank={RANK}", f"model.lora.alpha={ALPHA}")


def sft(data: Path, out: Path, *extra: str) -> Path:
    """Three steps of ``r4b sft`` (the demo config) on ``data`` into ``out``, a checkpoint after each."""
    argv = ["sft", "--config", str(DEMO_SFT), "--output-dir", str(out), f"data.train=[{data}]",
            "train.global_batch_samples=4", "train.max_steps=3", "train.save_every=1", "train.keep_checkpoints=3",
            "train.progress=false", "train.tensorboard=false", "optim.weight_decay=0.1", *extra]  # fmt: skip
    assert main(argv) == 0
    return out


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def exported_base() -> dict[str, torch.Tensor]:
    """The tiny base model (seed 0) in the export's layout."""
    from r4b.models.checkpoint import r4b_state_dict

    return {k: v.float() for k, v in r4b_state_dict(build_tiny_r4b(seed=0)).items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthetic_data(tmp_path_factory, n_sft=8) / "sft.jsonl"


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, Path]:
    """A full run's first step, a LoRA run (merged and adapter exports) and the LoRA run resumed from step 1."""
    out = tmp_path_factory.mktemp("lora")
    with pytest.MonkeyPatch.context() as patch:  # the torch references (torch_reference_kernels, module-wide)
        patch.setenv("TRITON_INTERPRET", "0")
        lora = sft(data, out / "lora", *LORA, "export.lora=both")
        resumed = sft(data, out / "resumed", *LORA, "export.lora=both", f"train.resume={lora / 'checkpoint-1'}")
        full = sft(data, out / "full", "train.max_steps=1", "train.export=false")
    return {"full": full, "lora": lora, "resumed": resumed}


def test_targets_are_the_language_models_projections_and_lm_head_is_refused(tiny_r4b):
    default = lora_targets(tiny_r4b, LoraSection().targets)
    assert len(default) == 14 and all(".language_model.layers." in name for name in default)
    assert lora_targets(tiny_r4b, ["q_proj"]) == [f"model.language_model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    vision = lora_targets(tiny_r4b, [r".*vision_tower.*\.fc1"])  # a dotted pattern reaches the vision tower
    assert vision == [f"model.vision_tower.encoder.layers.{i}.mlp.fc1" for i in (0, 1)]
    with pytest.raises(InputError, match=r"^model.lora.targets: lm_head cannot take LoRA: the fused loss reads"):
        lora_targets(tiny_r4b, ["q_proj", "lm_head"])
    with pytest.raises(InputError, match=r"^model.lora.targets: 'qproj' names no linear layer of the model$"):
        lora_targets(tiny_r4b, ["qproj"])


def test_targets_in_a_module_that_does_not_train_are_refused(data, tmp_path, capsys):
    """A dotted target in the vision tower while model.train leaves vision out (or optim.lr_vision is 0): its
    adapters would stay at B = 0, so the run stops before it starts, in one line; with vision trained they train."""
    from r4b.train.schedule import parameter_groups

    model = build_tiny_r4b(seed=0)
    apply_lora(model, LoraSection(rank=RANK, targets=["q_proj", r".*vision_tower.*\.fc1"]))
    lrs = {"vision": 1e-3, "projector": 1e-3, "llm": 1e-3}
    refused = (
        r"^model.lora.targets: 2 targeted layer\(s\) are in the vision module "
        r"\(model.vision_tower.encoder.layers.0.mlp.fc1, ...\), which does not train \(model.train, optim.lr_vision\): "
        r"their adapters would never change; train vision or leave its layers out of model.lora.targets$"
    )
    with pytest.raises(InputError, match=refused):
        parameter_groups(model, lrs, ["projector", "llm"])
    with pytest.raises(InputError, match=refused):
        parameter_groups(model, {**lrs, "vision": 0.0}, ["vision", "projector", "llm"])
    groups = {g["name"]: len(g["params"]) for g in parameter_groups(model, lrs, ["vision", "llm"])}
    assert groups == {"vision": 4, "llm": 4}  # A and B of 2 fc1 layers, of 2 q_proj layers

    argv = ["sft", "--config", str(DEMO_SFT), "--output-dir", str(tmp_path / "run"), f"data.train=[{data}]",
            *LORA, r"model.lora.targets=[q_proj, .*vision_tower.*\.fc1]", "model.train=[projector, llm]"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the data's warnings
    assert err.startswith("r4b sft: error: model.lora.targets: 2 targeted layer(s) are in the vision module")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_first_loss_is_full_trainings_and_the_log_gives_the_adapters_size(runs, capsys):
    assert metrics(runs["lora"])[0]["loss"] == metrics(runs["full"])[0]["loss"]  # B = 0: the base's forward
    assert [m["step"] for m in metrics(runs["lora"])] == [1, 2, 3]


def test_checkpoints_hold_the_adapters_and_their_optimizer_state_only(runs):
    state = torch.load(runs["lora"] / "checkpoint-1" / "engine" / "engine_state.pt", weights_only=True)
    assert state["model"] and all(is_adapter_parameter(k) for k in state["model"])
    assert len(state["model"]) == 2 * 14  # A and B of each targeted layer
    adapters = sum(v.numel() for v in state["model"].values())
    moments = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in state["optimizer"]["state"].values())
    assert moments == 2 * adapters


def test_a_step_moves_the_adapters_alone_and_the_merged_export_is_base_plus_scaled_ba(runs):
    """The export after step 3 against the tiny base and the adapters of checkpoint 3: every weight the base's
    except the targeted layers', which are base + alpha/rank x BA."""
    adapters = torch.load(runs["lora"] / "checkpoint-3" / "engine" / "engine_state.pt", weights_only=True)["model"]
    base, got = exported_base(), weights(runs["lora"] / "model")
    assert set(got) == set(base)
    targeted = {k.removeprefix("model.").split(".lora_A.")[0] for k in adapters if ".lora_A." in k}
    from r4b.models.checkpoint import r4b_state_dict

    model = build_tiny_r4b(seed=0)
    for layer in targeted:  # the merged weight of each layer, in the export's names
        a, b = adapters[f"model.{layer}.lora_A.default.weight"], adapters[f"model.{layer}.lora_B.default.weight"]
        assert b.abs().max() > 0, layer  # the adapters moved
        model.get_submodule(layer).weight.data += SCALE * b @ a
    expected = {k: v.float() for k, v in r4b_state_dict(model).items()}
    changed = {k for k in base if not torch.equal(got[k], base[k])}
    assert changed and all(k.endswith("_proj.weight") and "language_model" in k for k in changed), changed
    assert len(changed) == len(targeted)
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6, msg=k)


def test_the_adapter_export_loads_with_peft_onto_the_base(runs):
    from peft import PeftModel

    from r4b.models.checkpoint import r4b_state_dict
    from r4b.models.model_card import read_card_data

    merged = PeftModel.from_pretrained(build_tiny_r4b(seed=0), runs["lora"] / "adapter").merge_and_unload()
    got, expected = {k: v.float() for k, v in r4b_state_dict(merged).items()}, weights(runs["lora"] / "model")
    assert set(got) == set(expected)
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6, msg=k)
    for where in ("model", "adapter"):
        card = (runs["lora"] / where / "README.md").read_text()
        assert f"- LoRA-trained (stage 1, sft): rank {RANK}, alpha {ALPHA:g}" in card, card
        assert read_card_data(runs["lora"] / where)["stages"][0]["config"]["model"]["lora"]["rank"] == RANK
    assert "PeftModel.from_pretrained(base, path)" in (runs["lora"] / "adapter" / "README.md").read_text()


def test_a_resumed_lora_run_equals_the_uninterrupted_one(runs):
    full, resumed = metrics(runs["lora"]), metrics(runs["resumed"])
    assert [m["step"] for m in resumed] == [2, 3]
    for a, b in zip(full[1:], resumed, strict=True):
        assert (a["loss"], a["grad_norm"], a["lrs"]) == (b["loss"], b["grad_norm"], b["lrs"])
    for where in ("model", "adapter"):
        expected, got = weights(runs["lora"] / where), weights(runs["resumed"] / where)
        assert set(expected) == set(got) and all(torch.equal(expected[k], got[k]) for k in expected), where


def lora_model(seed: int = 1) -> torch.nn.Module:
    """The tiny model with adapters whose B is random (a merge that changes the weights), fp32."""
    model = build_tiny_r4b(seed=0)
    apply_lora(model, LoraSection(rank=RANK, alpha=ALPHA))
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if ".lora_B." in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.1
    return model


def test_the_rollout_sync_streams_merged_weights_under_the_base_names(tokenizer):
    """Through the single engine into a transformers rollout engine on the base model (strict: every name known,
    none missing), in bf16 as the rollout model keeps them; the reference pass is the base's."""
    from r4b.config import EngineConfig
    from r4b.rl.update import BPOObjective
    from r4b.rollout import HFRolloutEngine
    from r4b.train.engine import build_engine
    from r4b.train.schedule import parameter_groups
    from r4b.train.weight_sync import sync_rollout_weights

    model = lora_model()
    objective = BPOObjective(model)
    groups = parameter_groups(objective, {"llm": 1e-3, "vision": 1e-3, "projector": 1e-3}, ["llm"])
    trained = [n for n, p in objective.named_parameters() if p.requires_grad]
    assert trained and all(is_adapter_parameter(n) for n in trained)
    engine = build_engine(objective, groups, lambda step: 1.0, EngineConfig())
    rollout_model = build_tiny_r4b(seed=0).to(torch.bfloat16)
    from r4b.models.image_processing import RImageProcessor

    processor = RImageProcessor.from_config(rollout_model.config)
    rollout = HFRolloutEngine(rollout_model, tokenizer, processor, batch_size=1)
    sync_rollout_weights(engine, rollout)
    merged = dict(merged_tensors(model.state_dict().items(), SCALE))
    assert list(merged) == list(build_tiny_r4b(seed=0).state_dict())  # the base's names, in its order
    for name, tensor in rollout_model.state_dict().items():
        assert torch.equal(tensor, merged[name].to(torch.bfloat16)), name
    layer = "model.language_model.layers.0.self_attn.q_proj"
    a, b = model.get_submodule(f"{layer}.lora_A.default").weight, model.get_submodule(f"{layer}.lora_B.default").weight
    base = model.get_submodule(f"{layer}.base_layer").weight
    torch.testing.assert_close(merged[f"{layer}.weight"], base + SCALE * b @ a, rtol=0, atol=1e-6)

    # the reference: the policy with its adapters off is the base, and what trained still trains afterwards
    ids = torch.randint(0, 100, (1, 9))
    with torch.no_grad(), adapters_disabled(model):
        off = model(input_ids=ids).logits
    with torch.no_grad():
        on, plain = model(input_ids=ids).logits, build_tiny_r4b(seed=0)(input_ids=ids).logits
    assert torch.equal(off, plain) and not torch.allclose(on, plain)
    assert [n for n, p in objective.named_parameters() if p.requires_grad] == trained

    # the merged fp32 copy samples from the LoRA policy: the sync probe's log-probs (vLLM's check) agree
    from r4b.train.sync_probe import check_rollout_sync

    fp32 = HFRolloutEngine(build_tiny_r4b(seed=0), tokenizer, processor, batch_size=1)
    sync_rollout_weights(engine, fp32)
    assert check_rollout_sync(engine, fp32) < 1e-4


def test_bf16_keeps_the_frozen_base_in_bf16_and_the_adapters_in_fp32():
    model = build_tiny_r4b(seed=0)
    apply_lora(model, LoraSection(rank=RANK), torch.bfloat16)
    dtypes = {(is_adapter_parameter(n), p.dtype) for n, p in model.named_parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}


def test_a_checkpoint_written_before_model_lora_existed_resumes(runs, data, tmp_path):
    """Its config.yaml lacks model.lora and export: they had their defaults' effect (no LoRA), so a resume with the
    defaults is no change of config."""
    import shutil

    import yaml

    from r4b.config import load_config
    from r4b.config.sections import SFTConfig
    from r4b.train.runtime import check_run_dir

    run = tmp_path / "old"
    shutil.copytree(runs["full"], run)
    for config_file in (run / "config.yaml", run / "checkpoint-1" / "config.yaml"):
        old = yaml.safe_load(config_file.read_text())
        del old["model"]["lora"], old["export"]
        config_file.write_text(yaml.safe_dump(old))
    (run / "checkpoint-1" / "checksums.json").unlink()  # as an r4b that wrote none
    args = [f"data.train=[{data}]", "train.global_batch_samples=4", "train.max_steps=1", "train.save_every=1",
            "train.keep_checkpoints=3", "train.progress=false", "train.tensorboard=false", "optim.weight_decay=0.1",
            "train.export=false"]  # fmt: skip
    check_run_dir(load_config(SFTConfig, DEMO_SFT, [f"output_dir={run}", *args]), run)
    with pytest.raises(InputError, match=r"model\.lora\.rank: 0 -> 4"):
        check_run_dir(load_config(SFTConfig, DEMO_SFT, [f"output_dir={run}", *args, "model.lora.rank=4"]), run)


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_vl_lora_starts_at_full_trainings_loss_and_exports_merged(kind, data, tmp_path, monkeypatch):
    """Qwen2.5-VL / Qwen3-VL: adapters on the language model only (their vision towers have projections of the
    same names), the first loss full training's, the merged export reloads with stock transformers as the base's
    weights plus alpha/rank x BA."""
    from qwen_vl_models import save_tiny_qwen_vl
    from transformers import AutoModelForImageTextToText

    base_dir = save_tiny_qwen_vl(kind, tmp_path / kind)
    model = AutoModelForImageTextToText.from_pretrained(base_dir)
    targets = lora_targets(model, LoraSection().targets)
    assert len(targets) == 14 and all(".language_model." in name for name in targets)
    one = ("train.max_steps=1", f"model.path={base_dir}", "data.max_tokens=400")
    lora = sft(data, tmp_path / "lora", *one, *LORA)
    full = sft(data, tmp_path / "full", *one, "train.export=false")
    assert metrics(lora)[0]["loss"] == metrics(full)[0]["loss"]
    adapters = torch.load(lora / "checkpoint-1" / "engine" / "engine_state.pt", weights_only=True)["model"]
    for name in targets:
        a, b = adapters[f"model.{name}.lora_A.default.weight"], adapters[f"model.{name}.lora_B.default.weight"]
        assert b.abs().max() > 0, name
        model.get_submodule(name).weight.data += SCALE * b @ a
    exported = AutoModelForImageTextToText.from_pretrained(lora / "model").state_dict()
    expected = model.state_dict()
    assert exported.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(exported[k], expected[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.subprocess
def test_the_merged_export_without_r4b_gives_the_lora_policys_greedy_tokens(runs, image_files, tmp_path):  # noqa: F811
    """The LoRA policy as r4b trains it (adapters unmerged, checkpoint 3) and its merged export loaded without r4b (a
    subprocess that cannot import it, remote code): the same greedy tokens in every mode, images or not."""
    from models.test_export_standalone import make_cases, run_without_r4b
    from PIL import Image

    from r4b.models import load_model_and_processor
    from r4b.rollout import HFRolloutEngine, Prompt, SamplingParams

    cases = make_cases(image_files)
    got = run_without_r4b(runs["lora"] / "model", cases, tmp_path)
    assert got["r4b_absent"]

    _, tokenizer, processor = load_model_and_processor(runs["lora"] / "model")
    policy = build_tiny_r4b(seed=0)
    apply_lora(policy, LoraSection(rank=RANK, alpha=ALPHA))
    adapters = torch.load(runs["lora"] / "checkpoint-3" / "engine" / "engine_state.pt", weights_only=True)["model"]
    assert not policy.load_state_dict({k.removeprefix("model."): v for k, v in adapters.items()}, strict=False)[1]
    engine = HFRolloutEngine(policy, tokenizer, processor, batch_size=1)
    for case, result in zip(cases, got["results"], strict=True):
        sampling = SamplingParams(temperature=0.0, max_new_tokens=case["max_new_tokens"])
        prompt = Prompt(case["messages"], [Image.open(p).convert("RGB") for p in case["images"]])
        (rollout,) = engine.generate([prompt], n=1, mode=case["mode"], sampling=sampling)[0]
        assert (result["ids"], result["response"]) == (rollout.prompt_ids, rollout.response_ids), case["mode"]
