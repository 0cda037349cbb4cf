"""The vLLM rollout engine.

On machines without vLLM (CI), a stand-in ``vllm`` module checks r4b's side of the contract: the request
(template ids with one ``<image>`` per image, the images, per-prompt seeds, stop ids, the ``<image>`` bias),
the translation of vLLM's outputs into Rollouts (completion order, stop token kept, finished flag,
log-probs), the refusal of a prompt vLLM expanded differently, weight loading, sleep mode, and
``r4b bpo`` wiring with ``rollout.engine=vllm``. The engine on vLLM itself (greedy parity with the transformers
engine, weight sync, BPO and eval) is tested in tests/real_vllm (``make test-vllm``, vLLM's CPU build), which also
checks this stand-in's answers against vLLM's.
"""

from __future__ import annotations

import itertools
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from r4b.format import MODE_SUFFIX
from r4b.models.checkpoint import checkpoint_name
from r4b.models.image_processing import RImageProcessor
from r4b.models.tiny import build_tiny_r4b
from r4b.models.tokenizer import IMAGE_TOKEN, load_tokenizer
from r4b.rollout import Prompt, SamplingParams, encode_prompt
from r4b.rollout.vllm import request_seed

IM_END = "<|im_end|>"
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Completion:
    index: int
    token_ids: list[int]
    finish_reason: str
    logprobs: list[dict[int, Any]] | None = None


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[Completion]


@dataclass
class FakeLLM:
    """Expands ``<image>`` as vLLM does (``image_extra`` tokens off, to test the refusal) and answers
    completion k of every request with ``[100 + k, 101, <|im_end|>]`` (even k, stopped) or
    ``[100 + k, 101, 102]`` (odd k, cut at max_tokens)."""

    processor: Any
    image_id: int
    im_end: int
    image_extra: int = 0
    calls: list[tuple[list[dict], list[Any]]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    loaded: list[tuple[str, torch.Tensor]] = field(default_factory=list)

    def generate(self, requests, params, use_tqdm=True):
        self.calls.append((requests, params))
        self.events.append("generate")
        return [self._answer(request, param) for request, param in zip(requests, params, strict=True)]

    def _answer(self, request, param) -> RequestOutput:
        images = iter(request.get("multi_modal_data", {}).get("image", []))
        ids = []
        for token in request["prompt_token_ids"]:
            if token == self.image_id:
                image = next(images)
                ids += [token] * (self.processor.num_image_tokens(image.height, image.width) + self.image_extra)
            else:
                ids.append(token)
        completions = []
        for k in reversed(range(param.n)):  # vLLM does not promise index order
            tokens = [100 + k, 101, self.im_end if k % 2 == 0 else 102]
            logprobs = [{t: types.SimpleNamespace(logprob=-0.25 * (j + 1))} for j, t in enumerate(tokens)]
            reason = "stop" if k % 2 == 0 else "length"
            completions.append(Completion(k, tokens, reason, logprobs if param.logprobs is not None else None))
        return RequestOutput(ids, completions)

    def collective_rpc(self, method, kwargs=None):
        assert method == "reload_weights" and kwargs["is_checkpoint_format"] is True  # vLLM's checkpoint-format reload
        self.loaded.extend(kwargs["weights_iterator"])
        return [None]

    def reset_prefix_cache(self):
        self.events.append("reset_prefix_cache")
        return True

    @property
    def llm_engine(self):
        core = types.SimpleNamespace(shutdown=lambda: self.events.append("shutdown"))
        return types.SimpleNamespace(
            reset_encoder_cache=lambda: self.events.append("reset_encoder_cache"), engine_core=core
        )

    def sleep(self, level):
        self.events.append(f"sleep{level}")

    def wake_up(self, tags=None):
        self.events.append(f"wake_up:{','.join(tags)}")


@pytest.fixture()
def fake_vllm(monkeypatch):
    """A ``vllm`` module whose LLM is a FakeLLM; ``module.built`` lists the LLMs made with their kwargs."""
    module = types.ModuleType("vllm")
    module.SamplingParams = lambda **kwargs: types.SimpleNamespace(**kwargs)
    module.built = []
    tokenizer = load_tokenizer()

    def make_llm(model, **kwargs):
        processor = RImageProcessor.from_config(build_tiny_r4b(seed=0).config)  # what r4b bpo runs here
        llm = FakeLLM(processor, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.convert_tokens_to_ids(IM_END))
        module.built.append((model, kwargs, llm))
        return llm

    module.LLM = make_llm
    module.cleanups = []
    # the stand-in answers fixed tokens, so no probe of a weight sync can match the trainer's log-probs: the probe
    # is tested on the transformers engine (tests/train/test_sync_probe.py) and on vLLM itself (tests/vllm)
    from r4b.rollout import vllm as engine_module

    monkeypatch.setattr(engine_module.VLLMRolloutEngine, "verify_sync", False)
    monkeypatch.setattr(engine_module, "_cpu_backend", lambda: False)  # the stand-in is no CPU build
    state = types.ModuleType("vllm.distributed.parallel_state")
    state.cleanup_dist_env_and_memory = lambda: module.cleanups.append(True)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.distributed", types.ModuleType("vllm.distributed"))
    monkeypatch.setitem(sys.modules, "vllm.distributed.parallel_state", state)
    return module


@pytest.fixture(scope="module")
def processor():
    return RImageProcessor.from_config(build_tiny_r4b(seed=0).config)


def _prompts() -> list[Prompt]:
    image = Image.new("RGB", (56, 28), "red")
    return [
        Prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}], [image]),
        Prompt([{"role": "user", "content": "Seven plus five?"}]),
    ]


def _engine(fake_vllm, tokenizer, processor, **kwargs):
    from r4b.rollout.vllm import VLLMRolloutEngine

    llm = FakeLLM(processor, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.convert_tokens_to_ids(IM_END))
    return VLLMRolloutEngine(llm, tokenizer, processor, **kwargs), llm


@pytest.mark.parametrize("mode", ["thinking", "non_thinking", "auto"])
def test_requests_and_rollouts(fake_vllm, tokenizer, processor, mode):
    engine, llm = _engine(fake_vllm, tokenizer, processor)
    sampling = SamplingParams(temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=3, seed=11, logprobs=True)
    rows = engine.generate(_prompts(), n=3, mode=mode, sampling=sampling)

    (requests, params), image_id = llm.calls[0], tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for prompt, request, param, index in zip(_prompts(), requests, params, range(2), strict=True):
        encoded = encode_prompt(tokenizer, processor, prompt, mode)
        assert request["prompt_token_ids"] == encoded.template_ids
        assert request["prompt_token_ids"].count(image_id) == len(prompt.images)
        assert len(request.get("multi_modal_data", {}).get("image", [])) == len(prompt.images)
        assert (param.n, param.temperature, param.top_p, param.top_k, param.max_tokens) == (3, 0.7, 0.9, 5, 3)
        assert param.seed == request_seed(11, index) and param.logprobs == 0 and param.logit_bias == {image_id: -100.0}
        assert tokenizer.convert_tokens_to_ids(IM_END) in param.stop_token_ids

    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    suffix = tokenizer(MODE_SUFFIX[mode], add_special_tokens=False)["input_ids"]
    for prompt, row in zip(_prompts(), rows, strict=True):
        assert len(row) == 3
        for k, rollout in enumerate(row):  # in completion-index order
            assert rollout.prompt_ids == encode_prompt(tokenizer, processor, prompt, mode).ids
            assert rollout.prompt_ids[-len(suffix) :] == suffix and rollout.mode == mode
            stopped = k % 2 == 0
            assert rollout.response_ids == [100 + k, 101, im_end if stopped else 102]
            assert rollout.finished is stopped
            assert rollout.text == tokenizer.decode([100 + k, 101] if stopped else [100 + k, 101, 102])
            assert rollout.logprobs == [-0.25, -0.5, -0.75]


def test_without_logprobs_and_greedy(fake_vllm, tokenizer, processor):
    engine, llm = _engine(fake_vllm, tokenizer, processor)
    rows = engine.generate(_prompts()[1:], n=1, mode="auto", sampling=SamplingParams(temperature=0.0))
    assert rows[0][0].logprobs is None and llm.calls[0][1][0].temperature == 0.0
    assert llm.calls[0][1][0].logprobs is None
    # vLLM refuses greedy n > 1: one greedy answer per prompt, repeated (as distinct objects)
    rows = engine.generate(_prompts(), n=3, mode="auto", sampling=SamplingParams(temperature=0.0))
    assert [param.n for param in llm.calls[1][1]] == [1, 1]
    for row in rows:
        assert len(row) == 3 and len({id(r) for r in row}) == 3
        assert all(r.response_ids == row[0].response_ids for r in row)


def test_request_seeds_never_collide():
    """vLLM seeds sample k of a request with seed + k: requests' seeds are 2**16 apart or more."""
    seeds = sorted(request_seed(seed, index) for seed in range(50) for index in range(50))
    assert min(b - a for a, b in itertools.pairwise(seeds)) >= 1 << 16
    assert request_seed(3, 1) == request_seed(3, 1) and all(0 <= s < 1 << 62 for s in seeds)


def test_a_prompt_expanded_differently_is_refused(fake_vllm, tokenizer, processor):
    engine, llm = _engine(fake_vllm, tokenizer, processor)
    llm.image_extra = 1
    with pytest.raises(ValueError, match="image processors disagree"):
        engine.generate(_prompts()[:1], n=1, mode="thinking", sampling=SamplingParams())


def test_weights_load_by_checkpoint_name_and_drop_the_caches(fake_vllm, tokenizer, processor):
    engine, llm = _engine(fake_vllm, tokenizer, processor)
    state = {
        "model.language_model.embed_tokens.weight": torch.ones(2),
        "model.vision_tower.embeddings.patch_embedding.weight": torch.ones(1),  # transformers 5 drops vision_model.
        "lm_head.weight": torch.zeros(2),
    }
    engine.load_weights(state)
    assert [name for name, _ in llm.loaded] == [
        "model.language_model.embed_tokens.weight",
        "model.vision_tower.vision_model.embeddings.patch_embedding.weight",  # what vLLM's SigLIP loader knows
        "lm_head.weight",
    ]
    assert llm.events == ["reset_prefix_cache", "reset_encoder_cache"]
    engine.sleep()  # no sleep_level: a no-op
    assert llm.events == ["reset_prefix_cache", "reset_encoder_cache"]


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_mode(fake_vllm, tokenizer, processor, level, monkeypatch):
    engine, llm = _engine(fake_vllm, tokenizer, processor, sleep_level=level)
    # torch's cached blocks go back to the driver before vLLM wakes (else its memory may not fit)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: llm.events.append("empty_cache"))
    greedy = SamplingParams(temperature=0.0)
    engine.generate(_prompts()[1:], n=1, mode="auto", sampling=greedy)
    engine.sleep()
    engine.sleep()  # once asleep, stays asleep
    assert engine.needs_weights is (level == 2)
    if level == 2:  # the weights are gone: generating first is an error
        with pytest.raises(RuntimeError, match="load_weights"):
            engine.generate(_prompts()[1:], n=1, mode="auto", sampling=greedy)
        engine.load_weights({"lm_head.weight": torch.zeros(2)})
    engine.generate(_prompts()[1:], n=1, mode="auto", sampling=greedy)
    expected = ["generate", f"sleep{level}"]
    if level == 2:
        expected += ["empty_cache", "wake_up:weights", "empty_cache", "wake_up:kv_cache"]
        expected += ["reset_prefix_cache", "reset_encoder_cache"]
    else:
        expected += ["empty_cache", "wake_up:weights,kv_cache"]
    assert llm.events == [*expected, "generate"]
    with pytest.raises(ValueError, match="sleep_level"):
        _engine(fake_vllm, tokenizer, processor, sleep_level=3)


def test_missing_vllm_says_how_to_install(monkeypatch):
    from r4b.rollout.vllm import import_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"r4b\[vllm\]"):
        import_vllm()


def _vllm_trainer(fake_vllm, tmp_path, monkeypatch, *extra: str):
    from r4b.config import load_config
    from r4b.synth import write_synthetic
    from r4b.train.bpo import BPOConfig, BPOTrainer

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    write_synthetic(tmp_path / "data", n_sft=2, n_rl=4, n_eval=2, seed=0)
    overrides = [
        f"output_dir={tmp_path / 'run'}", "model.path=null", f"data.prompts=[{tmp_path / 'data' / 'rl.jsonl'}]",
        f"data.eval={tmp_path / 'data' / 'eval.jsonl'}", "rollout.engine=vllm", "rollout.vllm={enforce_eager: true}",
        "rollout.group_size=2", "rollout.max_new_tokens=3", "train.prompts_per_step=2", "train.steps=2",
        "train.progress=false", "train.tensorboard=false", *extra,
    ]  # fmt: skip
    trainer = BPOTrainer(load_config(BPOConfig, ROOT / "configs" / "demo" / "bpo.yaml", overrides))
    ((path, kwargs, llm),) = fake_vllm.built
    return trainer, path, kwargs, llm


def test_bpo_trainer_on_the_vllm_engine(fake_vllm, tmp_path, monkeypatch):
    """``rollout.engine=vllm``: the initial policy is written for vLLM to load, every step starts by syncing
    the trainer's weights under their checkpoint names, and the step trains on vLLM's rollouts."""
    trainer, path, kwargs, llm = _vllm_trainer(fake_vllm, tmp_path, monkeypatch)
    init = tmp_path / "run" / "rollout-init"
    assert path == str(init) and (init / "config.json").exists()
    assert kwargs["enforce_eager"] is True and kwargs["seed"] == 0 and kwargs["logprobs_mode"] == "processed_logprobs"
    row = trainer.step(0)
    names = {name for name, _ in llm.loaded}
    assert names == {checkpoint_name(name) for name in trainer.model.state_dict()} and "lm_head.weight" in names
    assert llm.events[:3] == ["reset_prefix_cache", "reset_encoder_cache", "generate"]
    assert row["thinking"]["response_len"] == 3 and row["tokens"] > 0
    trainer.step(1)  # weights changed by the update: synced again before generating
    assert llm.events.count("reset_prefix_cache") == 2


@pytest.mark.parametrize("level", [1, 2])
def test_bpo_trainer_sleeps_vllm_between_rollout_phases(fake_vllm, tmp_path, monkeypatch, level):
    """With rollout.vllm_sleep_level, vLLM sleeps after each rollout phase (a step's, an evaluation's); after a
    level-2 sleep the trainer reloads the weights even when the policy has not changed since the last sync."""
    trainer, _, kwargs, llm = _vllm_trainer(fake_vllm, tmp_path, monkeypatch, f"rollout.vllm_sleep_level={level}")
    assert kwargs["enable_sleep_mode"] is True
    sync = ["reset_prefix_cache", "reset_encoder_cache"]
    trainer.step(0)
    generates = llm.events.count("generate")
    assert llm.events == [*sync, *["generate"] * generates, f"sleep{level}"]
    llm.events.clear()
    trainer.evaluate_auto(0)  # the update changed the policy: sync (waking weights, then the cache) first
    assert llm.events == ["wake_up:weights", "wake_up:kv_cache", *sync, "generate", f"sleep{level}"]
    llm.events.clear()
    trainer.step(1)  # the policy is unchanged since the evaluation's sync
    if level == 1:  # weights kept on the CPU: just wake up
        assert llm.events[:2] == ["wake_up:weights,kv_cache", "generate"]
    else:  # weights discarded: load them again
        assert llm.events[:5] == ["wake_up:weights", "wake_up:kv_cache", *sync, "generate"]
    assert llm.events[-1] == f"sleep{level}"


def test_eval_on_the_vllm_engine(fake_vllm, tmp_path):
    """``r4b eval --engine vllm``: vLLM gets the directory and the --vllm-arg values; the report is built from
    its answers; a model that is not a directory is refused."""
    from r4b.eval.cli import _vllm_args
    from r4b.eval.errors import EvalError
    from r4b.eval.runner import evaluate
    from r4b.models.loading import save_model
    from r4b.synth import write_synthetic

    write_synthetic(tmp_path / "data", n_sft=1, n_rl=1, n_eval=3, seed=0)
    model_dir = save_model(build_tiny_r4b(seed=0), tmp_path / "tiny", load_tokenizer())
    args = _vllm_args(["max_model_len=512", "enforce_eager=true"])
    report = evaluate(
        model_dir, tmp_path / "data" / "eval.jsonl", tmp_path / "out", modes=["auto", "non_thinking"],
        max_new_tokens=3, engine="vllm", vllm_args=args, progress=False, plots=False,
    )  # fmt: skip
    ((path, kwargs, llm),) = fake_vllm.built
    assert path == str(model_dir) and kwargs["max_model_len"] == 512 and kwargs["enforce_eager"] is True
    assert kwargs["gpu_memory_utilization"] == 0.9 and len(llm.calls) == 2  # one call per mode (batch of 3)
    assert llm.events[-1] == "shutdown" and fake_vllm.cleanups == [True]  # GPU memory freed for the next model
    (metrics,) = report["models"].values()
    assert metrics["auto"]["n"] == 3 and metrics["non_thinking"]["n"] == 3
    assert len((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()) == 6
    with pytest.raises(EvalError, match="model directories"):
        evaluate("tiny", tmp_path / "data" / "eval.jsonl", tmp_path / "o2", engine="vllm", progress=False)
    with pytest.raises(EvalError, match="KEY=VALUE"):
        _vllm_args(["max_model_len"])


def test_suffix_overrides_reach_the_requests(fake_vllm, tokenizer, processor):
    custom = "<think>\nStep by step.\n"
    engine, llm = _engine(fake_vllm, tokenizer, processor, suffixes={"thinking": custom})
    (row,) = engine.generate(_prompts()[1:], n=1, mode="thinking", sampling=SamplingParams())
    ids = tokenizer.encode(custom)
    assert llm.calls[0][0][0]["prompt_token_ids"][-len(ids) :] == ids and row[0].prompt_ids[-len(ids) :] == ids
    assert row[0].suffix == custom
    (row,) = engine.generate(_prompts()[1:], n=1, mode="non_thinking", sampling=SamplingParams())
    assert row[0].suffix == MODE_SUFFIX["non_thinking"] and row[0].prompt_suffix is None
