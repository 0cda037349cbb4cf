"""Ctrl-C during training (r4b.train.signals.StopSignal): under torchrun, one Ctrl-C in the terminal reaches each
worker twice (from the terminal, then torchrun's forwarded copy) and must still stop every rank at the step boundary
with a checkpoint, exit status 130 and no traceback; a later second signal stops at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from r4b.train.signals import LAUNCHER_COPY_S, StopSignal

ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_under_a_launcher_its_copy_is_not_a_second_ctrl_c(monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "0")
    clock = FakeClock()
    stop = StopSignal(clock=clock)
    try:
        assert stop.copy_window_s == LAUNCHER_COPY_S
        os.kill(os.getpid(), signal.SIGINT)  # the terminal's
        clock.now += 0.05
        os.kill(os.getpid(), signal.SIGINT)  # torchrun's copy: ignored
        assert stop.requested == "SIGINT" and stop.should_stop()
        clock.now += LAUNCHER_COPY_S
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C, later: at once
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert capsys.readouterr().err.count("stopping after this step") == 1


def test_without_a_launcher_a_second_signal_stops_at_once(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    stop = StopSignal(clock=FakeClock())
    try:
        assert stop.copy_window_s == 0
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()


def test_restore_outlasts_the_launchers_copy():
    """A run that stops quickly puts the old handlers back only after the copy can have come: a copy arriving then
    would otherwise be a KeyboardInterrupt while the run reports its stop."""
    before = signal.getsignal(signal.SIGINT)
    stop = StopSignal(copy_window_s=0.4)
    os.kill(os.getpid(), signal.SIGINT)
    copy = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT))
    copy.start()
    started = time.monotonic()
    stop.restore()  # the copy arrives while it waits: swallowed
    copy.join()
    assert time.monotonic() - started >= 0.3 and signal.getsignal(signal.SIGINT) is before


def worker(out: Path, argv: list[str]) -> None:
    """One torchrun worker: its pid to ``out/pid<rank>``, then ``r4b argv``; its exit status to ``out/rc<rank>``."""
    from r4b.cli import main

    rank = os.environ.get("RANK", "0")
    (out / f"pid{rank}").write_text(str(os.getpid()))
    code = main(argv)
    (out / f"rc{rank}").write_text(str(code))
    sys.exit(code)


@pytest.mark.multiprocess
@pytest.mark.subprocess
def test_one_ctrl_c_under_torchrun_stops_every_rank_at_the_step_boundary(tmp_path):
    from r4b.synth import write_synthetic

    write_synthetic(tmp_path / "data", n_sft=8, n_rl=2, n_eval=2, seed=0)
    run, logs = tmp_path / "run", tmp_path / "logs"
    sft = [
        "sft", "--config", str(ROOT / "configs" / "demo" / "sft.yaml"), "--output-dir", str(run),
        f"data.train=[{tmp_path / 'data' / 'sft.jsonl'}]", "data.max_tokens=300", "train.global_batch_samples=4",
        "train.max_steps=200", "train.save_every=0", "train.progress=false", "train.tensorboard=false",
        "train.export=false", "engine.kind=fsdp2", "engine.timeout_minutes=2",
    ]  # fmt: skip
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    launch += ["--log-dir", str(logs), "--redirects", "3", __file__, str(tmp_path), "--", *sft]
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    # its own process group, as a terminal's foreground job
    torchrun = subprocess.Popen(launch, env=env, cwd=ROOT, start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        metrics = run / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert torchrun.poll() is None and time.monotonic() < deadline, "the run did not reach step 1"
            time.sleep(0.05)
        workers = [int((tmp_path / f"pid{r}").read_text()) for r in range(2)]
        # Ctrl-C: the terminal signals every process of the group; torchrun's forwarded copy reaches the workers
        # after theirs (here 0.3 s later, so that their handlers have run: the copy is then a second signal)
        for pid in workers:
            os.kill(pid, signal.SIGINT)
        time.sleep(0.3)
        os.kill(torchrun.pid, signal.SIGINT)
        _, torchrun_err = torchrun.communicate(timeout=120)
    finally:
        if torchrun.poll() is None:
            os.killpg(torchrun.pid, signal.SIGKILL)
    worker_logs = "\n".join(p.read_text() for p in sorted(logs.rglob("stderr.log")))
    codes = [(tmp_path / f"rc{r}").read_text() if (tmp_path / f"rc{r}").exists() else None for r in range(2)]
    assert codes == ["130", "130"], f"{codes}\n{worker_logs[-4000:]}\n{torchrun_err[-2000:]}"
    assert "Traceback" not in worker_logs, worker_logs[-4000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    last = steps[-1]
    assert steps == list(range(1, last + 1)) and last < 200
    stopped = f"r4b sft: stopped by SIGINT after step {last}; {run / f'checkpoint-{last}'} written"
    assert worker_logs.count(stopped) == 2, worker_logs[-4000:]
    assert json.loads((run / f"checkpoint-{last}" / "trainer_state.json").read_text())["step"] == last


if __name__ == "__main__":
    split = sys.argv.index("--")
    worker(Path(sys.argv[1]), sys.argv[split + 1 :])
