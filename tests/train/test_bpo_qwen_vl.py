"""Rollouts, the BPO update, `r4b bpo` and `r4b eval` on Qwen2.5-VL / Qwen3-VL (tiny random models, no download).

- prompts: ``<|image_pad|>`` expanded to the processor's count, one per image in ``template_ids``;
- the HF engine: batched (left-padded) greedy generation equals one prompt at a time, with and without images;
- the update: shared-prefix packing with mRoPE positions gives the loss, gradients and log-probs of the unshared
  packing and of a plain padded transformers forward of prompt + response (float64 loss on its log-probs);
- `r4b bpo` (2 steps) and `r4b eval` on a saved tiny model.

The models and their directories are those of tests/train/test_sft_qwen_vl.py (56x56 pictures: 16 image tokens).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import pytest
import torch
from bpo_cases import BIG, RecordingEngine, assert_grads_close
from helpers import run_two_ranks
from PIL import Image
from qwen_vl_models import KINDS, VISION_TOKENS, save_tiny_qwen_vl
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from r4b.config import load_config
from r4b.eval import add_parser
from r4b.format import MODE_SUFFIX, MODES
from r4b.kernels.losses import bpo_loss_from_logprobs
from r4b.models.loading import load_model_and_processor
from r4b.models.mrope import mm_token_type_ids, packed_mrope_position_ids, use_varlen_attention
from r4b.rl import RolloutBatch, UpdateConfig, compute_advantages, compute_logprobs, policy_update
from r4b.rl.batch import build_micro_batch, chunk_tokens, plan_chunks
from r4b.rl.credit import decision_token_counts
from r4b.rollout import HFRolloutEngine, Prompt, Rollout, SamplingParams, encode_prompt, generation_attention
from r4b.synth import write_synthetic
from r4b.train.bpo import BPOConfig, BPOTrainer

ROOT = Path(__file__).resolve().parents[2]
BPO_DEMO = ROOT / "configs" / "demo" / "bpo.yaml"
G_PER_MODE = 2


pytestmark = pytest.mark.usefixtures("torch_reference_kernels")  # tests/conftest.py


@pytest.fixture(scope="module", params=KINDS)
def model_dir(request, tmp_path_factory) -> Path:
    return save_tiny_qwen_vl(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture()
def qwen(model_dir):
    """(model, tokenizer, processor), float32, with sharper logits than at init (clear greedy margins, ratios
    and clipping that matter)."""
    model, tokenizer, processor = load_model_and_processor(model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model, tokenizer, processor


def _prompts() -> list[Prompt]:
    """Two images of different token counts, one image given as a literal <image> in text, and text only."""
    image = lambda w, h, c: Image.new("RGB", (w, h), c)
    user = lambda text, n=1: {"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": text}]}
    return [
        Prompt([user("How many circles are there?")], [image(56, 56, "red")]),
        Prompt([user("Which is larger, left or right?", 2)], [image(56, 28, "blue"), image(28, 28, "green")]),
        Prompt([{"role": "user", "content": "<image>\nWhat?"}], [image(40, 56, "white")]),
        Prompt([{"role": "user", "content": "What is seven plus five?"}]),
    ]


@pytest.mark.parametrize("mode", MODES)
def test_encode_prompt_expands_image_pads(qwen, mode):
    _, tokenizer, processor = qwen
    start, end, pad = tokenizer.convert_tokens_to_ids(VISION_TOKENS[:3])
    suffix = tokenizer(MODE_SUFFIX[mode], add_special_tokens=False)["input_ids"]
    counts = set()
    for prompt in _prompts():
        encoded = encode_prompt(tokenizer, processor, prompt, mode)
        assert encoded.ids[-len(suffix) :] == suffix and encoded.template_ids[-len(suffix) :] == suffix
        expected = [processor.num_image_tokens(im.height, im.width) for im in prompt.images]
        counts.update(expected)
        assert encoded.ids.count(pad) == sum(expected)
        assert encoded.template_ids.count(pad) == encoded.template_ids.count(start) == len(prompt.images)
        runs = [k for k, t in enumerate(encoded.ids) if t == pad and encoded.ids[k - 1] == start]
        assert [encoded.ids[k + n] for k, n in zip(runs, expected, strict=True)] == [end] * len(expected)
        collapsed = [t for k, t in enumerate(encoded.ids) if t != pad or encoded.ids[k - 1] != pad]
        assert collapsed == encoded.template_ids  # the same prompt, one pad per image
    assert len(counts) > 1
    with pytest.raises(ValueError, match=r"0 <\|image_pad\|> placeholder\(s\) for 1 image"):
        encode_prompt(tokenizer, processor, Prompt([{"role": "user", "content": "x"}], [_prompts()[0].images[0]]), mode)


@pytest.mark.parametrize("mode", ["thinking", "non_thinking"])
def test_batched_greedy_equals_one_at_a_time(qwen, mode):
    model, tokenizer, processor = qwen
    prompts = _prompts()
    sampling = SamplingParams(temperature=0.0, max_new_tokens=8, logprobs=True)
    engine = HFRolloutEngine(model, tokenizer, batch_size=8)  # the processor by default: the directory's
    assert engine.processor.num_image_tokens(56, 56) == processor.num_image_tokens(56, 56) == 16
    batched = engine.generate(prompts, n=2, mode=mode, sampling=sampling)
    single = HFRolloutEngine(model, tokenizer, processor, batch_size=1)
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for prompt, rollouts in zip(prompts, batched, strict=True):
        (alone,) = single.generate([prompt], n=1, mode=mode, sampling=sampling)[0]
        for rollout in rollouts:
            assert rollout.prompt_ids == alone.prompt_ids and rollout.response_ids == alone.response_ids
            assert pad not in rollout.response_ids
            torch.testing.assert_close(torch.tensor(rollout.logprobs), torch.tensor(alone.logprobs), atol=1e-4, rtol=0)
    assert len({tuple(r[0].response_ids) for r in batched}) > 1  # the prompts are not all answered alike
    # generation's mRoPE positions are the trainer's: its log-probs are the packed forward's on these rollouts
    batch = RolloutBatch.from_rollouts(
        batched, torch.zeros(len(prompts), 2), images=[p.images for p in prompts], processor=processor
    )
    trained = compute_logprobs(model, batch, max_tokens=BIG)
    assert (trained - batch.rollout_logprobs).abs().max() < 1e-4
    # after a packed training forward (r4b_varlen everywhere) generation swaps to sdpa and back
    use_varlen_attention(model)
    again = engine.generate(prompts, n=1, mode=mode, sampling=sampling)
    assert [r[0].response_ids for r in again] == [r[0].response_ids for r in batched]
    assert model.config.text_config._attn_implementation == "r4b_varlen"


def make_batch(tokenizer, processor, *, seed: int = 0, max_len: int = 7) -> RolloutBatch:
    """The prompts x (2 thinking + 2 non-thinking) random responses (no vision tokens); random 0/1 rewards."""
    gen = torch.Generator().manual_seed(seed)
    vision = torch.tensor(tokenizer.convert_tokens_to_ids(VISION_TOKENS))
    prompts, rollouts = _prompts(), []
    for prompt in prompts:
        row = []
        for mode in ("thinking", "non_thinking"):
            ids = encode_prompt(tokenizer, processor, prompt, mode).ids
            for _ in range(G_PER_MODE):
                response = torch.randint(0, len(tokenizer), (int(torch.randint(1, max_len + 1, (1,), generator=gen)),))
                response[torch.isin(response, vision)] = 0
                row.append(Rollout(ids, response.tolist(), "", True, mode))
        rollouts.append(row)
    rewards = torch.randint(0, 2, (len(prompts), 2 * G_PER_MODE), generator=gen).float()
    rewards[0] = torch.tensor([1.0, 0.0, 1.0, 1.0])
    advantages = compute_advantages(rewards)
    return RolloutBatch.from_rollouts(rollouts, advantages, images=[p.images for p in prompts], processor=processor)


def hf_logprobs(model, processor, batch: RolloutBatch, temperature: float = 1.0) -> list[torch.Tensor]:
    """Float64 log-probs of each response (with a graph to the model) from ONE plain transformers forward of the
    right-padded prompt + response rows (sdpa, the model's own get_rope_index, every row its own image copies)."""
    rows, images = [], []
    for i, e in enumerate(batch.groups.tolist()):
        rows.append(torch.cat([batch.prompt_ids[e], batch.response_ids[i, : batch.response_lengths[i]]]))
        images += batch.images[e]
    input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=0)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
    with generation_attention(model):
        logits = model(
            input_ids=input_ids, attention_mask=mask, mm_token_type_ids=mm_token_type_ids(model.config, input_ids),
            **processor.preprocess(images),
        ).logits  # fmt: skip
    log_probs = torch.log_softmax(logits.double() / temperature, dim=-1)
    out = []
    for i, e in enumerate(batch.groups.tolist()):
        start, length = batch.prompt_ids[e].numel(), int(batch.response_lengths[i])
        targets = batch.response_ids[i, :length]
        out.append(log_probs[i, start - 1 : start - 1 + length].gather(1, targets[:, None]).squeeze(1))
    return out


def reference_grads(model, processor, batch, config: UpdateConfig, old, ref):
    """The float64 BPO loss (r4b.kernels' plain-PyTorch one) on the HF forward's log-probs, and its gradients."""
    model.zero_grad(set_to_none=True)
    logp = hf_logprobs(model, processor, batch, config.temperature)
    lengths = batch.response_lengths.tolist()
    per_token = lambda t: None if t is None else torch.cat([t[i, :n] for i, n in enumerate(lengths)]).double()
    loss, _ = bpo_loss_from_logprobs(
        torch.cat(logp), batch.advantages.double().repeat_interleave(batch.response_lengths),
        seq_ids=torch.arange(len(lengths)).repeat_interleave(batch.response_lengths), old_logprobs=per_token(old),
        ref_logprobs=per_token(ref), clip_eps_low=config.clip_eps_low, clip_eps_high=config.clip_eps_high,
        beta=config.beta, loss_agg_mode=config.aggregation,
        norm_len=config.norm_len or batch.response_ids.shape[1],
    )  # fmt: skip
    loss.backward()
    grads = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for n, p in
             model.named_parameters()}  # fmt: skip
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def noisy(logp: torch.Tensor, batch: RolloutBatch, *, seed: int, scale: float = 0.3) -> torch.Tensor:
    """Stand-ins for the rollout / reference policies' log-probs (ratio != 1)."""
    valid = torch.arange(batch.response_ids.shape[1])[None] < batch.response_lengths[:, None]
    noise = scale * torch.randn(logp.shape, generator=torch.Generator().manual_seed(seed))
    return torch.where(valid, logp + noise, 0.0)


@pytest.mark.parametrize(("loss_agg_mode", "beta"), [("token-mean", 0.05), ("seq-mean-token-mean", 0.0)])
def test_shared_update_equals_unshared_and_the_plain_forward(qwen, loss_agg_mode, beta):
    model, tokenizer, processor = qwen
    batch = make_batch(tokenizer, processor)
    assert batch.mrope and batch.image_sizes == [None] * batch.num_entries
    assert batch.image_grid_thw[0] is batch.image_grid_thw[1] and batch.image_grid_thw[-1] is None
    current = compute_logprobs(model, batch, max_tokens=BIG)
    old = noisy(current, batch, seed=1)
    ref = noisy(current, batch, seed=2) if beta else None
    config = UpdateConfig(clip_eps_high=0.28, beta=beta, loss_agg_mode=loss_agg_mode, max_tokens=120)
    expected_loss, expected = reference_grads(model, processor, batch, config, old, ref)
    assert any(".visual." in n and g.norm() > 0 for n, g in expected.items())

    shared = RecordingEngine(model)
    metrics = policy_update(shared, batch, config, old_logprobs=old, ref_logprobs=ref)
    assert shared.backward_calls > 1 and 0 < metrics["clip_frac"] < 1 and (metrics["kl"] > 0) == bool(beta)
    assert metrics["loss"] == pytest.approx(float(expected_loss), rel=1e-5, abs=1e-6)
    assert_grads_close(shared.grads[0], expected)

    unshared = RecordingEngine(model)
    config.shared_prefix = False
    again = policy_update(unshared, batch, config, old_logprobs=old, ref_logprobs=ref)
    assert again["loss"] == pytest.approx(metrics["loss"], rel=1e-5, abs=1e-6)
    assert again["packed_tokens"] > metrics["packed_tokens"]
    assert_grads_close(unshared.grads[0], shared.grads[0])


def test_logprobs_and_mrope_positions_of_both_packings(qwen):
    model, tokenizer, processor = qwen
    batch = make_batch(tokenizer, processor, seed=3)
    with torch.no_grad():
        expected = hf_logprobs(model, processor, batch)
    shared = compute_logprobs(model, batch, max_tokens=BIG)
    # the budget of the longest single response: its entry cannot hold a second one, so it is cut into runs
    longest = max(chunk_tokens(batch, int(batch.groups[i]), [i], shared=True) for i in range(batch.num_responses))
    assert len(plan_chunks(batch, range(batch.num_responses), longest, shared=True)) > batch.num_entries
    split = compute_logprobs(model, batch, max_tokens=longest)
    unshared = compute_logprobs(model, batch, max_tokens=BIG, shared_prefix=False)
    for i, reference in enumerate(expected):
        n = reference.numel()
        for got in (shared, split, unshared):
            assert (got[i, :n].double() - reference).abs().max() < 1e-5, i
            assert torch.all(got[i, n:] == 0)

    # the positions: each unshared document is get_rope_index of prompt + response; the shared row holds the same
    # positions for the prompt body and each response segment
    chunks = plan_chunks(batch, range(batch.num_responses), BIG, shared=True)
    one, many = (build_micro_batch(batch, chunks, shared=s, device="cpu") for s in (True, False))
    assert one.position_ids.shape == (3, one.num_tokens)
    assert one.image_grid_thw.shape[0] < many.image_grid_thw.shape[0]  # prompts' images once
    cu = many.cu_seqlens_host
    for k, i in enumerate(many.responses):
        e = int(batch.groups[i])
        ids = many.input_ids[cu[k] : cu[k + 1]]
        full = packed_mrope_position_ids(model, [ids], [batch.image_grid_thw[e]])
        assert torch.equal(many.position_ids[:, cu[k] : cu[k + 1]], full)
        prompt = batch.prompt_ids[e].numel()
        assert full[:, prompt:].max() == full[:, :prompt].max() + int(batch.response_lengths[i])  # text continues
    # shared: every response's segment (the last prompt token, then the response) has the unshared positions
    assert one.responses == many.responses
    for k, i in enumerate(one.responses):
        n = int(batch.response_lengths[i])
        a, b = int(one.response_starts[k]), int(many.response_starts[k])
        assert torch.equal(one.position_ids[:, a : a + n], many.position_ids[:, b : b + n])


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, n_sft=2, n_rl=4, n_eval=3, seed=0)
    return out


def bpo_args(model_dir: Path, synth: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={out}", f"model.path={model_dir}", f"data.prompts=[{synth / 'rl.jsonl'}]",
        f"data.eval={synth / 'eval.jsonl'}", "rollout.group_size=2", "rollout.max_new_tokens=4",
        "rollout.prompts_per_call=2", "train.prompts_per_step=2", "train.steps=2", "train.eval_max_new_tokens=3",
        "train.progress=false", "train.tensorboard=false", "policy.beta=0.01", "policy.max_tokens=256", *extra,
    ]  # fmt: skip


def test_bpo_runs_two_steps_and_exports(model_dir, synth, tmp_path):
    trainer = BPOTrainer(load_config(BPOConfig, BPO_DEMO, bpo_args(model_dir, synth, tmp_path / "run")))
    assert trainer.processor.num_image_tokens(56, 56) == 16
    run = trainer.train()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "eval_auto" in rows[-1]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert rows[0]["thinking"]["response_len"] > 0 and rows[0]["non_thinking"]["response_len"] > 0
    model, _, processor = load_model_and_processor(run / "model")
    assert model.config.model_type == json.loads((model_dir / "config.json").read_text())["model_type"]
    assert processor.num_image_tokens(56, 56) == 16


def test_mode_decision_credit_needs_a_think_token(qwen):
    assert decision_token_counts(qwen[1]) == {"auto": 0, "thinking": 1, "non_thinking": 2}
    # a vocabulary without a <think> token (Qwen2.5-VL's): here one token per character
    chars = sorted(set(MODE_SUFFIX["non_thinking"]))
    words = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<"))
    words.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    with pytest.raises(ValueError, match="mode_decision_credit needs '<think>' to be one token"):
        decision_token_counts(PreTrainedTokenizerFast(tokenizer_object=words))


def test_eval_cli_on_a_qwen_vl_directory(model_dir, synth, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="r4b")
    add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(model_dir), "--name", "qwen", "--data", str(synth / "eval.jsonl"), "--out",
            str(out), "--max-new-tokens", "4", "--batch-size", "2", "--no-progress", "--no-plots"]  # fmt: skip
    args = parser.parse_args(argv)
    assert args.run(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["models"]) == ["qwen"] and set(report["models"]["qwen"]) == set(MODES)
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 3 * len(MODES)
    for record in records:
        assert record["prompt"].endswith(MODE_SUFFIX[record["mode"]])
        assert "<|vision_start|><|image_pad|><|vision_end|>" in record["prompt"] and 1 <= record["tokens"] <= 4
    assert "qwen auto: accuracy" in capsys.readouterr().out


@pytest.mark.multiprocess
def test_two_fsdp2_processes_give_the_one_process_run(model_dir, synth, tmp_path):
    """Qwen-VL BPO sharded over 2 processes: the same rollouts (rewards, tokens), loss and gradient norm."""
    extra = ("train.export=false", "data.eval=null")
    BPOTrainer(load_config(BPOConfig, BPO_DEMO, bpo_args(model_dir, synth, tmp_path / "one", *extra))).train()
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    two = bpo_args(model_dir, synth, tmp_path / "two", *extra, "engine.kind=fsdp2")
    run_two_ranks(["-m", "r4b", "bpo", "--config", str(BPO_DEMO), *two], env=env, cwd=ROOT, timeout=300,
                  fresh=tmp_path / "two")  # fmt: skip
    rows = [[json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("one", "two")]
    assert len(rows[0]) == len(rows[1]) == 2
    for a, b in zip(*rows, strict=True):
        assert (a["reward"], a["tokens"]) == (b["reward"], b["tokens"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
