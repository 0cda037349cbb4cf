"""r4b's varlen attention inside a stock transformers model (Qwen3, random tiny config, no download)."""

import pytest
import torch
from helpers import DEVICE, rel_err
from transformers import Qwen3Config, Qwen3ForCausalLM

from r4b.kernels import linear_logprobs
from r4b.models import register_varlen_attention
from r4b.shared_prefix import pack_shared_prefix, pack_unshared, unpack_responses

VOCAB = 97


@pytest.fixture(scope="module")
def model():
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    return Qwen3ForCausalLM(config).to(DEVICE)


def packed_forward(model, input_ids, position_ids, cu_seqlens, max_seqlen, **extra):
    model.set_attn_implementation(register_varlen_attention())
    return model.model(
        input_ids=input_ids[None], position_ids=position_ids[None], cu_seq_lens_q=cu_seqlens,
        cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen, max_length_k=max_seqlen, **extra,
    ).last_hidden_state[0]  # fmt: skip


def test_packed_forward_and_backward_match_per_document_sdpa(model):
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 13, 1, 8]
    docs = [torch.randint(0, VOCAB, (n,), generator=gen).to(DEVICE) for n in lengths]
    weights = torch.randn(sum(lengths), 64, generator=gen).to(DEVICE)

    model.set_attn_implementation("sdpa")
    model.zero_grad()
    reference = torch.cat([model.model(input_ids=d[None]).last_hidden_state[0] for d in docs])
    (reference * weights).sum().backward()
    grads_ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    positions = torch.cat([torch.arange(n, device=DEVICE) for n in lengths])
    packed = packed_forward(model, torch.cat(docs), positions, cu, max(lengths))
    (packed * weights).sum().backward()

    assert (packed - reference).abs().max().item() < 1e-5
    for name, grad in grads_ref.items():
        assert rel_err(dict(model.named_parameters())[name].grad, grad) < 1e-4, name


def test_shared_prefix_runs_through_the_stock_model(model):
    """segment_ids reach every attention call: shared-prefix log-probs equal the unshared ones."""
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).to(DEVICE) for n in (6, 4)]
    lengths = torch.tensor([3, 5, 2, 4]).to(DEVICE)
    responses = torch.randint(0, VOCAB, (4, 5), generator=gen).to(DEVICE)
    groups, adv = torch.tensor([0, 0, 1, 1]).to(DEVICE), torch.zeros(4).to(DEVICE)
    logps = []
    for packer, shared in ((pack_shared_prefix, True), (pack_unshared, False)):
        packed = packer(prompts, responses, lengths, groups, adv)
        extra = {"segment_ids": packed.segment_ids} if shared else {}
        with torch.no_grad():
            hidden = packed_forward(
                model, packed.input_ids, packed.position_ids, packed.cu_seqlens, packed.max_seqlen, **extra
            )
            logp, _ = linear_logprobs(hidden, model.lm_head.weight, packed.targets.clamp(min=0))
        logps.append(unpack_responses(packed, logp))
    valid = torch.arange(5, device=DEVICE)[None, :] < lengths[:, None]
    assert (logps[0] - logps[1])[valid].abs().max().item() < 1e-5


def test_padding_mask_is_refused(model):
    model.set_attn_implementation(register_varlen_attention())
    ids = torch.randint(0, VOCAB, (2, 6), device=DEVICE)
    mask = torch.ones(2, 6, dtype=torch.long, device=DEVICE)
    mask[1, 4:] = 0
    with pytest.raises(ValueError, match="takes packed batches, not padding masks"):
        model.model(input_ids=ids, attention_mask=mask)
