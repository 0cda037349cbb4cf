"""bench/fused_loss.py's log-prob kernel competitors: TRL's adapter computes the benchmark's loss (its forward
checked against the materialized one, so its row times the right thing); each competitor has a row in both modes."""

import importlib
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _fused_loss():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module("fused_loss")
    finally:
        sys.path.pop(0)


def test_trl_rows_compute_the_benchmark_loss():
    pytest.importorskip("trl.kernels")
    fused_loss = _fused_loss()
    hidden, weight, targets, batch = fused_loss.make_batch(40, 24, 70, 8, torch.float32, "cpu")
    trl = fused_loss.trl_logprobs_factory()
    with torch.no_grad():
        logp, entropy = trl(hidden, weight, targets, with_entropy=True)
        logp_ref, entropy_ref = fused_loss.materialized_logprobs(hidden, weight, targets, with_entropy=True)
        loss = fused_loss.bpo_loss_on(trl, hidden, weight, targets, batch)
        loss_ref = fused_loss.materialized_bpo_loss(hidden, weight, targets, batch)
    assert (logp - logp_ref).abs().max() < 1e-5 and (entropy - entropy_ref).abs().max() < 1e-5
    assert abs(loss.item() - loss_ref.item()) < 1e-6
    # Not its backward: TRL's imports trl.trainer.utils (~10 s here); the benchmark's warm-up absorbs that.


def test_every_logprob_kernel_is_a_row_in_both_modes():
    fused_loss = _fused_loss()
    fwd_bwd, fwd_only = fused_loss.competitors(fused_loss.parse_args(["--smoke", "--no-compile"]))
    assert {"trl", "cce", "verl"} <= fwd_bwd.keys() & fwd_only.keys()
