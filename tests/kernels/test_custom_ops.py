"""The kernels' public entry points as torch.library custom ops: their fake implementations agree with the real
ones (torch.library.opcheck), and torch.compile(fullgraph=True) traces a model calling them, with the outputs and
gradients of eager mode. Runs where the Triton path runs (a GPU, or the CPU interpreter)."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE

from r4b.kernels import fused_linear_bpo_loss, fused_linear_cross_entropy, linear_logprobs, varlen_attention
from r4b.kernels._backend import use_triton

pytestmark = pytest.mark.skipif(
    not use_triton(torch.empty(0, device=DEVICE)), reason="the custom ops wrap the Triton path (GPU or interpreter)"
)


def _attention_inputs(seed: int = 0, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 19, 9]
    n = sum(lengths)
    q, k, v = (torch.randn(n, heads, 16, generator=g).to(DEVICE) for heads in (4, 2, 2))
    cu = torch.tensor([0, 5, 24, 33], dtype=torch.int32, device=DEVICE)
    seg = torch.tensor([0] * 5 + [0] * 7 + [1] * 6 + [2] * 6 + [0] * 9, dtype=torch.int32, device=DEVICE)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)], cu, max(lengths), seg


def _loss_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, h, vocab = 21, 32, 53
    hidden = torch.randn(n, h, generator=g).to(DEVICE).requires_grad_()
    weight = (0.3 * torch.randn(vocab, h, generator=g)).to(DEVICE).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    return hidden, weight, targets


def test_opcheck_attention():
    (q, k, v), cu, longest, seg = _attention_inputs(requires_grad=True)
    op = torch.ops.r4b.varlen_attention
    torch.library.opcheck(op, (q, k, v, cu, seg, None, longest, True, 0.25))
    torch.library.opcheck(op, (q, k, v, cu, None, None, longest, False, 0.25))


@pytest.mark.parametrize("with_entropy", [False, True])
def test_opcheck_linear_logprobs(with_entropy):
    hidden, weight, targets = _loss_inputs()
    torch.library.opcheck(torch.ops.r4b.linear_logprobs, (hidden, weight, targets, 0.7, with_entropy, 64))


def _model_step(hidden, weight, targets, q, k, v, cu, longest, seg):
    """What a trainer's compiled step calls: attention over a packed row, then the fused losses and log-probs."""
    attended = varlen_attention(q, k, v, cu, longest, segment_ids=seg)
    mixed = hidden + attended.reshape(attended.shape[0], -1)[: hidden.shape[0], : hidden.shape[1]].mean()
    logp, entropy = linear_logprobs(mixed, weight, targets, with_entropy=True, temperature=0.9)
    advantages = torch.linspace(-1, 1, targets.numel(), device=targets.device)
    seq_ids = torch.arange(targets.numel(), device=targets.device) // 7
    bpo, _ = fused_linear_bpo_loss(mixed, weight, targets, advantages, seq_ids=seq_ids, method="recompute")
    ce = fused_linear_cross_entropy(mixed, weight, targets, method="recompute")
    return bpo + ce + logp.mean() + 0.1 * entropy.mean()


def test_fullgraph_compile_matches_eager():
    """aot_eager stands in for inductor on the CPU: Dynamo and AOTAutograd decide graph breaks and trace the fakes."""
    torch._dynamo.reset()
    results = []
    for step in (_model_step, torch.compile(_model_step, fullgraph=True, backend="aot_eager")):
        hidden, weight, targets = _loss_inputs(seed=1)
        (q, k, v), cu, longest, seg = _attention_inputs(seed=2, requires_grad=True)
        loss = step(hidden, weight, targets, q, k, v, cu, longest, seg)
        loss.backward()
        results.append([loss.detach(), *(t.grad for t in (hidden, weight, q, k, v))])
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
