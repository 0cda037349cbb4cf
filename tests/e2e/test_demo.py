"""The end-to-end demo, shortened: every stage runs and report.json has the documented shape."""

import json

import pytest

from r4b.demo import paper_signature, run_demo, sweep_table

pytestmark = pytest.mark.usefixtures("torch_reference_kernels")  # tests/conftest.py


@pytest.mark.demo
def test_quick_demo_writes_the_report(tmp_path):
    run_demo(tmp_path, quick=True)
    report = json.loads((tmp_path / "report.json").read_text())
    for model in ("annealed", "bpo", "grpo"):
        for mode in ("auto", "thinking", "non_thinking"):
            metrics = report["models"][model][mode]
            assert {"accuracy", "trigger_rate", "mean_tokens"} <= metrics.keys()
            for difficulty in ("easy", "hard"):
                assert {"accuracy", "trigger_rate", "mean_tokens"} <= metrics["by_difficulty"][difficulty].keys()
        assert (
            report["models"][model]["thinking"]["trigger_rate"]
            >= report["models"][model]["non_thinking"]["trigger_rate"]
        )
    assert set(report["paper_signature"]) == set(paper_signature(report))
    assert report["seconds"] > 0 and isinstance(report["forced_mode_flags"], list)
    for stage in ("sft", "bpo", "grpo"):
        assert (tmp_path / stage / "metrics.jsonl").exists() and (tmp_path / stage / "model" / "config.json").exists()


def _report(gap: float, forced_thinking: float) -> dict:
    """A report whose signature values are known: BPO auto 0.8 accurate with 10 tokens, thinking 0.8 and 20 tokens
    (forced-thinking trigger rate ``forced_thinking``), non-thinking 0.3; annealed auto 0.5."""
    bpo = {
        "auto": {"accuracy": 0.8, "mean_tokens": 10.0, "by_difficulty": {"easy": {"trigger_rate": 0.1},
                                                                         "hard": {"trigger_rate": 0.1 + gap}}},
        "thinking": {"accuracy": 0.8, "mean_tokens": 20.0, "trigger_rate": forced_thinking},
        "non_thinking": {"accuracy": 0.3, "mean_tokens": 5.0, "trigger_rate": 0.0},
    }  # fmt: skip
    return {"models": {"bpo": bpo, "annealed": {"auto": {"accuracy": 0.5}}}}


@pytest.mark.demo
def test_sweep_table(tmp_path):
    """scripts/demo_sweep.sh's table: one row per seed, a target not met in bold, a seed without a report listed."""
    for seed, (gap, forced) in {0: (0.8, 1.0), 1: (0.2, 0.469)}.items():
        (tmp_path / f"seed-{seed}").mkdir()
        (tmp_path / f"seed-{seed}" / "report.json").write_text(json.dumps(_report(gap, forced)))
        (tmp_path / f"seed-{seed}" / "seconds").write_text("270\n")
    lines = sweep_table(tmp_path, [0, 1, 2]).splitlines()
    assert lines[2] == "| 0 | +0.800 | +0.000 | 0.500 | +0.300 | 1.000 / 0.000 | 4/4 | 4.5 |"
    assert lines[3] == "| 1 | **+0.200** | +0.000 | 0.500 | +0.300 | 0.469 / 0.000 | 3/4 | 4.5 |"
    assert lines[4] == "| 2 | - | - | - | - | - | - | - |"
    assert lines[-1].endswith("All four met on seeds [0] of [0, 1, 2].")
