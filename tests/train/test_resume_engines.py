"""Resuming the sharded engines' checkpoints: for every ``model.train`` set that matters, on FSDP2 and DeepSpeed
with 2 gloo ranks, a run resumed from its step-1 checkpoint ends with the losses, gradient norms and exported
weights of the uninterrupted run, bit for bit (weight decay on, so that a parameter moved by a resume would show).
FSDP2 checkpoints written before they held optimizer state for parameters without a gradient resume too, and FSDP2 and
DeepSpeed ZeRO-2 resume on another number of ranks (torch.distributed.checkpoint reshards; DeepSpeed through its
universal checkpoint); ZeRO-3 refuses that in one line.

The multi-rank cases run in one torchrun launch (this file is its worker), each case a few tiny steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "demo" / "sft.yaml"
STEPS = 3
TRAIN_SETS = ["vision,projector,llm", "projector,llm", "llm"]  # the default first: its post_layernorm has no grad
CASES = [f"{kind}:{train}" for kind in ("fsdp2", "deepspeed") for train in TRAIN_SETS]
# an FSDP2 checkpoint written without the state of parameters that never had a gradient (as before save() added it)
LEGACY = f"fsdp2-legacy:{TRAIN_SETS[0]}"
ZERO3 = f"deepspeed-zero3:{TRAIN_SETS[0]}"  # the other cases' DeepSpeed is ZeRO-2, the default
# the engine keys of each case's kind: the kind itself unless listed
ENGINE_KEYS = {
    "fsdp2-legacy": ["engine.kind=fsdp2"],
    "deepspeed-zero3": ["engine.kind=deepspeed", "engine.zero_stage=3"],
}


def sft_args(data: Path, out: Path, kind: str, train: str, *extra: str) -> list[str]:
    engine = ENGINE_KEYS.get(kind, [f"engine.kind={kind}"])
    return [
        "sft", "--config", str(CONFIG), "--output-dir", str(out), f"data.train=[{data}]", f"model.train=[{train}]",
        *engine, "engine.timeout_minutes=3", "data.max_tokens=300", "train.global_batch_samples=4",
        f"train.max_steps={STEPS}", "train.save_every=1", f"train.keep_checkpoints={STEPS}", "train.progress=false",
        "train.tensorboard=false", "optim.weight_decay=0.1", *extra,
    ]  # fmt: skip


def case_dir(out: Path, case: str) -> Path:
    return out / case.replace(":", "-").replace(",", "_")


def worker(out: Path, data: Path, cases: list[str]) -> None:
    """One rank: per case, an uninterrupted run (``full``), then a run resumed from its step-1 checkpoint
    (``resumed``); each rank's exit codes to ``out/rank<r>.json``."""
    from r4b.cli import main
    from r4b.train import engine

    codes = {}
    for case in cases:
        kind, train = case.split(":")
        where = case_dir(out, case)
        add_state = engine._add_initial_optimizer_state
        if kind == "fsdp2-legacy":
            engine._add_initial_optimizer_state = lambda optimizer: None
        full = main(sft_args(data, where / "full", kind, train))
        engine._add_initial_optimizer_state = add_state
        resume = f"train.resume={where / 'full' / 'checkpoint-1'}"
        resumed = main(sft_args(data, where / "resumed", kind, train, resume))
        codes[case] = [full, resumed]
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(codes))


def _env() -> dict[str, str]:
    return {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted((run / "model").glob("*.safetensors")):
        out.update(load_file(file))
    assert out, f"no weights exported in {run / 'model'}"
    return out


def one_rank(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """``r4b args`` as the one rank of a process group (the environment torchrun gives, which DeepSpeed needs), in a
    fresh process: its exit status is r4b's, and no process group is left in pytest's process."""
    from r4b.train.engine import _free_port

    env = {**_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(_free_port())
    command = [sys.executable, "-m", "r4b", *args]
    return subprocess.run(command, env=env, cwd=ROOT, timeout=timeout, capture_output=True, text=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from r4b.synth import write_synthetic

    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, n_sft=8, n_rl=2, n_eval=2, seed=0)
    return out / "sft.jsonl"


@pytest.fixture(scope="module")
def two_rank_runs(data, tmp_path_factory) -> Path:
    """Every case's full and resumed runs on 2 gloo ranks (one torchrun launch)."""
    from helpers import run_two_ranks

    out = tmp_path_factory.mktemp("engines")
    run_two_ranks([__file__, str(out), str(data), *CASES, LEGACY, ZERO3], env=_env(), cwd=ROOT, timeout=500)
    for rank in range(2):
        codes = json.loads((out / f"rank{rank}.json").read_text())
        assert codes == {case: [0, 0] for case in [*CASES, LEGACY, ZERO3]}, codes
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", [*CASES, LEGACY, ZERO3])
def test_a_resumed_run_equals_the_uninterrupted_one(two_rank_runs, case):
    where = case_dir(two_rank_runs, case)
    full, resumed = metrics(where / "full"), metrics(where / "resumed")
    assert [m["step"] for m in full] == [1, 2, 3] and [m["step"] for m in resumed] == [2, 3]
    for a, b in zip(full[1:], resumed, strict=True):
        assert (a["loss"], a["grad_norm"], a["lrs"]) == (b["loss"], b["grad_norm"], b["lrs"])
    expected, got = weights(where / "full"), weights(where / "resumed")
    assert set(expected) == set(got)
    changed = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not changed, f"weights differ after resuming: {changed[:5]}"


@pytest.mark.multiprocess
def test_fsdp2_checkpoints_hold_state_for_parameters_without_a_gradient(two_rank_runs):
    """The vision tower's post_layernorm never has a gradient (LLaVA reads an earlier layer's features): its
    AdamW state is saved all the same; the legacy case's checkpoint lacks it, as those written before did."""
    import torch.distributed.checkpoint as dcp

    key = "optimizer.state.model.model.vision_tower.post_layernorm.weight.step"
    for case, held in ((CASES[0], True), (LEGACY, False)):
        engine = case_dir(two_rank_runs, case) / "full" / "checkpoint-1" / "engine"
        assert (key in dcp.FileSystemReader(engine).read_metadata().state_dict_metadata) is held, case


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["fsdp2", "deepspeed"])
def test_a_checkpoint_resumes_on_another_number_of_ranks(two_rank_runs, data, tmp_path, kind):
    """A 2-rank FSDP2 or DeepSpeed ZeRO-2 checkpoint (with optimizer state for the never-updated post_layernorm)
    resumed on 1 rank: the same steps follow, equal up to the order of the ranks' sums; DeepSpeed's universal copy
    of the checkpoint is gone afterwards."""
    where = case_dir(two_rank_runs, CASES[0 if kind == "fsdp2" else len(TRAIN_SETS)])
    resume = f"train.resume={where / 'full' / 'checkpoint-1'}"
    proc = one_rank(*sft_args(data, tmp_path / "one", kind, TRAIN_SETS[0], resume))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in (where / "full").glob(".checkpoint-*")) == []
    full, resumed = metrics(where / "full"), metrics(tmp_path / "one")
    assert [m["step"] for m in resumed] == [2, 3]
    for a, b in zip(full[1:], resumed, strict=True):
        assert a["lrs"] == b["lrs"] and a["tokens"] == b["tokens"]
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * abs(a["grad_norm"]), (a["grad_norm"], b["grad_norm"])
    expected, got = weights(where / "full"), weights(tmp_path / "one")
    for k in expected:
        # a key bias shifts every score of a query alike, which softmax ignores: its gradient is rounding noise
        # that Adam scales up to a step of ~lr, so it differs in the order of the ranks' sums
        if not k.endswith("k_proj.bias"):
            torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.multiprocess
def test_deepspeed_zero3_refuses_another_number_of_ranks_in_one_line(two_rank_runs, data, tmp_path):
    checkpoint = case_dir(two_rank_runs, ZERO3) / "full" / "checkpoint-1"
    proc = one_rank(*sft_args(data, tmp_path / "one", "deepspeed-zero3", TRAIN_SETS[0], f"train.resume={checkpoint}"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert lines[-1] == (
        f"r4b sft: error: {checkpoint} was written by 2 ranks and this run has 1: a DeepSpeed ZeRO-3 checkpoint "
        "resumes on 2 ranks only (ZeRO-1 and 2 ones reshard)"
    )
    assert not (tmp_path / "one" / "metrics.jsonl").exists()


def test_initial_optimizer_state_changes_nothing_adamw_computes():
    """The state save() adds for a parameter without a gradient is what AdamW creates at its first gradient:
    a later step equals the step of an optimizer that never had it, bit for bit, and the parameter does not move
    meanwhile (no dummy step, whose weight decay would)."""
    from r4b.train.engine import _add_initial_optimizer_state

    def make():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
        return params, torch.optim.AdamW(params, lr=0.1, weight_decay=0.5, betas=(0.9, 0.95))

    (a, b), plain = make()
    (a2, b2), filled = make()
    for step in range(3):
        for params, opt in (((a, b), plain), ((a2, b2), filled)):
            params[0].grad = torch.full_like(params[0], 0.1 * (step + 1))
            if step == 2:  # the second parameter's first gradient
                params[1].grad = torch.full_like(params[1], -0.3)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if step == 0:
            before = b2.detach().clone()
            _add_initial_optimizer_state(filled)
            assert set(filled.state[b2]) == {"step", "exp_avg", "exp_avg_sq"} and float(filled.state[b2]["step"]) == 0
            assert b not in plain.state or not plain.state[b]
        if step == 1:
            assert torch.equal(b2, before)  # no gradient, no change
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert all(torch.equal(plain.state[b][k], filled.state[b2][k]) for k in ("step", "exp_avg", "exp_avg_sq"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    worker(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
