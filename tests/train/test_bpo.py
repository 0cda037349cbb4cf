"""`r4b bpo` end to end on the embedded tiny model: dual rollouts, metrics, exact resume, 2 processes = 1."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import DEMO_BPO, ROOT, run_two_ranks, synthetic_data

from r4b.config import load_config
from r4b.format import MODE_SUFFIX
from r4b.models.tokenizer import load_tokenizer
from r4b.rl import RolloutBatch, compute_advantages, compute_logprobs
from r4b.rl.credit import decision_token_counts, move_decision_tokens
from r4b.rl.metrics import rollout_metrics
from r4b.rollout import Prompt, Rollout, RolloutEngine, SamplingParams
from r4b.rollout.prompts import encode_for_generation, stop_token_ids
from r4b.train.bpo import BPOConfig, BPOTrainer, prompt_indices, train_bpo

pytestmark = pytest.mark.usefixtures("torch_reference_kernels")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthetic_data(tmp_path_factory, n_sft=2, n_rl=12, n_eval=4)


def overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={out}",
        "model.path=null",  # the untrained tiny model: these tests check the machinery, not learning
        f"data.prompts=[{data / 'rl.jsonl'}]",
        f"data.eval={data / 'eval.jsonl'}",
        "rollout.group_size=2",
        "rollout.max_new_tokens=6",
        "rollout.prompts_per_call=2",
        "train.prompts_per_step=4",
        "train.steps=4",
        "train.eval_max_new_tokens=4",
        "train.progress=false",
        "train.tensorboard=false",
        *extra,
    ]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_bpo_rollouts_force_each_mode_and_the_step_logs_per_mode(data, tmp_path):
    trainer = BPOTrainer(load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / "run", "train.export=false")))
    samples = [trainer.prompts[i] for i in prompt_indices(0, 4, len(trainer.prompts), 0)]
    rollouts = trainer.generate(samples, step=0)
    tokenizer = load_tokenizer()
    assert [len(row) for row in rollouts] == [4] * 4
    for row in rollouts:
        for rollout, mode in zip(row, ["thinking", "thinking", "non_thinking", "non_thinking"], strict=True):
            suffix = tokenizer.encode(MODE_SUFFIX[mode])
            assert rollout.mode == mode and rollout.prompt_ids[-len(suffix) :] == suffix
    assert trainer.generate(samples, step=0)[1][0].response_ids == rollouts[1][0].response_ids  # seeded by step
    row = trainer.step(0)
    assert {"reward", "thinking", "non_thinking", "zero_adv_groups", "clip_frac", "kl", "entropy", "grad_norm"} <= set(
        row
    )
    assert {"sync", "rollout", "reward", "logprobs", "update"} == set(row["time"])
    assert row["thinking"]["response_len"] > 0 and 0 <= row["zero_adv_groups"] <= 1
    assert 0 <= row["thinking"]["uniform_reward_groups"] <= 1


def test_mode_decision_credit_moves_the_suffix_tail_into_the_response(data, tmp_path):
    trainer = BPOTrainer(load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / "run", "train.export=false")))
    rollout = trainer.generate(trainer.prompts[:1], step=0)[0][-1]  # a non-thinking rollout
    moved = move_decision_tokens(rollout, 2)
    blank, close = load_tokenizer().encode("\n\n</think>")
    assert moved.response_ids[:2] == [blank, close] and moved.prompt_ids == rollout.prompt_ids[:-2]


def test_run_logs_checkpoints_evaluates_and_exports(data, tmp_path):
    run = train_bpo(load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / "run", "train.eval_every=2")))
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert "eval_auto" in rows[1] and "eval_auto" not in rows[0]
    assert 0 <= rows[-1]["eval_auto"]["trigger_rate"] <= 1
    assert (run / "model" / "config.json").exists() and (run / "checkpoint-4").is_dir()


def test_grpo_baseline_rolls_out_in_auto_mode(data, tmp_path):
    run = train_bpo(
        load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / "g", "rollout.strategy=grpo", "train.max_steps=1"))
    )
    (row,) = metrics(run)
    assert "auto" in row and "thinking" not in row


def test_resume_gives_the_uninterrupted_run(data, tmp_path):
    common = ("train.save_every=2", "train.keep_checkpoints=5", "train.export=false")
    straight = train_bpo(load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / "a", *common)))
    train_bpo(load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / "b", *common, "train.max_steps=3")))
    shutil.rmtree(tmp_path / "b" / "checkpoint-3")  # resume from step 2: step 3 is redone
    train_bpo(load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / "b", *common)))
    keys = ("step", "reward", "loss", "grad_norm", "tokens")
    assert [tuple(r[k] for k in keys) for r in metrics(tmp_path / "b")] == [
        tuple(r[k] for k in keys) for r in metrics(straight)
    ]


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["fsdp2", "deepspeed"])
def test_two_processes_give_the_one_process_run(data, tmp_path, kind):
    args = ("train.max_steps=2", "train.export=false", "data.eval=null")
    train_bpo(load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / "one", *args)))
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    two = overrides(data, tmp_path / "two", *args, f"engine.kind={kind}")
    run_two_ranks(
        ["-m", "r4b", "bpo", "--config", str(DEMO_BPO), *two], env=env, cwd=ROOT, timeout=300, fresh=tmp_path / "two"
    )
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two"), strict=True):
        assert (a["reward"], a["tokens"]) == (b["reward"], b["tokens"])  # the same rollouts
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_configured_suffixes_replace_the_templates(data, tmp_path):
    """rollout.suffixes: the thinking prompts end with the configured suffix (a prefill), the other modes keep the
    template's; rewards read it back (full_text) and mode-decision credit moves all of it after <think>."""
    custom = "<think>\nStep by step.\n"
    extra = ('rollout.suffixes={thinking: "<think>\\nStep by step.\\n"}', "train.export=false", "data.eval=null")
    trainer = BPOTrainer(load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / "run", *extra)))
    tokenizer = load_tokenizer()
    rows = trainer.generate(trainer.prompts[:2], step=0)
    for row in rows:
        thinking, non_thinking = row[0], row[-1]
        assert thinking.prompt_ids[-len(tokenizer.encode(custom)) :] == tokenizer.encode(custom)
        assert thinking.suffix == custom and thinking.full_text.startswith(custom)
        assert non_thinking.suffix == MODE_SUFFIX["non_thinking"]
    assert trainer.decision_tokens == {"auto": 0, "thinking": len(tokenizer.encode(custom)) - 1, "non_thinking": 2}
    moved = move_decision_tokens(rows[0][0], trainer.decision_tokens["thinking"])  # what the update trains on
    think, *tail = tokenizer.encode(custom)
    assert moved.prompt_ids[-1] == think and moved.response_ids[: len(tail)] == tail
    assert trainer.step(0)["thinking"]["response_len"] > 0
    with pytest.raises(ValueError, match="unknown mode"):
        BPOTrainer(load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / "bad", "rollout.suffixes={think: x}")))


def test_format_reward_is_added_with_its_weight_and_logged(data, tmp_path):
    extra = ("reward.format_weight=0.5", "train.export=false", "data.eval=null")
    plain = ("reward.off_mode=null",)  # the plain sum: no off-mode score replaces it
    trainer = BPOTrainer(load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / "run", *extra, *plain)))
    row = trainer.step(0)
    for mode in ("thinking", "non_thinking"):
        assert 0 <= row[mode]["format"] <= 1
        assert row[mode]["reward"] == pytest.approx(row[mode]["accuracy"] + 0.5 * row[mode]["format"])
    assert row["non_thinking"]["format"] > 0  # scored on the full text: the suffix opens and closes the block
    with pytest.raises(ValueError, match="format reward alone"):
        BPOTrainer(
            load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / "bad", "reward.name=format", *extra[:1]))
        )
    with pytest.raises(ValueError, match=r"rollout\.engine=vllm"):
        BPOTrainer(load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / "bad2", "rollout.vllm_sleep_level=1")))


def test_rollout_metrics_by_hand():
    """Two prompts, g=2: prompt 0 thinking [1, 1] / non-thinking [0, 1]; prompt 1 all 0. In each prompt the second
    thinking rollout closes its thought at once and the second non-thinking one opens a late thought: off-mode."""
    shape = ((3, "thinking", "a\n</think>\n\n3"), (5, "thinking", "</think>\n\n3"),
             (1, "non_thinking", "\n\n3"), (1, "non_thinking", "\n\n<think>\nb\n</think>\n\n3"))  # fmt: skip
    row = lambda: [Rollout([1], [2] * n, text, True, mode) for n, mode, text in shape]
    rewards = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    out = rollout_metrics([row(), row()], rewards, rewards, None)
    assert out["reward"] == pytest.approx(3 / 8) and out["zero_adv_groups"] == 0.5  # prompt 1's 2g are all equal
    assert out["thinking"] == {"reward": 0.5, "accuracy": 0.5, "response_len": 4.0, "trigger_rate": 0.5,
                               "off_mode": 0.5, "uniform_reward_groups": 1.0}  # fmt: skip
    assert out["non_thinking"] == {"reward": 0.25, "accuracy": 0.25, "response_len": 1.0, "trigger_rate": 0.0,
                                   "off_mode": 0.5, "uniform_reward_groups": 0.5}  # fmt: skip
    auto = [[Rollout([1], [2], "\nc\n</think>\n\n3", True, "auto"), Rollout([1], [2], "\n\n</think>3", True, "auto")]]
    out = rollout_metrics(auto, torch.ones(1, 2), torch.ones(1, 2), None)
    assert out["auto"]["trigger_rate"] == 0.5 and "off_mode" not in out["auto"]  # auto chooses: never off-mode


class ScriptedEngine(RolloutEngine):
    """Issue 16's failure on an easy item, written out: of each prompt's two thinking rollouts the first closes the
    forced thought at once and answers right, the second thinks until cut off (no answer: wrong); both non-thinking
    ones answer right. Prompt ids come from the real encoder, so the update trains on them as on generated ones."""

    THOUGHT = "I count the shapes one by one"

    def __init__(self, trainer: BPOTrainer) -> None:
        self.tokenizer, self.processor = trainer.tokenizer, trainer.processor
        self.answers = {self.key(Prompt.from_sample(s)): s.answer for s in trainer.prompts}
        self.stop = stop_token_ids(self.tokenizer)[0]

    @staticmethod
    def key(prompt: Prompt) -> str:
        """A prompt's messages and image pixels: the trainer hands engines its prompts with their images decoded."""
        pixels = [hashlib.sha1(image.tobytes()).hexdigest() for image in prompt.decoded().images]
        return json.dumps([prompt.messages, pixels])

    def texts(self, mode: str, answer: str) -> list[str]:
        """The responses of one prompt in ``mode``, cycled over its ``n`` rollouts."""
        return [f"</think>\n\n{answer}", self.THOUGHT] if mode == "thinking" else [f"\n\n{answer}"]

    def generate(self, prompts, *, n, mode, sampling):
        encoded = encode_for_generation(self.tokenizer, self.processor, prompts, n=n, mode=mode, suffix=None)
        out = []
        for prompt, enc in zip(prompts, encoded, strict=True):
            texts = self.texts(mode, self.answers[self.key(prompt)])
            row = []
            for k in range(n):
                text = texts[k % len(texts)]
                ids, finished = self.tokenizer.encode(text, add_special_tokens=False), text != self.THOUGHT
                row.append(Rollout(list(enc.ids), ids + [self.stop] * finished, text, finished, mode))
            out.append(row)
        return out


def scripted_thought_logprobs(
    trainer: BPOTrainer, samples: list, engine: type[ScriptedEngine]
) -> tuple[list[list[Rollout]], torch.Tensor]:
    """``engine``'s first forced-thinking response per sample and its per-token log-probs ``[R, L]`` under the
    policy."""
    rows = engine(trainer).generate([Prompt.from_sample(s) for s in samples], n=1, mode="thinking",
                                    sampling=SamplingParams())  # fmt: skip
    images, pad = [s.images for s in samples], trainer.tokenizer.pad_token_id or 0
    batch = RolloutBatch.from_rollouts(rows, torch.zeros(len(rows), 1), images=images, processor=trainer.processor,
                                       pad_id=pad)  # fmt: skip
    return rows, compute_logprobs(trainer.model, batch, max_tokens=4096)


def scripted_trainer(data: Path, out: Path, engine: type[ScriptedEngine], *extra: str) -> BPOTrainer:
    """The demo config's trainer generating with ``engine``, without mode-decision credit (a probe then reads the
    thinking group's own tokens alone) or evaluation."""
    extra = ("advantages.mode_decision_credit=false", "data.eval=null", *extra)
    trainer = BPOTrainer(load_config(BPOConfig, DEMO_BPO, overrides(data, out, *extra)))
    trainer.rollout_engine = engine(trainer)
    return trainer


def close_at_once_logprob(trainer: BPOTrainer, samples: list) -> float:
    """Mean log-prob, under the policy, of ``</think>`` right after the forced ``<think>\n`` (closing at once)."""
    rows, logprobs = scripted_thought_logprobs(trainer, samples, ScriptedEngine)
    assert rows[0][0].text.startswith("</think>")
    return float(logprobs[:, 0].mean())


def test_off_mode_reward_keeps_the_thinking_group_thinking(data, tmp_path, monkeypatch):
    """Issue 16: with the paper's plain answer reward (reward.off_mode=null) a forced thought closed at once and
    answered right gets a positive joint advantage, above the real thought's; scored as a format failure below a
    wrong answer (the default, reward.off_mode=-1) it gets a negative advantage below the wrong thought's, and three
    BPO steps make closing at once far less likely than the same steps under the plain reward: the thinking group
    keeps thinking. (reward.off_mode=0, a wrong answer's reward, ties it with the wrong thought: too weak in the
    demo.) Under the plain reward alone the three steps' change is small and its sign depends on the initialisation
    (-0.11 to +0.45 nats over the tiny model's seeds 0 to 3 at text head dims 16 and 32), so only the default's
    fall and the gap between the settings are checked."""
    import r4b.train.bpo as bpo

    seen = []
    monkeypatch.setattr(bpo, "compute_advantages", lambda *a, **k: seen.append(compute_advantages(*a, **k)) or seen[-1])
    change = {}
    for setting in ("null", "-1.0"):
        trainer = scripted_trainer(data, tmp_path / setting, ScriptedEngine, f"reward.off_mode={setting}")
        probe = trainer.prompts[:4]
        before, seen[:] = close_at_once_logprob(trainer, probe), []
        rows = [trainer.step(step) for step in range(3)]
        change[setting] = close_at_once_logprob(trainer, probe) - before
        for row in rows:  # seen either way: half the thinking group left its mode
            assert row["thinking"]["off_mode"] == 0.5 and row["thinking"]["trigger_rate"] == 1 / 2
            assert row["thinking"]["accuracy"] == 0.5 and row["non_thinking"]["off_mode"] == 0.0
        assert rows[0]["thinking"]["reward"] == (0.5 if setting == "null" else -0.5)  # [1 or -1, 0] per prompt
        closed, thought = seen[0][:, 0], seen[0][:, 1]  # columns: [closed at once, thought] + 2 non-thinking
        if setting == "null":
            assert (closed > 0).all() and (closed > thought).all()
        else:
            assert (closed < 0).all() and (closed < thought).all()
    assert BPOConfig().reward.off_mode == -1.0  # the remedy is the default, and the demo's
    print(f"log p(</think> | <think>\\n) after 3 steps: {change}")
    # reward.min_thought_chars: the scripted thought (29 characters) is too short for 30, so every thinking rollout
    # is off-mode and scores -1
    extra = ("reward.min_thought_chars=30", "data.eval=null", "rollout.max_new_tokens=8")
    trainer = BPOTrainer(load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / "min", *extra)))
    trainer.rollout_engine = ScriptedEngine(trainer)
    row = trainer.step(0)
    assert row["thinking"]["off_mode"] == 1.0 and row["thinking"]["reward"] == -1.0
    assert change["-1.0"] < -0.5 and change["null"] > change["-1.0"] + 0.5, change


class StoppingEngine(ScriptedEngine):
    """The scripted thought ends with the stop token before </think> (an unclosed thought, stopped: no answer)."""

    def generate(self, prompts, *, n, mode, sampling):
        rows = super().generate(prompts, n=n, mode=mode, sampling=sampling)
        for rollout in (r for row in rows for r in row if r.text == self.THOUGHT):
            rollout.response_ids.append(self.stop)
            rollout.finished = True
        return rows


def test_close_thoughts_makes_a_stopped_thought_off_mode(data, tmp_path):
    """reward.close_thoughts: a forced thought that stops before </think> is off-mode (scored -1); off by default."""
    for close, expected in (("false", 0.5), ("true", 1.0)):
        extra = (f"reward.close_thoughts={close}", "data.eval=null", "rollout.max_new_tokens=8")
        trainer = BPOTrainer(load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / close, *extra)))
        trainer.rollout_engine = StoppingEngine(trainer)
        assert trainer.step(0)["thinking"]["off_mode"] == expected


def test_off_mode_on_the_progress_line_and_in_tensorboard():
    from r4b.train.logging import _scalars, _status

    row = {"step": 3, "loss": 0.5, "lr": 1e-3, "tokens_per_s": 900.0, "reward": 0.25}
    row |= {
        "thinking": {"trigger_rate": 0.47, "off_mode": 0.53},
        "non_thinking": {"trigger_rate": 0.0, "off_mode": 0.0},
    }
    assert _status(row).endswith("reward 0.250  empty think 53%  non-think thinks 0%")
    assert {"thinking/off_mode": 0.53, "non_thinking/off_mode": 0.0, "thinking/trigger_rate": 0.47}.items() <= dict(
        _scalars(row)
    ).items()


def test_bpo_applies_the_configured_liger_patches(data, tmp_path, monkeypatch):
    """model.liger reaches r4b bpo as it reaches r4b sft (it was silently ignored)."""
    import r4b.models.liger as liger

    seen = []
    monkeypatch.setattr(liger, "apply_configured_liger", lambda model, enabled, announce=True: seen.append(enabled))
    extra = ("train.export=false", "data.eval=null", "model.liger=false")
    BPOTrainer(load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / "run", *extra)))
    assert seen == [False]


@pytest.mark.parametrize("credit", ["all", "positive"])
def test_positive_mode_decision_credit_trains_only_the_better_modes_token(data, tmp_path, monkeypatch, credit):
    """advantages.mode_decision_from=positive (issue 16, demo seed 0): of each prompt's two modes only the one with
    the positive mean advantage moves its decision tokens into the response; the other's net push would be negative
    and hand its token's mass to whatever else is likeliest after <think> (seed 0: <|im_end|>). Scripted: one
    thinking rollout per prompt closes at once (off-mode, -1), the other is cut off (0); non-thinking answers right."""
    import r4b.rl.credit as credit_module
    import r4b.train.bpo as bpo

    extra = (f"advantages.mode_decision_from={credit}", "data.eval=null", "train.export=false")
    trainer = BPOTrainer(load_config(BPOConfig, DEMO_BPO, overrides(data, tmp_path / credit, *extra)))
    trainer.rollout_engine = ScriptedEngine(trainer)
    moved, advantages = [], []
    spy = lambda r, d: moved.append((r.mode, d)) or move_decision_tokens(r, d)
    monkeypatch.setattr(credit_module, "move_decision_tokens", spy)
    monkeypatch.setattr(
        bpo, "compute_advantages", lambda *a, **k: advantages.append(compute_advantages(*a, **k)) or advantages[-1]
    )
    trainer.step(0)  # the update runs: every mode's rollouts still share their prompt ids
    (adv,) = advantages
    counts = decision_token_counts(trainer.tokenizer)
    g = trainer.config.rollout.group_size
    expected = []
    for row in adv:
        means = {"thinking": float(row[:g].mean()), "non_thinking": float(row[g:].mean())}
        assert means["thinking"] < 0 < means["non_thinking"]
        for mode in ("thinking",) * g + ("non_thinking",) * g:
            expected.append((mode, counts[mode] if credit == "all" or means[mode] > 0 else 0))
    assert moved == expected


def test_unknown_mode_decision_from_is_refused(data, tmp_path):
    args = overrides(data, tmp_path / "run", "advantages.mode_decision_from=best")
    with pytest.raises(ValueError, match=r"advantages\.mode_decision_from = 'best': expected one of 'all', 'positive'"):
        BPOTrainer(load_config(BPOConfig, DEMO_BPO, args))


class WrongThoughtEngine(ScriptedEngine):
    """An easy item as the demo's BPO sees it: every forced thought is wrong (cut off, no answer) and every direct
    answer right, so the whole thinking group sits below the joint mean."""

    def texts(self, mode: str, answer: str) -> list[str]:
        return [self.THOUGHT] if mode == "thinking" else super().texts(mode, answer)


def thought_logprob(trainer: BPOTrainer, samples: list) -> float:
    """Mean per-token log-prob, under the policy, of the scripted thought after the forced ``<think>\n``."""
    rows, logprobs = scripted_thought_logprobs(trainer, samples, WrongThoughtEngine)
    assert rows[0][0].text == WrongThoughtEngine.THOUGHT
    return float(logprobs.mean())


def test_kl_to_the_annealed_model_bounds_how_far_forced_thoughts_fall(data, tmp_path):
    """Issue 16, demo seed 4: where thinking never helps, all of a prompt's thinking rollouts get negative joint
    advantages, every sampled thought is pushed down step after step, and the greedy forced thought decayed (seed 4:
    `The\\n\\n3`, 5 tokens, where the annealed model wrote 15). policy.beta (the paper's beta*KL to the reference,
    the frozen initial policy) stops the fall: a token's k3 gradient beta*(exp(ref - logp) - 1) meets the advantage
    |A| where the token has lost ln(1 + |A| / beta) nats, so each token of the thought levels off there, while
    without it the same steps keep lowering it. (Beta 1 here, to see the level within a few steps; the demo's 0.2
    holds each token within ln(1 + 0.87 / 0.2) = 1.7 nats of the annealed model.)"""
    rewards = torch.tensor([[0.0, 0.0, 1.0, 1.0]])  # per prompt: both thoughts wrong, both direct answers right
    level_beta = 1.0
    bound = math.log(1 + abs(float(compute_advantages(rewards, "joint", num_thinking=2)[0, 0])) / level_beta)
    drops = {}
    for beta in ("0.0", str(level_beta)):
        trainer = scripted_trainer(data, tmp_path / beta, WrongThoughtEngine, f"policy.beta={beta}")
        probe = trainer.prompts[:4]
        before, drops[beta] = thought_logprob(trainer, probe), []
        for step in range(8):
            row = trainer.step(step)
            assert row["thinking"]["accuracy"] == 0.0 and row["non_thinking"]["accuracy"] == 1.0
            drops[beta].append(before - thought_logprob(trainer, probe))
    print(f"fall of the thought's log-prob per step: {drops}; the level with beta 1: {bound:.3f}")
    assert drops["0.0"][-1] > drops["0.0"][3] + 0.2 and drops["0.0"][-1] > bound + 0.4  # no KL: still falling
    assert all(abs(d - bound) < 0.1 for d in drops["1.0"][3:]), (drops, bound)  # beta 1: level at the bound
    assert BPOConfig().policy.beta == 0.0 and load_config(BPOConfig, DEMO_BPO, []).policy.beta == 0.2  # the demo's
