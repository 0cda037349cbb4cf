"""The weight sync's probe (r4b.train.sync_probe): a rollout engine holding the trainer's weights passes, one holding
other weights is an error, and the trainer's sync runs the probe only for engines that ask for it (vLLM; on vLLM
itself in tests/real_vllm)."""

from __future__ import annotations

import copy
import types

import pytest
import torch

from r4b.models.image_processing import RImageProcessor
from r4b.models.tiny import build_tiny_r4b
from r4b.rollout import HFRolloutEngine
from r4b.train import sync_probe

pytestmark = pytest.mark.usefixtures("torch_reference_kernels")  # the kernels have their own tests


def _engine(model, tokenizer):
    return HFRolloutEngine(model, tokenizer, RImageProcessor.from_config(model.config))


def test_the_probe_passes_on_the_trainers_weights_and_fails_on_others(tiny_r4b, tokenizer):
    with torch.no_grad():  # sharper logits than the fresh model's: a stale engine's log-probs differ clearly
        tiny_r4b.lm_head.weight.mul_(20.0)
    assert sync_probe.check_rollout_sync(tiny_r4b, _engine(copy.deepcopy(tiny_r4b), tokenizer)) < 1e-4
    stale = build_tiny_r4b(seed=3)
    with pytest.raises(RuntimeError, match="the sync did not take effect"):
        sync_probe.check_rollout_sync(tiny_r4b, _engine(stale, tokenizer))


def test_half_precision_on_either_side_widens_the_tolerance():
    fp32, bf16 = types.SimpleNamespace(mixed_precision="no"), types.SimpleNamespace(mixed_precision="bf16")
    assert sync_probe.sync_tolerance(torch.float32, types.SimpleNamespace(config=fp32)) == 1e-3
    assert sync_probe.sync_tolerance(torch.float32, types.SimpleNamespace(config=bf16)) == 0.1
    assert sync_probe.sync_tolerance(torch.bfloat16, types.SimpleNamespace(config=fp32)) == 0.1


@pytest.mark.parametrize("verify", [False, True])
def test_the_sync_probes_only_engines_that_ask(monkeypatch, verify):
    checked, loaded = [], []
    trainer = types.SimpleNamespace(full_tensors=lambda dtype: iter([("model.lm_head.weight", torch.zeros(2))]))
    rollout = types.SimpleNamespace(verify_sync=verify, load_weights=lambda pairs: loaded.extend(pairs))
    monkeypatch.setattr(sync_probe, "check_rollout_sync", lambda engine, rollout_engine: checked.append(engine))
    sync_probe.sync_and_verify(trainer, rollout)
    assert [name for name, _ in loaded] == ["lm_head.weight"] and checked == ([trainer] if verify else [])
