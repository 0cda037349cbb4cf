"""LoRA (``model.lora``) on the sharded engines with 2 gloo ranks: FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 checkpoints hold
the adapters only and resume bit for bit (FSDP2's and ZeRO-2's on 1 rank too); 2 FSDP2 ranks give the one-process
run, for ``r4b sft`` and for ``r4b bpo`` with the KL to the reference (the base: the policy with its adapters off)
and the rollout copy fed merged weights.

The 2-rank runs share one torchrun launch (this file is its worker)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import DEMO_BPO, DEMO_SFT, run_two_ranks, synthetic_data, tiny_bpo  # noqa: E402

LORA = ("model.lora.rank=4", "model.lora.alpha=8")
SFT_KINDS = ("fsdp2", "deepspeed", "zero3")
ENGINE = {"zero3": ("engine.kind=deepspeed", "engine.zero_stage=3")}  # the others: engine.kind=<kind>


def sft_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["sft", "--config", str(DEMO_SFT), "--output-dir", str(out), f"data.train=[{data / 'sft.jsonl'}]", *LORA,
            "data.max_tokens=300", "train.global_batch_samples=4", "train.max_steps=3", "train.save_every=1",
            "train.keep_checkpoints=3", "train.progress=false", "train.tensorboard=false", "optim.weight_decay=0.1",
            "engine.timeout_minutes=3", *extra]  # fmt: skip


def bpo_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["bpo", "--config", str(DEMO_BPO), *tiny_bpo(data, out), *LORA, "policy.beta=0.1", "train.max_steps=2",
            "engine.timeout_minutes=3", *extra]  # fmt: skip


def worker(out: Path, data: Path) -> None:
    """One rank: each sharded engine's SFT run and its resume from step 1, then BPO on FSDP2; exit codes to
    ``out/rank<r>.json``."""
    from r4b.cli import main

    codes = {}
    for kind in SFT_KINDS:
        engine = ENGINE.get(kind, (f"engine.kind={kind}",))
        full = main(sft_args(data, out / kind, *engine))
        resume = f"train.resume={out / kind / 'checkpoint-1'}"
        codes[kind] = [full, main(sft_args(data, out / f"{kind}-resumed", *engine, resume))]
    codes["bpo"] = [main(bpo_args(data, out / "bpo", "engine.kind=fsdp2"))]
    # bf16: the frozen base in bf16 beside fp32 adapters in one FSDP2 unit, the reference pass its first forward
    codes["bpo-bf16"] = [main(bpo_args(data, out / "bpo-bf16", "engine.kind=fsdp2", "engine.mixed_precision=bf16"))]
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(codes))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthetic_data(tmp_path_factory, n_sft=8, n_rl=8)


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora-engines")
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    run_two_ranks([__file__, str(out), str(data)], env=env, cwd=ROOT, timeout=500)
    for rank in range(2):
        codes = json.loads((out / f"rank{rank}.json").read_text())
        assert codes == {**{kind: [0, 0] for kind in SFT_KINDS}, "bpo": [0], "bpo-bf16": [0]}, codes
    return out


@pytest.fixture(scope="module")
def one_rank(data, tmp_path_factory) -> dict[str, Path]:
    """The same SFT and BPO runs in one process on the single engine."""
    from r4b.cli import main

    out = tmp_path_factory.mktemp("lora-one")
    with pytest.MonkeyPatch.context() as patch:  # the kernels' torch references, as the ranks run them
        patch.setenv("TRITON_INTERPRET", "0")
        assert main(sft_args(data, out / "sft")) == 0
        assert main(bpo_args(data, out / "bpo")) == 0
    return {"sft": out / "sft", "bpo": out / "bpo"}


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", SFT_KINDS)
def test_sharded_lora_checkpoints_resume_exactly(two_ranks, kind):
    full, resumed = metrics(two_ranks / kind), metrics(two_ranks / f"{kind}-resumed")
    assert [m["step"] for m in resumed] == [2, 3]
    for a, b in zip(full[1:], resumed, strict=True):
        assert (a["loss"], a["grad_norm"], a["lrs"]) == (b["loss"], b["grad_norm"], b["lrs"])
    expected, got = weights(two_ranks / kind / "model"), weights(two_ranks / f"{kind}-resumed" / "model")
    assert set(expected) == set(got) and all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["fsdp2", "deepspeed"])
def test_a_lora_checkpoint_resumes_on_another_number_of_ranks(two_ranks, data, tmp_path, kind):
    """A 2-rank FSDP2 or DeepSpeed ZeRO-2 LoRA checkpoint (adapters and their AdamW state only) resumed on 1 rank,
    as full training's do (tests/train/test_resume_engines.py): the same steps follow, equal up to the order of the
    ranks' sums."""
    from train.test_resume_engines import one_rank

    resume = f"train.resume={two_ranks / kind / 'checkpoint-1'}"
    proc = one_rank(*sft_args(data, tmp_path / "one", f"engine.kind={kind}", resume))
    assert proc.returncode == 0, proc.stderr[-4000:]
    full, resumed = metrics(two_ranks / kind), metrics(tmp_path / "one")
    assert [m["step"] for m in resumed] == [2, 3]
    for a, b in zip(full[1:], resumed, strict=True):
        assert a["lrs"] == b["lrs"] and a["tokens"] == b["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(
            a["grad_norm"], rel=1e-4
        )
    expected, got = weights(two_ranks / kind / "model"), weights(tmp_path / "one" / "model")
    assert set(expected) == set(got)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.multiprocess
def test_fsdp2_lora_checkpoints_leave_the_frozen_base_out(two_ranks):
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(two_ranks / "fsdp2" / "checkpoint-1" / "engine").read_metadata()
    model_keys = [k for k in saved.state_dict_metadata if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys), model_keys[:4]


@pytest.mark.multiprocess
def test_two_fsdp2_ranks_give_the_one_process_lora_run(two_ranks, one_rank):
    for a, b in zip(metrics(one_rank["sft"]), metrics(two_ranks / "fsdp2"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["lrs"] == a["lrs"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    expected, got = weights(one_rank["sft"] / "model"), weights(two_ranks / "fsdp2" / "model")
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-6, msg=k)
    for a, b in zip(metrics(one_rank["bpo"]), metrics(two_ranks / "bpo"), strict=True):
        assert (a["reward"], a["tokens"]) == (b["reward"], b["tokens"])  # the same rollouts: the synced policy
        for key in ("loss", "kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-8), key
    assert metrics(two_ranks / "bpo")[0]["kl"] == 0.0  # step 1: the policy is the base (B = 0)
    assert metrics(two_ranks / "bpo")[1]["kl"] > 0.0


@pytest.mark.multiprocess
def test_fsdp2_bf16_lora_trains_a_bf16_base_beside_fp32_adapters(two_ranks, one_rank):
    rows = metrics(two_ranks / "bpo-bf16")
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["kl"] == 0.0
    for a, b in zip(metrics(one_rank["bpo"]), rows, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.05, abs=1e-3)  # bf16 compute


if __name__ == "__main__":
    torch.set_num_threads(1)
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
