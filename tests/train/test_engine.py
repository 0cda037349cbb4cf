"""Distributed engines (r4b.train.engine): FSDP2 and DeepSpeed ZeRO-2/3 on 2 CPU processes (gloo) against one process.

Each distributed run launches tests/engine_worker.py under torchrun with 2 processes on the CPU: each rank takes
half of every global batch (optionally in 2 micro-batches), and the all-reduced losses, grad norms, lrs and the
final full fp32 parameters must equal a single-process run over the whole batch. Resume tests save after step 2,
load in fresh processes and must reproduce the uninterrupted run's steps 3-4 bit for bit.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_two_ranks

from r4b.config import EngineConfig
from r4b.train.engine import build_engine

WORKER = Path(__file__).resolve().parents[1] / "engine_worker.py"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install deepspeed)")

sys.path.insert(0, str(WORKER.parent))
import engine_worker  # noqa: E402


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    return env


def run_worker(tmp: Path, name: str, *args: str, nproc: int = 2, timeout: int = 120) -> dict:
    """Run the worker (torchrun with `nproc` processes, or plain python when nproc is 0); return rank 0's output."""
    out = tmp / f"{name}.pt"
    if nproc:
        assert nproc == 2, "the two-rank cases only"
        run_two_ranks([str(WORKER), "--out", str(out), *args], env=_env(), timeout=timeout)
    else:
        cmd = [sys.executable, str(WORKER), "--out", str(out), *args]
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return torch.load(out, weights_only=False)


CASES = {
    "single": (0, ["--kind", "single"]),
    "fsdp2": (2, ["--kind", "fsdp2"]),
    "fsdp2-accum2-actckpt": (2, ["--kind", "fsdp2", "--accum", "2", "--activation-checkpointing"]),
    "zero2": (2, ["--kind", "deepspeed", "--zero-stage", "2"]),
    "zero2-accum2": (2, ["--kind", "deepspeed", "--zero-stage", "2", "--accum", "2"]),
    "zero3": (2, ["--kind", "deepspeed", "--zero-stage", "3"]),
    "zero3-accum2-actckpt": (
        2,
        ["--kind", "deepspeed", "--zero-stage", "3", "--accum", "2", "--activation-checkpointing"],
    ),
}


def _params(cases) -> list:
    return [pytest.param(c, marks=[needs_deepspeed] if "zero" in c else []) for c in cases]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """full_run(case) -> (dir, output): 4 uninterrupted steps saving into dir/ckpt after step 2; run once per case."""
    cache: dict[str, tuple[Path, dict]] = {}

    def get(case: str) -> tuple[Path, dict]:
        if case not in cache:
            nproc, args = CASES[case]
            d = tmp_path_factory.mktemp(case)
            out = run_worker(d, "full", *args, "--save-at", "2", "--ckpt", str(d / "ckpt"), nproc=nproc)
            cache[case] = (d, out)
        return cache[case]

    return get


@pytest.fixture(scope="module")
def reference(full_run) -> dict:
    """Single process, whole batch, one micro-batch per step."""
    return full_run("single")[1]


def assert_close_run(got: dict, ref: dict, *, atol: float = 1e-5) -> None:
    assert got["world"] == 2
    assert len(got["losses"]) == len(ref["losses"]) == 4
    for a, b in zip(got["losses"], ref["losses"], strict=True):
        assert abs(a - b) <= atol, (got["losses"], ref["losses"])
    for a, b in zip(got["grad_norms"], ref["grad_norms"], strict=True):
        assert abs(a - b) <= atol * max(1.0, abs(b)), (got["grad_norms"], ref["grad_norms"])
    assert got["lrs"] == ref["lrs"]
    assert set(got["state"]) == set(ref["state"])
    for k, v in ref["state"].items():
        g = got["state"][k]
        assert g.dtype == torch.float32 and g.shape == v.shape, k
        assert torch.allclose(g, v, rtol=0, atol=atol), (k, (g - v).abs().max().item())
    # the run trained: lr-0 and frozen parameters did not move, the others did (the worker's init is seed 0)
    init = engine_worker.tiny_model().state_dict()
    assert torch.equal(got["state"]["model.embed_tokens.weight"], init["model.embed_tokens.weight"])
    assert torch.equal(
        got["state"]["model.layers.0.self_attn.q_norm.weight"], init["model.layers.0.self_attn.q_norm.weight"]
    )
    assert not torch.allclose(got["state"]["lm_head.weight"], init["lm_head.weight"])


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", _params(c for c in CASES if c != "single"))
def test_two_ranks_match_single_process(case, reference, full_run):
    full = full_run(case)[1]
    assert_close_run(full, reference)
    # Engine.full_tensors (the rollout weight sync; FSDP2: each parameter gathered on the device) = full_state_dict
    assert full["streamed_equal"] and full["streamed_bf16_equal"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", _params(["single", "fsdp2", "zero2-accum2", "zero3"]))
def test_save_load_resume_is_exact(case, full_run):
    d, full = full_run(case)
    # save wrote only inside its directory
    assert {p.name for p in d.iterdir()} == {"full.pt", "ckpt"}
    nproc, args = CASES[case]
    resumed = run_worker(d, "resumed", *args, "--save-at", "2", "--ckpt", str(d / "ckpt"), "--load", nproc=nproc)
    assert resumed["losses"] == full["losses"][2:]
    assert resumed["grad_norms"] == full["grad_norms"][2:]
    assert resumed["lrs"] == full["lrs"][2:]
    assert set(resumed["state"]) == set(full["state"])
    for k, v in full["state"].items():
        assert torch.equal(resumed["state"][k], v), k


BF16 = {
    "single": (0, ["--kind", "single"]),
    "fsdp2": (2, ["--kind", "fsdp2"]),
    "zero3": (2, ["--kind", "deepspeed", "--zero-stage", "3"]),
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", _params(BF16))
def test_bf16_tracks_fp32(case, reference, tmp_path):
    nproc, args = BF16[case]
    got = run_worker(tmp_path, case, *args, "--mixed-precision", "bf16", nproc=nproc)
    assert got["losses"] == pytest.approx(reference["losses"], abs=2e-3)
    assert got["grad_norms"] == pytest.approx(reference["grad_norms"], rel=5e-3)
    # fp32 master weights: the exported state is fp32 and close to the fp32 run (|update| <= ~lr per step)
    for k, v in reference["state"].items():
        assert got["state"][k].dtype == torch.float32
        assert (got["state"][k] - v).abs().max().item() < 2e-2, k


# ----------------------------------------------------------------------------------------------------------------
# in-process checks of the single engine and of the parameter groups


def _single(model=None, groups=None, **cfg):
    model = model or engine_worker.tiny_model()
    groups = groups if groups is not None else engine_worker.param_groups(model)
    return build_engine(model, groups, engine_worker.lr_lambda, EngineConfig(kind="single", **cfg))


def test_param_groups_and_lrs():
    eng = _single()
    names = [g["name"] for g in eng.optimizer.param_groups]
    assert names == ["embed", "llm", "head"]  # the empty group is not in the optimizer
    frozen = "model.layers.0.self_attn.q_norm.weight"
    assert all(p is not dict(eng.module.named_parameters())[frozen] for p in eng.optimizer.param_groups[1]["params"])
    assert eng.lrs() == pytest.approx({"embed": 0.0, "llm": 1.5e-3, "head": 5e-4, "empty": 5e-4})


def test_param_group_errors():
    model = engine_worker.tiny_model()
    with pytest.raises(ValueError, match="in no param group"):
        _single(model, [{"name": "head", "lr": 1e-3, "params": ["lm_head.weight"]}])
    everything = [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match="is in param groups"):
        _single(model, [{"name": "a", "lr": 1.0, "params": everything}, {"name": "b", "lr": 1.0, "params": everything}])
    with pytest.raises(ValueError, match="no parameter named"):
        _single(model, [{"name": "a", "lr": 1.0, "params": ["nope"]}])
    with pytest.raises(ValueError, match="unknown engine kind"):
        build_engine(model, [{"name": "a", "lr": 1.0, "params": everything}], lambda s: 1.0, EngineConfig(kind="ddp"))


def test_grad_clip_and_activation_checkpointing():
    ids = engine_worker.batch(0)
    norms = {}
    for clip, ac in [(0.0, False), (1e-3, True)]:
        eng = _single(grad_clip=clip, activation_checkpointing=ac)
        assert eng.module.is_activation_checkpointing == ac
        eng.backward(eng.module(input_ids=ids, labels=ids).loss)
        before = {n: p.detach().clone() for n, p in eng.module.named_parameters()}
        lr_head = eng.lrs()["head"]
        norms[clip] = eng.step()
        step = (eng.module.lm_head.weight.detach() - before["lm_head.weight"]).abs().max().item()
        assert step <= lr_head * 1.01 + 1e-8  # Adam's first step moves each weight by at most ~lr
        assert all(p.grad is None for p in eng.module.parameters())
    # the returned norm is the pre-clip one, identical with and without clipping / checkpointing
    assert norms[0.0] == pytest.approx(norms[1e-3], rel=1e-6)


@pytest.mark.multiprocess
def test_two_rank_launches_retry_only_the_gloo_teardown_abort(monkeypatch, tmp_path):
    """run_two_ranks reruns (from a fresh output directory) only a run a rank of which died of the teardown abort."""
    import helpers

    fresh = tmp_path / "run"
    outcomes, existed = [], []

    def fake_run(command, **_):
        existed.append(fresh.exists())
        fresh.mkdir(exist_ok=True)
        returncode, stderr = outcomes.pop(0)
        return subprocess.CompletedProcess(command, returncode, "", stderr)

    monkeypatch.setattr(helpers.subprocess, "run", fake_run)
    outcomes[:] = [(1, f"... {helpers.GLOO_TEARDOWN_ABORT} ..."), (0, "")]
    assert helpers.run_two_ranks(["x"], env={}, timeout=1, fresh=fresh).returncode == 0 and not outcomes
    assert existed == [False, False]  # the rerun started from scratch
    outcomes[:] = [(1, "AssertionError: loss differs")]  # any other failure fails at once
    with pytest.raises(pytest.fail.Exception, match="loss differs"):
        helpers.run_two_ranks(["x"], env={}, timeout=1)
    outcomes[:] = [(1, helpers.GLOO_TEARDOWN_ABORT), (1, helpers.GLOO_TEARDOWN_ABORT)]  # twice: a real failure
    with pytest.raises(pytest.fail.Exception):
        helpers.run_two_ranks(["x"], env={}, timeout=1)
