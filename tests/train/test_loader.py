"""`data.workers`: micro-batches built in DataLoader workers are the in-loop ones, in order, with the same losses."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from helpers import DEMO_SFT, synthetic_data

from r4b.cli import main
from r4b.config import load_config
from r4b.data import DataError
from r4b.data.prepare import load_data_tools
from r4b.packed_row import PackedRow
from r4b.train.batches import GlobalBatchPlanner
from r4b.train.loader import MicroBatchLoader, default_workers, rank_micro_batches
from r4b.train.sft import SFTConfig, padding_sample, train_sft
from r4b.train.sft_data import SFTDataset

DEMO = DEMO_SFT


pytestmark = pytest.mark.usefixtures("torch_reference_kernels")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthetic_data(tmp_path_factory, n_sft=40, seed=1) / "sft.jsonl"


def dataset_and_keys(data: Path, world_size: int = 1, rank: int = 0, steps: int = 3, max_tokens: int = 4096):
    tokenizer, processor = load_data_tools(None, None)
    dataset = SFTDataset.from_files([str(data)], tokenizer, processor, max_tokens=4096)
    max_tokens = max(max_tokens, max(dataset.lengths))
    planner = GlobalBatchPlanner(
        dataset.lengths, dataset.loss_tokens, global_batch_samples=16, max_tokens=max_tokens, world_size=world_size
    )
    keys = rank_micro_batches(planner, rank, 0, steps, lambda plan: padding_sample(plan, dataset.lengths))
    return dataset, planner, keys


def drain(loader: MicroBatchLoader, planner: GlobalBatchPlanner, steps: int) -> list[PackedRow]:
    out = []
    with loader:
        for step in range(steps):
            for index in range(planner.plan(step).micro_steps):
                _, batch, waited = loader.next(step, index)
                assert waited >= 0
                out.append(batch)
    return out


@pytest.mark.parametrize("world_size", [1, 2])
def test_worker_batches_equal_the_in_loop_batches(data, world_size):
    rank = world_size - 1  # with 2 ranks: rank 1, which may pad
    dataset, planner, keys = dataset_and_keys(data, world_size, rank)
    inline = drain(MicroBatchLoader(dataset.host_batch, keys, workers=0), planner, 3)
    dataset, planner, keys = dataset_and_keys(data, world_size, rank)
    workers = drain(MicroBatchLoader(dataset.host_batch, keys, workers=2, prefetch=3), planner, 3)
    assert len(inline) == len(workers) == sum(planner.plan(s).micro_steps for s in range(3))
    assert any(row.pixel_values is not None for row in inline)
    for a, b in zip(inline, workers, strict=True):
        assert a.inputs().keys() == b.inputs().keys()
        for field in dataclasses.fields(a):
            value, other = getattr(a, field.name), getattr(b, field.name)
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, field.name


def test_micro_batches_cover_each_step_in_the_planned_order(data):
    dataset, planner, keys = dataset_and_keys(data, world_size=2, rank=1, steps=2)
    keys = list(keys)
    expected = []
    for step in range(2):
        plan = planner.plan(step)
        mine = plan.for_rank(1)
        expected += [(step, i, i >= len(mine)) for i in range(plan.micro_steps)]
    assert [(k.step, k.index, k.padding) for k in keys] == expected
    for key in keys:
        plan = planner.plan(key.step)
        if not key.padding:
            assert key.samples == tuple(plan.for_rank(1)[key.index])
        else:
            assert key.samples == padding_sample(plan, dataset.lengths)


def test_workers_outlive_ctrl_c_so_the_step_can_finish(data):
    """SIGINT / SIGTERM reach the workers too (one process group); the loop finishes its step, then stops."""
    dataset, planner, keys = dataset_and_keys(data, steps=1, max_tokens=1)  # one sample per micro-batch
    assert planner.plan(0).micro_steps >= 3
    with MicroBatchLoader(dataset.host_batch, keys, workers=1, prefetch=1) as loader:
        loader.next(0, 0)
        for worker in loader._iterator._workers:
            os.kill(worker.pid, signal.SIGINT)
            os.kill(worker.pid, signal.SIGTERM)
        for index in range(1, planner.plan(0).micro_steps):
            loader.next(0, index)


def test_asking_out_of_order_is_refused(data):
    dataset, _, keys = dataset_and_keys(data)
    with MicroBatchLoader(dataset.host_batch, keys) as loader, pytest.raises(RuntimeError, match="out of order"):
        loader.next(0, 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_missing_image_in_a_worker_is_the_one_line_data_error(data, tmp_path, workers):
    lines = data.read_text().splitlines()
    moved = tmp_path / "sft.jsonl"
    moved.write_text("\n".join(lines) + "\n")
    for line in lines:  # the images the samples name, next to the copy
        for image in json.loads(line).get("images", []):
            target = tmp_path / image
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((data.parent / image).read_bytes())
    dataset, planner, keys = dataset_and_keys(moved)
    for image in tmp_path.rglob("*.png"):  # gone after validation: found when the micro-batch is built
        image.unlink()
    loader = MicroBatchLoader(dataset.host_batch, keys, workers=workers)
    with loader, pytest.raises(DataError, match=r"sft\.jsonl:\d+.*image"):
        for step in range(3):
            for index in range(planner.plan(step).micro_steps):
                loader.next(step, index)


def test_default_workers():
    assert default_workers("cpu") == 0
    assert 0 <= default_workers("cuda", world_size=8) <= 4


def test_sft_losses_do_not_depend_on_workers_and_data_wait_is_logged(data, tmp_path):
    def run(name: str, workers: int) -> list[dict]:
        args = [
            f"output_dir={tmp_path / name}",
            f"data.train=[{data}]",
            f"data.workers={workers}",
            "train.global_batch_samples=12",
            "train.max_steps=3",
            "train.progress=false",
            "train.tensorboard=false",
            "train.export=false",
        ]
        run_dir = train_sft(load_config(SFTConfig, DEMO, args))
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    inline, workers = run("w0", 0), run("w2", 2)
    keys = ("step", "loss", "grad_norm", "tokens", "loss_tokens", "samples")
    assert [tuple(r[k] for k in keys) for r in workers] == [tuple(r[k] for k in keys) for r in inline]
    assert all(0 <= r["data_wait_s"] <= r["step_time_s"] for r in inline + workers)


def test_negative_workers_is_a_one_line_error(data, tmp_path, capsys):
    args = ["sft", "--config", str(DEMO), f"output_dir={tmp_path / 'run'}", f"data.train=[{data}]", "data.workers=-1"]
    assert main(args) != 0
    assert "data.workers must be 0 or more" in capsys.readouterr().err
