"""r4b.kernels.use_r4b_fused_lm_head against TRL 1.16's own fused LM head (``trl.trainer.utils.add_fused_lm_head``).

A tiny Qwen3 patched by TRL's ``add_fused_lm_head`` is run with TRL's kernel and with r4b's, and against the float64
log-softmax of the model's own logits. TRL folds its statistics in fp32 whatever the input, so with float64 models
only r4b is held to 1e-12 (its float64 path is the torch reference); TRL is held to fp32's 1e-5. float32 models take
r4b's Triton kernels in the interpreter on a CPU (conftest sets TRITON_INTERPRET=1). TRL's compute dtype (autocast's,
or fp32 under ``cast_lm_head_to_fp32``) is r4b's too. Last, TRL's GRPOTrainer runs 2 steps both ways (fp32, no
autocast; r4b's torch reference there, the interpreter being ~4x slower): the same logged losses and metrics, the same
gradients at each step and the same weights after.
"""

import copy

import pytest
import torch
import transformers
from helpers import DEVICE, rel_err

from r4b.kernels import trl_compat, use_r4b_fused_lm_head
from r4b.kernels._backend import use_triton

pytest.importorskip("trl")  # TRL 1.16 needs Python >= 3.11
from trl.trainer import utils as trl_utils

TEMPERATURE = 0.7
VOCAB = 100  # not a multiple of the interpreter's 16-wide vocabulary tiles


def tiny_qwen3(vocab=VOCAB, *, dtype=torch.float32, bias=False, seed=0, **config):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=False, max_position_embeddings=64, **config,
    )  # fmt: skip
    model = transformers.Qwen3ForCausalLM(cfg)
    if bias:  # Qwen3 has no lm_head bias; phi-2's kind has one
        model.lm_head = torch.nn.Linear(32, vocab, bias=True)
        torch.nn.init.normal_(model.lm_head.bias, std=0.5)
    return model.to(DEVICE, dtype)


def batch(seed=1):
    """GRPO-like labels: the prompt masked, one completion shorter (a padded tail)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 12), generator=gen)
    labels = ids.clone()
    labels[:, :5] = -100
    labels[2, 9:] = -100
    return ids.to(DEVICE), labels.to(DEVICE)


def oracle(model, ids, labels, logit_scale=1.0):
    """float64 log-probs and entropy of the model's own logits, zero where the shifted label is -100."""
    logits = model(input_ids=ids).logits[:, :-1].double() * logit_scale / TEMPERATURE
    log_p = logits.log_softmax(-1)
    target, mask = labels[:, 1:], labels[:, 1:] != -100
    log_probs = log_p.gather(-1, target.clamp(min=0)[..., None])[..., 0] * mask
    return log_probs, -(log_p.exp() * log_p).sum(-1) * mask


def fused(model, ids, labels, outputs=("log_probs", "entropy"), **options):
    """A fresh copy of ``model`` patched by TRL's add_fused_lm_head: its output and the gradients of a loss reading
    the log-probs and the entropy (a GRPO loss with an entropy bonus reads both)."""
    model = copy.deepcopy(model)
    trl_utils.add_fused_lm_head(model, temperature=TEMPERATURE, outputs=outputs, **options)
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    weights = torch.linspace(-1, 1, out.log_probs.numel(), device=DEVICE).view(out.log_probs.shape)
    ((out.log_probs * weights).sum() + (out.entropy * weights.flip(0)).sum() + out.loss).backward()
    return out, {name: p.grad for name, p in model.named_parameters()}


def oracle_grads(model, ids, labels, logit_scale=1.0):
    model = copy.deepcopy(model).double()
    log_probs, entropy = oracle(model, ids, labels, logit_scale)
    weights = torch.linspace(-1, 1, log_probs.numel(), device=DEVICE, dtype=torch.float64).view(log_probs.shape)
    mask = labels[:, 1:] != -100
    loss = -log_probs.sum() / mask.sum()  # TRL's `loss`: the mean negative log-likelihood of the labelled tokens
    ((log_probs * weights).sum() + (entropy * weights.flip(0)).sum() + loss).backward()
    return log_probs, entropy, {name: p.grad for name, p in model.named_parameters()}


# (dtype, logit_scale in the config or None, lm_head bias)
CASES = {
    "fp64": (torch.float64, None, False),
    "fp32": (torch.float32, None, False),
    "fp64-scale-bias": (torch.float64, 2.0, True),
    "fp32-scale-bias": (torch.float32, 0.5, True),
}


@pytest.mark.parametrize(("dtype", "logit_scale", "bias"), list(CASES.values()), ids=list(CASES))
def test_log_probs_entropy_and_gradients_match_trl_and_float64(dtype, logit_scale, bias):
    config = {} if logit_scale is None else {"logit_scale": logit_scale}  # TRL folds it in; so does r4b
    model, (ids, labels) = tiny_qwen3(dtype=dtype, bias=bias, **config), batch()
    want_lp, want_ent, want_grads = oracle_grads(model, ids, labels, logit_scale or 1.0)
    theirs, their_grads = fused(model, ids, labels)
    with use_r4b_fused_lm_head():
        ours, our_grads = fused(model, ids, labels)
    hidden = torch.zeros(1, 32, device=DEVICE, dtype=dtype)
    assert use_triton(hidden) == (dtype == torch.float32)  # fp32: the Triton kernels (interpreter on a CPU)
    assert ours.log_probs.shape == theirs.log_probs.shape == labels[:, 1:].shape
    assert torch.equal(ours.label_mask, theirs.label_mask)
    assert not ours.log_probs[~ours.label_mask].any() and not ours.entropy[~ours.label_mask].any()
    # r4b: float64 exact to rounding, float32 to fp32's; TRL: fp32 statistics either way
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert (ours.log_probs.double() - want_lp).abs().max() < tol
    assert (ours.entropy.double() - want_ent).abs().max() < tol
    assert abs(ours.loss.item() - theirs.loss.item()) < 1e-5
    assert (ours.log_probs.double() - theirs.log_probs.double()).abs().max() < 1e-5
    assert (ours.entropy.double() - theirs.entropy.double()).abs().max() < 1e-5
    for name, want in want_grads.items():
        assert rel_err(our_grads[name], want) < (1e-10 if dtype == torch.float64 else 1e-5), name
        assert rel_err(their_grads[name], want) < 1e-5, name


def test_cast_lm_head_to_fp32_is_trls():
    """A bf16 model whose lm_head GRPOTrainer cast to fp32: TRL's wrapper hands fp32 hidden states over with autocast
    off, so both heads compute in fp32 on the same inputs."""
    model, (ids, labels) = tiny_qwen3(dtype=torch.bfloat16), batch(seed=3)
    model.lm_head.float()
    theirs, their_grads = fused(model, ids, labels, cast_lm_head_to_fp32=True)
    with use_r4b_fused_lm_head():
        ours, our_grads = fused(model, ids, labels, cast_lm_head_to_fp32=True)
    assert ours.log_probs.dtype == theirs.log_probs.dtype == torch.float32
    assert (ours.log_probs - theirs.log_probs).abs().max() < 1e-5
    assert (ours.entropy - theirs.entropy).abs().max() < 1e-5
    assert rel_err(our_grads["lm_head.weight"], their_grads["lm_head.weight"]) < 1e-5


def test_autocast_sets_the_compute_dtype_as_in_trl():
    """Under bf16 autocast TRL computes the head in bf16; so does r4b: bf16 operands, fp32 sums. r4b then equals the
    float64 logits of the bf16-rounded operands to fp32's precision (TRL rounds each logit to bf16 besides)."""
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(37, 32, generator=gen).to(DEVICE)
    weight = (0.3 * torch.randn(VOCAB, 32, generator=gen)).to(DEVICE)
    targets = torch.randint(0, VOCAB, (37,), generator=gen).to(DEVICE)
    args = (None, targets, TEMPERATURE, 32768, None, 1.0, ("log_probs", "entropy"))
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16):
        theirs = trl_utils._ChunkedLogProbFunction.apply(hidden, weight, *args)
        with use_r4b_fused_lm_head():
            ours = trl_utils._ChunkedLogProbFunction.apply(hidden, weight, *args)
    logits = hidden.bfloat16().double() @ weight.bfloat16().double().t() / TEMPERATURE
    log_p = logits.log_softmax(-1)
    want = log_p.gather(-1, targets[:, None])[:, 0], -(log_p.exp() * log_p).sum(-1)
    for mine, their, expected in zip(ours[:2], theirs[:2], want, strict=True):
        assert (mine.double() - expected).abs().max() < 1e-5
        assert (their.double() - expected).abs().max() < 5e-2


@pytest.mark.usefixtures("torch_reference_kernels")  # r4b's kernels are the test above's
def test_metric_outputs_are_trls_own():
    """DPO's and SFT's extra outputs come from TRL's kernel (a second, gradient-free pass), bit for bit."""
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    model, (ids, labels) = tiny_qwen3(), batch(seed=2)
    theirs, _ = fused(model, ids, labels, outputs)
    with use_r4b_fused_lm_head():
        ours, _ = fused(model, ids, labels, outputs)
    for name in outputs[2:]:
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
        assert not getattr(ours, name).requires_grad
    assert (ours.log_probs - theirs.log_probs).abs().max() < 1e-5


def test_an_empty_selection_stays_differentiable():
    """On a GPU TRL hands over only the labelled positions: none at all must still give a graph (a zero loss)."""
    hidden = torch.randn(0, 32, device=DEVICE, requires_grad=True)
    weight = torch.randn(VOCAB, 32, device=DEVICE, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.long, device=DEVICE)
    with use_r4b_fused_lm_head():
        log_probs, entropy, *extras = trl_utils._ChunkedLogProbFunction.apply(
            hidden, weight, None, targets, 1.0, 32768, None, 1.0, ("log_probs", "entropy")
        )
    assert log_probs.shape == entropy.shape == (0,) and extras == [None, None, None]
    (log_probs.sum() + entropy.sum()).backward()
    assert not weight.grad.any()


def spy_on_r4b(monkeypatch) -> list:
    """The calls of r4b's linear_logprobs made through the TRL adapter, one entry each."""
    calls = []
    real = trl_compat.linear_logprobs
    monkeypatch.setattr(trl_compat, "linear_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.usefixtures("torch_reference_kernels")
def test_models_patched_before_the_call_switch_and_restore_switches_back(monkeypatch):
    calls = spy_on_r4b(monkeypatch)
    trl_function = trl_utils._ChunkedLogProbFunction
    model, (ids, labels) = tiny_qwen3(), batch()
    trl_utils.add_fused_lm_head(model, temperature=TEMPERATURE)  # patched before r4b's call
    with torch.no_grad():
        outer = use_r4b_fused_lm_head()
        with use_r4b_fused_lm_head():  # nested: the inner one's exit keeps the outer one's
            pass
        model(input_ids=ids, labels=labels, fused_lm_head=True)
        assert len(calls) == 1
        outer.restore()
        assert trl_utils._ChunkedLogProbFunction is trl_function
        model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("config", "outputs", "match"),
    [
        ({"final_logit_softcapping": 30.0}, ("log_probs",), "final_logit_softcapping"),
        ({"logit_scale": -1.0}, ("log_probs",), "logit_scale"),
        ({}, ("log_probs", "top_k"), "unknown outputs"),
    ],
    ids=["softcapping", "negative-scale", "unknown-output"],
)
def test_what_r4b_does_not_compute_is_a_one_line_error(config, outputs, match):
    model, (ids, labels) = tiny_qwen3(**config), batch()
    trl_utils.add_fused_lm_head(model, outputs=outputs)
    with use_r4b_fused_lm_head(), pytest.raises(NotImplementedError, match=match) as error:
        model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert "\n" not in str(error.value)


def test_a_zero3_head_and_another_trl_are_refused(monkeypatch):
    weight = torch.nn.Parameter(torch.randn(VOCAB, 32, device=DEVICE))
    weight.ds_id = 0  # what DeepSpeed ZeRO-3 sets on a partitioned parameter
    targets = torch.zeros(3, dtype=torch.long, device=DEVICE)
    with use_r4b_fused_lm_head(), pytest.raises(NotImplementedError, match="ZeRO-3"):
        trl_utils._ChunkedLogProbFunction.apply(torch.randn(3, 32, device=DEVICE), weight, None, targets, 1.0, 8)

    class OtherHead(torch.autograd.Function):  # a TRL whose head takes other arguments
        @staticmethod
        def forward(ctx, hidden, weight, targets, temperature):
            raise AssertionError("never called")

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", OtherHead)
    with pytest.raises(ImportError, match=r"TRL 1\.16"):
        use_r4b_fused_lm_head()


class StepGradients(transformers.TrainerCallback):
    """Every parameter's gradient just before each optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({name: p.grad.detach().clone() for name, p in model.named_parameters()})


def distinct_characters(completions, **kwargs):
    return [len(set(text)) / 8 for text in completions]


def grpo_two_steps(model_dir, tokenizer, out_dir, *, r4b: bool):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    # beta > 0: a reference model, patched by TRL too; entropy_coef: the entropy's gradient; SGD: the weights'
    # change is lr x the gradient (Adam would blow a 1e-7 gradient difference up where a gradient is near 0)
    args = GRPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=4, num_generations=2, max_completion_length=8,
        max_steps=2, beta=0.04, entropy_coef=0.01, temperature=TEMPERATURE, learning_rate=1e-2, optim="sgd",
        logging_steps=1, use_cpu=True, bf16=False, save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
    )  # fmt: skip
    prompts = Dataset.from_dict({"prompt": ["1+1=", "2+3=", "4+4=", "7+1="]})
    gradients = StepGradients()
    trainer = GRPOTrainer(
        model=str(model_dir), reward_funcs=distinct_characters, args=args, train_dataset=prompts,
        processing_class=tokenizer, callbacks=[gradients],
    )  # fmt: skip
    if r4b:
        with use_r4b_fused_lm_head():
            trainer.train()
    else:
        trainer.train()
    weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return trainer.state.log_history[:2], gradients.steps, weights


@pytest.mark.usefixtures("torch_reference_kernels")
def test_grpo_trainer_two_steps_as_with_trls_head(tokenizer, tmp_path, monkeypatch):
    model = tiny_qwen3(len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model.cpu().save_pretrained(tmp_path / "model")
    theirs = grpo_two_steps(tmp_path / "model", tokenizer, tmp_path / "trl", r4b=False)
    calls = spy_on_r4b(monkeypatch)
    ours = grpo_two_steps(tmp_path / "model", tokenizer, tmp_path / "r4b", r4b=True)
    assert len(calls) >= 4  # each step: the policy's and the reference's log-probs, at least
    for step, (mine, their) in enumerate(zip(ours[0], theirs[0], strict=True)):
        assert mine["num_tokens"] == their["num_tokens"] and mine["reward"] == their["reward"], step  # same rollouts
        for key in ("loss", "entropy", "kl", "policy_loss", "grad_norm"):
            assert abs(mine[key] - their[key]) <= 1e-5 * max(1.0, abs(their[key])), (step, key)
    assert theirs[0][1]["kl"] > 0 and theirs[0][0]["entropy"] > 0  # step 2 reads the reference model
    assert len(ours[1]) == len(theirs[1]) == 2
    for mine, their in zip(ours[1], theirs[1], strict=True):
        for name, grad in their.items():
            assert rel_err(mine[name], grad) < 1e-5, name
    assert max((ours[2][name] - w).abs().max().item() for name, w in theirs[2].items()) < 1e-7
