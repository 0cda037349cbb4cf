"""r4b.data.pack: token budgets, every sample exactly once, shifted targets, overlong handling."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from r4b.data import IGNORE_INDEX, DataError, EncodedSample, pack


def synthetic(n: int, high: int, seed: int = 0) -> list[EncodedSample]:
    """Samples of random lengths; ids encode (sample, position); loss on the second half of each."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(1, high)
        ids = [1000 * i + t for t in range(length)]
        labels = [IGNORE_INDEX if t < length // 2 else ids[t] for t in range(length)]
        images = [Path(f"img{i}_{k}.png") for k in range(i % 3)]
        out.append(EncodedSample(ids, labels, images, [2] * len(images), source=f"d.jsonl:{i + 1}"))
    return out


@pytest.mark.parametrize(("n", "high", "budget"), [(1, 5, 5), (50, 40, 64), (200, 100, 100), (300, 16, 1000)])
def test_every_sample_once_within_budget_with_shifted_targets(n, high, budget):
    encoded = synthetic(n, high, seed=n)
    batches, report = pack(encoded, budget)
    assert report.loaded == n and report.skipped == {}
    seen = sorted(i for b in batches for i in b.sample_indices)
    assert seen == list(range(n))
    for batch in batches:
        assert batch.num_tokens <= budget
        lengths = [encoded[i].length for i in batch.sample_indices]
        assert batch.cu_seqlens.dtype == torch.int32
        assert batch.cu_seqlens.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
        assert batch.max_seqlen == max(lengths)
        assert batch.images == [p for i in batch.sample_indices for p in encoded[i].images]
        assert batch.sources == [encoded[i].source for i in batch.sample_indices]
        ids, targets, positions = batch.input_ids.tolist(), batch.targets.tolist(), batch.position_ids.tolist()
        cu = batch.cu_seqlens.tolist()
        assert batch.cu_seqlens_host == tuple(cu)  # the host copy the forward's layout is made with
        for s, i in enumerate(batch.sample_indices):
            lo, hi, e = cu[s], cu[s + 1], encoded[i]
            assert hi - lo == e.length
            assert ids[lo:hi] == e.input_ids
            assert positions[lo:hi] == list(range(e.length))
            assert targets[lo:hi] == [*e.labels[1:], IGNORE_INDEX]  # position t predicts token t+1
        assert batch.loss_tokens == sum(
            sum(x != IGNORE_INDEX for x in encoded[i].labels[1:]) for i in batch.sample_indices
        )
        # SFT rows: no segment ids, no BPO loss inputs; inputs() is what PackedSFTObjective takes
        assert batch.segment_ids is None and batch.loss_mask is None and batch.num_responses == 0
        assert set(batch.inputs()) == {"input_ids", "position_ids", "cu_seqlens", "cu_seqlens_host", "max_seqlen",
                                       "targets"}  # fmt: skip


def test_shift_by_hand():
    e = EncodedSample([5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8])
    f = EncodedSample([9, 10], [IGNORE_INDEX, 10])
    (batch,), _ = pack([e, f], 8)
    assert batch.sample_indices == [0, 1]  # longest first
    assert batch.input_ids.tolist() == [5, 6, 7, 8, 9, 10]
    assert batch.targets.tolist() == [IGNORE_INDEX, 7, 8, IGNORE_INDEX, 10, IGNORE_INDEX]
    assert batch.position_ids.tolist() == [0, 1, 2, 3, 0, 1]
    assert batch.cu_seqlens.tolist() == [0, 4, 6] and batch.max_seqlen == 4
    assert batch.cu_seqlens_host == (0, 4, 6) and batch.loss_tokens == 3


def test_overlong_raises_with_location_or_is_reported():
    encoded = synthetic(10, 10)
    encoded[3] = EncodedSample(list(range(40)), [IGNORE_INDEX] * 40, source="data/train.jsonl:4")
    encoded[7] = EncodedSample(list(range(33)), [IGNORE_INDEX] * 33, source="data/train.jsonl:8")
    with pytest.raises(DataError) as caught:
        pack(encoded, 32)
    assert str(caught.value) == (
        "data/train.jsonl:4: sample has 40 tokens, over the packing budget of 32 (samples are never cut)"
    )
    batches, report = pack(encoded, 32, on_overlong="skip")
    assert sorted(i for b in batches for i in b.sample_indices) == [0, 1, 2, 4, 5, 6, 8, 9]
    assert report.loaded == 8 and report.skipped == {"overlong": 2}
    assert report.examples["overlong"][1].startswith("data/train.jsonl:8: sample has 33 tokens")
    assert all(b.num_tokens <= 32 for b in batches)


def test_bad_arguments():
    with pytest.raises(ValueError, match="on_overlong"):
        pack(synthetic(2, 3), 8, on_overlong="truncate")
    with pytest.raises(ValueError, match="max_tokens"):
        pack(synthetic(2, 3), 0)


def test_a_row_pins_and_moves_as_one(monkeypatch):
    """PackedRow.pin_memory pins every tensor (the DataLoader calls it); to() moves them and casts only the pixels;
    cu_seqlens' host values go with the row into the forward's inputs."""
    (row,), _ = pack(synthetic(3, 6), 64)
    row.pixel_values = torch.ones(2, 3)
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(t) or t.clone())  # no accelerator here
    out = row.pin_memory()
    assert len(pinned) == 5 and all(getattr(out, k) is not getattr(row, k) for k in ("input_ids", "pixel_values"))
    kept = ("cu_seqlens_host", "loss_tokens", "sample_indices", "sources")
    assert [getattr(out, k) for k in kept] == [getattr(row, k) for k in kept]
    moved = out.to("cpu", pixel_dtype=torch.bfloat16)
    assert moved.pixel_values.dtype == torch.bfloat16 and moved.input_ids.dtype == torch.int64
    assert moved.inputs()["cu_seqlens_host"] == row.cu_seqlens_host == tuple(row.cu_seqlens.tolist())
    assert set(moved.inputs()) == {"input_ids", "position_ids", "cu_seqlens", "cu_seqlens_host", "max_seqlen",
                                   "targets", "pixel_values"}  # fmt: skip
