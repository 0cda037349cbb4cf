"""linear_logprobs against the float64 reference: values, entropy and both gradients."""

import pytest
import torch
from helpers import DEVICE, GRAD_RTOL, VALUE_ATOL, AllocationTracker, leaf, max_abs, random_problem, rel_err

from r4b.kernels import linear_logprobs
from r4b.kernels.reference import linear_logprobs_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Ragged on purpose: none is a multiple of the 16-wide interpreter tiles.
SHAPES = [(1, 16, 16), (37, 45, 83), (50, 23, 129), (19, 70, 301)]


def _check_against_reference(n, h, v, dtype, *, seed, temperature, with_entropy, chunk_elements=None):
    hidden64, weight64, targets = random_problem(n, h, v, seed=seed)
    hidden, weight = leaf(hidden64, dtype), leaf(weight64, dtype)
    # The oracle sees exactly the rounded inputs the kernel sees.
    hidden_ref, weight_ref = leaf(hidden, torch.float64), leaf(weight, torch.float64)
    gen = torch.Generator().manual_seed(seed + 1)
    g_lp = torch.randn(n, generator=gen, dtype=torch.float64).to(DEVICE)
    g_ent = torch.randn(n, generator=gen, dtype=torch.float64).to(DEVICE)

    logp, ent = linear_logprobs(
        hidden, weight, targets, temperature=temperature, with_entropy=with_entropy, chunk_elements=chunk_elements
    )
    logp_ref, ent_ref = linear_logprobs_reference(
        hidden_ref, weight_ref, targets, temperature=temperature, with_entropy=with_entropy
    )
    assert logp.dtype == torch.float32 and logp.shape == (n,)
    assert max_abs(logp, logp_ref) < VALUE_ATOL[dtype]
    objective = (logp.double() * g_lp).sum()
    objective_ref = (logp_ref * g_lp).sum()
    if with_entropy:
        assert ent.dtype == torch.float32
        assert max_abs(ent, ent_ref) < VALUE_ATOL[dtype]
        objective = objective + (ent.double() * g_ent).sum()
        objective_ref = objective_ref + (ent_ref * g_ent).sum()
    else:
        assert ent is None
    objective.backward()
    objective_ref.backward()
    assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype
    assert rel_err(hidden.grad, hidden_ref.grad) < GRAD_RTOL[dtype]
    assert rel_err(weight.grad, weight_ref.grad) < GRAD_RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype):
    n, h, v = shape
    _check_against_reference(n, h, v, dtype, seed=n * 7 + v, temperature=1.0, with_entropy=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_entropy_and_temperature(dtype, temperature):
    _check_against_reference(29, 40, 97, dtype, seed=3, temperature=temperature, with_entropy=True)


@pytest.mark.parametrize("chunk_elements", [1, 29 * 16, 29 * 50, 29 * 1000])
def test_vocabulary_chunking(chunk_elements):
    """One column per chunk, tile-aligned chunks, ragged chunks and a single chunk give the same answer."""
    _check_against_reference(
        29, 33, 97, torch.float32, seed=5, temperature=0.9, with_entropy=True, chunk_elements=chunk_elements
    )


def test_random_shapes():
    gen = torch.Generator().manual_seed(2026)
    for trial in range(4):
        n, h, v = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in ((1, 70), (16, 90), (16, 200)))
        _check_against_reference(n, h, v, torch.float32, seed=trial, temperature=1.0, with_entropy=True)


def test_leading_dimensions_and_strided_hidden():
    hidden64, weight64, targets = random_problem(24, 40, 70, seed=11)
    wide = torch.zeros(24, 56, dtype=torch.float32, device=DEVICE)
    wide[:, 8:48] = hidden64.float()
    hidden = wide[:, 8:48]  # non-contiguous rows
    logp, _ = linear_logprobs(hidden.view(4, 6, 40), weight64.float(), targets.view(4, 6))
    logp_ref, _ = linear_logprobs_reference(hidden64, weight64, targets)
    assert logp.shape == (4, 6)
    assert max_abs(logp.reshape(-1), logp_ref) < 1e-4


def test_fp32_weight_with_low_precision_hidden():
    """Autocast keeps an fp32 lm_head beside bf16 activations: the weight is cast, its grad stays fp32."""
    hidden64, weight64, targets = random_problem(20, 32, 50, seed=12)
    hidden, weight = leaf(hidden64, torch.float16), leaf(weight64, torch.float32)
    logp, _ = linear_logprobs(hidden, weight, targets)
    logp.sum().backward()
    assert weight.grad.dtype == torch.float32
    ref_w = leaf(weight.to(torch.float16), torch.float64)
    logp_ref, _ = linear_logprobs_reference(leaf(hidden, torch.float64), ref_w, targets)
    logp_ref.sum().backward()
    assert rel_err(weight.grad, ref_w.grad) < GRAD_RTOL[torch.float16]


def test_empty_batch():
    _, weight64, _ = random_problem(1, 32, 50, seed=0)
    hidden = torch.zeros(0, 32, device=DEVICE, requires_grad=True)
    logp, ent = linear_logprobs(
        hidden, weight64.float(), torch.zeros(0, dtype=torch.long, device=DEVICE), with_entropy=True
    )
    assert logp.shape == (0,) and ent.shape == (0,)


def test_never_allocates_tokens_by_vocab():
    """With a small chunk budget no tensor of N*V elements exists, forward or backward."""
    n, h, v = 20, 32, 300
    hidden64, weight64, targets = random_problem(n, h, v, seed=4)
    hidden, weight = leaf(hidden64, torch.float32), leaf(weight64, torch.float32)
    with AllocationTracker() as tracker:
        logp, _ = linear_logprobs(hidden, weight, targets, with_entropy=True, chunk_elements=n * 40)
        logp.sum().backward()
    allocated = [size for size, _ in tracker.sizes]
    assert max(allocated) == v * h  # the weight gradient itself, and nothing larger
    assert all(size <= n * 40 for size in allocated if size != v * h)
    assert n * v not in allocated


def test_forward_only_costs_only_outputs():
    """Old / reference log-probs under no_grad allocate O(N) floats, nothing with V or H in it."""
    n, h, v = 20, 32, 300
    hidden64, weight64, targets = random_problem(n, h, v, seed=6)
    hidden, weight = hidden64.float(), weight64.float()
    with torch.no_grad(), AllocationTracker() as tracker:
        linear_logprobs(hidden, weight, targets, with_entropy=True)
    size, op = tracker.largest()
    assert size <= 4 * 3 * n, f"{op} allocated {size} elements"


@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_frozen_input_gets_no_gradient(frozen):
    """A frozen lm_head (or frozen activations) skips that matmul; the other gradient is unchanged."""
    hidden64, weight64, targets = random_problem(21, 30, 77, seed=9)
    inputs = {"hidden": leaf(hidden64, torch.float32), "weight": leaf(weight64, torch.float32)}
    inputs[frozen].requires_grad_(False)
    logp, _ = linear_logprobs(inputs["hidden"], inputs["weight"], targets, chunk_elements=21 * 20)
    logp.sum().backward()
    hidden_ref, weight_ref = leaf(hidden64, torch.float64), leaf(weight64, torch.float64)
    linear_logprobs_reference(hidden_ref, weight_ref, targets)[0].sum().backward()
    trained, reference = ("weight", weight_ref) if frozen == "hidden" else ("hidden", hidden_ref)
    assert inputs[frozen].grad is None
    assert rel_err(inputs[trained].grad, reference.grad) < GRAD_RTOL[torch.float32]
