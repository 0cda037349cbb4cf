"""Non-finite training never passes silently: a nan/inf loss or gradient norm stops the run before its optimizer step
with one line naming the step (``train.on_nonfinite: stop``), or has its update dropped and counted (``skip``); on
several ranks every rank decides the same; metrics.jsonl stays strict JSON; no checkpoint or export holds a
non-finite weight. Faults are injected on the CPU: a huge learning rate, a NaN multiplied into the loss, an inf
written into a gradient (gloo for two ranks, FSDP2 and DeepSpeed ZeRO-2)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers, engine_worker (also under torchrun)

from helpers import DEMO_SFT, ROOT, run_two_ranks, synthetic_data

from r4b.cli import main
from r4b.config import EngineConfig
from r4b.train.accumulate import NonFiniteGuard, NonFiniteStep
from r4b.train.engine import build_engine
from r4b.train.logging import RunLogger

DEMO_BPO = ROOT / "configs" / "demo" / "bpo.yaml"

pytestmark = pytest.mark.usefixtures("torch_reference_kernels")  # tests/conftest.py


def _strict_json(line: str) -> dict:
    """A metrics.jsonl row, refusing the bare NaN / Infinity tokens Python's json would accept."""

    def refuse(token: str):
        raise AssertionError(f"not JSON: {token} in {line[:120]}")

    return json.loads(line, parse_constant=refuse)


def _rows(run: Path) -> list[dict]:
    return [_strict_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _all_finite(path: Path) -> bool:
    """Every floating tensor of every .pt / .safetensors file under ``path`` is finite."""
    tensors = []
    for file in path.rglob("*.pt"):
        stack = [torch.load(file, weights_only=False)]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                stack += list(item.values())
            elif isinstance(item, list | tuple):
                stack += list(item)
            elif isinstance(item, torch.Tensor):
                tensors.append(item)
    for file in path.rglob("*.safetensors"):
        from safetensors.torch import load_file

        tensors += list(load_file(file).values())
    assert tensors, f"no tensors under {path}"
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


# --------------------------------------------------------------------------------------------------------------
# the guard on one engine


def _engine(lr: float = 0.1):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    groups = [{"name": "llm", "lr": lr, "params": list(model.parameters())}]
    return build_engine(model, groups, lambda step: 1.0 / (step + 1), EngineConfig(kind="single", grad_clip=1.0))


def _weights(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


def _backward(guard: NonFiniteGuard, poison: float = 1.0) -> None:
    loss = guard.module(torch.ones(2, 4)).sum() * poison
    guard.backward(loss)


@pytest.mark.parametrize("fault", ["nan loss", "inf loss", "inf gradient"])
def test_stop_raises_before_the_optimizer_step(fault):
    engine = _engine()
    guard = NonFiniteGuard(engine, "stop")
    guard.begin(1)
    _backward(guard)
    assert guard.step() > 0  # a finite step is taken
    before, state = _weights(engine), len(engine.optimizer.state)
    guard.begin(2)
    _backward(guard, float("nan") if fault == "nan loss" else float("inf") if fault == "inf loss" else 1.0)
    if fault == "inf gradient":  # finite loss, one gradient overflowed
        next(engine.module.parameters()).grad[0, 0] = float("inf")
    with pytest.raises(NonFiniteStep, match=r"^step 2: non-finite (loss|gradient norm \(inf\)); stopped before"):
        guard.step()
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(engine), strict=True))
    assert len(engine.optimizer.state) == state


def test_skip_drops_the_update_keeps_adam_state_and_advances_the_schedule():
    engine = _engine()
    guard = NonFiniteGuard(engine, "skip", updates_per_step=2)
    guard.begin(1)
    _backward(guard)
    guard.step()
    before = _weights(engine)
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in engine.optimizer.state.items()}
    lr = engine.lrs()["llm"]
    guard.begin(2)
    _backward(guard, float("nan"))
    assert torch.isnan(torch.tensor(guard.step()))
    assert guard.skipped == 1 and engine.lrs()["llm"] < lr  # counted; the schedule moved on
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(engine), strict=True))
    for p, s in engine.optimizer.state.items():
        assert all(torch.equal(v, moments[id(p)][k]) for k, v in s.items())
    assert all(p.grad is None for p in engine.module.parameters())  # the NaN gradients are gone
    _backward(guard)  # update 2 of step 2: finite again, taken
    assert guard.step() > 0 and guard.skipped == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, _weights(engine), strict=True))


def test_check_weights_refuses_a_non_finite_weight():
    engine = _engine()
    guard = NonFiniteGuard(engine, "stop")
    guard.begin(3)
    guard.check_weights()
    with torch.no_grad():
        next(engine.module.parameters())[0, 0] = float("inf")
    with pytest.raises(NonFiniteStep, match="step 3: the weights hold non-finite values"):
        guard.check_weights()


def test_metrics_jsonl_writes_null_for_non_finite_numbers(tmp_path):
    logger = RunLogger(tmp_path, 2, tensorboard=False, progress=False)
    logger.log({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lrs": {"llm": 1.0}, "x": [float("-inf")]})
    logger.close()
    assert _rows(tmp_path) == [{"step": 1, "loss": None, "grad_norm": None, "lrs": {"llm": 1.0}, "x": [None]}]


# --------------------------------------------------------------------------------------------------------------
# r4b sft and r4b bpo on the tiny model


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthetic_data(tmp_path_factory, n_sft=24, n_rl=8, n_eval=2)


def _sft(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "sft", "--config", str(DEMO_SFT), "--output-dir", str(out), f"data.train=[{data / 'sft.jsonl'}]",
        "train.global_batch_samples=8", "train.epochs=1", "train.save_every=1", "train.keep_checkpoints=5",
        "train.progress=false", "train.tensorboard=false", *extra,
    ]  # fmt: skip


def _error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def test_sft_with_a_huge_learning_rate_stops_with_one_line(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_sft(data, run, "optim.lr_llm=1e30")) == 2
    line = _error_line(capsys)
    rows = _rows(run)
    assert line.startswith(f"r4b sft: error: step {len(rows) + 1}: non-finite loss; stopped before its optimizer step")
    assert rows and all(isinstance(r["loss"], float) for r in rows)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == [f"checkpoint-{r['step']}" for r in rows]
    assert _all_finite(run) and not (run / "model").exists()


class _PoisonCall:
    """Multiplies the loss of the objective's ``nth`` training call (1-based) by NaN."""

    def __init__(self, monkeypatch, cls, nth: int) -> None:
        self.calls, original = 0, cls.forward

        def forward(module, *args, **kwargs):
            out = original(module, *args, **kwargs)
            if kwargs.get("logprobs_only"):
                return out
            self.calls += 1
            if self.calls != nth:
                return out
            return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")

        monkeypatch.setattr(cls, "forward", forward)


def test_sft_nan_loss_stops_or_is_skipped(data, tmp_path, capsys, monkeypatch):
    from r4b.train.objective import PackedSFTObjective

    _PoisonCall(monkeypatch, PackedSFTObjective, nth=2)
    assert main(_sft(data, tmp_path / "stop")) == 2
    rows = _rows(tmp_path / "stop")
    assert f"step {len(rows) + 1}: non-finite loss" in _error_line(capsys)

    _PoisonCall(monkeypatch, PackedSFTObjective, nth=2)
    run = tmp_path / "skip"
    assert main(_sft(data, run, "train.on_nonfinite=skip")) == 0
    rows = _rows(run)
    skipped = [r for r in rows if r["skipped_updates"]]
    assert len(rows) == 3 and len(skipped) == 1 and skipped[0]["loss"] is None and skipped[0]["grad_norm"] is None
    assert all(r["loss"] > 0 for r in rows if not r["skipped_updates"])
    assert f"step {skipped[0]['step']}: non-finite loss: update skipped" in capsys.readouterr().err
    assert _all_finite(run) and (run / "model" / "model.safetensors").is_file()


def _bpo(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "bpo", "--config", str(DEMO_BPO), "--output-dir", str(out), "model.path=null",
        f"data.prompts=[{data / 'rl.jsonl'}]", "data.eval=null", "rollout.group_size=2", "rollout.max_new_tokens=4",
        "rollout.prompts_per_call=2", "train.prompts_per_step=2", "train.steps=2", "train.save_every=1",
        "train.progress=false", "train.tensorboard=false", "train.export=false", "policy.mini_batches=2",
        "policy.beta=0", "reward.name=format", *extra,
    ]  # fmt: skip


def test_bpo_nan_loss_stops_or_is_skipped(data, tmp_path, capsys, monkeypatch):
    from r4b.rl.update import BPOObjective

    _PoisonCall(monkeypatch, BPOObjective, nth=1)
    assert main(_bpo(data, tmp_path / "stop")) == 2
    assert _error_line(capsys).startswith("r4b bpo: error: step 1, update 1 of 2: non-finite loss; stopped before")
    assert not list((tmp_path / "stop").glob("checkpoint-*"))

    _PoisonCall(monkeypatch, BPOObjective, nth=1)
    run = tmp_path / "skip"
    assert main(_bpo(data, run, "train.on_nonfinite=skip")) == 0
    rows = _rows(run)
    assert [r["skipped_updates"] for r in rows] == [1, 0] and rows[0]["loss"] is None
    assert _all_finite(run / "checkpoint-2")


# --------------------------------------------------------------------------------------------------------------
# two ranks: the fault on one rank, the same decision on both


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["fsdp2", "deepspeed"])
def test_two_ranks_take_the_same_decision(kind, tmp_path):
    if kind == "deepspeed":
        pytest.importorskip("deepspeed")
    run_two_ranks([__file__, str(tmp_path), kind], env=_env(), timeout=300)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        # skip: the NaN of rank 1 (and on FSDP2 its inf gradient) dropped everywhere, then training goes on
        assert report["skipped"] == (2 if kind == "fsdp2" else 1), report
        assert report["unchanged_by_skips"] and report["changed_after"], report
        # stop: every rank raises the one message before the optimizer step, nothing applied
        assert report["stop"].startswith("step 9: non-finite loss; stopped before") and report["unchanged_by_stop"]


def _two_rank_worker(out: Path, kind: str) -> None:
    """One rank of test_two_ranks_take_the_same_decision: steps of a tiny Qwen3 where rank 1 alone turns bad."""
    import engine_worker

    from r4b.train.engine import init_distributed

    torch.set_num_threads(1)
    rank, world = init_distributed()
    model = engine_worker.tiny_model()
    config = EngineConfig(kind=kind, zero_stage=2, grad_clip=1.0)
    engine = build_engine(model, engine_worker.param_groups(model), engine_worker.lr_lambda, config)

    def local() -> list[torch.Tensor]:
        return [(p.to_local() if hasattr(p, "to_local") else p).detach().clone() for p in _params(engine)]

    def same(a, b) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    def step(guard: NonFiniteGuard, number: int, *, nan_loss=False, inf_grad=False) -> None:
        guard.begin(number)
        ids = engine_worker.batch(number)[rank::world].to(engine.device)
        loss = guard.module(input_ids=ids, labels=ids).loss
        guard.backward(loss * (float("nan") if nan_loss and rank == 1 else 1.0))
        if inf_grad and rank == 1:  # this rank's shard of one gradient
            shards = [g.to_local() if hasattr(g, "to_local") else g for g in _grads(engine)]
            next(s for s in shards if s.numel()).view(-1)[0] = float("inf")
        guard.step()

    report: dict = {}
    guard = NonFiniteGuard(engine, "skip")
    step(guard, 1)
    before = local()
    step(guard, 2, nan_loss=True)
    skipped = guard.skipped
    if kind == "fsdp2":  # DeepSpeed's gradients sit in its partitions, out of the test's reach
        step(guard, 3, inf_grad=True)
        skipped += guard.skipped
    report["skipped"] = skipped
    report["unchanged_by_skips"] = same(before, local())
    step(guard, 4)
    report["changed_after"] = not same(before, local())
    stopper = NonFiniteGuard(engine, "stop")
    before = local()
    try:
        step(stopper, 9, nan_loss=True)
        report["stop"] = "no error"
    except NonFiniteStep as error:
        report["stop"] = str(error)
    report["unchanged_by_stop"] = same(before, local())
    (out / f"rank{rank}.json").write_text(json.dumps(report))


def _params(engine) -> list[torch.Tensor]:
    return [p for group in engine.optimizer.param_groups for p in group["params"]]


def _grads(engine) -> list[torch.Tensor]:
    return [p.grad for p in _params(engine) if p.grad is not None]


if __name__ == "__main__":
    _two_rank_worker(Path(sys.argv[1]), sys.argv[2])
