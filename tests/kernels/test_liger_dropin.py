"""r4b.kernels.FusedLinearGRPOLoss against liger-kernel's LigerFusedLinearGRPOLoss, called the same way.

float64 inputs take r4b's torch reference (liger computes its log-probs in fp32 whatever the input, hence the
1e-5 tolerances); the float32 tests take the Triton kernels in the interpreter (conftest sets TRITON_INTERPRET=1
on a CPU). Masks are ragged and one sequence is fully masked: liger's grpo and dr_grpo still count it.
"""

import pytest
import torch
from helpers import AllocationTracker, rel_err

from r4b.kernels import FusedLinearGRPOLoss
from r4b.kernels._backend import use_triton

liger_grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]
CLIP_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]  # those that take importance_sampling_level="sequence"
TEMPERATURE = 0.7


def make_problem(batch=4, seq_len=9, hidden_size=24, vocab=50, *, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq_len, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) * 0.3
    targets = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    lengths = torch.randint(1, seq_len + 1, (batch,), generator=gen)
    lengths[-1] = 0  # a sequence without a completion token
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.t() / TEMPERATURE, -1).gather(-1, targets[..., None])[..., 0]
    noise = lambda: 0.3 * torch.randn(batch, seq_len, generator=gen, dtype=torch.float64)
    return {
        "_input": hidden.to(dtype),
        "lin_weight": weight.to(dtype),
        "selected_token_ids": targets,
        "attention_mask": mask,
        "advantages": torch.randn(batch, generator=gen, dtype=torch.float64).to(dtype),
        "old_per_token_logps": (logp + noise()).float(),
        "ref_per_token_logps": (logp + noise()).float(),
    }


def run(module: torch.nn.Module, inputs: dict, differentiable=("_input", "lin_weight")):
    """module(**inputs) with fresh leaves for ``differentiable``: (loss, metrics, their gradients)."""
    inputs = {k: v.detach().clone().requires_grad_() if k in differentiable else v for k, v in inputs.items()}
    loss, metrics = module(**inputs)
    loss.backward()
    return loss.detach(), metrics, {k: inputs[k].grad for k in differentiable}


def assert_same(ours, theirs, *, rtol=1e-5):
    (loss, metrics, grads), (loss_l, metrics_l, grads_l) = ours, theirs
    assert abs(loss.item() - loss_l.item()) <= rtol * max(1.0, abs(loss_l.item()))
    assert len(metrics) == len(metrics_l)
    for mine, theirs_ in zip(metrics, metrics_l, strict=True):
        assert abs(mine.item() - theirs_.item()) <= rtol
    for name, grad in grads_l.items():
        assert rel_err(grads[name], grad) <= 10 * rtol, name


def both(inputs=None, differentiable=("_input", "lin_weight"), r4b_options=None, **options):
    """(r4b's run, liger's run) of the same module options on the same inputs (r4b's own: ``r4b_options``)."""
    inputs = make_problem() if inputs is None else inputs
    options = {"temperature": TEMPERATURE, "max_completion_length": 11, "epsilon_high": 0.28, **options}
    ours = run(FusedLinearGRPOLoss(**options, **(r4b_options or {})), inputs, differentiable)
    theirs = run(liger_grpo.LigerFusedLinearGRPOLoss(compiled=False, **options), inputs, differentiable)
    return ours, theirs


def liger_cases():
    """(loss_type, importance level, beta): every type at token level with and without the KL, the clip types at
    sequence level (GSPO), luspo where liger's per-token loss is one value per sequence (see liger_compat)."""
    for loss_type in LOSS_TYPES:
        for level in ("token", "sequence") if loss_type in CLIP_TYPES else ("token",):
            for beta in (0.0, 0.04):
                if loss_type != "luspo" or (level == "sequence" and beta == 0.0):
                    yield pytest.param(loss_type, level, beta, id=f"{loss_type}-{level}-beta{beta}")


@pytest.mark.parametrize(("loss_type", "level", "beta"), list(liger_cases()))
@pytest.mark.parametrize("on_policy", [True, False], ids=["on-policy", "off-policy"])
def test_matches_liger(loss_type, level, beta, on_policy):
    inputs = make_problem(seed=LOSS_TYPES.index(loss_type))
    if on_policy:
        del inputs["old_per_token_logps"]
    options = {"epsilon_high": 1.1} if loss_type == "cispo" else {}  # CISPO's eps_high caps the ratio itself
    ours, theirs = both(inputs, loss_type=loss_type, beta=beta, importance_sampling_level=level, **options)
    assert_same(ours, theirs)
    assert ours[0].item() != 0.0
    if not on_policy and loss_type in ("dapo", "cispo") and level == "token":
        assert ours[1][-1].item() > 0  # the clipped branch is exercised


@pytest.mark.parametrize(("level", "beta"), [("token", 0.0), ("token", 0.04), ("sequence", 0.04)])
def test_luspo_is_trls_where_liger_counts_padding(level, beta):
    """luspo as TRL 1.16 writes it, (per_token_loss * mask).sum(-1).mean(): float64 by hand (liger, here, sums the
    padded positions too and divides by T)."""
    inputs = make_problem(seed=11)
    module = FusedLinearGRPOLoss(loss_type="luspo", beta=beta, importance_sampling_level=level, temperature=TEMPERATURE)
    loss, _, grads = run(module, inputs)
    hidden = inputs["_input"].detach().clone().requires_grad_()
    logp = torch.log_softmax(hidden @ inputs["lin_weight"].t() / TEMPERATURE, -1)
    logp = logp.gather(-1, inputs["selected_token_ids"][..., None])[..., 0]
    mask = inputs["attention_mask"].double()
    log_ratio = logp - inputs["old_per_token_logps"].double()
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1))[:, None]
    ratio, adv = torch.exp(log_ratio), inputs["advantages"][:, None]
    per_token = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    ref = inputs["ref_per_token_logps"].double()
    per_token = per_token + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
    expected = (per_token * mask).sum(-1).mean()
    expected.backward()
    assert abs(loss.item() - expected.item()) < 1e-12
    assert rel_err(grads["_input"], hidden.grad) < 1e-10


@pytest.mark.parametrize(
    ("loss_type", "options"),
    [
        ("sapo", {"sapo_temperature_pos": 0.5, "sapo_temperature_neg": 2.0}),
        ("vespo", {"vespo_k_pos": 1.5, "vespo_lambda_pos": 2.0, "vespo_k_neg": 2.5, "vespo_lambda_neg": 1.0}),
        ("cispo", {"epsilon_high": 0.9}),
    ],
)
def test_loss_type_parameters_match_liger(loss_type, options):
    assert_same(*both(make_problem(seed=12), loss_type=loss_type, beta=0.04, **options))


@pytest.mark.parametrize(
    "options", [{"delta": 1.2}, {"use_bias_correction_kl": True}, {"delta": 1.1, "use_bias_correction_kl": True}]
)
def test_two_sided_clipping_and_corrected_kl_match_liger(options):
    """INTELLECT-2's delta caps the unclipped ratio; DeepSeek-V3.2's corrected KL is the KL times the ratio."""
    assert_same(*both(make_problem(seed=5), beta=0.04, loss_type="grpo", **options))


@pytest.mark.parametrize("per", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo-gspo", "sapo", "vespo"])
def test_vllm_is_ratio_matches_liger(per, loss_type):
    """liger's rollout correction: the ratio scales each token's policy term, not the KL ([B, T] or [B, 1]);
    VESPO adds its logs to the sequence's gamma weight instead (the padding's ratios 1, as TRL's)."""
    inputs = make_problem(seed=3)
    batch, seq_len = inputs["attention_mask"].shape
    ratio = torch.rand(batch, seq_len if per == "token" else 1, generator=torch.Generator().manual_seed(4)) * 2
    if per == "token":
        ratio = torch.where(inputs["attention_mask"].bool(), ratio, 1.0)
    level = "sequence" if loss_type == "grpo-gspo" else "token"
    options = dict(loss_type=loss_type.removesuffix("-gspo"), importance_sampling_level=level)
    assert_same(*both({**inputs, "vllm_is_ratio": ratio}, beta=0.04, **options))


def test_matches_liger_without_reference_model():
    """use_ref_model=False: no KL term whatever ref_per_token_logps holds, and a zero kl metric (beta != 0)."""
    ours, theirs = both(use_ref_model=False, beta=0.1)
    assert_same(ours, theirs)
    assert ours[1][0].item() == 0.0


def test_matches_liger_with_reference_inputs_and_bias():
    """The reference log-probs from ref_input / ref_weight / ref_bias; the policy with an lm_head bias, whose
    gradient matches too."""
    inputs = make_problem(seed=5)
    gen = torch.Generator().manual_seed(6)
    del inputs["ref_per_token_logps"]
    vocab = inputs["lin_weight"].shape[0]
    inputs["bias"] = torch.randn(vocab, generator=gen, dtype=torch.float64)
    inputs["ref_input"] = inputs["_input"] + 0.1 * torch.randn(inputs["_input"].shape, generator=gen).double()
    inputs["ref_weight"] = inputs["lin_weight"] * 0.9
    inputs["ref_bias"] = torch.randn(vocab, generator=gen, dtype=torch.float64)
    ours, theirs = both(inputs, ("_input", "lin_weight", "bias"), loss_type="grpo", beta=0.2)
    assert_same(ours, theirs)


def test_dapo_num_items_in_batch():
    ours, _ = both(make_problem(seed=7), beta=0.04)
    inputs = {**make_problem(seed=7), "num_items_in_batch": 40}
    scaled = both(inputs, beta=0.04)
    assert_same(*scaled)
    tokens = inputs["attention_mask"].sum().item()
    assert abs(scaled[0][0].item() - ours[0].item() * tokens / 40) < 1e-6


@pytest.mark.parametrize("method", ["recompute", "cublas"])
@pytest.mark.parametrize(("loss_type", "level"), [("dr_grpo", "token"), ("grpo", "sequence"), ("vespo", "token")])
def test_triton_path_matches_liger(method, loss_type, level):
    """float32 through r4b's Triton kernels (interpreted on a CPU) against liger; chunks of 3 tokens, so that a
    sequence's shared ratio (GSPO) or weight (VESPO) spans the cuBLAS method's chunks."""
    inputs = make_problem(batch=2, seq_len=5, hidden_size=16, vocab=40, dtype=torch.float32, seed=9)
    assert use_triton(inputs["_input"]), "run under TRITON_INTERPRET=1 (tests/conftest.py sets it on a CPU)"
    ours, theirs = both(
        inputs, loss_type=loss_type, beta=0.04, importance_sampling_level=level,
        r4b_options={"method": method, "chunk_bytes": 3 * 40 * 4},
    )  # fmt: skip
    assert_same(ours, theirs, rtol=2e-5)


def test_no_tokens_by_vocab_tensor():
    batch, seq_len, hidden_size, vocab = 2, 8, 20, 48
    inputs = make_problem(batch, seq_len, hidden_size, vocab, dtype=torch.float32, seed=3)
    rows = 5
    module = FusedLinearGRPOLoss(
        loss_type="grpo", temperature=TEMPERATURE, method="cublas", chunk_bytes=rows * vocab * 4
    )
    with AllocationTracker() as tracker:
        run(module, inputs)
    sizes = {size for size, _ in tracker.sizes}
    assert batch * seq_len * vocab not in sizes
    assert all(size <= rows * vocab or size in (vocab * hidden_size, batch * seq_len * hidden_size) for size in sizes)


@pytest.mark.parametrize(
    ("options", "call", "error", "argument"),
    [
        ({"loss_type": "ppo"}, {}, ValueError, "loss_type 'ppo'"),
        ({"loss_type": "sapo", "importance_sampling_level": "sequence"}, {}, ValueError, "importance_level"),
        ({"importance_sampling_level": "segment"}, {}, ValueError, "importance_level 'segment'"),
        ({"sapo_temperature_neg": 0.0}, {}, ValueError, "sapo_temperatures"),
        ({"loss_type": "dr_grpo"}, {}, ValueError, "max_completion_length"),
        ({}, {"vllm_is_ratio": torch.ones(4, 2)}, ValueError, "vllm_is_ratio"),
        ({}, {"ref_per_token_logps": None}, ValueError, "ref_per_token_logps"),
        ({}, {"advantages": torch.ones(4, 9)}, ValueError, "advantages"),
    ],
)
def test_unsupported_is_one_line_naming_the_argument(options, call, error, argument):
    with pytest.raises(error, match=argument) as info:
        FusedLinearGRPOLoss(**options)(**{**make_problem(), **call})
    assert "\n" not in str(info.value)


def test_dapo_normalizer_over_a_process_group(tmp_path):
    """dapo under torch.distributed: the token count is summed over the group (one gloo rank here), as liger's."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert_same(*both(make_problem(seed=8), beta=0.04))
    finally:
        torch.distributed.destroy_process_group()
