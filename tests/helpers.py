"""Shared test utilities: devices, tolerances, allocation tracking, two-rank launches, the demo's data and configs."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[1]
DEMO_SFT = ROOT / "configs" / "demo" / "sft.yaml"
DEMO_BPO = ROOT / "configs" / "demo" / "bpo.yaml"


def bench_module(name: str):
    """A module of bench/ (its modules import each other as top-level names)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def synthetic_data(tmp_path_factory, *, n_sft: int, n_rl: int = 2, n_eval: int = 2, seed: int = 0) -> Path:
    """A fresh directory of the demo's synthetic task (r4b.synth): sft.jsonl, rl.jsonl, eval.jsonl, images."""
    from r4b.synth import write_synthetic

    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, n_sft=n_sft, n_rl=n_rl, n_eval=n_eval, seed=seed)
    return out


# Relative (Frobenius) error allowed against the float64 reference, by input dtype.
# fp16/bf16 bounds come from rounding the outputs and d_logits to that dtype.
GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}
VALUE_ATOL = {torch.float32: 1e-4, torch.float16: 1e-4, torch.bfloat16: 1e-4}


def sft_argv(data: Path, out: Path, *extra: str) -> list[str]:
    """``r4b sft`` of the demo config on ``data`` into ``out``: batches of 12, a checkpoint every step, no progress,
    TensorBoard or export (the resume and integrity tests' run)."""
    return ["sft", "--config", str(DEMO_SFT), "--output-dir", str(out), f"data.train=[{data}]",
            "train.global_batch_samples=12", "train.progress=false", "train.tensorboard=false", "train.export=false",
            "train.save_every=1", *extra]  # fmt: skip


def tiny_bpo(data: Path, out: Path, *extra: str) -> list[str]:
    """Overrides of a small ``r4b bpo`` of the untrained tiny model on ``data``'s ``rl.jsonl`` into ``out`` (2 + 2
    rollouts of 6 tokens for 4 prompts a step; no evaluation, progress, TensorBoard or export): ``extra`` after them,
    so it may change any of them."""
    return [f"output_dir={out}", "model.path=null", f"data.prompts=[{data / 'rl.jsonl'}]", "data.eval=null",
            "rollout.group_size=2", "rollout.max_new_tokens=6", "rollout.prompts_per_call=2",
            "train.prompts_per_step=4", "train.progress=false", "train.tensorboard=false", "train.export=false",
            *extra]  # fmt: skip


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-30))


def max_abs(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max())


def random_problem(n: int, h: int, v: int, *, seed: int, scale: float = 0.5):
    """float64 hidden, weight and targets on DEVICE: logits of order a few units."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * (scale * 4 / h**0.5)
    targets = torch.randint(0, v, (n,), generator=gen)
    return hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE)


def leaf(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(dtype).requires_grad_()


class AllocationTracker(TorchDispatchMode):
    """Records the element count of every tensor an op allocates (not views of existing storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append((t.untyped_storage().nbytes() // t.element_size(), str(func)))
        return out

    def largest(self) -> tuple[int, str]:
        return max(self.sizes, default=(0, "none"))


# A gloo rank can die at teardown with this C++ message (a joinable worker thread destroyed; see
# pytorch/pytorch#190489): a crash of the process, seen rarely and only on a loaded machine, not a wrong result.
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def run_two_ranks(
    args: list[str], *, env: dict[str, str], timeout: int, cwd: str | Path | None = None, fresh: Path | None = None
) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node=2 *args``, output captured; the test fails
    with the output when the run does. Run once more when a rank died of :data:`GLOO_TEARDOWN_ABORT` -- after deleting
    ``fresh`` (the run's output directory), so the rerun starts from scratch. The test checks the rerun's results."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    for attempt in range(2):
        proc = subprocess.run(command, env=env, cwd=cwd, timeout=timeout, capture_output=True, text=True)
        if proc.returncode == 0 or attempt == 1 or GLOO_TEARDOWN_ABORT not in proc.stderr:
            break
        if fresh is not None:
            shutil.rmtree(fresh, ignore_errors=True)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc
