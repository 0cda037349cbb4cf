"""The cuBLAS methods of the fused losses (r4b.kernels.fused_grad) against the float64 references.

Every chunk budget here is small enough that the token chunks are ragged (not multiples of anything) and
several, so the cross-chunk d_weight accumulation is exercised; N, H, V are not multiples of the tiles.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, GRAD_RTOL, VALUE_ATOL, AllocationTracker, leaf, max_abs, random_problem, rel_err
from kernel_cases import bpo_batch, policy_logprobs, rollout_weights

from r4b.kernels import LOSS_AGG_MODES, fused_grad, fused_linear_bpo_loss, fused_linear_cross_entropy, linear_logprobs
from r4b.kernels.reference import bpo_loss_reference, cross_entropy_reference, linear_logprobs_reference

V_TEST = 90  # bpo_batch's vocabulary


def _budget(rows: int, vocab: int, dtype: torch.dtype, method: str) -> int:
    """chunk_bytes giving ``rows`` rows per chunk."""
    logits_fp32 = method != "cublas-fast"
    esize = torch.finfo(dtype).bits // 8
    per_row = vocab * (4 if logits_fp32 else esize) + (vocab * esize if logits_fp32 and esize != 4 else 0)
    return rows * per_row


# Loss value (relative) and gradient (relative Frobenius) tolerances against float64, by (method, dtype).
# cublas-fast rounds the logits to the compute dtype, as a materialized bf16 loss does.
LOSS_RTOL = {
    ("cublas", torch.float32): 1e-5,
    ("cublas", torch.bfloat16): 1e-4,
    ("cublas", torch.float16): 1e-4,
    ("cublas-fast", torch.bfloat16): 3e-2,
    ("cublas-fast", torch.float16): 3e-3,
}
GRAD_TOL = {
    ("cublas", torch.float32): GRAD_RTOL[torch.float32],
    ("cublas", torch.bfloat16): GRAD_RTOL[torch.bfloat16],
    ("cublas", torch.float16): GRAD_RTOL[torch.float16],
    ("cublas-fast", torch.bfloat16): GRAD_RTOL[torch.bfloat16],
    ("cublas-fast", torch.float16): 1e-2,
}


def _bpo_case(loss_agg_mode, on_policy, beta, dtype, method, *, seed=1, rows=13, scale=1.0, **extra):
    temperature = 0.8
    hidden64, weight64, targets, b = bpo_batch(seed=seed)
    policy = policy_logprobs(hidden64, weight64, targets, temperature)
    kwargs = dict(
        seq_ids=b["seq_ids"],
        loss_mask=b["loss_mask"],
        old_logprobs=None if on_policy else policy + b["old_delta"],
        ref_logprobs=policy + b["ref_delta"] if beta else None,
        clip_eps_low=0.2,
        clip_eps_high=0.28,
        beta=beta,
        temperature=temperature,
        loss_agg_mode=loss_agg_mode,
        norm_len=64,
    )
    kwargs.update(extra)  # is_weights, delta, bias_correction_kl, the loss type's options
    hidden, weight = leaf(hidden64, dtype), leaf(weight64, dtype)
    hidden_ref, weight_ref = leaf(hidden, torch.float64), leaf(weight, torch.float64)
    loss, metrics = fused_linear_bpo_loss(
        hidden, weight, targets, b["advantages"].float(), method=method,
        chunk_bytes=_budget(rows, V_TEST, dtype, method), **kwargs,
    )  # fmt: skip
    loss_ref, metrics_ref = bpo_loss_reference(hidden_ref, weight_ref, targets, b["advantages"], **kwargs)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    tol = LOSS_RTOL[(method, dtype)]
    assert abs(loss.item() - loss_ref.item()) < tol * max(1.0, abs(loss_ref.item()))
    for name in ("clip_frac", "kl", "entropy"):
        assert not metrics[name].requires_grad
        assert abs(metrics[name].item() - metrics_ref[name].item()) < max(1e-5, tol), name
    if not on_policy and dtype == torch.float32 and kwargs.get("loss_type", "dapo") in ("dapo", "grpo"):
        assert metrics["clip_frac"].item() > 0  # the clipped branch is exercised
    (loss * scale).backward()
    (loss_ref * scale).backward()
    assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype
    assert rel_err(hidden.grad, hidden_ref.grad) < GRAD_TOL[(method, dtype)]
    assert rel_err(weight.grad, weight_ref.grad) < GRAD_TOL[(method, dtype)]


@pytest.mark.parametrize("loss_agg_mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("on_policy", [True, False], ids=["on-policy", "off-policy"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_bpo_matches_reference_fp32(loss_agg_mode, on_policy, beta):
    _bpo_case(loss_agg_mode, on_policy, beta, torch.float32, "cublas")


@pytest.mark.parametrize(("method", "dtype"), [("cublas", torch.float32), ("cublas-fast", torch.bfloat16)])
def test_bpo_with_importance_weights_matches_reference(method, dtype):
    """The rollout correction's per-token weights, liger's delta and corrected KL reach the gradients made in the
    forward too (cublas-fast on-policy, as in the bf16 test below)."""
    on_policy = method == "cublas-fast"
    options = dict(is_weights=rollout_weights(60, seed=5), delta=1.1, bias_correction_kl=True)
    _bpo_case("token-mean", on_policy, 0.05, dtype, method, rows=17, **options)


@pytest.mark.parametrize("loss_agg_mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("method", ["cublas", "cublas-fast"])
def test_bpo_matches_reference_bf16(loss_agg_mode, method):
    """bf16. cublas-fast on-policy only: with logits rounded to bf16 (a materialized bf16 loss's precision) an
    off-policy token near a clip boundary can take the other branch than in float64, a gradient of 0 or not."""
    _bpo_case(loss_agg_mode, method == "cublas-fast", 0.05, torch.bfloat16, method, seed=2, rows=17)


@pytest.mark.parametrize("method", ["cublas", "cublas-fast"])
def test_bpo_fp16_one_chunk_and_scaled_upstream(method):
    """fp16, the whole batch in one chunk, and an upstream gradient of 0.37 (loss scaled after the call)."""
    _bpo_case("seq-mean-token-sum", method == "cublas-fast", 0.05, torch.float16, method, seed=3, rows=1000, scale=0.37)


def test_cublas_fast_equals_cublas_in_fp32():
    """fp32 has no rounding to skip: both methods are the same computation."""
    hidden64, weight64, targets, b = bpo_batch(seed=4)
    results = []
    for method in ("cublas", "cublas-fast"):
        hidden = leaf(hidden64, torch.float32)
        loss, _ = fused_linear_bpo_loss(
            hidden, weight64.float(), targets, b["advantages"].float(), seq_ids=b["seq_ids"],
            loss_mask=b["loss_mask"], method=method, chunk_bytes=_budget(11, V_TEST, torch.float32, method),
        )  # fmt: skip
        loss.backward()
        results.append((loss.detach(), hidden.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_gradient_accumulation_over_micro_batches():
    """Two micro-batches, each loss scaled (by 0.5 and by -1.3) and backpropagated: .grad holds the sum."""
    hidden64, weight64, targets, b = bpo_batch(seed=5)
    weight = leaf(weight64, torch.float32)
    weight_ref = leaf(weight64, torch.float64)
    halves = (slice(0, 27), slice(27, None))
    for part, scale in zip(halves, (0.5, -1.3), strict=True):
        kwargs = dict(seq_ids=b["seq_ids"][part], loss_mask=b["loss_mask"][part], loss_agg_mode="seq-mean-token-mean")
        hidden = leaf(hidden64[part], torch.float32)
        loss, _ = fused_linear_bpo_loss(
            hidden, weight, targets[part], b["advantages"][part].float(), method="cublas",
            chunk_bytes=_budget(8, V_TEST, torch.float32, "cublas"), **kwargs,
        )  # fmt: skip
        (loss * scale).backward()
        hidden_ref = leaf(hidden64[part], torch.float64)
        loss_ref, _ = bpo_loss_reference(hidden_ref, weight_ref, targets[part], b["advantages"][part], **kwargs)
        (loss_ref * scale).backward()
        assert rel_err(hidden.grad, hidden_ref.grad) < GRAD_RTOL[torch.float32]
    assert rel_err(weight.grad, weight_ref.grad) < GRAD_RTOL[torch.float32]


def test_masked_tokens_cannot_leak():
    """Garbage at masked positions (target -100, inf/NaN log-probs, NaN advantages) changes nothing."""
    hidden64, weight64, targets, b = bpo_batch(seed=3)
    policy = policy_logprobs(hidden64, weight64, targets, 1.0)
    mask = b["loss_mask"]
    clean = dict(old=policy + b["old_delta"], ref=policy + b["ref_delta"], adv=b["advantages"], tgt=targets)
    dirty = dict(
        old=torch.where(mask, clean["old"], float("inf")),
        ref=torch.where(mask, clean["ref"], float("nan")),
        adv=torch.where(mask, clean["adv"], float("nan")),
        tgt=torch.where(mask, targets, -100),
    )
    results = []
    for batch in (clean, dirty):
        hidden = leaf(hidden64, torch.float32)
        loss, _ = fused_linear_bpo_loss(
            hidden, weight64.float(), batch["tgt"], batch["adv"].float(), seq_ids=b["seq_ids"], loss_mask=mask,
            old_logprobs=batch["old"].float(), ref_logprobs=batch["ref"].float(), beta=0.1, method="cublas",
            chunk_bytes=_budget(16, V_TEST, torch.float32, "cublas"),
        )  # fmt: skip
        loss.backward()
        results.append((loss.detach(), hidden.grad))
    assert torch.isfinite(results[1][0]) and torch.isfinite(results[1][1]).all()
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize(
    ("reduction", "dtype", "method"),
    [(r, torch.float32, "cublas") for r in ("mean", "sum", "none")]
    + [(r, torch.bfloat16, m) for r in ("mean", "sum") for m in ("cublas", "cublas-fast")],
)
def test_cross_entropy_matches_torch(reduction, dtype, method):
    """reduction="none" takes "recompute" (its per-token gradient is unknown in the forward)."""
    hidden64, weight64, targets = random_problem(45, 38, 101, seed=7)
    targets[::4] = -100
    hidden, weight = leaf(hidden64, dtype), leaf(weight64, dtype)
    hidden_ref, weight_ref = leaf(hidden, torch.float64), leaf(weight, torch.float64)
    loss = fused_linear_cross_entropy(
        hidden, weight, targets, reduction=reduction, method=method, chunk_bytes=_budget(14, 101, dtype, method)
    )
    expected = F.cross_entropy(hidden_ref @ weight_ref.t(), targets, reduction=reduction)
    assert loss.dtype == torch.float32
    tol = LOSS_RTOL[(method, dtype)] if reduction != "none" else 1e-4
    assert max_abs(loss, expected) < max(tol, 1e-4) * max(1.0, float(expected.detach().abs().max()))
    gen = torch.Generator().manual_seed(1)
    upstream = torch.randn(loss.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    (loss.double() * upstream).sum().backward()
    (expected * upstream).sum().backward()
    assert rel_err(hidden.grad, hidden_ref.grad) < GRAD_RTOL[dtype]
    assert rel_err(weight.grad, weight_ref.grad) < GRAD_RTOL[dtype]


def test_cross_entropy_all_ignored_and_reference():
    hidden64, weight64, _ = random_problem(20, 32, 50, seed=8)
    ignored = torch.full((20,), -100, device=DEVICE)
    hidden = leaf(hidden64, torch.float32)
    loss = fused_linear_cross_entropy(hidden, weight64.float(), ignored, method="cublas")
    assert loss.item() == 0.0
    loss.backward()
    assert hidden.grad.abs().max().item() == 0.0
    targets = torch.randint(0, 50, (20,), device=DEVICE)
    got = fused_linear_cross_entropy(hidden64.float(), weight64.float(), targets, method="cublas", reduction="sum")
    assert math.isclose(got.item(), cross_entropy_reference(hidden64, weight64, targets, reduction="sum").item(),
                        rel_tol=1e-5)  # fmt: skip


CASES = [(torch.float32, "cublas"), (torch.bfloat16, "cublas"), (torch.bfloat16, "cublas-fast")]


@pytest.mark.parametrize(("dtype", "method"), CASES, ids=["fp32", "bf16", "bf16-fast"])
def test_forward_only_logprobs(dtype, method):
    """linear_logprobs under no_grad: cuBLAS logits per chunk + the Triton row statistics."""
    n, h, v = 41, 37, 103
    hidden64, weight64, targets = random_problem(n, h, v, seed=9)
    hidden, weight = hidden64.to(dtype), weight64.to(dtype)
    with torch.no_grad():
        logp, ent = linear_logprobs(
            hidden, weight, targets, temperature=0.7, with_entropy=True, method=method,
            chunk_bytes=_budget(9, v, dtype, method),
        )  # fmt: skip
    logp_ref, ent_ref = linear_logprobs_reference(
        hidden.double(), weight.double(), targets, temperature=0.7, with_entropy=True
    )
    tol = VALUE_ATOL[dtype] if method == "cublas" else 5e-2
    assert logp.dtype == torch.float32 and max_abs(logp, logp_ref) < tol
    assert max_abs(ent, ent_ref) < tol


def test_with_grad_logprobs_take_recompute(monkeypatch):
    """A differentiable linear_logprobs call cannot know its upstream gradient in the forward: "recompute"."""
    monkeypatch.setattr(fused_grad, "chunked_forward", _forbidden)
    hidden64, weight64, targets = random_problem(12, 20, 30, seed=10)
    hidden = leaf(hidden64, torch.float32)
    logp, _ = linear_logprobs(hidden, weight64.float(), targets, method="cublas")
    logp.sum().backward()
    assert hidden.grad is not None


def _forbidden(*args, **kwargs):
    raise AssertionError("the cuBLAS path ran")


def test_no_gradient_work_without_grad(monkeypatch):
    """Under no_grad, or with inputs not requiring grad, the per-token gradient and d_logits never run."""
    launched = []
    real = fused_grad._dlogits_kernel
    monkeypatch.setattr(fused_grad, "_dlogits_kernel", _Recorder(real, launched))
    hidden64, weight64, targets, b = bpo_batch(seed=6)
    kwargs = dict(seq_ids=b["seq_ids"], loss_mask=b["loss_mask"], method="cublas")
    hidden, weight = leaf(hidden64, torch.float32), leaf(weight64, torch.float32)
    with torch.no_grad():
        loss_nograd, _ = fused_linear_bpo_loss(hidden, weight, targets, b["advantages"].float(), **kwargs)
    loss_frozen, _ = fused_linear_bpo_loss(hidden64.float(), weight64.float(), targets, b["advantages"].float(),
                                           **kwargs)  # fmt: skip
    assert not launched and not loss_nograd.requires_grad and not loss_frozen.requires_grad
    loss, _ = fused_linear_bpo_loss(hidden, weight, targets, b["advantages"].float(), **kwargs)
    assert launched and loss.requires_grad
    assert loss.item() == loss_nograd.item() == loss_frozen.item()


class _Recorder:
    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        self.calls.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_frozen_input_gets_no_gradient(frozen):
    hidden64, weight64, targets = random_problem(21, 30, 77, seed=9)
    inputs = {"hidden": leaf(hidden64, torch.float32), "weight": leaf(weight64, torch.float32)}
    inputs[frozen].requires_grad_(False)
    loss = fused_linear_cross_entropy(inputs["hidden"], inputs["weight"], targets, method="cublas",
                                      chunk_bytes=_budget(6, 77, torch.float32, "cublas"))  # fmt: skip
    loss.backward()
    hidden_ref, weight_ref = leaf(hidden64, torch.float64), leaf(weight64, torch.float64)
    cross_entropy_reference(hidden_ref, weight_ref, targets).backward()
    trained, reference = ("weight", weight_ref) if frozen == "hidden" else ("hidden", hidden_ref)
    assert inputs[frozen].grad is None
    assert rel_err(inputs[trained].grad, reference.grad) < GRAD_RTOL[torch.float32]


def test_leading_dimensions_and_fp32_weight():
    """[B, T, H] hidden with [B, T] targets, and an fp32 lm_head beside bf16 activations (autocast)."""
    hidden64, weight64, targets = random_problem(24, 40, 70, seed=11)
    hidden, weight = leaf(hidden64.view(4, 6, 40), torch.bfloat16), leaf(weight64, torch.float32)
    loss = fused_linear_cross_entropy(hidden, weight, targets.view(4, 6), method="cublas",
                                      chunk_bytes=_budget(5, 70, torch.bfloat16, "cublas"))  # fmt: skip
    loss.backward()
    assert weight.grad.dtype == torch.float32 and hidden.grad.shape == (4, 6, 40)
    hidden_ref = leaf(hidden.reshape(24, 40), torch.float64)
    weight_ref = leaf(weight.to(torch.bfloat16), torch.float64)
    cross_entropy_reference(hidden_ref, weight_ref, targets).backward()
    assert rel_err(weight.grad, weight_ref.grad) < GRAD_RTOL[torch.bfloat16]
    assert rel_err(hidden.grad.reshape(24, 40), hidden_ref.grad) < GRAD_RTOL[torch.bfloat16]


def test_never_allocates_tokens_by_vocab():
    """The chunk budget bounds every allocation: no N x V tensor; beyond the chunk only O(N), N x H and V x H."""
    n, h, v = 24, 32, 300
    hidden64, weight64, targets = random_problem(n, h, v, seed=4)
    hidden, weight = leaf(hidden64, torch.bfloat16), leaf(weight64, torch.bfloat16)
    rows = 9
    with AllocationTracker() as tracker:
        loss = fused_linear_cross_entropy(hidden, weight, targets, method="cublas",
                                          chunk_bytes=_budget(rows, v, torch.bfloat16, "cublas"))  # fmt: skip
        loss.backward()
    allowed = {v * h, n * h}
    sizes = [size for size, _ in tracker.sizes]
    assert n * v not in sizes
    assert all(size <= rows * v or size in allowed for size in sizes), sorted(set(sizes))


def test_chunk_rows_and_peak_bytes():
    """The chunk comes from the byte budget; peak_bytes is what the benchmark's sizes predict."""
    v, h = 151936, 2560
    rows = fused_grad.chunk_rows(4096, v, torch.bfloat16, True, None)
    assert rows * v * 6 <= fused_grad.DEFAULT_CHUNK_BYTES < (rows + 64) * v * 6
    assert fused_grad.chunk_rows(100, v, torch.bfloat16, True, None) == 100
    fast = fused_grad.chunk_rows(4096, v, torch.bfloat16, True, None, logits_fp32=False)
    assert fast * v * 2 <= fused_grad.DEFAULT_CHUNK_BYTES < (fast + 64) * v * 2
    exact = fused_grad.peak_bytes(4096, h, v, torch.bfloat16)
    lean = fused_grad.peak_bytes(4096, h, v, torch.bfloat16, logits_fp32=False, exact_dweight=False)
    assert exact - lean == v * h * 4 + rows * v * 6 - fast * v * 2  # the fp32 d_weight buffer and the chunk


def test_method_selection(monkeypatch):
    hidden64, weight64, targets = random_problem(10, 16, 20, seed=12)
    with pytest.raises(ValueError, match="method"):
        fused_linear_cross_entropy(hidden64.float(), weight64.float(), targets, method="fast")
    monkeypatch.setenv(fused_grad.METHOD_ENV, "nope")
    with pytest.raises(ValueError, match=fused_grad.METHOD_ENV):
        fused_linear_cross_entropy(hidden64.float(), weight64.float(), targets)
    monkeypatch.setenv(fused_grad.METHOD_ENV, "cublas")
    monkeypatch.setattr(fused_grad, "chunked_forward", _forbidden)
    with pytest.raises(AssertionError, match="cuBLAS path ran"):
        fused_linear_cross_entropy(hidden64.float(), weight64.float(), targets)


def test_cpu_without_interpreter_takes_the_reference(monkeypatch):
    """Without TRITON_INTERPRET, CPU tensors run the torch reference, whatever the method."""
    if DEVICE != "cpu":
        pytest.skip("the CPU dispatch rule")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(fused_grad, "chunked_forward", _forbidden)
    hidden64, weight64, targets, b = bpo_batch(seed=7)
    hidden = leaf(hidden64, torch.float32)
    loss, _ = fused_linear_bpo_loss(hidden, weight64.float(), targets, b["advantages"].float(),
                                    seq_ids=b["seq_ids"], loss_mask=b["loss_mask"], method="cublas")  # fmt: skip
    loss.backward()
    hidden_ref = leaf(hidden64, torch.float64)
    loss_ref, _ = bpo_loss_reference(hidden_ref, weight64, targets, b["advantages"], seq_ids=b["seq_ids"],
                                     loss_mask=b["loss_mask"])  # fmt: skip
    loss_ref.backward()
    assert abs(loss.item() - loss_ref.item()) < 1e-5
    assert rel_err(hidden.grad, hidden_ref.grad) < GRAD_RTOL[torch.float32]
    with torch.no_grad():
        logp, _ = linear_logprobs(hidden64.float(), weight64.float(), targets, method="cublas")
    assert max_abs(logp, linear_logprobs_reference(hidden64, weight64, targets)[0]) < 1e-4


def test_second_backward_through_the_graph_is_refused():
    """The gradients are handed out once (autograd may keep them as .grad without a copy)."""
    hidden64, weight64, targets = random_problem(12, 20, 30, seed=13)
    hidden = leaf(hidden64, torch.float32)
    loss = fused_linear_cross_entropy(hidden, weight64.float(), targets, method="cublas")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


@pytest.mark.parametrize(
    ("loss_type", "level"),
    [("grpo", "sequence"), ("luspo", "sequence"), ("cispo", "token"), ("sapo", "token"), ("vespo", "token")],
)
def test_bpo_loss_types_match_reference(loss_type, level):
    """Every policy term through the gradients made in the forward, chunks of 13 tokens that cut through
    sequences: a sequence's shared ratio (GSPO) or weight (VESPO) takes the two-pass route."""
    eps_high = 1.2 if loss_type == "cispo" else 0.28  # CISPO's eps_high caps the ratio itself
    options = dict(loss_type=loss_type, importance_level=level, is_weights=rollout_weights(60, seed=6))
    _bpo_case(None, False, 0.05, torch.float32, "cublas", clip_eps_high=eps_high, **options)
