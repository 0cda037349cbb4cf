"""Fused linear + BPO loss: r4b against torch eager, torch.compile, liger-kernel and the log-prob kernels of TRL,
cut-cross-entropy and verl.

    python bench/fused_loss.py                # Qwen3-4B sizes on a GPU, bf16
    python bench/fused_loss.py --impls r4b-cublas r4b-cublas-fast r4b   # those rows only, in that order
    python bench/fused_loss.py --smoke        # tiny sizes on a CPU: a check that it runs

Times forward+backward of the full BPO loss (off-policy ratio, clip-higher,
beta * k3 KL to a reference, token-mean) and forward-only log-probs (old and
reference policies), with the peak memory each adds over its inputs, and the
achieved TFLOP/s against the measured bf16 matmul rate (2·N·H·V FLOPs forward,
6·N·H·V forward+backward). Writes bench/results/fused_loss-<device>-<date>.json.

r4b runs each of its methods in the same run: ``r4b`` is what a user gets by default (``method=None``:
``R4B_FUSED_LOSS_METHOD``, else r4b's default, "recompute" today: Triton logits, recomputed in the backward), and
every other method has its own row: ``r4b-cublas`` and ``r4b-cublas-fast`` (cuBLAS logits per token chunk,
gradients made in the forward; r4b.kernels.fused_grad), ``r4b-recompute`` once the default is another. The cuBLAS
rows are skipped where that path cannot run (CPU tensors without TRITON_INTERPRET). Every row records what ran
(``method``; for r4b the path of each fp32 product, ``accumulation``: fused_grad.accumulation_paths) and is
checked: one more call of what was timed, its loss, d_hidden and d_weight (fwd+bwd) or log-probs (forward-only)
against the materialized loss in true fp32 on the same inputs (``reference_fp32``, 2,048 tokens at a time), with
``within_tolerance`` against the dtype's bounds (``TOLERANCE``); ``accuracy`` lists those errors. ``ratios``
compares each r4b row (``base``) with every competitor; ``method_ratios`` r4b's other methods with ``r4b``. Rows
stream into ``rows-<device>-<date>.jsonl`` and the JSON as they are measured (bench/common.py: Results).

Then ``loss_type_rows`` (``--loss-types``, ``--loss-type-tokens``; 0 skips them): fwd+bwd of every loss type of
liger's and TRL's (grpo, bnpo, dapo, dr_grpo, luspo, cispo, sapo, vespo) per token and the clipped ones per sequence
(GSPO), r4b's default and cuBLAS methods against liger's module of that type and TRL's chunked log-prob kernel under
the same loss, each checked against the fp32 materialized loss of that type; ``loss_type_ratios`` per type.

The log-prob kernels trainers ship are timed in both modes, their per-token log-probs feeding the same BPO loss
(``bpo_loss_from_logprobs``): ``trl`` (``trl.kernels.ChunkedLogProbFunction``, as TRL's GRPOTrainer calls it),
``cce`` (Apple's ``cut_cross_entropy.linear_cross_entropy``, reduction "none", its default gradient filter) and
``verl`` (``verl.utils.kernel.linear_cross_entropy``). A package that is not installed, or a kernel that fails
(cut-cross-entropy and verl run on CUDA only), is that competitor's error row.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import traceback
from pathlib import Path

if "--smoke" in sys.argv and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # on a CPU, time the Triton path (interpreted), not the reference

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    Results,
    build_competitor,
    compile_fresh,
    error_row,
    error_text,
    exit_code,
    free_device_memory,
    matmul_tflops,
    median_ms,
    peak_gib,
    print_table,
    within_tolerance,
)

from r4b.kernels import LOSS_TYPES, bpo_loss_from_logprobs, fused_grad, fused_linear_bpo_loss, linear_logprobs
from r4b.kernels._backend import use_triton

BETA, EPS_LOW, EPS_HIGH, TEMPERATURE = 0.04, 0.2, 0.28, 1.0


def materialized_logprobs(hidden, weight, targets, with_entropy=False):
    """What trainers do without a fused kernel: full [N, V] logits, log_softmax, gather."""
    logits = (hidden @ weight.t()).float() / TEMPERATURE
    log_probs = torch.log_softmax(logits, dim=-1)
    logp = log_probs.gather(1, targets[:, None]).squeeze(1)
    entropy = -(log_probs.exp() * log_probs).sum(-1) if with_entropy else None
    return logp, entropy


def materialized_logprob_values(hidden, weight, targets):
    return materialized_logprobs(hidden, weight, targets)[0]


# The main rows' loss: token-mean clipped surrogate (liger's and TRL's bnpo / dapo in one process).
MAIN_LOSS = {"loss_type": "dapo", "importance_level": "token"}


def loss_case_options(loss_type: str, level: str, seq_len: int) -> dict:
    """fused_linear_bpo_loss's options of a (loss type, importance level) row: CISPO's eps_high caps the ratio
    itself (TRL's recommended 5), Dr. GRPO normalizes by the sequence length."""
    return {"loss_type": loss_type, "importance_level": level, "norm_len": seq_len,
            "clip_eps_high": 5.0 if loss_type == "cispo" else EPS_HIGH}  # fmt: skip


def bpo_loss_on(logprobs_fn, hidden, weight, targets, batch, **loss):
    """The benchmark's BPO loss (``loss``: the loss type's options) on the log-probs (and entropy, for its
    metric) of ``logprobs_fn``."""
    logp, entropy = logprobs_fn(hidden, weight, targets, with_entropy=True)
    return bpo_loss_from_logprobs(
        logp, batch["advantages"], seq_ids=batch["seq_ids"], loss_mask=batch["loss_mask"],
        old_logprobs=batch["old"], ref_logprobs=batch["ref"], entropy=None if entropy is None else entropy.detach(),
        **{"clip_eps_low": EPS_LOW, "clip_eps_high": EPS_HIGH, "beta": BETA, **loss},
    )[0]  # fmt: skip


def materialized_bpo_loss(hidden, weight, targets, batch, **loss):
    return bpo_loss_on(materialized_logprobs, hidden, weight, targets, batch, **loss)


def r4b_bpo_loss(hidden, weight, targets, batch, method="recompute", chunk_bytes=None, **loss):
    return fused_linear_bpo_loss(
        hidden, weight, targets, batch["advantages"], seq_ids=batch["seq_ids"], loss_mask=batch["loss_mask"],
        old_logprobs=batch["old"], ref_logprobs=batch["ref"], temperature=TEMPERATURE, method=method,
        chunk_bytes=chunk_bytes, **{"clip_eps_low": EPS_LOW, "clip_eps_high": EPS_HIGH, "beta": BETA, **loss},
    )[0]  # fmt: skip


def liger_bpo_loss_factory(compiled: bool, seq_len: int, loss_type: str = "bnpo", importance_level: str = "token",
                           **loss):  # fmt: skip
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        return None
    module = LigerFusedLinearGRPOLoss(
        beta=BETA, compiled=compiled, use_ref_model=True, epsilon_low=EPS_LOW,
        epsilon_high=loss.get("clip_eps_high", EPS_HIGH), loss_type=loss_type, temperature=TEMPERATURE,
        importance_sampling_level=importance_level, max_completion_length=loss.get("norm_len"),
    )  # fmt: skip

    def loss(hidden, weight, targets, batch):
        b = hidden.shape[0] // seq_len
        shape = (b, seq_len)
        return module(
            hidden.view(b, seq_len, -1), weight, targets.view(shape), batch["loss_mask"].view(shape).long(),
            batch["advantages"].view(shape)[:, 0], ref_per_token_logps=batch["ref"].view(shape),
            old_per_token_logps=batch["old"].view(shape),
        )[0]  # fmt: skip

    return loss


# TRL's vocabulary tile (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE, what its GRPOTrainer passes).
TRL_CHUNK_SIZE = 32768


def trl_logprobs_factory():
    from trl.kernels import ChunkedLogProbFunction

    def logprobs(hidden, weight, targets, with_entropy=False):
        outputs = ("entropy",) if with_entropy else ()
        logp, entropy, *_ = ChunkedLogProbFunction.apply(
            hidden, weight, None, targets, TEMPERATURE, TRL_CHUNK_SIZE, None, 1.0, outputs
        )
        return logp, entropy

    return logprobs


def cce_logprobs_factory():
    from cut_cross_entropy import linear_cross_entropy

    if TEMPERATURE != 1.0:
        raise NotImplementedError("cut-cross-entropy has no temperature")

    def logprobs(hidden, weight, targets, with_entropy=False):
        return -linear_cross_entropy(hidden, weight, targets, reduction="none"), None

    return logprobs


def verl_logprobs_factory():
    from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

    def logprobs(hidden, weight, targets, with_entropy=False):
        return linear_cross_entropy(hidden, weight, targets, float(TEMPERATURE), "none")  # (logprobs, entropy)

    return logprobs


# Row name -> factory of a log-prob kernel (hidden, weight, targets, with_entropy) -> (logprobs, entropy or None).
LOGPROB_COMPETITORS = {"trl": trl_logprobs_factory, "cce": cce_logprobs_factory, "verl": verl_logprobs_factory}


def logprob_values_of(logprobs_fn, hidden, weight, targets):
    return logprobs_fn(hidden, weight, targets)[0]


def make_batch(n: int, h: int, v: int, seq_len: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, device=device, dtype=dtype, generator=gen).requires_grad_()
    weight = (torch.randn(v, h, device=device, dtype=dtype, generator=gen) * h**-0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device, generator=gen)
    with torch.no_grad():
        policy, _ = linear_logprobs(hidden, weight, targets)
    seq_ids = torch.arange(n, device=device) // seq_len
    batch = {
        "seq_ids": seq_ids,
        "loss_mask": torch.rand(n, device=device, generator=gen) > 0.05,
        "advantages": torch.randn(n // seq_len + 1, device=device, generator=gen)[seq_ids],
        "old": policy + 0.1 * torch.randn(n, device=device, generator=gen),
        "ref": policy + 0.1 * torch.randn(n, device=device, generator=gen),
    }
    return hidden, weight, targets, batch


def r4b_logprob_values(hidden, weight, targets, method="recompute", chunk_bytes=None):
    return linear_logprobs(hidden, weight, targets, method=method, chunk_bytes=chunk_bytes)[0]


def r4b_impls() -> dict[str, str]:
    """The r4b rows and their methods: ``r4b`` is what a user gets by default (``method=None``: the
    ``R4B_FUSED_LOSS_METHOD`` variable, else r4b's default), then each method by name where it differs."""
    default = fused_grad.resolve_method(None)
    impls = {"r4b": default}
    for method in fused_grad.METHODS:
        if method != default:
            impls["r4b-recompute" if method == "recompute" else f"r4b-{method}"] = method
    return impls


def cublas_runs() -> bool:
    """Whether the cuBLAS methods run here (elsewhere they would time the torch reference again)."""
    probe = torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu")
    return use_triton(probe)


def competitor_names() -> tuple[str, ...]:
    """Every competitor's row, in the order timed unless --impls names others (after r4b's methods)."""
    return ("torch", "torch.compile", "liger", *LOGPROB_COMPETITORS)


def impl_names(args: argparse.Namespace) -> list[str]:
    """The rows to time, in order: ``--impls`` (unknown names refused), else every r4b method then every
    competitor; the cuBLAS methods only where they run, torch.compile only with compiling on."""
    r4b = r4b_impls()
    known = [*r4b, *competitor_names()]
    names = args.impls or known
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"fused_loss: unknown --impls {unknown}; known: {known}")
    runs = cublas_runs()
    runnable = lambda name: r4b.get(name, "recompute") == "recompute" or runs
    return [name for name in names if runnable(name) and (name != "torch.compile" or args.compile)]


def r4b_fns(method: str | None, chunk_bytes: int | None) -> tuple:
    """(fwd+bwd loss, fwd-only log-probs) of one r4b method (None: r4b's default)."""
    return (functools.partial(r4b_bpo_loss, method=method, chunk_bytes=chunk_bytes),
            functools.partial(r4b_logprob_values, method=method, chunk_bytes=chunk_bytes))  # fmt: skip


def competitor_fns(name: str, args: argparse.Namespace) -> tuple:
    """(fwd+bwd loss or None, fwd-only log-probs or None) of one competitor, built afresh for the current size
    (torch.compile compiles for it alone); one that fails to build is a stand-in raising its error."""
    if name == "torch":
        return materialized_bpo_loss, materialized_logprob_values
    if name == "torch.compile":
        return (build_competitor(compile_fresh, materialized_bpo_loss),
                build_competitor(compile_fresh, materialized_logprob_values))  # fmt: skip
    if name == "liger":
        return build_competitor(liger_bpo_loss_factory, compiled=torch.cuda.is_available(), seq_len=args.seq_len), None
    logprobs = build_competitor(LOGPROB_COMPETITORS[name])  # a missing package: a stand-in raising its ImportError
    return functools.partial(bpo_loss_on, logprobs), functools.partial(logprob_values_of, logprobs)


def competitors(args: argparse.Namespace) -> tuple[dict, dict]:
    """The implementations timed at one size, (fwd+bwd, fwd-only), in the order of :func:`impl_names`, built
    afresh for it: dynamo's caches are dropped (liger compiles its chunk function on a GPU)."""
    torch._dynamo.reset()
    methods = r4b_impls()
    fwd_bwd, fwd_only = {}, {}
    for name in impl_names(args):
        pair = r4b_fns(None if name == "r4b" else methods[name], args.chunk_bytes) if name in methods else None
        loss, logprobs = pair or competitor_fns(name, args)
        if loss is not None:
            fwd_bwd[name] = loss
        if logprobs is not None:
            fwd_only[name] = logprobs
    return fwd_bwd, fwd_only


def loss_cases(names: list[str] | None) -> list[tuple[str, str]]:
    """(loss type, importance level) of the loss-type rows: every type per token, the clipped ones per sequence
    (GSPO) too; ``names`` (``grpo``, ``grpo/sequence``, ...) picks some."""
    cases = [(t, "token") for t in LOSS_TYPES] + [(t, "sequence") for t, (kind, _) in LOSS_TYPES.items()
                                                   if kind == "clip"]  # fmt: skip
    if names is None:
        return cases
    known = {f"{t}/{level}" if level == "sequence" else t: (t, level) for t, level in cases}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"fused_loss: unknown --loss-types {unknown}; known: {list(known)}")
    return [known[name] for name in names]


def loss_type_impls(args: argparse.Namespace, loss: dict) -> dict:
    """The fwd+bwd rows of one loss type: r4b's default and cuBLAS methods, liger's module of that type, TRL's
    chunked log-prob kernel (what its GRPOTrainer's fused head runs) under the same O(N) loss."""
    impls = {"r4b": functools.partial(r4b_bpo_loss, method=None, chunk_bytes=args.chunk_bytes, **loss)}
    if cublas_runs() and fused_grad.resolve_method(None) != "cublas":
        impls["r4b-cublas"] = functools.partial(r4b_bpo_loss, method="cublas", chunk_bytes=args.chunk_bytes, **loss)
    compiled = torch.cuda.is_available()
    impls["liger"] = build_competitor(liger_bpo_loss_factory, compiled=compiled, seq_len=args.seq_len, **loss)
    impls["trl"] = functools.partial(bpo_loss_on, build_competitor(trl_logprobs_factory), **loss)
    return impls


def bench_loss_types(args: argparse.Namespace, results: Results) -> None:
    """The ``loss_type_rows``: fwd+bwd of each loss type and importance level at ``--loss-type-tokens`` tokens,
    each row checked against the fp32 materialized loss of the same type (liger's luspo at token level sums the
    padding's positions too: its row is then outside tolerance by definition, see r4b.kernels.liger_compat)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = args.loss_type_tokens
    hidden, weight, targets, batch = make_batch(n, args.hidden, args.vocab, args.seq_len, getattr(torch, args.dtype),
                                                device)  # fmt: skip
    for loss_type, level in loss_cases(args.loss_types):
        torch._dynamo.reset()
        loss = loss_case_options(loss_type, level, args.seq_len)
        reference = reference_fp32(hidden, weight, targets, batch, **loss) if args.accuracy else None
        for name, fn in loss_type_impls(args, loss).items():
            row = {"impl": name, "loss_type": loss_type, "level": level, "N": n, "dtype": args.dtype}

            def step(fn=fn):
                hidden.grad = weight.grad = None
                value = fn(hidden, weight, targets, batch)
                value.backward()
                return value

            with error_row(row):
                row["ms"] = median_ms(step, warmup=args.warmup, repeats=args.repeats)
                row["peak_gib"] = peak_gib(step)
            if reference is not None and "error" not in row:
                check_row(row, lambda step=step: loss_errors(step(), hidden, weight, reference), args.dtype)
            hidden.grad = weight.grad = None
            results.add("loss_type_rows", row)
        free_device_memory()


def loss_type_ratios(rows: list[dict]) -> list[dict]:
    """Per loss type and level: each competitor's time / r4b's (same run), and r4b's memory / theirs."""
    timed = {(r["loss_type"], r["level"], r["impl"]): r for r in rows if _timed(r)}
    out = []
    for (loss_type, level, impl), r in timed.items():
        base = timed.get((loss_type, level, "r4b"))
        if impl != "r4b" and base is not None:
            mem = r.get("peak_gib") and base.get("peak_gib") and base["peak_gib"] / r["peak_gib"]
            out.append({"loss_type": loss_type, "level": level, "vs": impl, "r4b_speedup": r["ms"] / base["ms"],
                        "r4b_mem_ratio": mem})  # fmt: skip
    return out


def run(args: argparse.Namespace, results: Results) -> None:
    """Every size's rows into ``results`` as they are measured, then the loss-type rows."""
    dtype = getattr(torch, args.dtype)
    ceiling = matmul_tflops(args.sizes[-1], args.hidden, min(args.vocab, 16384), dtype, repeats=args.repeats)
    results.update(matmul_tflops=ceiling)
    for n in args.sizes:
        try:
            bench_size(n, args, *competitors(args), ceiling, results)
            free_device_memory()  # this size's inputs and reference
        except Exception as err:  # the inputs of this size could not be made: one error row, the next size
            results.add("rows", {"impl": "all", "mode": "-", "N": n, "error": error_text(err)})
            free_device_memory()
    if args.loss_type_tokens:
        try:
            bench_loss_types(args, results)
        except Exception as err:
            results.add("loss_type_rows", {"impl": "all", "loss_type": "-", "level": "-", "error": error_text(err)})
            free_device_memory()


class _no_tf32:
    """True fp32 products for the reference, whatever the process-wide TF32 setting."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().float(), expected.detach().float()
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-30))


# Rows of the fp32 reference's logits chunk (2,048 x 151,936 fp32: 1.2 GiB): no [N, V] tensor at any size.
REFERENCE_ROWS = 2048


def reference_fp32(hidden, weight, targets, batch, rows: int = REFERENCE_ROWS, **loss) -> dict:
    """The materialized loss in fp32 (true fp32 products) on the benchmark's inputs, computed ``rows`` tokens at a
    time: its log-probs, loss, d_hidden and d_weight. The same function as :func:`materialized_bpo_loss` in fp32;
    the gradients go through dL/dlogp (O(N) autograd on the loss), then d_logits = g (onehot - p) / T per chunk."""
    h, w = hidden.detach().float(), weight.detach().float()
    n = h.shape[0]
    with _no_tf32(), torch.no_grad():
        logp = torch.cat([materialized_logprob_values(h[lo : lo + rows], w, targets[lo : lo + rows])
                          for lo in range(0, n, rows)])  # fmt: skip
    leaf = logp.clone().requires_grad_()
    loss = bpo_loss_on(lambda *_, **__: (leaf, None), h, w, targets, batch, **loss)
    (grad,) = torch.autograd.grad(loss, leaf)
    d_hidden, d_weight = torch.empty_like(h), torch.zeros_like(w)
    with _no_tf32(), torch.no_grad():
        for lo in range(0, n, rows):
            part = slice(lo, lo + rows)
            probs = torch.softmax((h[part] @ w.t()) / TEMPERATURE, dim=-1)
            d_logits = probs.mul_(-grad[part, None])
            d_logits[torch.arange(d_logits.shape[0], device=h.device), targets[part]] += grad[part]
            d_logits /= TEMPERATURE
            d_hidden[part] = d_logits @ w
            d_weight.addmm_(d_logits.t(), h[part])
    return {"loss": loss.detach(), "logp": logp, "d_hidden": d_hidden, "d_weight": d_weight}


# A row is within tolerance when each error is at or under its dtype's bound: 16-bit logits (cublas-fast,
# torch.compile, liger) carry ~2^-9 relative error per logit, so their log-probs ~1e-2 absolute at |logit| ~ 10.
TOLERANCE = {
    "float32": {"loss_rel_err": 1e-4, "d_hidden_rel_err": 1e-3, "d_weight_rel_err": 1e-3, "logprob_max_abs_err": 1e-3},
    "float16": {"loss_rel_err": 3e-3, "d_hidden_rel_err": 1e-2, "d_weight_rel_err": 1e-2, "logprob_max_abs_err": 1e-2},
    "bfloat16": {"loss_rel_err": 3e-2, "d_hidden_rel_err": 4e-2, "d_weight_rel_err": 4e-2,
                 "logprob_max_abs_err": 6e-2},
}  # fmt: skip


def loss_errors(loss, hidden, weight, reference: dict) -> dict:
    """One fwd+bwd call's loss and gradients against the fp32 reference."""
    ref_loss = reference["loss"].item()
    errors = {"loss_rel_err": abs(loss.item() - ref_loss) / max(abs(ref_loss), 1e-30)}
    errors["d_hidden_rel_err"] = _rel_err(hidden.grad, reference["d_hidden"])
    errors["d_weight_rel_err"] = _rel_err(weight.grad, reference["d_weight"])
    errors["max_rel_err"] = max(errors.values())
    return errors


def logprob_errors(logp, reference: dict) -> dict:
    diff = (logp.detach().float() - reference["logp"]).abs()
    return {"logprob_max_abs_err": float(diff.max()), "logprob_rel_err": _rel_err(logp, reference["logp"])}


def check_row(row: dict, call, dtype: str) -> None:
    """One more call of what was timed, its output against the fp32 reference: the errors into ``row`` (a check
    that fails is ``check_error``: the timing stays)."""
    try:
        row.update(call())
    except Exception as err:
        row["check_error"] = error_text(err)
        traceback.print_exc()
        return
    row["within_tolerance"] = within_tolerance(row, TOLERANCE[dtype])


def bench_size(n: int, args, fwd_bwd: dict, fwd_only: dict, ceiling: float, results: Results) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, targets, batch = make_batch(
        n, args.hidden, args.vocab, args.seq_len, getattr(torch, args.dtype), device
    )
    reference = reference_fp32(hidden, weight, targets, batch) if args.accuracy else None

    def train_step(fn):
        hidden.grad = weight.grad = None
        fn(hidden, weight, targets, batch).backward()

    def checked_train_step(fn):
        hidden.grad = weight.grad = None
        loss = fn(hidden, weight, targets, batch)
        loss.backward()
        return loss_errors(loss, hidden, weight, reference)

    def logprobs_only(fn):
        with torch.no_grad():
            return fn(hidden, weight, targets)

    flops = 2 * n * args.hidden * args.vocab
    methods = r4b_impls()
    modes = (
        ("fwd+bwd", fwd_bwd, train_step, checked_train_step, 3),
        ("fwd logprobs", fwd_only, logprobs_only, lambda fn: logprob_errors(logprobs_only(fn), reference), 1),
    )
    for mode, impls, step, checked, mult in modes:
        for name, fn in impls.items():
            row = {"impl": name, "mode": mode, "N": n, "H": args.hidden, "V": args.vocab, "dtype": args.dtype}
            row |= ran(name, methods, device, n, args, mode)
            with error_row(row):  # any failure (OOM, torch.compile, liger) is this row's error; the run goes on
                row["ms"] = median_ms(functools.partial(step, fn), warmup=args.warmup, repeats=args.repeats)
                row["peak_gib"] = peak_gib(functools.partial(step, fn))
                row["tflops"] = mult * flops / (row["ms"] * 1e-3) / 1e12
                row["frac_of_matmul"] = row["tflops"] / ceiling
            if reference is not None and "error" not in row:
                check_row(row, functools.partial(checked, fn), args.dtype)
            hidden.grad = weight.grad = None
            results.add("rows", row)


def ran(name: str, methods: dict, device: str, n: int, args: argparse.Namespace, mode: str) -> dict:
    """What a row ran: the fused-loss method (r4b's; a competitor's own name) and, for r4b, the path of its fp32
    products (fused_grad.accumulation_paths) with the chunking of the cuBLAS methods."""
    if name not in methods:
        return {"method": name}
    method = methods[name]
    out = {"method": method, "accumulation": fused_grad.accumulation_paths(device, method)}
    if method != "recompute":
        out |= cublas_plan(n, args, method, with_grad=mode == "fwd+bwd")
    return out


def cublas_plan(n: int, args: argparse.Namespace, method: str, *, with_grad: bool) -> dict:
    """The chunking a cuBLAS row ran with and the peak fused_grad.peak_bytes predicts for it (GiB), without the
    gradients themselves: train_step frees the previous ones first, as peak_gib measures."""
    dtype = getattr(torch, args.dtype)
    options = fused_grad.method_options(method)
    rows = fused_grad.chunk_rows(n, args.vocab, dtype, with_grad, args.chunk_bytes, options["logits_fp32"])
    peak = fused_grad.peak_bytes(
        n, args.hidden, args.vocab, dtype, need_hidden=with_grad, need_weight=with_grad,
        chunk_bytes=args.chunk_bytes, include_grads=False, **options,
    )  # fmt: skip
    return {"chunk_rows": rows, "chunks": math.ceil(n / rows), "predicted_peak_gib": peak / 2**30}


def ratios_to_r4b(rows: list[dict]) -> list[dict]:
    """competitor time / r4b time and r4b memory / competitor memory, same mode and size, same run, for each r4b
    row (``base``: r4b and each method's row) against each competitor (``vs``)."""
    impls = r4b_impls()
    out = []
    for base_impl in impls:
        ours = {(r["mode"], r["N"]): r for r in rows if r["impl"] == base_impl and _timed(r)}
        for r in rows:
            base = ours.get((r["mode"], r["N"]))
            if r["impl"] in impls or base is None or not _timed(r):
                continue
            mem = r.get("peak_gib") and base.get("peak_gib") and base["peak_gib"] / r["peak_gib"]
            speedup = r["ms"] / base["ms"]
            out.append(
                {"mode": r["mode"], "N": r["N"], "base": base_impl, "vs": r["impl"], "r4b_speedup": speedup,
                 "r4b_mem_ratio": mem}
            )  # fmt: skip
    return out


def _timed(row: dict) -> bool:
    return "ms" in row and "error" not in row


def method_ratios(rows: list[dict]) -> list[dict]:
    """Each other r4b method's row against the ``r4b`` (default) row: time ratio and memory ratio, same run."""
    impls = r4b_impls()
    timed = {(r["impl"], r["mode"], r["N"]): r for r in rows if _timed(r)}
    out = []
    for (impl, mode, n), r in timed.items():
        base = timed.get(("r4b", mode, n))
        if impl in impls and impl != "r4b" and base is not None:
            mem = r.get("peak_gib") and base.get("peak_gib") and r["peak_gib"] / base["peak_gib"]
            out.append({"mode": mode, "N": n, "method": impl, "speedup_vs_r4b": base["ms"] / r["ms"],
                        "mem_vs_r4b": mem})  # fmt: skip
    return out


ERROR_COLUMNS = ["loss_rel_err", "d_hidden_rel_err", "d_weight_rel_err", "logprob_max_abs_err", "within_tolerance"]


def accuracy(rows: list[dict]) -> list[dict]:
    """Each checked row's errors against the fp32 materialized loss (the same inputs, the same run)."""
    keys = ["impl", "mode", "N", "method", *ERROR_COLUMNS, "check_error"]
    return [{k: r[k] for k in keys if k in r} for r in rows if "within_tolerance" in r or "check_error" in r]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 sizes: a CPU check that the benchmark runs")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 32768], help="tokens N")
    parser.add_argument(
        "--impls",
        nargs="+",
        default=None,
        help="rows to time, in this order (default: r4b's methods, then every competitor)",
    )
    parser.add_argument("--hidden", type=int, default=2560)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (liger takes [B, T, H])")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    parser.add_argument("--no-accuracy", dest="accuracy", action="store_false",
                        help="skip checking each row against the fp32 materialized loss")  # fmt: skip
    parser.add_argument(
        "--chunk-bytes", type=int, default=None, help="chunk budget of the r4b-cublas rows (default: fused_grad's)"
    )
    parser.add_argument("--loss-types", nargs="+", default=None,
                        help="loss-type rows (grpo, grpo/sequence, ...; default: every type and level)")  # fmt: skip
    parser.add_argument("--loss-type-tokens", type=int, default=16384,
                        help="tokens of the loss-type rows (0: none)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.hidden, args.vocab, args.seq_len = [48, 96], 40, 200, 16
        args.dtype, args.warmup, args.repeats = "float32", 1, 2
        args.loss_type_tokens = min(args.loss_type_tokens, 32)
    return args


PACKAGES = ("liger-kernel", "trl", "cut-cross-entropy", "verl")


def main(argv=None) -> int:
    args = parse_args(argv)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results = Results("fused_loss", args.out, PACKAGES, config)
    status = results.run(lambda: run(args, results))
    rows = results.section("rows")
    results.update(ratios=ratios_to_r4b(rows), method_ratios=method_ratios(rows), accuracy=accuracy(rows),
                   loss_type_ratios=loss_type_ratios(results.section("loss_type_rows")))  # fmt: skip
    path = results.finish(status)
    payload = results.payload
    columns = ["impl", "mode", "N", "method", "ms", "peak_gib", "tflops", "frac_of_matmul", "chunks",
               "predicted_peak_gib", "error"]  # fmt: skip
    ceiling = payload.get("matmul_tflops") or float("nan")
    print_table(f"fused BPO loss, {results.env['device']}, matmul {ceiling:.3g} TFLOP/s", rows, columns)
    print_table("r4b vs competitors (same run)", payload["ratios"],
                ["mode", "N", "base", "vs", "r4b_speedup", "r4b_mem_ratio"])  # fmt: skip
    print_table(f"each row against the fp32 materialized loss ({args.dtype} inputs)", payload["accuracy"],
                ["impl", "mode", "N", *ERROR_COLUMNS, "check_error"])  # fmt: skip
    print_table("r4b's other methods vs r4b (same run)", payload["method_ratios"],
                ["mode", "N", "method", "speedup_vs_r4b", "mem_vs_r4b"])  # fmt: skip
    print_table("each loss type, fwd+bwd (same run)", results.section("loss_type_rows"),
                ["impl", "loss_type", "level", "N", "ms", "peak_gib", "loss_rel_err", "d_hidden_rel_err",
                 "within_tolerance", "error"])  # fmt: skip
    print_table("r4b vs competitors per loss type", payload["loss_type_ratios"],
                ["loss_type", "level", "vs", "r4b_speedup", "r4b_mem_ratio"])  # fmt: skip
    print(f"wrote {path} ({status}; rows also in {results.rows_path})")
    return exit_code(status)


if __name__ == "__main__":
    raise SystemExit(main())
