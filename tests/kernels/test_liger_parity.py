"""Our fused BPO loss against liger-kernel's LigerFusedLinearGRPOLoss, an independent implementation.

Their loss types map to ours: bnpo = token-mean, grpo = seq-mean-token-mean,
dr_grpo = seq-mean-token-sum-norm with norm_len = max_completion_length. Liger
counts every sequence in its means, so no sequence here is fully masked.
"""

import pytest
import torch
from helpers import DEVICE, leaf, rel_err

from r4b.kernels import fused_linear_bpo_loss

liger_grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")

PAIRS = [("bnpo", "token-mean"), ("grpo", "seq-mean-token-mean"), ("dr_grpo", "seq-mean-token-sum-norm")]


@pytest.mark.parametrize(("liger_type", "our_mode"), PAIRS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("on_policy", [True, False], ids=["on-policy", "off-policy"])
@pytest.mark.parametrize("method", ["recompute", "cublas"])
def test_matches_liger(liger_type, our_mode, beta, on_policy, method):
    batch, seq_len, hidden_size, vocab = 3, 13, 40, 70
    temperature, eps_low, eps_high = 0.9, 0.2, 0.28
    gen = torch.Generator().manual_seed(hash((liger_type, beta, on_policy)) % 1000)
    hidden = torch.randn(batch, seq_len, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) * 0.25
    targets = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    mask = torch.rand(batch, seq_len, generator=gen) > 0.3
    mask[:, 0] = True
    advantages = torch.randn(batch, generator=gen)
    with torch.no_grad():
        logits = (hidden @ weight.t()) / temperature
        policy = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    old = None if on_policy else policy + 0.3 * torch.randn(batch, seq_len, generator=gen)
    ref = policy + 0.3 * torch.randn(batch, seq_len, generator=gen)

    liger = liger_grpo.LigerFusedLinearGRPOLoss(
        beta=beta,
        compiled=False,
        use_ref_model=True,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        loss_type=liger_type,
        max_completion_length=seq_len,
        temperature=temperature,
    )
    h_liger, w_liger = leaf(hidden, torch.float32), leaf(weight, torch.float32)
    loss_liger, metrics_liger = liger(
        h_liger, w_liger, targets, mask.long(), advantages, ref_per_token_logps=ref, old_per_token_logps=old
    )
    loss_liger.backward()

    h_ours, w_ours = leaf(hidden, torch.float32).to(DEVICE), leaf(weight, torch.float32).to(DEVICE)
    h_ours.retain_grad()
    w_ours.retain_grad()
    seq_ids = torch.arange(batch)[:, None].expand(batch, seq_len)
    to_dev = lambda t: None if t is None else t.to(DEVICE)
    loss, metrics = fused_linear_bpo_loss(
        h_ours.reshape(-1, hidden_size),
        w_ours,
        targets.reshape(-1).to(DEVICE),
        advantages[:, None].expand(batch, seq_len).reshape(-1).to(DEVICE),
        seq_ids=seq_ids.reshape(-1).to(DEVICE),
        loss_mask=mask.reshape(-1).to(DEVICE),
        old_logprobs=to_dev(None if old is None else old.reshape(-1)),
        ref_logprobs=to_dev(ref.reshape(-1)) if beta else None,
        clip_eps_low=eps_low,
        clip_eps_high=eps_high,
        beta=beta,
        temperature=temperature,
        loss_agg_mode=our_mode,
        norm_len=seq_len,
        method=method,
        chunk_bytes=17 * vocab * 4,  # "cublas": three token chunks (17, 17, 5 rows)
    )
    loss.backward()

    assert abs(loss.item() - loss_liger.item()) < 1e-5 * max(1.0, abs(loss_liger.item()))
    clip_liger = metrics_liger[-1]
    assert abs(metrics["clip_frac"].item() - clip_liger.item()) < 1e-6
    if beta:
        assert abs(metrics["kl"].item() - metrics_liger[0].item()) < 1e-5
    assert rel_err(h_ours.grad, h_liger.grad) < 1e-4
    assert rel_err(w_ours.grad, w_liger.grad) < 1e-4
