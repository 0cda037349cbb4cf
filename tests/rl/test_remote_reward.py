"""reward.name=http: OpenRLHF's remote reward protocol against a local server on 127.0.0.1 that is slow, fails and
answers out of order; rewards keep the rollouts' order, failures are retried then stop the run or are counted, and
r4b bpo trains on them with 2 ranks as with 1."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import DEMO_BPO, ROOT, run_two_ranks, synthetic_data, tiny_bpo

from r4b.config import load_config
from r4b.rl.remote_reward import RemoteReward, RewardServerError, server_scores
from r4b.rollout import Rollout
from r4b.train.bpo import BPOConfig, train_bpo

pytestmark = pytest.mark.usefixtures("torch_reference_kernels")


class RewardServer(ThreadingHTTPServer):
    """Scores a query 1.0 when its last word after the prompt is its label (the response ends in the answer), after
    a random delay (so concurrent requests finish out of order); ``fail_first`` requests get HTTP 500,
    ``garble_first`` a wrong-length answer, ``stall_first`` no answer before the client's timeout."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.answered: list[float] = []  # time.monotonic() of each answer sent
        self.fail_first = self.garble_first = self.stall_first = 0
        self.hold = threading.Event()  # answers wait (up to 60 s) until it is set
        self.hold.set()
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/reward"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        server: RewardServer = self.server  # type: ignore[assignment]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            server.requests.append(body)
            number = len(server.requests)
        server.hold.wait(timeout=60)
        time.sleep(random.Random(number).uniform(0.0, 0.05))
        if number <= server.stall_first:
            time.sleep(1.0)
        if number <= server.fail_first:
            self.send_error(500, "scorer crashed")
            return
        columns = zip(body["query"], body["prompts"], body["labels"], strict=True)
        rewards = [float(query[len(prompt) :].split()[-1:] == [label]) for query, prompt, label in columns]
        if number <= server.garble_first:
            rewards = rewards[:-1]
        payload = json.dumps({"rewards": rewards, "extra_logs": {}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        server.answered.append(time.monotonic())


@pytest.fixture
def server():
    instance = RewardServer()
    thread = threading.Thread(target=instance.serve_forever, daemon=True)
    thread.start()
    yield instance
    instance.shutdown()
    instance.server_close()


def rollout(text: str, mode: str = "thinking") -> Rollout:
    return Rollout(prompt_ids=[1], response_ids=[2], text=text, finished=True, mode=mode)


def test_rewards_keep_the_rollouts_order_across_concurrent_batches(server):
    labels = [str(k) for k in range(40)]
    responses = [f"the answer is {k if k % 3 else k + 100}" for k in range(40)]
    client = RemoteReward(server.url, batch_size=3, concurrency=4, retries=0)
    result = client.score(["Q: "] * 40, responses, labels, ["thinking"] * 40)
    assert result.rewards == [float(k % 3 != 0) for k in range(40)] and result.failures == 0
    assert len(server.requests) == 14 and all(len(r["query"]) <= 3 for r in server.requests)
    first = server.requests[0]
    assert set(first) == {"query", "prompts", "labels", "mode"} and first["query"][0].startswith("Q: ")


@pytest.mark.parametrize("fault", ["fail_first", "garble_first", "stall_first"])
def test_a_failed_request_is_retried(server, fault):
    setattr(server, fault, 2)
    client = RemoteReward(server.url, batch_size=8, retries=2, timeout_s=0.5)
    result = client.score(["Q: "] * 4, ["so 1", "so 2", "so x", "so 4"], ["1", "2", "3", "4"], ["auto"] * 4)
    assert result.rewards == [1.0, 1.0, 0.0, 1.0] and len(server.requests) == 3


def test_exhausted_retries_stop_the_run_or_score_on_failure(server):
    server.fail_first = 100
    client = RemoteReward(server.url, batch_size=2, retries=1)
    rollouts = [[rollout("x\n</think>\n\n3"), rollout("3", "non_thinking")]]
    with pytest.raises(RewardServerError, match=rf"^reward server {server.url}: 2 of 2 rollouts unscored after 1 "
                       r"retries \(HTTP 500 scorer crashed\); set reward.on_failure"):  # fmt: skip
        server_scores(client, rollouts, ["Q"], ["3"], on_failure=None)
    scores, failures = server_scores(client, rollouts, ["Q"], ["3"], on_failure=-0.5)
    assert scores.tolist() == [[-0.5, -0.5]] and failures == 2


def test_an_unreachable_server_is_one_line(tmp_path):
    client = RemoteReward("http://127.0.0.1:9/reward", retries=0, timeout_s=0.5)
    with pytest.raises(RewardServerError, match=r"http://127\.0\.0\.1:9/reward: 1 of 1 rollouts unscored .*no answer"):
        server_scores(client, [[rollout("3")]], ["Q"], ["3"], on_failure=None)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthetic_data(tmp_path_factory, n_sft=2, n_rl=8, n_eval=2)


def bpo_overrides(data: Path, out: Path, url: str, *extra: str) -> list[str]:
    return tiny_bpo(data, out, "train.steps=2", "reward.name=http", f"reward.url={url}", "reward.batch_size=5",
                    "train.stop_after_flat_steps=0", *extra)  # fmt: skip


def test_bpo_trains_on_the_servers_rewards(data, tmp_path, server):
    # one request in flight, so the server sees them in the rollouts' order and requests[0] holds the first rollout
    # (out-of-order answers have their own test above)
    overrides = bpo_overrides(data, tmp_path / "run", server.url, "reward.concurrency=1")
    run = train_bpo(load_config(BPOConfig, DEMO_BPO, overrides))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["reward_failures"] == 0 for r in rows)
    assert len(server.requests) == 2 * 4  # 16 rollouts a step in requests of 5
    query, prompt = server.requests[0]["query"][0], server.requests[0]["prompts"][0]
    assert query.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n")
    assert query[len(prompt) :].startswith("<think>") and server.requests[0]["mode"][0] == "thinking"


def test_a_server_that_fails_stops_bpo_in_one_line(data, tmp_path, server, capsys):
    from r4b.cli import main

    server.fail_first = 100
    argv = ["bpo", "--config", str(DEMO_BPO), *bpo_overrides(data, tmp_path / "run", server.url, "reward.retries=0")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"r4b bpo: error: reward server {server.url}: 16 of 16 rollouts unscored")


def test_the_reference_pass_overlaps_the_servers_requests(data, tmp_path, server, monkeypatch):
    """With a KL to the reference (policy.beta > 0) the reference log-probs are computed while the server scores
    (the server holds its answer until the reference pass has started), and the step trains on the same batch,
    advantages included, as when they come one after the other."""
    from r4b.train.bpo import BPOTrainer

    started: list[float] = []
    reference_logprobs = BPOTrainer._reference_logprobs

    def timed(self, batch):
        started.append(time.monotonic())
        server.hold.set()
        return reference_logprobs(self, batch)

    monkeypatch.setattr(BPOTrainer, "_reference_logprobs", timed)
    args = ("policy.beta=0.1", "advantages.mode_decision_from=all", "train.steps=1", "reward.batch_size=16")
    server.hold.clear()
    overlapped = train_bpo(load_config(BPOConfig, DEMO_BPO, bpo_overrides(data, tmp_path / "a", server.url, *args)))
    assert len(started) == 1 and started[0] < server.answered[0]
    monkeypatch.setattr(BPOTrainer, "_reference_while_scoring", lambda self: False)
    in_turn = train_bpo(load_config(BPOConfig, DEMO_BPO, bpo_overrides(data, tmp_path / "b", server.url, *args)))
    assert started[1] > server.answered[1]
    keep = ("reward", "loss", "grad_norm", "kl", "tokens")
    rows = lambda run: [{k: json.loads(line).get(k) for k in keep} for line in (run / "metrics.jsonl").open()]
    assert rows(overlapped) == rows(in_turn)


@pytest.mark.multiprocess
def test_two_ranks_get_the_one_rank_rewards(data, tmp_path, server):
    one = train_bpo(load_config(BPOConfig, DEMO_BPO, bpo_overrides(data, tmp_path / "one", server.url)))
    asked = len(server.requests)
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    two = bpo_overrides(data, tmp_path / "two", server.url, "engine.kind=fsdp2")
    run_two_ranks(["-m", "r4b", "bpo", "--config", str(DEMO_BPO), *two], env=env, cwd=ROOT, timeout=300,
                  fresh=tmp_path / "two")  # fmt: skip
    rows = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows(one), rows(tmp_path / "two"), strict=True):
        assert (a["reward"], a["tokens"]) == (b["reward"], b["tokens"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
    assert len(server.requests) == 2 * asked  # rank 0 asks; rank 1 gets the answer


def test_the_verl_example_config_runs_on_a_verl_parquet_and_a_server(tmp_path, server):
    """configs/verl/bpo.yaml as shipped, pointed at a Parquet file in verl's layout and the local server."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from prompt_layouts import verl_rows

    pq.write_table(pa.Table.from_pylist(verl_rows()), tmp_path / "train.parquet")
    overrides = [f"output_dir={tmp_path / 'run'}", f"data.prompts=[{tmp_path / 'train.parquet'}]",
                 f"reward.url={server.url}", "train.steps=1", "train.prompts_per_step=3", "rollout.group_size=2",
                 "rollout.max_new_tokens=6", "train.progress=false", "train.tensorboard=false",
                 "train.export=false"]  # fmt: skip
    run = train_bpo(load_config(BPOConfig, ROOT / "configs" / "verl" / "bpo.yaml", overrides))
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert row["reward_failures"] == 0 and len(server.requests[0]["labels"]) == 12
    assert sorted(set(server.requests[0]["labels"])) == ["3", "4", "7"] and any((run / "prompt_images").rglob("*.png"))
