"""What the benchmarks share (bench/common.py): a failing competitor is an error row, torch.compile per size; and
the autotune pinning the GPU test run relies on (R4B_AUTOTUNE=0)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import bench_module

ROOT = Path(__file__).resolve().parents[2]


def test_error_row_keeps_one_line_and_goes_on(capsys):
    common = bench_module("common")
    rows = []
    for name in ("fails", "works"):
        row = {"impl": name}
        with common.error_row(row):
            if name == "fails":
                raise RuntimeError("backend refused the shape\nsecond line of the message")
            row["ms"] = 1.0
        rows.append(row)
    assert rows == [{"impl": "fails", "error": "RuntimeError: backend refused the shape"}, {"impl": "works", "ms": 1.0}]
    assert "second line of the message" in capsys.readouterr().err  # the whole traceback goes to the log
    with pytest.raises(KeyboardInterrupt), common.error_row({}):
        raise KeyboardInterrupt


def test_build_competitor_defers_the_error_to_its_rows():
    common = bench_module("common")

    def factory(size):
        raise ImportError(f"no backend for {size}")

    fn = common.build_competitor(factory, 7)
    row = {}
    with common.error_row(row):
        fn(1, 2)
    assert row == {"error": "ImportError: no backend for 7"}
    assert common.build_competitor(lambda x: x + 1, 1) == 2


def test_raising_competitor_is_an_error_row_and_the_results_still_write(tmp_path, monkeypatch):
    """fused_loss with liger raising at run time, torch.compile raising at build time and a log-prob kernel whose
    package is missing: all become error rows with the exception's one-line text, every other row is timed, the
    table prints and the JSON is written."""
    # Imported first: Triton picks the interpreter when r4b.kernels is imported (conftest's TRITON_INTERPRET=1),
    # and a later test must find it so. Then the torch references: a check of the bookkeeping, not a timing.
    fused_loss = bench_module("fused_loss")
    monkeypatch.setenv("TRITON_INTERPRET", "0")

    def liger_factory(compiled, seq_len):
        def loss(*_):
            raise RuntimeError("liger exploded\nat some depth")

        return loss

    def compile_factory(fn, **kwargs):
        raise IndexError("dynamo guard index out of range")

    monkeypatch.setattr(fused_loss, "liger_bpo_loss_factory", liger_factory)
    monkeypatch.setattr(fused_loss, "compile_fresh", compile_factory)

    def missing_package():
        raise ModuleNotFoundError("No module named 'verl'")

    monkeypatch.setattr(fused_loss, "LOGPROB_COMPETITORS", {"verl": missing_package})
    assert fused_loss.main(["--smoke", "--out", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("fused_loss-*.json")
    record = json.loads(result.read_text())
    sizes = [48, 96]
    errors = {(r["impl"], r["mode"], r["N"]): r["error"] for r in record["rows"] if "error" in r}
    assert errors == {
        **{("liger", "fwd+bwd", n): "RuntimeError: liger exploded" for n in sizes},
        **{("torch.compile", mode, n): "IndexError: dynamo guard index out of range"
           for mode in ("fwd+bwd", "fwd logprobs") for n in sizes},
        **{("verl", mode, n): "ModuleNotFoundError: No module named 'verl'"
           for mode in ("fwd+bwd", "fwd logprobs") for n in sizes},
    }  # fmt: skip
    timed = {(r["impl"], r["mode"], r["N"]) for r in record["rows"] if "ms" in r}
    modes = ("fwd+bwd", "fwd logprobs")
    assert timed == {(impl, mode, n) for impl in ("r4b", "torch") for mode in modes for n in sizes}
    assert {r["vs"] for r in record["ratios"]} == {"torch"}


def test_compile_fresh_never_recompiles_across_sizes(monkeypatch):
    """A fresh compile per size: no recompilation, which is where dynamo's guards broke a whole run once."""
    common = bench_module("common")
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)

    def f(x):
        return (x * 2).sum()

    try:
        for n in (3, 5, 9):
            assert float(common.compile_fresh(f, backend="eager")(torch.ones(n))) == 2 * n
        reused = common.compile_fresh(f, backend="eager")
        reused(torch.ones(3))
        with pytest.raises(Exception, match=r"[Rr]ecompil"):  # the control: one compiled function, a new shape
            reused(torch.ones(4))
    finally:
        torch._dynamo.reset()


_COUNT_CONFIGS = """
import importlib, json, triton
counts = {}
for name in ("r4b.kernels.varlen_attention", "r4b.kernels.linear_logprobs"):
    module = importlib.import_module(name)
    for attr, value in vars(module).items():
        if isinstance(value, triton.runtime.autotuner.Autotuner):
            counts[attr] = [(c.kwargs, c.num_warps, c.num_stages) for c in value.configs]
print(json.dumps(counts))
"""


def _autotune_configs(pin: str | None) -> dict:
    """Each autotuned kernel's configs as compiled for a GPU (TRITON_INTERPRET=0), with R4B_AUTOTUNE=pin."""
    env = {k: v for k, v in os.environ.items() if k != "R4B_AUTOTUNE"}
    env |= {"TRITON_INTERPRET": "0", **({"R4B_AUTOTUNE": pin} if pin is not None else {})}
    out = subprocess.run([sys.executable, "-c", _COUNT_CONFIGS], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.subprocess
def test_autotune_pinning_selects_one_config():
    full, pinned = _autotune_configs(None), _autotune_configs("0")
    kernels = {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_logprobs_fwd_kernel", "_dlogits_kernel"}
    assert full.keys() == pinned.keys() == kernels
    assert {name: len(configs) for name, configs in full.items()} == {
        "_fwd_kernel": 3, "_bwd_dkdv_kernel": 2, "_bwd_dq_kernel": 2, "_logprobs_fwd_kernel": 5, "_dlogits_kernel": 5,
    }  # fmt: skip
    for name in kernels:
        (config,) = pinned[name]
        assert config in full[name], name  # one of the tuned configs, not a test-only one
    # the smallest tiles, so a lone (never benchmarked) config fits fp32 and head_dim 128
    assert pinned["_fwd_kernel"][0][0] == {"BLOCK_M": 128, "BLOCK_N": 32}
    assert pinned["_bwd_dq_kernel"][0][0] == {"BLOCK_M": 32, "BLOCK_N": 64}
    assert pinned["_logprobs_fwd_kernel"][0][0] == {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 32}
    assert _autotune_configs("1") == full


@pytest.mark.subprocess
def test_gpu_report_records_steps_and_summarises_runs(tmp_path):
    """scripts/gpu_report.py, the bookkeeping of scripts/gpu_checks.sh: a step's JSON line carries the line of its
    output that says most (pytest's result, "wrote ..."), and a run directory's metrics become one JSON line."""
    report = [sys.executable, str(ROOT / "scripts" / "gpu_report.py")]
    jsonl = tmp_path / "steps.jsonl"
    outputs = {
        "kernel-tests": "collecting\n....F.\n= short test summary =\nFAILED x\n1 failed, 5 passed in 12.31s\n",
        "fused_loss": "{'impl': 'r4b'}\nwrote /out/fused_loss-h100.json\n",
        "sft": "step 1\nrun directory: runs/gpu/sft\n",
    }
    for name, text in outputs.items():
        (tmp_path / f"{name}.out").write_text(text)
        rc = "1" if name == "kernel-tests" else "0"
        subprocess.run([*report, "record", jsonl, name, "ok", rc, "7", "60", tmp_path / f"{name}.out"], check=True)
    entries = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(e["step"], e["rc"], e["seconds"], e["limit_s"], e["summary"]) for e in entries] == [
        ("kernel-tests", 1, 7, 60, "1 failed, 5 passed in 12.31s"),
        ("fused_loss", 0, 7, 60, "wrote /out/fused_loss-h100.json"),
        ("sft", 0, 7, 60, "run directory: runs/gpu/sft"),
    ]
    table = subprocess.run([*report, "table", jsonl], capture_output=True, text=True, check=True).stdout
    assert "1 failed, 5 passed" in table and len(table.splitlines()) == 4

    run_dir = tmp_path / "run"
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "model" / "config.json").write_text("{}")
    (run_dir / "checkpoint-2" / "engine").mkdir(parents=True)
    (run_dir / "checkpoint-2" / "engine" / "shard.distcp").write_bytes(b"\0" * 2**20)  # its size is reported
    metrics = [{"step": 1, "loss": 2.0, "tokens_per_s": 100.0}, {"step": 2, "loss": 1.5, "tokens_per_s": 300.0}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    out = subprocess.run([*report, "run", run_dir], capture_output=True, text=True, check=True).stdout
    summary = json.loads(out)
    assert summary["steps"] == 2 and (summary["loss_first"], summary["loss_last"]) == (2.0, 1.5)
    assert summary["tokens_per_s_mean"] == 200.0 and summary["exported"] and summary["checkpoints"] == ["checkpoint-2"]
    assert summary["checkpoint_gib"] == 2**-10


def test_results_stream_each_row_and_keep_them_when_terminated(tmp_path):
    """Results.add appends the row to the rows JSONL and rewrites the suite's JSON at once; a SIGTERM mid-suite ends
    it through its finally-blocks with the rows so far, marked interrupted, and the handler is put back."""
    import signal

    common = bench_module("common")
    before = signal.getsignal(signal.SIGTERM)
    results = common.Results("demo", tmp_path, ("liger-kernel",), {"sizes": [1]})
    seen = []

    def measure():
        for i in range(3):
            results.add("rows", {"impl": f"impl-{i}", "ms": 1.0})
            lines = results.rows_path.read_text().splitlines()
            seen.append((len(lines), json.loads(results.path.read_text())["status"]))
            if i == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    status = results.run(measure)
    path = results.finish(status)
    assert status == "interrupted: SIGTERM" and common.exit_code(status) == 143
    assert seen == [(1, "running"), (2, "running")]  # each row on disk the moment it was added
    record = json.loads(path.read_text())
    assert record["status"] == status and [r["impl"] for r in record["rows"]] == ["impl-0", "impl-1"]
    lines = [json.loads(line) for line in results.rows_path.read_text().splitlines()]
    assert [(line["suite"], line["section"], line["impl"]) for line in lines] == [
        ("demo", "rows", "impl-0"),
        ("demo", "rows", "impl-1"),
    ]
    assert {"torch", "triton", "r4b", "cuda", "liger-kernel"} <= lines[0]["versions"].keys()
    assert lines[0]["device"] == record["device"] and "measured_at" in lines[0]
    assert signal.getsignal(signal.SIGTERM) is before


def test_within_tolerance_needs_every_bounded_error_under_its_bound():
    common = bench_module("common")
    bounds = {"a": 1e-3, "b": 1e-2}
    assert common.within_tolerance({"a": 1e-4, "b": 1e-2, "c": 5.0}, bounds)
    assert not common.within_tolerance({"a": 1e-4, "b": 2e-2}, bounds)
    assert not common.within_tolerance({"a": float("nan")}, bounds)  # NaN never passes
    assert not common.within_tolerance({}, bounds)  # nothing checked is not a pass
