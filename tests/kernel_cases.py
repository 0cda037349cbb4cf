"""Inputs shared by the kernel tests: packed attention layouts with their masks, and a packed BPO batch."""

import torch
from helpers import DEVICE, random_problem

from r4b.kernels.packed_layout import PackedLayout


def packed_documents(lengths, *, seed, responses_in=(), bidir_in=()):
    """cu_seqlens plus segment ids (doc index -> (prompt_len, response lengths)) and bidir blocks."""
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    n = int(cu[-1])
    seg = torch.zeros(n, dtype=torch.int32)
    for doc in responses_in:
        start, end = int(cu[doc]), int(cu[doc + 1])
        prompt = int(torch.randint(1, end - start - 2, (1,), generator=gen))
        cuts = sorted(set(torch.randint(start + prompt + 1, end, (3,), generator=gen).tolist()))
        for k, (a, b) in enumerate(zip([start + prompt, *cuts], [*cuts, end], strict=True), start=1):
            seg[a:b] = k
    bidir = torch.zeros(n, dtype=torch.int32)
    for block_id, doc in enumerate(bidir_in, start=1):
        start, end = int(cu[doc]), int(cu[doc + 1])
        a = int(torch.randint(start, end - 2, (1,), generator=gen))
        bidir[a : min(end, a + 9)] = block_id
    return cu.to(DEVICE), seg.to(DEVICE), bidir.to(DEVICE)


MASKS = ["causal", "shared-prefix", "shared-prefix+bidir", "bidir", "full"]


def mask_kwargs(mask: str, seg, bidir) -> dict:
    """The mask arguments of ``varlen_attention`` for one of MASKS."""
    return {
        "causal": {},
        "shared-prefix": {"segment_ids": seg},
        "shared-prefix+bidir": {"segment_ids": seg, "bidir_ids": bidir},
        "bidir": {"bidir_ids": bidir},
        "full": {"causal": False},
    }[mask]


def mask_layout(cu, mask: str, seg, bidir) -> tuple[PackedLayout, bool]:
    """The per-batch form of one of MASKS: the row's PackedLayout (packed_attention, the tile schedule) and causal."""
    kw = mask_kwargs(mask, seg, bidir)
    return PackedLayout(cu, segment_ids=kw.get("segment_ids"), bidir_ids=kw.get("bidir_ids")), kw.get("causal", True)


def bpo_batch(n=60, h=40, v=90, *, seed=0, num_seqs=6):
    """A packed batch: ragged sequences, one of them fully masked, old/ref log-probs near the policy's."""
    hidden, weight, targets = random_problem(n, h, v, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    cuts = sorted(torch.randperm(n - 1, generator=gen)[: num_seqs - 1].add(1).tolist())
    seq_ids = torch.zeros(n, dtype=torch.long)
    for cut in cuts:
        seq_ids[cut:] += 1
    seq_ids = seq_ids * 3 + 5  # ids need not be 0..k-1
    loss_mask = torch.rand(n, generator=gen) > 0.25
    loss_mask[seq_ids == seq_ids[0]] = False  # a sequence with no token in the loss
    per_seq_adv = torch.randn(num_seqs, generator=gen, dtype=torch.float64)
    advantages = per_seq_adv[(seq_ids - 5) // 3]
    # Deviations large enough that both clip branches are taken.
    old = torch.randn(n, generator=gen, dtype=torch.float64) * 0.3
    ref = torch.randn(n, generator=gen, dtype=torch.float64) * 0.3
    extras = dict(seq_ids=seq_ids, loss_mask=loss_mask, advantages=advantages, old_delta=old, ref_delta=ref)
    return hidden, weight, targets, {k: t.to(DEVICE) for k, t in extras.items()}


def rollout_weights(n: int, *, seed: int) -> torch.Tensor:
    """Importance weights as the rollout correction makes them: in [0, 2], every fifth token masked (0, MIS)."""
    weights = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
    weights[::5] = 0.0
    return weights.to(DEVICE)


def policy_logprobs(hidden, weight, targets, temperature):
    logits = (hidden @ weight.t()) / temperature
    return torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1).detach()
