"""The run configs' one home (r4b/config): Literal choices and declared ranges checked on load and at a run's start,
docs/config.md generated from the dataclasses (and never stale), the resume markers, the shared sections, and the
two kernel keys with their environment variables (the variable overrides the key)."""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from pathlib import Path

import pytest

from r4b.config import STAGES, BPOConfig, ConfigError, SFTConfig, check_values, load_config
from r4b.config.docs import COMMAND, render
from r4b.config.fields import config_fields
from r4b.config.sections import (
    AttentionBackend,
    BPOTrainSection,
    FusedLossMethod,
    LossAggMode,
    ModelSection,
    PolicySection,
    PolicyUpdate,
    TrainBase,
    TrainSection,
)
from r4b.kernels import LOSS_AGG_MODES, fused_grad
from r4b.models import attention_backends as ab
from r4b.rl import UpdateConfig
from r4b.train.runtime import HARMLESS_KEYS, apply_kernel_choices, changed_keys, start_run
from r4b.train.schedule import MODULES

ROOT = Path(__file__).resolve().parents[2]
SFT_DEMO = ROOT / "configs" / "demo" / "sft.yaml"
BPO_DEMO = ROOT / "configs" / "demo" / "bpo.yaml"


@pytest.fixture
def clean_kernel_choices(monkeypatch):
    """Neither variable set; whatever a test's config applied undone afterwards."""
    monkeypatch.delenv(ab.ENV_VAR, raising=False)
    monkeypatch.delenv(fused_grad.METHOD_ENV, raising=False)
    yield
    apply_kernel_choices(None)
    ab.set_attention_backend(None)


# -- choices and ranges --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "override", "message"),
    [
        (SFTConfig, "data.on_error=maybe", "data.on_error = 'maybe': expected one of 'raise', 'skip'"),
        (SFTConfig, "engine.mixed_precision=fp16", "engine.mixed_precision = 'fp16': expected one of 'no', 'bf16'"),
        (SFTConfig, "model.train=[llm,decoder]", "model.train = 'decoder': expected one of 'vision', 'projector'"),
        (SFTConfig, "model.attention_backend=fast", "model.attention_backend = 'fast': expected one of 'auto'"),
        (SFTConfig, "model.fused_loss_method=fast", "model.fused_loss_method = 'fast': expected one of 'recompute'"),
        (BPOConfig, "rollout.strategy=ppo", "rollout.strategy = 'ppo': expected one of 'bpo', 'grpo'"),
        (BPOConfig, "rollout.engine=sglang", "rollout.engine = 'sglang': expected one of 'hf', 'vllm'"),
        (BPOConfig, "advantages.grouping=all", "advantages.grouping = 'all': expected one of 'joint', 'per_mode'"),
        (BPOConfig, "advantages.mode_decision_from=best", "mode_decision_from = 'best': expected one of 'all'"),
        (BPOConfig, "policy.loss_agg_mode=seq-mean", "policy.loss_agg_mode = 'seq-mean': expected one of"),
        (SFTConfig, "train.global_batch_samples=0", "train.global_batch_samples = 0: must be positive"),
        (SFTConfig, "train.schedule_steps=-1", "train.schedule_steps = -1: must be positive"),
        (SFTConfig, "optim.lr_llm=-1.0e-3", "optim.lr_llm = -0.001: must not be negative"),
        (SFTConfig, "optim.warmup_ratio=-0.5", "optim.warmup_ratio = -0.5: must not be negative"),
        (SFTConfig, "optim.min_lr_ratio=1.5", "optim.min_lr_ratio = 1.5: must be between 0 and 1"),
        (SFTConfig, "train.max_steps=0", "--max-steps = 0: must be positive"),
        (SFTConfig, "engine.timeout_minutes=0", "engine.timeout_minutes = 0.0: must be positive"),
        (BPOConfig, "rollout.top_p=1.5", "rollout.top_p = 1.5: must be between 0 and 1"),
        (BPOConfig, "rollout.top_p=-0.1", "rollout.top_p = -0.1: must be between 0 and 1"),
        (BPOConfig, "policy.beta=-0.1", "policy.beta = -0.1: must not be negative"),
        (BPOConfig, "train.eval_every=-1", "train.eval_every = -1: must not be negative"),
        (SFTConfig, "optim.lr_llm=nan", "optim.lr_llm = 'nan': must be a finite number"),
        (SFTConfig, "optim.lr_llm=.inf", "optim.lr_llm = inf: must be a finite number"),
        (SFTConfig, "optim.lr_llm=1.0e+400", "optim.lr_llm = inf: must be a finite number"),
        (BPOConfig, "policy.beta=.nan", "policy.beta = nan: must be a finite number"),
        (SFTConfig, "optim.betas=0.9", "optim.betas = [0.9]: must be two numbers"),
        (SFTConfig, "optim.betas=[0.9,2.0]", "optim.betas = [0.9, 2.0]: each must be at least 0 and below 1"),
        (SFTConfig, "model.train=[]", "model.train = []: must name at least one"),
    ],
)
def test_bad_values_are_refused_naming_the_file_and_key(stage, override, message):
    demo = SFT_DEMO if stage is SFTConfig else BPO_DEMO
    with pytest.raises(ConfigError, match="^" + str(demo).replace(".", r"\.") + ": ") as error:
        load_config(stage, demo, [override])
    assert message in str(error.value)


def test_a_key_set_twice_in_the_file_is_refused_with_its_line(tmp_path):
    """A second section of the same name would silently replace the first (every rate it does not repeat back to its
    default): the file, the line and the key instead."""
    config = tmp_path / "sft.yaml"
    config.write_text("optim:\n  lr_llm: 1.0e-3\n  lr_vision: 2.0e-4\ntrain:\n  epochs: 2\noptim:\n  lr_llm: 5.0e-4\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(config))}:6: key 'optim' is set twice .*line 1\)$"):
        load_config(SFTConfig, config)
    config.write_text("optim:\n  lr_llm: 1.0e-3\n  lr_llm: 5.0e-4\n")
    with pytest.raises(ConfigError, match=r":3: key 'lr_llm' is set twice in one mapping \(first on line 2\)"):
        load_config(SFTConfig, config)


def test_accepted_values_and_defaults_load():
    for stage in STAGES.values():
        assert load_config(stage) == stage()  # every default passes its own checks
    config = load_config(BPOConfig, BPO_DEMO, ["model.train=[llm]", "optim.warmup_ratio=1", "rollout.top_k=0"])
    assert config.model.train == ["llm"] and config.optim.warmup_ratio == 1.0
    assert load_config(SFTConfig, None, ["train.max_steps=null"]).train.max_steps is None


def test_a_config_built_in_python_is_checked_too(tmp_path):
    config = BPOConfig(output_dir=str(tmp_path / "run"))
    config.rollout.strategy = "ppo"
    with pytest.raises(ConfigError, match=r"^<config>: rollout\.strategy = 'ppo': expected one of 'bpo', 'grpo'$"):
        check_values(config)
    config.rollout.strategy = "grpo"
    config.train.prompts_per_step = 0
    with pytest.raises(ConfigError, match=r"train\.prompts_per_step = 0: must be positive"):
        start_run(config, config.output_dir, 0)  # before anything is written
    assert not (tmp_path / "run").exists()


# -- one source ---------------------------------------------------------------------------------------------------


def test_every_key_has_a_docstring():
    missing = [f"{cls.__name__}: {f.key}" for cls in STAGES.values() for f in config_fields(cls) if not f.doc]
    assert not missing, "keys without a docstring (a string literal right under the field): " + ", ".join(missing)


def test_the_choices_are_the_libraries_own():
    assert typing.get_args(AttentionBackend) == ab.BACKENDS
    assert typing.get_args(FusedLossMethod) == fused_grad.METHODS  # r4b.kernels cannot import r4b.config
    assert set(typing.get_args(LossAggMode)) == set(LOSS_AGG_MODES)
    assert MODULES == ("vision", "projector", "llm") == tuple(SFTConfig().model.train)


def test_docs_config_md_is_current():
    current = (ROOT / "docs" / "config.md").read_text()
    assert current == render(), f"docs/config.md is stale: regenerate it with `{COMMAND}`"


def test_docs_list_every_key_of_every_stage():
    page = render()
    for cls in STAGES.values():
        for f in config_fields(cls):
            assert f"| `{f.key}` |" in page


def test_resume_may_change_keys_are_declared_on_the_fields():
    assert {
        "output_dir", "train.resume", "train.max_steps", "train.save_every", "train.keep_checkpoints",
        "train.tensorboard", "train.progress", "train.export", "train.allow_config_change", "engine.timeout_minutes",
        "model.attention_backend", "model.fused_loss_method", "train.on_nonfinite", "train.stop_after_flat_steps",
        "logging.sinks", "logging.samples_every", "logging.samples_prompts", "logging.project", "logging.run_name",
        "logging.mlflow_uri", "export.lora",
    } == HARMLESS_KEYS  # fmt: skip
    old = {"model": {"path": None}, "train": {"save_every": 0}}
    new = {"model": {"path": None, "attention_backend": "flex"}, "train": {"save_every": 5}}
    assert changed_keys(old, new) == []


def test_train_sections_share_their_common_keys():
    common = [f.name for f in dataclasses.fields(TrainBase)]
    assert len(common) == 10
    for cls in (TrainSection, BPOTrainSection):
        assert issubclass(cls, TrainBase)
        assert [f.name for f in dataclasses.fields(cls)][:10] == common
    # the YAML keys did not move: train.max_steps, train.steps, train.epochs ...
    assert load_config(BPOConfig, None, ["train.max_steps=3", "train.steps=7"]).train.max_steps == 3
    assert load_config(SFTConfig, None, ["train.max_steps=3", "train.epochs=2"]).train.epochs == 2


def test_update_config_is_built_from_the_policy_section():
    assert issubclass(UpdateConfig, PolicyUpdate) and issubclass(PolicySection, PolicyUpdate)
    policy = load_config(BPOConfig, BPO_DEMO, ["policy.mini_batches=2", "policy.loss_agg_mode=seq-mean-token-sum"])
    update = UpdateConfig.from_policy(policy.policy, temperature=0.7)
    for f in dataclasses.fields(PolicyUpdate):
        assert getattr(update, f.name) == getattr(policy.policy, f.name)
    assert update.temperature == 0.7 and update.norm_len is None
    assert UpdateConfig().clip_eps_high == 0.2 and PolicySection().clip_eps_high == 0.28  # both defaults kept
    with pytest.raises(ValueError, match="unknown loss_agg_mode 'seq-mean'"):
        UpdateConfig(loss_agg_mode="seq-mean")


# -- the kernel keys and their environment variables ---------------------------------------------------------------


@pytest.mark.usefixtures("clean_kernel_choices")
def test_kernel_keys_apply_where_the_variables_are_unset():
    assert apply_kernel_choices(ModelSection()) == {"attention_backend": None, "fused_loss_method": None}
    assert ab.attention_backend() == "auto" and fused_grad.resolve_method(None) == "recompute"
    chosen = apply_kernel_choices(ModelSection(attention_backend="flex", fused_loss_method="cublas"))
    assert chosen == {"attention_backend": "flex", "fused_loss_method": "cublas"}
    assert ab.attention_backend() == "flex" and fused_grad.resolve_method(None) == "cublas"
    # the next run of the process (r4b demo: sft, then bpo) starts from the library's defaults again
    apply_kernel_choices(ModelSection())
    assert ab.attention_backend() == "auto" and fused_grad.resolve_method(None) == "recompute"


@pytest.mark.usefixtures("clean_kernel_choices")
def test_the_environment_variables_override_the_keys(monkeypatch):
    monkeypatch.setenv(ab.ENV_VAR, "r4b")
    monkeypatch.setenv(fused_grad.METHOD_ENV, "cublas-fast")
    chosen = apply_kernel_choices(ModelSection(attention_backend="flex", fused_loss_method="cublas"))
    assert chosen == {"attention_backend": "r4b", "fused_loss_method": "cublas-fast"}
    assert ab.attention_backend() == "r4b" and fused_grad.resolve_method(None) == "cublas-fast"
    apply_kernel_choices(ModelSection())  # a user's variable is never removed
    assert fused_grad.resolve_method(None) == "cublas-fast"


@pytest.mark.usefixtures("clean_kernel_choices")
def test_a_run_applies_its_kernel_keys_at_start(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("")
    keys = ["model.attention_backend=r4b", "model.fused_loss_method=cublas"]
    config = load_config(SFTConfig, SFT_DEMO, [f"output_dir={tmp_path / 'run'}", f"data.train=[{data}]", *keys])
    start_run(config, config.output_dir, 0)
    assert ab.attention_backend() == "r4b" and fused_grad.resolve_method(None) == "cublas"


@pytest.mark.usefixtures("clean_kernel_choices")
def test_the_method_key_never_writes_the_environment():
    """The key sets the kernels' process default (fused_grad.set_default_method), not $R4B_FUSED_LOSS_METHOD: a
    child process (a DataLoader worker, torchrun's ranks) inherits nothing a config chose."""
    apply_kernel_choices(ModelSection(fused_loss_method="cublas-fast"))
    assert fused_grad.METHOD_ENV not in os.environ and fused_grad.resolve_method(None) == "cublas-fast"
    with pytest.raises(ValueError, match="unknown fused-loss method 'nope'"):
        fused_grad.set_default_method("nope")
