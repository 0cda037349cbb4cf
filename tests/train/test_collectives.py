"""Two ranks on gloo as they would run on NCCL: every tensor r4b hands to a collective is on the engine's device.

Gloo reduces CPU tensors, so a CPU tensor where NCCL needs a GPU one passes here unnoticed (``r4b sft`` all-reduced
a CPU float64 loss sum and failed at the end of step 1 on GPUs). The check therefore looks at where r4b *made*
each tensor: :class:`CollectiveAudit` tags the tensors that r4b's own code creates with a factory function and no
``device=`` (``torch.zeros(())`` lands on the default device, the CPU, whatever the engine's device) or moves to
the CPU with ``.cpu()``, and wraps torch.distributed's collectives: every tensor handed to one must be on the
engine's device and untagged. The same run checks more of what differs on GPUs (tests/train/test_mixed_precision.py has
the one-process checks):

- FSDP2 in bf16, with a micro-batch without an image on one rank (the vision tower still runs on every rank,
  on a blank image contributing zero; without it the ranks' parameter gathers pair up wrongly and the run
  fails or hangs until the process-group timeout, ``engine.timeout_minutes``, set to minutes here);
- the BPO update's fp32 inputs (old / ref log-probs, advantages) reach the objective's forward in fp32, not
  rounded to bf16 by FSDP2's input casting;
- the bf16 runs track the fp32 one-process run within :data:`LOSS_RTOL`.

Run as a test (pytest) or, per rank, as the worker: ``python tests/train/test_collectives.py OUT -- r4b-args...``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
R4B_SOURCES = (str(ROOT / "r4b") + os.sep,)
TAG = "_r4b_made_on_cpu"
COLLECTIVES = (
    "all_reduce", "all_reduce_coalesced", "broadcast", "all_gather", "all_gather_single", "all_gather_into_tensor",
    "all_gather_coalesced", "reduce_scatter", "reduce_scatter_single", "reduce_scatter_tensor", "all_to_all",
    "all_to_all_single", "reduce", "gather", "scatter", "send", "recv", "isend", "irecv",
)  # fmt: skip
# (tensor collectives, FSDP2's own included; object collectives pickle into tensors torch makes itself)
FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint", "linspace", "eye")

# bf16 against fp32 on the tiny model (3 steps / 2 BPO steps): relative difference of the logged losses
LOSS_RTOL = 2e-2


def _r4b_caller(depth: int = 2) -> str | None:
    """``file:line`` of the calling frame when it is r4b's code (under r4b/), else None."""
    frame = sys._getframe(depth)
    name = frame.f_code.co_filename
    return f"{name}:{frame.f_lineno}" if name.startswith(R4B_SOURCES) else None


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


class CollectiveAudit:
    """Context manager: tags tensors r4b creates on the default device (or moves to the CPU), and checks every
    tensor given to a torch.distributed collective. ``violations``: what was wrong, with r4b's call site;
    ``checked``: collective calls seen, ``r4b_calls``: those made by r4b's own code."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.violations: list[str] = []
        self.checked = 0
        self.r4b_calls: list[str] = []
        self._saved: list[tuple[object, str, object]] = []

    def _patch(self, owner, name: str, make) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return
        self._saved.append((owner, name, original))
        setattr(owner, name, make(original))

    def _factory(self, original):
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            out = original(*args, **kwargs)
            where = _r4b_caller() if kwargs.get("device") is None else None
            if where is not None and isinstance(out, torch.Tensor):
                setattr(out, TAG, f"made without device= at {where}")
            return out

        return wrapper

    def _cpu(self, original):
        @functools.wraps(original)
        def wrapper(self_, *args, **kwargs):
            out = original(self_, *args, **kwargs)
            where = _r4b_caller()
            if where is not None:
                if out is self_:  # already on the CPU: tag an alias, never the caller's own tensor
                    out = out.view_as(out)
                setattr(out, TAG, f"moved to the CPU at {where}")
            return out

        return wrapper

    def _to(self, original):
        @functools.wraps(original)
        def wrapper(self_, *args, **kwargs):
            out = original(self_, *args, **kwargs)
            moved = "device" in kwargs or any(isinstance(a, str | torch.device) for a in args)
            if out is self_ and moved and hasattr(self_, TAG):
                out = out.view_as(out)  # .to(engine.device) is a no-op on the CPU: the result counts as moved
            return out

        return wrapper

    def _collective(self, name: str, original):
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            self.checked += 1
            where = _r4b_caller()
            if where is not None:
                self.r4b_calls.append(f"{name} at {where}")
            for t in _tensors(list(args) + list(kwargs.values())):
                if t.device != self.device:
                    self.violations.append(f"{name}: a tensor on {t.device}, not {self.device} ({where})")
                if hasattr(t, TAG):
                    self.violations.append(f"{name}: a tensor {getattr(t, TAG)} ({where})")
            return original(*args, **kwargs)

        return wrapper

    def __enter__(self) -> CollectiveAudit:
        for name in FACTORIES:
            self._patch(torch, name, self._factory)
        self._patch(torch.Tensor, "cpu", self._cpu)
        self._patch(torch.Tensor, "to", self._to)
        for name in COLLECTIVES:
            self._patch(dist, name, functools.partial(self._collective, name))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()


def _record_rl_input_dtypes(seen: dict[str, set[str]]):
    """Wrap BPOObjective.forward: the dtypes of the RL inputs as the forward receives them (after FSDP2's hooks)."""
    from r4b.rl.update import BPOObjective

    original = BPOObjective.forward

    def forward(self, *args, **kwargs):
        for name in ("advantages", "old_logprobs", "ref_logprobs"):
            if kwargs.get(name) is not None:
                seen.setdefault(name, set()).add(str(kwargs[name].dtype))
        return original(self, *args, **kwargs)

    BPOObjective.forward = forward


def worker(out: Path, argv: list[str]) -> None:
    """One rank: run ``r4b argv`` under the audit; write what it saw to ``out/rank<r>.json``."""
    from r4b.cli import main
    from r4b.train.engine import _device

    seen: dict[str, set[str]] = {}
    _record_rl_input_dtypes(seen)
    with CollectiveAudit(_device()) as audit:
        code = main(argv)
    report = {
        "code": code,
        "violations": audit.violations,
        "checked": audit.checked,
        "r4b_calls": audit.r4b_calls,
        "rl_input_dtypes": {k: sorted(v) for k, v in seen.items()},
    }
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(report, indent=1))
    sys.exit(code)


# --------------------------------------------------------------------------------------------------------------
# tests


def test_the_audit_catches_a_cpu_tensor_made_by_r4b_code(tmp_path, monkeypatch):
    """What ``r4b sft`` did (``torch.zeros((), dtype=float64)``, then ``all_reduce``) is a violation, and
    ``torch.zeros(..., device=engine.device)`` or ``.to(engine.device)`` is not; torch's own tensors are not
    tagged. A fake r4b module stands in for the trainer (its file is under r4b/)."""
    fake = ROOT / "r4b" / "_audit_probe_test_only.py"
    fake.write_text(
        "import torch\nimport torch.distributed as dist\n\n"
        "def bad():\n    s = torch.zeros((), dtype=torch.float64)\n    s += 1\n    dist.all_reduce(s)\n\n"
        "def moved(device):\n    s = torch.zeros(3)\n    dist.all_reduce(s.to(device))\n\n"
        "def good(device):\n    s = torch.zeros((), device=device)\n    dist.all_reduce(s)\n\n"
        "def to_cpu(device):\n    s = torch.ones(2, device=device).cpu()\n    dist.all_reduce(s)\n"
    )
    try:
        import importlib

        monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: None)  # no process group needed
        probe = importlib.import_module("r4b._audit_probe_test_only")
        device = torch.device("cpu")
        with CollectiveAudit(device) as audit:
            probe.good(device)
            probe.moved(device)
            torch.zeros(2)  # torch's or a test's own: not r4b's
        assert audit.violations == [] and audit.checked == 2 and len(audit.r4b_calls) == 2
        for case in (probe.bad, lambda: probe.to_cpu(device)):
            with CollectiveAudit(device) as audit:
                case()
            assert len(audit.violations) == 1 and "_audit_probe_test_only.py" in audit.violations[0]
        assert torch.zeros is not None and dist.all_reduce.__name__ == "<lambda>"  # restored on exit
    finally:
        fake.unlink()
        sys.modules.pop("r4b._audit_probe_test_only", None)


def _text_only(line: str) -> str:
    record = json.loads(line)
    record.pop("images", None)
    for message in record["messages"]:
        if isinstance(message["content"], list):
            message["content"] = [c for c in message["content"] if c.get("type") != "image"]
    return json.dumps(record)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from r4b.synth import write_synthetic

    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, n_sft=4, n_rl=4, n_eval=2, seed=0)
    lines = (out / "sft.jsonl").read_text().splitlines()
    # one sample with an image, three without: the rank without it runs micro-batches with no image
    (out / "mixed.jsonl").write_text("\n".join([lines[0]] + [_text_only(x) for x in lines[1:4]]) + "\n")
    return out


def _env() -> dict[str, str]:
    return {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def _run(kind: str, args: list[str], out: Path, *, ranks: int) -> list[dict]:
    """``r4b kind args`` in one process (in this one) or on two ranks under the audit; the metrics rows."""
    out.mkdir(parents=True)
    if ranks == 1:
        from r4b.cli import main

        assert main([kind, *args]) == 0
    else:
        from helpers import run_two_ranks

        run_two_ranks([__file__, str(out), "--", kind, *args], env=_env(), cwd=ROOT, timeout=400, fresh=out / "run")
    return [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]


def _reports(out: Path) -> list[dict]:
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["code"] == 0 and report["violations"] == [], report["violations"]
        assert report["checked"] > 0 and report["r4b_calls"], "the audit saw no collective of r4b's"
    return reports


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= LOSS_RTOL * max(abs(a), abs(b), 1e-3)


@pytest.mark.multiprocess
def test_sft_fsdp2_bf16_two_ranks_one_without_images(data, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    config = str(ROOT / "configs" / "demo" / "sft.yaml")
    common = [
        f"data.train=[{data / 'mixed.jsonl'}]", "data.max_tokens=160", "train.global_batch_samples=4",
        "train.max_steps=3", "train.progress=false", "train.tensorboard=false", "train.export=false",
    ]  # fmt: skip
    fp32 = _run(
        "sft", ["--config", config, f"output_dir={tmp_path / 'one' / 'run'}", *common], tmp_path / "one", ranks=1
    )
    two = [
        "--config", config, f"output_dir={tmp_path / 'two' / 'run'}", *common, "engine.kind=fsdp2",
        "engine.mixed_precision=bf16", "engine.timeout_minutes=3",
    ]  # fmt: skip
    bf16 = _run("sft", two, tmp_path / "two", ranks=2)
    reports = _reports(tmp_path / "two")
    assert any("all_reduce" in c and "sft.py" in c for c in reports[0]["r4b_calls"])  # the loss sum
    assert [r["step"] for r in bf16] == [1, 2, 3]
    for a, b in zip(fp32, bf16, strict=True):
        assert a["tokens"] == b["tokens"] and a["samples"] == b["samples"]
        assert _close(a["loss"], b["loss"]), (a["loss"], b["loss"])


@pytest.mark.multiprocess
def test_bpo_fsdp2_bf16_two_ranks_keeps_rl_inputs_fp32(data, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    config = str(ROOT / "configs" / "demo" / "bpo.yaml")
    common = [
        "model.path=null", f"data.prompts=[{data / 'rl.jsonl'}]", "data.eval=null", "rollout.group_size=2",
        "rollout.max_new_tokens=6", "rollout.prompts_per_call=2", "train.prompts_per_step=4", "train.steps=4",
        "train.max_steps=2", "train.progress=false", "train.tensorboard=false", "train.export=false",
        "policy.beta=0.01", "policy.mini_batches=2",  # ref log-probs, and old log-probs computed before the update
        "reward.name=format",  # rewards that differ within a group on the untrained model: non-zero advantages
    ]  # fmt: skip
    fp32 = _run(
        "bpo", ["--config", config, f"output_dir={tmp_path / 'one' / 'run'}", *common], tmp_path / "one", ranks=1
    )
    two = [
        "--config", config, f"output_dir={tmp_path / 'two' / 'run'}", *common, "engine.kind=fsdp2",
        "engine.mixed_precision=bf16", "engine.timeout_minutes=3",
    ]  # fmt: skip
    bf16 = _run("bpo", two, tmp_path / "two", ranks=2)
    for report in _reports(tmp_path / "two"):
        assert report["rl_input_dtypes"] == {
            "advantages": ["torch.float32"],
            "old_logprobs": ["torch.float32"],
            "ref_logprobs": ["torch.float32"],
        }
    assert [r["step"] for r in bf16] == [1, 2] and all(math.isfinite(r["loss"]) for r in bf16)
    # step 1 rolls out from the same fp32 weights (FSDP2's rollout copy): the same rewards, so comparable losses
    a, b = fp32[0], bf16[0]
    assert (a["reward"], a["tokens"]) == (b["reward"], b["tokens"]) and a["zero_adv_groups"] < 1
    assert _close(a["loss"], b["loss"]), (a["loss"], b["loss"])


if __name__ == "__main__":
    split = sys.argv.index("--")
    worker(Path(sys.argv[1]), sys.argv[split + 1 :])
