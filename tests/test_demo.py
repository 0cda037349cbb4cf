"""The end-to-end demo, shortened: every stage runs and report.json has the documented shape."""

import json

import pytest

from r4b.demo import paper_signature, run_demo


@pytest.fixture(autouse=True)
def torch_reference_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the demo's CPU path; the kernels are checked elsewhere


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
    for stage in ("sft", "bpo", "grpo"):
        assert (tmp_path / stage / "metrics.jsonl").exists() and (tmp_path / stage / "model" / "config.json").exists()
