"""A BPO step on the shared-prefix packing equals the same step on unshared packing.

The same responses, packed once with their prompt shared (segment ids, varlen
attention) and once each with its own copy of the prompt: the fused BPO loss of
a small transformer and every parameter gradient agree to fp32 rounding, and so
do the per-response log-probs gathered back with unpack_responses.
"""

import pytest
import torch
from helpers import DEVICE, rel_err
from tiny_decoder import TinyDecoder

from r4b.kernels import fused_linear_bpo_loss, linear_logprobs
from r4b.shared_prefix import pack_shared_prefix, pack_unshared, unpack_responses

VOCAB = 61


def bpo_batch(seed: int, groups: int = 2, per_group: int = 4):
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, VOCAB, (int(torch.randint(3, 12, (1,), generator=gen)),), generator=gen)
               for _ in range(groups)]  # fmt: skip
    n_resp = groups * per_group
    lengths = torch.randint(1, 9, (n_resp,), generator=gen)
    responses = torch.randint(0, VOCAB, (n_resp, int(lengths.max())), generator=gen)
    group_index = torch.arange(groups).repeat_interleave(per_group)
    advantages = torch.randn(n_resp, generator=gen)
    old = -3.0 + 0.3 * torch.randn(responses.shape, generator=gen)
    to = lambda t: t.to(DEVICE)
    return [to(p) for p in prompts], to(responses), to(lengths), to(group_index), to(advantages), to(old)


def step(model: TinyDecoder, packed, *, shared: bool, loss_agg_mode: str):
    model.zero_grad()
    hidden = model(
        packed.input_ids, packed.position_ids, packed.cu_seqlens, packed.max_seqlen,
        segment_ids=packed.segment_ids if shared else None,
    )  # fmt: skip
    loss, _ = fused_linear_bpo_loss(
        hidden, model.lm_head.weight, packed.targets, packed.advantages, seq_ids=packed.seq_ids,
        loss_mask=packed.loss_mask, old_logprobs=packed.old_logprobs, clip_eps_low=0.2, clip_eps_high=0.28,
        loss_agg_mode=loss_agg_mode, norm_len=8,
    )  # fmt: skip
    loss.backward()
    with torch.no_grad():
        logp, _ = linear_logprobs(hidden, model.lm_head.weight, packed.targets.clamp(min=0))
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.detach(), grads, unpack_responses(packed, logp)


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_shared_prefix_step_equals_unshared(loss_agg_mode):
    torch.manual_seed(0)
    model = TinyDecoder(vocab=VOCAB).to(DEVICE)
    prompts, responses, lengths, groups, advantages, old = bpo_batch(seed=1)
    shared = pack_shared_prefix(prompts, responses, lengths, groups, advantages, old_logprobs=old)
    unshared = pack_unshared(prompts, responses, lengths, groups, advantages, old_logprobs=old)
    assert shared.num_tokens < unshared.num_tokens  # the prompt is stored once per group

    loss_s, grads_s, logp_s = step(model, shared, shared=True, loss_agg_mode=loss_agg_mode)
    loss_u, grads_u, logp_u = step(model, unshared, shared=False, loss_agg_mode=loss_agg_mode)

    assert abs(loss_s.item() - loss_u.item()) < 1e-5 * max(1.0, abs(loss_u.item()))
    valid = torch.arange(responses.shape[1], device=DEVICE)[None, :] < lengths[:, None]
    assert (logp_s - logp_u)[valid].abs().max().item() < 1e-5
    for name, grad in grads_u.items():
        assert rel_err(grads_s[name], grad) < 1e-5, name


def test_without_segment_ids_responses_would_see_each_other():
    """The equivalence is the mask's doing: drop segment_ids and later responses attend to earlier ones."""
    torch.manual_seed(0)
    model = TinyDecoder(vocab=VOCAB).to(DEVICE)
    prompts, responses, lengths, groups, advantages, old = bpo_batch(seed=2)
    packed = pack_shared_prefix(prompts, responses, lengths, groups, advantages, old_logprobs=old)
    with torch.no_grad():
        masked = model(packed.input_ids, packed.position_ids, packed.cu_seqlens, packed.max_seqlen, packed.segment_ids)
        leaky = model(packed.input_ids, packed.position_ids, packed.cu_seqlens, packed.max_seqlen)
    later = packed.segment_ids > 1
    assert (masked[later] - leaky[later]).abs().max().item() > 1e-3
