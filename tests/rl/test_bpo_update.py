"""The BPO policy update on the tiny R-4B with images: shared-prefix packing + fused loss, micro-batched
and split over ranks, gives the loss and gradients of the plain computation (each response with its own
copy of the prompt, full logits from lm_head, log_softmax, the loss written out in float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from bpo_cases import BIG, RecordingEngine, assert_grads_close, grad_or_zeros
from PIL import Image

from r4b.config import EngineConfig
from r4b.kernels import LOSS_AGG_MODES
from r4b.kernels.reference import bpo_loss_reference
from r4b.models.image_processing import RImageProcessor
from r4b.models.packed import packed_hidden_states
from r4b.models.tiny import build_tiny_r4b
from r4b.models.tokenizer import IMAGE_TOKEN
from r4b.rl import BPOObjective, RolloutBatch, UpdateConfig, compute_advantages, compute_logprobs, policy_update
from r4b.rl.batch import plan_chunks
from r4b.rl.rollout_correction import rollout_correction_weights
from r4b.rollout import Prompt, Rollout, encode_prompt
from r4b.shared_prefix import pack_unshared
from r4b.train.engine import build_engine

G_PER_MODE = 2
MODES = ("thinking", "non_thinking")


pytestmark = pytest.mark.usefixtures("torch_reference_kernels")  # tests/conftest.py


@pytest.fixture(scope="module")
def model(tokenizer):
    model = build_tiny_r4b(seed=3, tokenizer=tokenizer)
    with torch.no_grad():  # sharper logits than at init: ratios and clipping that matter
        model.lm_head.weight.mul_(8.0)
    return model


def _prompts() -> list[Prompt]:
    image = lambda w, h, c: Image.new("RGB", (w, h), c)
    user = lambda text, n=1: {"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": text}]}
    return [
        Prompt([user("How many circles are there?")], [image(56, 28, "red")]),
        Prompt([user("Which is larger, left or right?", 2)], [image(28, 84, "blue"), image(28, 28, "green")]),
        Prompt([{"role": "user", "content": "What is seven plus five?"}]),
    ]


def make_batch(tokenizer, model, *, seed: int = 0, max_len: int = 9) -> RolloutBatch:
    """3 prompts (two with images) x (2 thinking + 2 non-thinking) random responses; random 0/1 rewards."""
    processor = RImageProcessor.from_config(model.config)
    gen = torch.Generator().manual_seed(seed)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    prompts, rollouts = _prompts(), []
    for prompt in prompts:
        row = []
        for mode in MODES:
            ids = encode_prompt(tokenizer, processor, prompt, mode).ids
            for _ in range(G_PER_MODE):
                n = int(torch.randint(1, max_len + 1, (1,), generator=gen))
                response = torch.randint(0, len(tokenizer), (n,), generator=gen)
                response[response == image_id] = 0  # a response never holds <image>
                row.append(Rollout(ids, response.tolist(), "", True, mode))
        rollouts.append(row)
    rewards = torch.randint(0, 2, (len(prompts), 2 * G_PER_MODE), generator=gen).float()
    rewards[0] = torch.tensor([1.0, 0.0, 1.0, 1.0])  # at least one group with signal in each sign
    advantages = compute_advantages(rewards)
    return RolloutBatch.from_rollouts(rollouts, advantages, images=[p.images for p in prompts], processor=processor)


def noisy_logprobs(model, batch, *, seed: int, scale: float) -> torch.Tensor:
    """The current log-probs plus noise: stand-ins for the rollout / reference policies (ratio != 1)."""
    logp = compute_logprobs(model, batch, max_tokens=BIG)
    gen = torch.Generator().manual_seed(seed)
    valid = torch.arange(batch.response_ids.shape[1])[None] < batch.response_lengths[:, None]
    return torch.where(valid, logp + scale * torch.randn(logp.shape, generator=gen), 0.0)


def reference_loss(
    model, batch: RolloutBatch, config: UpdateConfig, old, ref, is_weights=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unshared, unfused, float64: (loss, per-token log-probs [R, Lmax]) with a graph to the model; ``is_weights``
    [R, Lmax] scale each token's surrogate; ``config.entropy_coeff`` subtracts each token's entropy."""
    packed = pack_unshared(
        batch.prompt_ids, batch.response_ids, batch.response_lengths, batch.groups, batch.advantages,
        old_logprobs=old, ref_logprobs=ref,
    )  # fmt: skip
    images = [im for e in batch.groups.tolist() for im in batch.images[e]]  # every response's own copy
    vision = RImageProcessor.from_config(model.config).preprocess(images)
    hidden = packed_hidden_states(
        model, input_ids=packed.input_ids, position_ids=packed.position_ids, cu_seqlens=packed.cu_seqlens,
        max_seqlen=packed.max_seqlen, pixel_values=vision["pixel_values"], image_sizes=vision["image_sizes"],
    )  # fmt: skip
    log_probs = torch.log_softmax(model.lm_head(hidden).double() / config.temperature, dim=-1)
    logp = log_probs.gather(1, packed.targets.clamp(min=0)[:, None]).squeeze(1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    per_seq, all_tokens = [], []
    table = torch.zeros(batch.response_ids.shape, dtype=torch.float64)
    for i in range(batch.num_responses):
        at = packed.seq_ids == i
        lp = logp[at]
        table[i, : lp.numel()] = lp.detach()
        ratio = torch.exp(lp - packed.old_logprobs[at].double()) if old is not None else torch.exp(lp - lp.detach())
        a = packed.advantages[at].double()
        clipped = ratio.clamp(1 - config.clip_eps_low, 1 + config.clip_eps_high)
        capped = ratio if config.delta is None else ratio.clamp(max=config.delta)
        token = torch.maximum(-a * capped, -a * clipped)
        if is_weights is not None:
            token = token * is_weights[i, : lp.numel()].double()
        token = token - config.entropy_coeff * entropy[at]
        if config.beta:
            delta = packed.ref_logprobs[at].double() - lp
            k3 = torch.exp(delta) - delta - 1
            kl = {"k1": -delta, "k2": delta**2 / 2, "k3": k3, "low_var_kl": k3.clamp(-10, 10)}[config.kl_estimator]
            token = token + config.beta * kl
        per_seq.append(token)
        all_tokens.append(token)
    mode = config.aggregation
    if mode == "token-mean":
        loss = torch.cat(all_tokens).mean()
    elif mode == "seq-mean-token-mean":
        loss = torch.stack([t.mean() for t in per_seq]).mean()
    elif mode == "seq-mean-token-sum":
        loss = torch.stack([t.sum() for t in per_seq]).mean()
    else:
        norm = config.norm_len or batch.response_ids.shape[1]
        loss = torch.stack([t.sum() / norm for t in per_seq]).mean()
    return loss, table


def reference_grads(model, batch, config, old, ref, is_weights=None):
    model.zero_grad(set_to_none=True)
    loss, _ = reference_loss(model, batch, config, old, ref, is_weights)
    loss.backward()
    grads = {n: grad_or_zeros(p) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("loss_agg_mode", LOSS_AGG_MODES)
def test_update_equals_unshared_unfused_reference(tokenizer, model, loss_agg_mode, beta):
    batch = make_batch(tokenizer, model)
    old = noisy_logprobs(model, batch, seed=1, scale=0.3)
    ref = noisy_logprobs(model, batch, seed=2, scale=0.3) if beta else None
    config = UpdateConfig(clip_eps_low=0.2, clip_eps_high=0.28, beta=beta, loss_agg_mode=loss_agg_mode, max_tokens=120)
    expected_loss, expected = reference_grads(model, batch, config, old, ref)

    engine = RecordingEngine(model)
    metrics = policy_update(engine, batch, config, old_logprobs=old, ref_logprobs=ref)
    assert engine.backward_calls > 1  # several micro-batches
    # the advantages of a group sum to 0, so the loss is a small difference of O(1) terms: fp32 rounding of those
    assert metrics["loss"] == pytest.approx(float(expected_loss), rel=1e-5, abs=1e-6)
    assert 0 < metrics["clip_frac"] < 1
    assert (metrics["kl"] > 0) == bool(beta)
    assert_grads_close(engine.grads[0], expected)


@pytest.mark.parametrize(("correction", "level"), [("tis", "token"), ("mis", "token"), ("tis", "sequence")])
def test_rollout_correction_weighs_each_token_inside_the_fused_loss(tokenizer, model, correction, level):
    """One on-policy step: the weights come from the trainer's own log-probs (a pass of their own) against the
    rollout engine's, and scale each token's surrogate exactly where the packing put it."""
    batch = make_batch(tokenizer, model, seed=6)
    batch.rollout_logprobs = noisy_logprobs(model, batch, seed=7, scale=0.4).float()
    config = UpdateConfig(rollout_correction=correction, rollout_correction_level=level, rollout_correction_cap=1.5,
                          max_tokens=120)  # fmt: skip
    old = compute_logprobs(model, batch, max_tokens=BIG)
    weights, expected_metrics = rollout_correction_weights(
        old, batch.rollout_logprobs, batch.response_lengths, correction=correction, level=level, cap=1.5
    )
    assert 0 < expected_metrics["is_capped"] < 1  # the cap acts on some tokens (responses), not all
    expected_loss, expected = reference_grads(model, batch, config, None, None, weights)
    plain_loss, _ = reference_grads(model, batch, UpdateConfig(max_tokens=120), None, None)
    assert abs(float(expected_loss) - float(plain_loss)) > 1e-4  # the weights change the loss

    engine = RecordingEngine(model)
    metrics = policy_update(engine, batch, config)
    assert metrics["loss"] == pytest.approx(float(expected_loss), rel=1e-5, abs=1e-6)
    for name, value in expected_metrics.items():
        assert metrics[name] == pytest.approx(value, rel=1e-5), name
    assert_grads_close(engine.grads[0], expected)

    batch.rollout_logprobs = None
    with pytest.raises(ValueError, match="needs the rollout engine's log-probs"):
        policy_update(RecordingEngine(model), batch, config)


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-sum"])
def test_entropy_bonus_delta_and_kl_estimator_are_the_reference_terms(tokenizer, model, loss_agg_mode):
    batch = make_batch(tokenizer, model, seed=9)
    old = noisy_logprobs(model, batch, seed=10, scale=0.5)
    ref = noisy_logprobs(model, batch, seed=11, scale=0.3)
    config = UpdateConfig(entropy_coeff=0.05, delta=1.3, beta=0.05, kl_estimator="k2", loss_agg_mode=loss_agg_mode,
                          max_tokens=120)  # fmt: skip
    expected_loss, expected = reference_grads(model, batch, config, old, ref)
    engine = RecordingEngine(model)
    metrics = policy_update(engine, batch, config, old_logprobs=old, ref_logprobs=ref)
    assert metrics["loss"] == pytest.approx(float(expected_loss), rel=1e-5, abs=1e-6)
    assert_grads_close(engine.grads[0], expected)


def test_micro_batches_split_entries_and_ranks_without_changing_gradients(tokenizer, model):
    batch = make_batch(tokenizer, model, seed=4)
    old = noisy_logprobs(model, batch, seed=5, scale=0.3)
    base = dict(clip_eps_high=0.28, loss_agg_mode="seq-mean-token-mean")
    one = RecordingEngine(model)
    policy_update(one, batch, UpdateConfig(**base, max_tokens=BIG), old_logprobs=old)
    assert one.backward_calls == 1

    # a budget so small that entries are cut into runs of responses, each repeating the prompt
    longest = max(p.numel() for p in batch.prompt_ids) + int(batch.response_lengths.max())
    small = UpdateConfig(**base, max_tokens=longest + 2)
    chunks = plan_chunks(batch, range(batch.num_responses), small.max_tokens, shared=True)
    assert len(chunks) > batch.num_entries
    many = RecordingEngine(model)
    policy_update(many, batch, small, old_logprobs=old)
    assert many.backward_calls > 3
    assert_grads_close(many.grads[0], one.grads[0])

    unshared = RecordingEngine(model)
    policy_update(unshared, batch, UpdateConfig(**base, max_tokens=BIG, shared_prefix=False), old_logprobs=old)
    assert_grads_close(unshared.grads[0], one.grads[0])

    # two ranks, each its balanced share: engines average gradients, so the mean of the two is the whole (the
    # rollout correction's weights too, made from the given old log-probs)
    batch.rollout_logprobs = noisy_logprobs(model, batch, seed=8, scale=0.3).float()
    for mode, correction in (("token-mean", "none"), ("seq-mean-token-sum", "none"), ("token-mean", "mis")):
        config = UpdateConfig(clip_eps_high=0.28, loss_agg_mode=mode, max_tokens=80, rollout_correction=correction)
        whole = RecordingEngine(model)
        policy_update(whole, batch, config, old_logprobs=old)
        ranks = [RecordingEngine(model) for _ in range(2)]
        for rank, engine in enumerate(ranks):
            policy_update(engine, batch, config, old_logprobs=old, rank=rank, world_size=2)
        assert ranks[0].backward_calls == ranks[1].backward_calls
        mean = {n: (ranks[0].grads[0][n] + ranks[1].grads[0][n]) / 2 for n in whole.grads[0]}
        assert_grads_close(mean, whole.grads[0])


def test_compute_logprobs_shared_equals_unshared_and_reference(tokenizer, model):
    batch = make_batch(tokenizer, model, seed=6)
    shared = compute_logprobs(model, batch, max_tokens=BIG)
    split = compute_logprobs(BPOObjective(model), batch, max_tokens=75, shared_prefix=True)
    unshared = compute_logprobs(model, batch, max_tokens=90, shared_prefix=False)
    with torch.no_grad():
        _, expected = reference_loss(model, batch, UpdateConfig(), None, None)
    valid = torch.arange(batch.response_ids.shape[1])[None] < batch.response_lengths[:, None]
    assert shared.shape == batch.response_ids.shape and shared.dtype == torch.float32
    assert torch.all(shared[~valid] == 0) and torch.all(shared[valid] < 0)
    for got in (split, unshared):
        assert (got - shared).abs().max() < 1e-5
    assert (shared.double() - expected).abs().max() < 1e-5
    shares = [compute_logprobs(model, batch, max_tokens=90, rank=r, world_size=3) for r in range(3)]
    assert all(bool((s != 0).any()) for s in shares)  # each rank computed a part, the parts add up
    assert (sum(shares) - shared).abs().max() < 1e-5
    hot = compute_logprobs(model, batch, max_tokens=BIG, temperature=0.5)
    assert (hot - shared)[valid].abs().max() > 1e-3  # temperature reaches the log-softmax


def test_policy_update_trains_with_a_real_engine(tokenizer, model):
    batch = make_batch(tokenizer, model, seed=7)
    policy = copy.deepcopy(model).train()
    objective = BPOObjective(policy)
    engine = build_engine(
        objective, [{"params": list(objective.parameters()), "lr": 1e-3, "name": "all"}], lambda step: 1.0,
        EngineConfig(grad_clip=1.0),
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    ref = compute_logprobs(model, batch, max_tokens=BIG)
    config = UpdateConfig(ppo_epochs=2, mini_batches=2, beta=0.01, max_tokens=100, clip_eps_high=0.28)
    metrics = policy_update(engine, batch, config, ref_logprobs=ref)  # old log-probs computed first
    assert metrics["steps"] == 4 and len(metrics["grad_norms"]) == 4
    assert metrics["tokens"] == int(batch.response_lengths.sum())
    assert metrics["tokens_thinking"] + metrics["tokens_non_thinking"] == metrics["tokens"]
    unshared = sum(batch.prompt_ids[e].numel() for e in batch.groups.tolist()) + metrics["tokens"]
    assert metrics["packed_tokens"] < unshared
    assert all(k in metrics for k in ("loss", "clip_frac", "kl", "entropy", "grad_norm"))
    assert metrics["kl"] >= 0 and metrics["entropy"] > 0
    assert metrics["clip_frac"] > 0  # after the first step the ratio moves away from 1
    moved = [n for n, p in policy.named_parameters() if not torch.equal(p, before[n])]
    assert "lm_head.weight" in moved and any("vision" in n for n in moved)

    # one on-policy step: ratio 1, nothing clipped, no KL without beta
    on_policy = policy_update(engine, batch, UpdateConfig(max_tokens=100))
    assert on_policy["clip_frac"] == 0 and on_policy["kl"] == 0 and on_policy["steps"] == 1


def test_batch_layout_and_errors(tokenizer, model):
    batch = make_batch(tokenizer, model)
    assert batch.num_entries == 6 and batch.num_responses == 12
    assert batch.entry_prompts == [0, 0, 1, 1, 2, 2] and batch.entry_modes == list(MODES) * 3
    assert batch.groups.tolist() == [e for e in range(6) for _ in range(G_PER_MODE)]
    assert batch.source[:4] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    thinking, non_thinking = batch.prompt_ids[0], batch.prompt_ids[1]
    assert not torch.equal(thinking, non_thinking)  # the mode suffix is part of each entry's prompt
    assert batch.pixel_values[0] is batch.pixel_values[1] and batch.pixel_values[4] is None
    assert batch.modes == [m for _ in range(3) for m in MODES for _ in range(G_PER_MODE)]

    with pytest.raises(ValueError, match=r"response \d+ .* over the budget max_tokens=20"):
        plan_chunks(batch, range(batch.num_responses), 20, shared=True)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        policy_update(RecordingEngine(model), batch, UpdateConfig(beta=0.1))
    with pytest.raises(ValueError, match="mini_batches=4 is more than"):
        policy_update(RecordingEngine(model), batch, UpdateConfig(mini_batches=4))
    bad = Rollout(batch.prompt_ids[0].tolist(), [], "", True, "thinking")
    with pytest.raises(ValueError, match="empty response"):
        RolloutBatch.from_rollouts([[bad]], [[0.0]])


def test_bf16_autocast_update_tracks_fp32(tokenizer, model):
    """The single engine in bf16 (autocast around the objective; the lm_head operands in bf16, the loss in fp32)
    gives the fp32 update's loss, KL and gradient norm within bf16's rounding of the log-probs."""
    batch = make_batch(tokenizer, model, seed=11)
    old = noisy_logprobs(model, batch, seed=1, scale=0.05)
    ref = noisy_logprobs(model, batch, seed=2, scale=0.05)
    config = UpdateConfig(beta=0.01, max_tokens=100, clip_eps_high=0.28)
    out = {}
    for precision in ("no", "bf16"):
        objective = BPOObjective(copy.deepcopy(model).train())
        engine = build_engine(
            objective, [{"params": list(objective.parameters()), "lr": 1e-3, "name": "all"}], lambda step: 1.0,
            EngineConfig(grad_clip=0.0, mixed_precision=precision),
        )  # fmt: skip
        out[precision] = policy_update(engine, batch, config, old_logprobs=old, ref_logprobs=ref)
    fp32, bf16 = out["no"], out["bf16"]
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=5e-2, abs=5e-3)
    assert bf16["kl"] == pytest.approx(fp32["kl"], rel=0.2, abs=5e-3)
    assert bf16["grad_norm"] == pytest.approx(fp32["grad_norm"], rel=5e-2)


def test_padding_forward_is_the_shortest_first_response(tokenizer, model):
    """A rank without work in a mini-batch runs one zero-weight (prompt, response): the shortest of the plan's
    chunks' first responses, the same on every rank."""
    from r4b.rl.batch import chunk_tokens
    from r4b.rl.update import _padding_chunks, plan_ranks

    batch = make_batch(tokenizer, model, seed=5)
    plan = plan_ranks(batch, range(batch.num_responses), max_tokens=100, shared=True, world_size=2)
    (chunk,) = _padding_chunks(plan, batch, True)
    firsts = [(c.entry, c.responses[:1]) for r in plan for m in r for c in m]
    costs = [chunk_tokens(batch, e, rs, shared=True) for e, rs in firsts]
    assert len(chunk.responses) == 1 and (chunk.entry, chunk.responses) == firsts[costs.index(min(costs))]


def oracle_grads(model, batch: RolloutBatch, config: UpdateConfig, old, ref):
    """(loss, gradients) of the unshared packing's hidden states through the fused loss's float64 oracle
    (``r4b.kernels.reference.bpo_loss_reference``: every loss type written out per sequence)."""
    packed = pack_unshared(
        batch.prompt_ids, batch.response_ids, batch.response_lengths, batch.groups, batch.advantages,
        old_logprobs=old, ref_logprobs=ref,
    )  # fmt: skip
    images = [im for e in batch.groups.tolist() for im in batch.images[e]]
    vision = RImageProcessor.from_config(model.config).preprocess(images)
    model.zero_grad(set_to_none=True)
    hidden = packed_hidden_states(
        model, input_ids=packed.input_ids, position_ids=packed.position_ids, cu_seqlens=packed.cu_seqlens,
        max_seqlen=packed.max_seqlen, pixel_values=vision["pixel_values"], image_sizes=vision["image_sizes"],
    )  # fmt: skip
    loss, _ = bpo_loss_reference(
        hidden.double(), model.lm_head.weight.double(), packed.targets, packed.advantages.double(),
        seq_ids=packed.seq_ids, loss_mask=packed.targets >= 0, old_logprobs=packed.old_logprobs,
        ref_logprobs=packed.ref_logprobs, norm_len=batch.response_ids.shape[1], **config.loss_options(),
    )  # fmt: skip
    loss.backward()
    grads = {n: grad_or_zeros(p) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize(
    ("loss_type", "level"),
    [("grpo", "sequence"), ("luspo", "sequence"), ("cispo", "token"), ("sapo", "token"), ("vespo", "token")],
)
def test_loss_types_equal_the_oracle_whole_split_and_over_ranks(tokenizer, model, loss_type, level):
    """policy.loss_type / importance_level: shared-prefix packing, micro-batches that cut entries into runs of
    responses, and two ranks all give the oracle's loss and gradients (a response's shared ratio or weight never
    spans micro-batches)."""
    batch = make_batch(tokenizer, model, seed=12)
    old = noisy_logprobs(model, batch, seed=13, scale=0.3)
    ref = noisy_logprobs(model, batch, seed=14, scale=0.3)
    options = dict(loss_type=loss_type, importance_level=level, beta=0.05,
                   clip_eps_high=1.2 if loss_type == "cispo" else 0.28)  # fmt: skip
    expected_loss, expected = oracle_grads(model, batch, UpdateConfig(**options), old, ref)
    longest = max(p.numel() for p in batch.prompt_ids) + int(batch.response_lengths.max())
    for max_tokens in (BIG, longest + 2):
        engine = RecordingEngine(model)
        metrics = policy_update(engine, batch, UpdateConfig(**options, max_tokens=max_tokens), old_logprobs=old,
                                ref_logprobs=ref)  # fmt: skip
        assert metrics["loss"] == pytest.approx(float(expected_loss), rel=1e-5, abs=1e-6)
        assert_grads_close(engine.grads[0], expected)
    config = UpdateConfig(**options, max_tokens=80)
    ranks = [RecordingEngine(model) for _ in range(2)]
    for rank, engine in enumerate(ranks):
        policy_update(engine, batch, config, old_logprobs=old, ref_logprobs=ref, rank=rank, world_size=2)
    assert_grads_close({n: (ranks[0].grads[0][n] + ranks[1].grads[0][n]) / 2 for n in expected}, expected)


def test_loss_type_settings_that_cannot_combine_are_one_line_errors():
    with pytest.raises(ValueError, match=r"importance_level=sequence does not apply to policy\.loss_type=sapo"):
        UpdateConfig(loss_type="sapo", importance_level="sequence")
    with pytest.raises(ValueError, match=r"vespo takes policy\.rollout_correction_level=token"):
        UpdateConfig(loss_type="vespo", rollout_correction="tis", rollout_correction_level="sequence")
    assert UpdateConfig(loss_type="grpo").aggregation == "seq-mean-token-mean"
    assert UpdateConfig(loss_type="grpo", loss_agg_mode="token-mean").aggregation == "token-mean"
