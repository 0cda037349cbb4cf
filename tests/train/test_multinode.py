"""Many nodes on torchrun: 2 nodes x 1 process on this machine (two torchrun launches, ``--nnodes 2`` with a c10d
rendezvous on 127.0.0.1) train as 1 process does, on FSDP2 and DeepSpeed ZeRO-2 (gloo); the ranks take their node
layout from torchrun's environment; a checkpoint one process wrote resumes on the 2 nodes' 2 ranks (FSDP2 reshards it,
DeepSpeed ZeRO-2 through its universal checkpoint; 2 -> 1 is tests/train/test_resume_engines.py's).
scripts/multinode.sh and scripts/slurm.sbatch build that launch.

This file is the worker of every launch: the one-process references, then one launch per node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "demo" / "sft.yaml"
STEPS = 3
KINDS = ("fsdp2", "deepspeed")
RESUMED = {f"{kind}-resumed": kind for kind in KINDS}  # 2-rank runs from the one-process runs' checkpoint-1
LAYOUT_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID")


def sft_args(data: Path, out: Path, kind: str, *extra: str) -> list[str]:
    return [
        "sft", "--config", str(CONFIG), "--output-dir", str(out), f"data.train=[{data}]", f"engine.kind={kind}",
        "engine.timeout_minutes=3", "data.max_tokens=300", "train.global_batch_samples=4", f"train.max_steps={STEPS}",
        "train.save_every=1", f"train.keep_checkpoints={STEPS}", "train.progress=false", "train.tensorboard=false",
        "train.export=false", *extra,
    ]  # fmt: skip


def worker(out: Path, data: Path, mode: str) -> None:
    """``one``: the references in one process; ``nodes``: this node's rank of each 2-node run. Exit codes and the
    torchrun layout this rank saw go to ``out/<mode>-rank<r>.json``."""
    from r4b.cli import main

    codes = {kind: main(sft_args(data, out / mode / kind, kind)) for kind in KINDS}
    for name, kind in RESUMED.items() if mode == "nodes" else ():
        resume = f"train.resume={out / 'one' / kind / 'checkpoint-1'}"
        codes[name] = main(sft_args(data, out / mode / name, kind, resume))
    layout = {key: os.environ.get(key) for key in LAYOUT_KEYS}
    (out / f"{mode}-rank{os.environ['RANK']}.json").write_text(json.dumps({"codes": codes, "layout": layout}))


def _env() -> dict[str, str]:
    return {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def node_command(port: int, host: bool, out: Path, data: Path) -> list[str]:
    """One node's torchrun: both rendezvous on 127.0.0.1:port; ``is_host`` says which one serves the store (on
    one machine both match the endpoint's address)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "r4b-test",
        "--rdzv-conf", f"is_host={int(host)}", "--local-addr", "127.0.0.1", "--max-restarts", "0",
        __file__, str(out), str(data), "nodes",
    ]  # fmt: skip


def launch_two_nodes(out: Path, data: Path) -> list[subprocess.CompletedProcess]:
    """The two nodes' launches, concurrently; run once more when a rank died of gloo's teardown abort."""
    from helpers import GLOO_TEARDOWN_ABORT

    from r4b.train.engine import _free_port

    for attempt in range(2):
        port = _free_port()
        procs = [
            subprocess.Popen(node_command(port, host, out, data), env=_env(), cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for host in (True, False)
        ]  # fmt: skip
        done = [subprocess.CompletedProcess(p.args, p.wait(timeout=400), *p.communicate()) for p in procs]
        aborted = any(GLOO_TEARDOWN_ABORT in d.stderr for d in done if d.returncode)
        if all(d.returncode == 0 for d in done) or attempt == 1 or not aborted:
            return done
        import shutil

        shutil.rmtree(out / "nodes", ignore_errors=True)
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    from helpers import synthetic_data

    from r4b.train.engine import _free_port

    data = synthetic_data(tmp_path_factory, n_sft=8) / "sft.jsonl"
    out = tmp_path_factory.mktemp("multinode")
    one_rank = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(_free_port())}  # fmt: skip
    command = [sys.executable, __file__, str(out), str(data), "one"]
    proc = subprocess.run(command, env={**_env(), **one_rank}, cwd=ROOT, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for node in launch_two_nodes(out, data):
        assert node.returncode == 0, f"{node.stdout[-2000:]}\n{node.stderr[-4000:]}"
    return out


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_steps(expected: list[dict], got: list[dict]) -> None:
    """Equal up to the order of the ranks' sums (the tolerance of tests/train/test_resume_engines.py)."""
    assert [m["step"] for m in got] == [m["step"] for m in expected]
    for a, b in zip(expected, got, strict=True):
        assert a["lrs"] == b["lrs"] and a["tokens"] == b["tokens"]
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * abs(a["grad_norm"]), (a["grad_norm"], b["grad_norm"])


@pytest.mark.multiprocess
def test_the_ranks_read_the_node_layout_from_torchrun(runs):
    seen = [json.loads((runs / f"nodes-rank{r}.json").read_text()) for r in range(2)]
    assert [s["codes"] for s in seen] == [dict.fromkeys([*KINDS, *RESUMED], 0)] * 2
    layouts = [s["layout"] for s in seen]
    assert [(lay["RANK"], lay["LOCAL_RANK"], lay["WORLD_SIZE"], lay["LOCAL_WORLD_SIZE"]) for lay in layouts] == [
        ("0", "0", "2", "1"),
        ("1", "0", "2", "1"),
    ]
    assert sorted(lay["GROUP_RANK"] for lay in layouts) == ["0", "1"]  # one rank on each node


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", KINDS)
def test_two_nodes_train_as_one_process(runs, kind):
    assert_same_steps(metrics(runs / "one" / kind), metrics(runs / "nodes" / kind))


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", KINDS)
def test_a_one_process_checkpoint_resumes_on_two_nodes(runs, kind):
    """rng-1.pt was never written: the second rank takes rank 0's RNG state; the engine repartitions the state."""
    assert not (runs / "one" / kind / "checkpoint-1" / "rng-1.pt").exists()
    assert_same_steps(metrics(runs / "one" / kind)[1:], metrics(runs / "nodes" / f"{kind}-resumed"))


def test_the_launch_scripts_build_that_torchrun(tmp_path):
    """scripts/multinode.sh's command (R4B_DRY=1), and scripts/slurm.sbatch's under SLURM's environment with srun
    and scontrol stood in for."""
    env = {**os.environ, "R4B_DRY": "1", "NNODES": "2", "GPUS_PER_NODE": "8", "MASTER_ADDR": "node0", "RUN_ID": "7"}
    out = subprocess.run([str(ROOT / "scripts" / "multinode.sh"), "bpo", "c.yaml", "train.steps=1"], env=env,
                         capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert out[1:] == [
        "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "node0:29500", "--rdzv-id", "7", "--max-restarts", "0", "-m", "r4b", "bpo", "--config",
        "c.yaml", "train.steps=1",
    ]  # fmt: skip
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\nprintf "gpu-a\\ngpu-b\\n"\n')
    (bin_dir / "srun").write_text('#!/bin/sh\nshift 2\nexec "$@"\n')  # drops --kill-on-bad-exit, --ntasks-per-node
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    slurm = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "R4B_DRY": "1", "SLURM_SUBMIT_DIR": str(ROOT),
             "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_NNODES": "2", "SLURM_GPUS_PER_NODE": "h100:8",
             "SLURM_JOB_ID": "42"}  # fmt: skip
    out = subprocess.run(["bash", str(ROOT / "scripts" / "slurm.sbatch"), "sft", "c.yaml"], env=slurm,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "--nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint gpu-a:29500 --rdzv-id 42" in out


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    worker(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
