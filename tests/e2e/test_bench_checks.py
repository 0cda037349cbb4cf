"""What the benchmarks record beside each timing: the fused-loss rows against the fp32 materialized loss, the
attention rows against float64, what ran (method, fp32-accumulation path, attention backend). Each check is shown
to fail on a wrong implementation, so a miscompile cannot pass as a fast row."""

from __future__ import annotations

import argparse

import pytest
import torch
from helpers import bench_module, rel_err

from r4b.kernels import fused_grad
from r4b.kernels.reference import varlen_attention_reference


@pytest.fixture
def fused_loss(monkeypatch):
    module = bench_module("fused_loss")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the torch references: the bookkeeping, not the kernels
    return module


def test_fp32_reference_is_the_materialized_loss_in_chunks(fused_loss):
    """reference_fp32 (chunks of 7 tokens, gradients through dL/dlogp) equals autograd of the materialized loss
    in float64 on the same inputs."""
    hidden, weight, targets, batch = fused_loss.make_batch(40, 24, 70, 8, torch.float32, "cpu", seed=3)
    ref = fused_loss.reference_fp32(hidden, weight, targets, batch, rows=7)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    batch64 = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    loss = fused_loss.materialized_bpo_loss(h64, w64, targets, batch64)
    loss.backward()
    assert abs(ref["loss"].item() - loss.item()) < 1e-5 * abs(loss.item())
    assert rel_err(ref["d_hidden"], h64.grad) < 1e-5 and rel_err(ref["d_weight"], w64.grad) < 1e-5
    logp64 = fused_loss.materialized_logprob_values(h64.detach(), w64.detach(), targets)
    assert (ref["logp"].double() - logp64).abs().max() < 1e-5


def test_every_row_is_checked_and_a_wrong_one_fails(fused_loss, tmp_path):
    common = bench_module("common")
    args = fused_loss.parse_args(["--smoke", "--no-compile"])
    results = common.Results("fused_loss", tmp_path, (), {})

    def wrong_loss(hidden, weight, targets, batch):  # a miscompile: 10% off
        return fused_loss.materialized_bpo_loss(hidden, weight, targets, batch) * 1.1

    def wrong_logprobs(hidden, weight, targets):
        return fused_loss.materialized_logprob_values(hidden, weight, targets) + 0.5

    fwd_bwd = {"r4b": fused_loss.r4b_bpo_loss, "wrong": wrong_loss}
    fwd_only = {"r4b": fused_loss.r4b_logprob_values, "wrong": wrong_logprobs}
    fused_loss.bench_size(48, args, fwd_bwd, fwd_only, 1.0, results)
    verdicts = {(r["impl"], r["mode"]): r["within_tolerance"] for r in results.section("rows")}
    assert verdicts == {("r4b", "fwd+bwd"): True, ("r4b", "fwd logprobs"): True,
                        ("wrong", "fwd+bwd"): False, ("wrong", "fwd logprobs"): False}  # fmt: skip
    wrong = next(r for r in results.section("rows") if r["impl"] == "wrong" and r["mode"] == "fwd+bwd")
    assert wrong["loss_rel_err"] == pytest.approx(0.1, rel=1e-3) and wrong["method"] == "wrong"
    r4b = next(r for r in results.section("rows") if r["impl"] == "r4b")
    assert r4b["method"] == fused_grad.resolve_method(None) and r4b["accumulation"] == {
        "logits": "triton",
        "d_weight": "triton",
    }


def test_the_r4b_row_is_what_a_user_gets_by_default(fused_loss, monkeypatch):
    assert fused_loss.r4b_impls() == {"r4b": "recompute", "r4b-cublas": "cublas", "r4b-cublas-fast": "cublas-fast"}
    monkeypatch.setenv(fused_grad.METHOD_ENV, "cublas-fast")
    assert fused_loss.r4b_impls() == {"r4b": "cublas-fast", "r4b-recompute": "recompute", "r4b-cublas": "cublas"}
    args = fused_loss.parse_args(["--smoke", "--impls", "r4b", "nope"])
    with pytest.raises(SystemExit, match="unknown --impls"):
        fused_loss.impl_names(args)


@pytest.mark.parametrize(
    ("has_mm", "has_addmm", "expected"),
    [
        (True, True, {"logits": "mm-out_dtype", "d_weight": "addmm-out_dtype"}),
        (True, False, {"logits": "mm-out_dtype", "d_weight": "mm-out_dtype+add"}),  # addmm refuses fp32 self
        (False, False, {"logits": "rounded", "d_weight": "rounded"}),
    ],
)
def test_accumulation_paths_follow_this_torchs_probes(monkeypatch, has_mm, has_addmm, expected):
    """The path each fp32 product takes is read from the same run-time probes the chunk loop uses."""
    probes = {"mm": has_mm, "addmm": has_addmm}
    monkeypatch.setattr(fused_grad, "_has_out_dtype", lambda device_type, op: probes[op])
    assert fused_grad.accumulation_paths("cuda:0", "cublas") == expected
    assert fused_grad.accumulation_paths("cuda", "cublas-fast") == {"logits": "native", "d_weight": "native"}


def test_accumulation_paths_on_this_cpu():
    """This torch's CPU build has no mm / addmm out_dtype kernels: the interpreter's path upcasts, as recorded."""
    assert not fused_grad._has_out_dtype("cpu", "mm") and not fused_grad._has_out_dtype("cpu", "addmm")
    assert fused_grad.accumulation_paths("cpu") == {"logits": "upcast", "d_weight": "upcast"}


@pytest.fixture
def attention():
    return bench_module("attention")


def _args(attention, **overrides) -> argparse.Namespace:
    args = attention.parse_args(["--smoke"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_checked_documents_are_whole_and_at_least_one(attention):
    layout = attention.Layout([30, 20, 50, 10])
    assert attention.checked_documents(layout, 50) == 2
    assert attention.checked_documents(layout, 10) == 1  # the first document, whatever its length
    assert attention.checked_documents(layout, 1000) == 4


def test_the_float64_reference_of_the_first_documents(attention):
    """One document and kv head at a time, it equals the reference over the whole layout on those rows (documents
    never interact), output and gradients, with a shared prefix, a bidir block and GQA."""
    layout = attention.bpo_groups(2, 24, 10, 4, 8, shared=True)
    args = _args(attention, q_heads=4, kv_heads=2)
    (q, k, v), grad = attention.make_inputs(layout, args, "cpu")
    ref = attention.reference_outputs(layout, q, k, v, grad, docs=1)
    n = layout.lengths[0]
    full = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = varlen_attention_reference(*full, layout.cu, max(layout.lengths), segment_ids=layout.seg,
                                     bidir_ids=layout.bidir)  # fmt: skip
    (out * grad.double()).sum().backward()
    assert ref["out"].shape[0] == n
    for name, expected in (("out", out), ("dq", full[0].grad), ("dk", full[1].grad), ("dv", full[2].grad)):
        assert rel_err(ref[name], expected[:n]) < 1e-12, name


def test_each_timed_attention_row_is_checked_and_a_wrong_one_fails(attention):
    args = _args(attention, check_tokens=90)
    layout = attention.causal_documents(96, 40)
    case = attention.Case("causal-docs", layout, args, "cpu")

    def right(q, k, v):
        return varlen_attention_reference(q, k, v, layout.cu, 40)

    def wrong(q, k, v):  # a miscompile: the last key of each tile dropped, say
        return right(q, k, v) * 1.05

    rows = {name: attention.time_impl(name, fn, case, args, "cpu") for name, fn in (("r4b", right), ("flex", wrong))}
    for name, verdict in (("r4b", True), ("flex", False)):
        fwd, train = rows[name]
        assert fwd["within_tolerance"] is verdict and train["within_tolerance"] is verdict, name
        assert fwd["max_rel_err"] == fwd["out_rel_err"]
        assert train["max_rel_err"] == max(train[f"{t}_rel_err"] for t in ("out", "dq", "dk", "dv"))
    assert rows["flex"][0]["out_rel_err"] == pytest.approx(0.05, rel=1e-6)
    assert rows["r4b"][1]["checked_tokens"] == 80  # the whole documents within --check-tokens 90


def test_attention_rows_name_the_kernel_that_ran(attention, monkeypatch):
    args = _args(attention)
    shared = attention.bpo_groups(1, 24, 10, 4, 8, shared=True)
    monkeypatch.delenv("R4B_ATTENTION_BACKEND", raising=False)
    assert attention.backend_of("r4b", shared, args, "cpu") == {"backend": "r4b-triton", "backend_setting": "auto"}
    monkeypatch.setenv("R4B_ATTENTION_BACKEND", "flex")
    assert attention.backend_of("r4b", shared, args, "cpu") == {"backend": "flex", "backend_setting": "flex"}
    assert attention.backend_of("r4b-kernel", shared, args, "cpu") == {"backend": "r4b-triton"}
    assert attention.backend_of("r4b-schedule", shared, args, "cpu")["backend"].startswith("r4b-schedule (tiles")
    assert attention.build_impl("torch-fa2", shared, args, "cpu") is None  # a shared prefix is no FA2 mask
