"""``r4b bpo`` with LoRA moves the demo's reward (issue 29): a short annealing of the embedded tiny model, then BPO of
the demo's config with LoRA adapters on 8 fixed easy prompts of the demo's task.

The annealed model answers easy items directly (the annealing data has no thoughts for them), so forced to think on
one it closes the thought at once or after a few words: the demo's reward scores that off-mode (-1: reward.off_mode,
min_thought_chars, close_thoughts), and at the start almost every forced thought is. BPO through the adapters teaches
the policy to keep forced thoughts thoughts (issue 16's remedy), and the reward rises.

Settings (beside the demo's BPO config): adapters of rank 8, alpha 16, at lr 3e-3 with 4 PPO epochs per batch of
rollouts (clipped ratios: more learning per rollout, which is what costs), 12 steps of the 8 prompts x (4 + 4)
rollouts. The annealing is the demo's SFT config cut to 40 steps of 16 samples at a raised learning rate. The same
BPO run with the adapters' learning rate at 1e-9 (they do not move) is the control: its step 1 is the trained run's.

Measured (docs/usage.md#lora): this test's run raises the mean reward of its last 4 steps over step 1's by +0.418
(the thinking group's off-mode share from 1.00 to 0.30), its control by +0.043. Over BPO seeds 0-3 (train.seed)
after a 2-thread annealing: +0.441, +0.445, +0.473, +0.414; after an annealing of seed 1, BPO seeds 0-1: +0.309,
+0.395; the controls: -0.059 to +0.074. Rollouts and updates are seeded, so the test is deterministic on a given
thread count (the fixture: 1); 53-63 s on 2 CPU cores shared with other jobs (load average 1.4-3).
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import fmean as mean

import pytest
from helpers import DEMO_BPO, DEMO_SFT

from r4b.cli import main

pytestmark = pytest.mark.usefixtures("torch_reference_kernels")  # tests/conftest.py

SFT = ("train.max_steps=40", "train.global_batch_samples=16", "optim.lr_llm=1e-2", "optim.lr_vision=3e-3",
       "optim.lr_projector=3e-3")  # fmt: skip
LORA_BPO = ("model.lora.rank=8", "model.lora.alpha=16", "policy.ppo_epochs=4", "train.steps=12",
            "train.prompts_per_step=8", "rollout.max_new_tokens=40")  # fmt: skip
QUIET = ("train.progress=false", "train.tensorboard=false", "train.save_every=1000")


def easy_prompts(data: Path, n: int = 8) -> Path:
    """The first ``n`` easy prompts of the demo's RL prompts (``rl.jsonl``), in a file of their own."""
    rows = [json.loads(line) for line in (data / "rl.jsonl").read_text().splitlines()]
    easy = [row for row in rows if row["meta"]["difficulty"] == "easy"][:n]
    assert len(easy) == n
    out = data / "rl-easy.jsonl"
    out.write_text("".join(json.dumps(row) + "\n" for row in easy))
    return out


@pytest.fixture
def one_thread():
    """torch on one thread for the test: two intra-op threads on cores that other jobs (make test's other worker)
    share waited on each other up to 20 times as long a step; the results are the same on 1 and 2 threads."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_bpo_with_lora_moves_the_demos_reward(tmp_path):
    from r4b.synth import write_synthetic

    data = tmp_path / "data"
    write_synthetic(data, n_sft=512, n_rl=32, n_eval=1, seed=0)
    sft = tmp_path / "sft"
    argv = ["sft", "--config", str(DEMO_SFT), "--output-dir", str(sft), f"data.train=[{data / 'sft.jsonl'}]", *SFT]
    assert main([*argv, *QUIET]) == 0
    prompts, runs = easy_prompts(data), {}
    for name, lr in (("lora", "3e-3"), ("frozen", "1e-9")):  # 1e-9: a learning rate of 0 would freeze llm (refused)
        argv = ["bpo", "--config", str(DEMO_BPO), f"output_dir={tmp_path / name}", f"model.path={sft / 'model'}",
                f"data.prompts=[{prompts}]", "data.eval=null", "train.export=false", *LORA_BPO,
                f"optim.lr_llm={lr}"]  # fmt: skip
        assert main([*argv, *QUIET]) == 0
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    lora, frozen = runs["lora"], runs["frozen"]
    assert [row["step"] for row in lora] == [row["step"] for row in frozen] == list(range(1, 13))
    assert (lora[0]["reward"], lora[0]["tokens"]) == (frozen[0]["reward"], frozen[0]["tokens"])  # one start
    reward = {name: [row["reward"] for row in rows] for name, rows in runs.items()}
    off_mode = {name: [row["thinking"]["off_mode"] for row in rows] for name, rows in runs.items()}
    assert off_mode["lora"][0] >= 0.5  # the start: forced thoughts on easy items mostly leave their mode
    # measured: the trained run's last 4 steps +0.31..+0.47 over its step 1; the control's -0.06..+0.07
    assert mean(reward["lora"][-4:]) - reward["lora"][0] >= 0.2, reward
    assert mean(reward["lora"][-4:]) - mean(reward["frozen"][-4:]) >= 0.2, reward
    assert mean(off_mode["lora"][-4:]) <= mean(off_mode["frozen"][-4:]) - 0.3, off_mode
    # the adapters moved the policy off the base (the KL reference: the adapters off); the control's stayed on it
    assert lora[-1]["kl"] > 0.1 and abs(frozen[-1]["kl"]) < 1e-4
