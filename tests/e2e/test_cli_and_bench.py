"""The console entry point and the benchmark's CPU smoke run."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import bench_module

import r4b
from r4b.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_help_and_version(capsys):
    assert main([]) == 0
    assert "info" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert r4b.__version__ in capsys.readouterr().out


@pytest.mark.subprocess
def test_console_script_is_installed():
    out = subprocess.run([Path(sys.executable).parent / "r4b", "info", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["r4b"] == r4b.__version__ and "torch" in info


def test_fused_loss_benchmark_smoke(tmp_path):
    fused_loss = bench_module("fused_loss")
    # the loss-type rows of two types whose tokens share a sequence's ratio or weight (the smoke runs all 13)
    loss_types = ["--loss-types", "grpo/sequence", "vespo"]
    assert fused_loss.main(["--smoke", "--no-compile", *loss_types, "--out", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("fused_loss-*.json")
    record = json.loads(result.read_text())
    assert {"suite", "device", "torch", "triton", "cuda", "date", "command", "rows"} <= record.keys()
    impls = {row["impl"] for row in record["rows"] if "ms" in row}
    trl = {"trl"} if importlib.util.find_spec("trl") else set()  # the dev extra installs TRL from Python 3.11
    assert {"r4b", "torch", "liger"} | trl <= impls
    # cut-cross-entropy and verl run on CUDA only (or are not installed): error rows there, never a crash
    assert {(row["impl"], row["mode"]) for row in record["rows"] if "error" in row} <= {
        (impl, mode) for impl in ("cce", "verl") for mode in ("fwd+bwd", "fwd logprobs")
    }
    assert {r["vs"] for r in record["ratios"]} == impls - {"r4b", "r4b-cublas", "r4b-cublas-fast"}
    assert record["status"] == "complete"
    for row in (r for r in record["rows"] if "ms" in r):  # each timed row checked, and what ran recorded
        assert row["within_tolerance"] is True, row
        assert {"method", "versions", "device"} <= row.keys()
    typed = record["loss_type_rows"]
    assert {(r["loss_type"], r["level"]) for r in typed} == {("grpo", "sequence"), ("vespo", "token")}
    assert {r["impl"] for r in typed} == {"r4b", "r4b-cublas", "liger"} | trl
    assert all(r["within_tolerance"] is True for r in typed), typed
    assert {(r["loss_type"], r["vs"]) for r in record["loss_type_ratios"]} == {
        (t, vs) for t in ("grpo", "vespo") for vs in {"r4b-cublas", "liger"} | trl
    }
    (rows_file,) = tmp_path.glob("rows-*.jsonl")
    assert len(rows_file.read_text().splitlines()) == len(record["rows"]) + len(typed)


def test_attention_benchmark_smoke(tmp_path):
    attention = bench_module("attention")
    assert attention.main(["--smoke", "--out", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("attention-*.json")
    record = json.loads(result.read_text())
    assert {row["mask"] for row in record["rows"]} == {"causal-docs", "vision-tiles", "shared-prefix"}
    (shared, unshared) = (
        next(r for r in record["bpo_rows"] if r["mask"] == m and r["mode"] == "fwd")
        for m in ("shared-prefix", "unshared")
    )
    assert shared["tokens"] < unshared["tokens"] and shared["visible_pairs"] < unshared["visible_pairs"]
    assert any(r["vs"] == "sdpa-dense-mask" for r in record["ratios"])
    timed = [r for r in record["rows"] + record["bpo_rows"] if "ms" in r]
    assert {r["impl"] for r in timed} == {"r4b-schedule", "r4b-kernel", "r4b", "sdpa-dense-mask"}
    assert [r["impl"] for r in timed][:2] == ["r4b-schedule", "r4b-schedule"]  # the new rows first
    for row in timed:  # each timed row checked against float64, and the kernel that ran named
        assert row["within_tolerance"] is True and row["max_rel_err"] < 1e-5, row
        assert row["backend"] and "versions" in row


def test_sft_step_benchmark_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the torch references: a check that it runs, not a timing
    sft_step = bench_module("sft_step")
    assert sft_step.main(["--smoke", "--out", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("sft_step-*.json")
    record = json.loads(result.read_text())
    rows = {row["impl"]: row for row in record["rows"]}
    assert rows.keys() == {"r4b", "hf-padded"}
    assert rows["r4b"]["tokens"] == rows["hf-padded"]["tokens"] and rows["r4b"]["pad_frac"] == 0
    assert record["ratios"][0]["vs"] == "hf-padded" and record["ratios"][0]["r4b_speedup"] > 0


def test_full_size_models_build():
    """The GPU shapes (bench/sft_step.py's Qwen3-0.6B-sized model, scripts/make_random_model.py's ~1.2B preset)
    build: on the meta device, so no memory and no time; a config whose per-layer fields do not match the layer
    count fails here, not on the GPU."""
    import torch
    import yaml

    from r4b.models.r4b_model import RForConditionalGeneration

    sft_step = bench_module("sft_step")
    with torch.device("meta"):
        model = RForConditionalGeneration(sft_step.full_size_config())
    assert len(model.model.language_model.layers) == 28
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        make_random_model = importlib.import_module("make_random_model")
    finally:
        sys.path.pop(0)
    model = make_random_model.build_model("1b", device="meta")
    assert 1.1e9 < sum(p.numel() for p in model.parameters()) < 1.3e9
    text = model.config.text_config
    assert (text.num_hidden_layers, len(text.layer_types), text.vocab_size, text.head_dim) == (10, 10, 151936, 128)
    assert model.config.vision_config.hidden_size // model.config.vision_config.num_attention_heads == 72
    # the GPU checks' training runs: the same attention shapes, a checkpoint of ~1 GB (12 bytes a parameter: fp32
    # masters and AdamW's two moments), not the 1b preset's ~15 GB
    small = make_random_model.build_model("small", device="meta")
    assert sum(p.numel() for p in small.parameters()) * 12 < 1.1e9
    text, vision = small.config.text_config, small.config.vision_config
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (16, 8, 128)
    assert (vision.num_attention_heads, vision.hidden_size // vision.num_attention_heads) == (16, 72)
    for stage in ("sft", "bpo"):
        config = yaml.safe_load((ROOT / "configs" / "gpu" / f"{stage}.yaml").read_text())
        assert config["model"]["path"] == "runs/gpu/model"
    assert "--out runs/gpu/model --preset $preset" in (ROOT / "scripts" / "gpu_checks.sh").read_text()


@pytest.mark.subprocess
def test_random_model_directory_loads(tmp_path):
    """scripts/make_random_model.py writes a directory that model.path loads (the tiny preset: fast)."""
    from r4b.models.loading import load_model_and_processor

    script = ROOT / "scripts" / "make_random_model.py"
    out = subprocess.run(
        [sys.executable, script, "--out", tmp_path / "m", "--preset", "tiny", "--device", "cpu"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    model, tokenizer, _ = load_model_and_processor(tmp_path / "m")
    assert model.config.model_type == "rvl" and len(tokenizer) <= model.config.text_config.vocab_size


@pytest.mark.subprocess
def test_cuda_module_imports_torch_before_its_extension(tmp_path):
    """``import r4b._cuda`` alone works: r4b/_cuda.py imports torch (whose libc10 / libtorch the compiled
    extension links against) before ``r4b._cuda_ext``. Checked with a stand-in extension that fails unless torch
    is already loaded; on a CPU the real one is absent and the import raises ImportError (r4b.shared_prefix then
    runs its torch implementation)."""
    (tmp_path / "_cuda_ext.py").write_text(
        "import sys\n"
        "assert 'torch' in sys.modules, 'the extension was loaded before torch'\n"
        "pack_shared_prefix = unpack_responses = object()\n"
    )
    code = (
        "import sys, r4b\n"
        f"r4b.__path__.append({str(tmp_path)!r})\n"
        "assert 'torch' not in sys.modules\n"
        "import r4b._cuda\n"
        "print(r4b._cuda.pack_shared_prefix is r4b._cuda_ext.pack_shared_prefix)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr
    missing = subprocess.run([sys.executable, "-c", "import r4b._cuda"], capture_output=True, text=True)
    if missing.returncode != 0:  # no CUDA build here: only the extension is missing
        assert "No module named 'r4b._cuda_ext'" in missing.stderr, missing.stderr
