"""One run per output directory (r4b.train.run_lock): a second run is refused naming the holder before it writes
anything, a lock left by a killed run is taken over, and torchrun's other ranks follow their rank 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import DEMO_SFT, ROOT, run_two_ranks

from r4b.cli import main
from r4b.train.run_lock import LOCK_FILE, acquire, release, releases_run_locks

pytestmark = pytest.mark.usefixtures("torch_reference_kernels")  # tests/conftest.py

HOLD = (
    "import sys, time; from r4b.train.run_lock import acquire; "
    "acquire(sys.argv[1]); print('locked', flush=True); time.sleep(120)"
)


def holder(run_dir: Path) -> subprocess.Popen:
    """Another process holding ``run_dir``'s lock (running until killed)."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert child.stdout.readline().strip() == "locked"
    return child


@pytest.fixture
def held(tmp_path):
    run_dir = tmp_path / "run"
    child = holder(run_dir)
    yield run_dir, child.pid
    child.kill()
    child.wait()


def test_a_second_run_into_a_held_directory_is_refused_naming_the_holder(held, tmp_path, capsys):
    run_dir, pid = held
    data = tmp_path / "sft.jsonl"
    data.write_text("")
    assert main(["sft", "--config", str(DEMO_SFT), "--output-dir", str(run_dir), f"data.train=[{data}]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"r4b sft: error: output_dir {run_dir} is in use by another run")
    assert f"host {socket.gethostname()}, process {pid}, started " in err[0]
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # nothing written by the refused run


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    child = holder(run_dir)
    child.send_signal(signal.SIGKILL)  # no chance to clean up: the lock file stays, its flock goes with the process
    child.wait()
    assert (run_dir / LOCK_FILE).is_file()
    acquire(run_dir)
    try:
        line = capsys.readouterr().err.strip()
        assert line.startswith(f"taking over {run_dir / LOCK_FILE} from a run that is gone") and f"{child.pid}," in line
        assert f'"pid": {os.getpid()}' in (run_dir / LOCK_FILE).read_text()
    finally:
        release(run_dir)
    assert not (run_dir / LOCK_FILE).exists()


def test_the_lock_ends_with_the_stage_function_even_when_it_fails(tmp_path):
    run_dir = tmp_path / "run"

    @releases_run_locks
    def stage():
        acquire(run_dir)
        acquire(run_dir)  # the same process again: already its own
        raise RuntimeError("the run failed")

    with pytest.raises(RuntimeError):
        stage()
    assert not (run_dir / LOCK_FILE).exists()
    child = holder(run_dir)  # free for the next run
    child.kill()
    child.wait()


def test_a_run_refused_at_start_leaves_no_directory(tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_text("")
    run_dir = tmp_path / "run"
    args = ["sft", "--config", str(DEMO_SFT), "--output-dir", str(run_dir), f"data.train=[{data}]"]
    assert main([*args, f"train.resume={tmp_path / 'nowhere'}"]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err and not run_dir.exists()


WORKER = textwrap.dedent(
    """
    import sys
    import torch.distributed as dist
    from r4b.errors import InputError
    from r4b.train.run_lock import lock_run_dir, unlock_run_dir

    dist.init_process_group("gloo")
    for run_dir in sys.argv[1:]:
        try:
            lock_run_dir(run_dir)
            print(f"rank {dist.get_rank()}: locked {run_dir}", flush=True)
            dist.barrier()
            unlock_run_dir(run_dir)
        except InputError as error:
            print(f"rank {dist.get_rank()}: refused: {error}", flush=True)
    dist.destroy_process_group()
    """
)


@pytest.mark.multiprocess
def test_torchrun_ranks_follow_their_rank_0(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    free, held = tmp_path / "free", tmp_path / "held"
    child = holder(held)
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        out = run_two_ranks([str(worker), str(free), str(held)], env=env, timeout=120).stdout
    finally:
        child.kill()
        child.wait()
    # rank 1 is not refused by its own rank 0's lock, and follows rank 0's refusal
    assert f"rank 0: locked {free}" in out and f"rank 1: locked {free}" in out
    assert out.count(f"refused: output_dir {held} is in use by another run (host {socket.gethostname()}, ") == 2
