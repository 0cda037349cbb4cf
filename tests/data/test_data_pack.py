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
        ids, labels, positions = batch.input_ids.tolist(), batch.labels.tolist(), batch.position_ids.tolist()
        cu, seq_ids = batch.cu_seqlens.tolist(), batch.seq_ids().tolist()
        for s, i in enumerate(batch.sample_indices):
            lo, hi, e = cu[s], cu[s + 1], encoded[i]
            assert ids[lo:hi] == e.input_ids
            assert positions[lo:hi] == list(range(e.length))
            assert labels[lo:hi] == [*e.labels[1:], IGNORE_INDEX]  # position t predicts token t+1
            assert seq_ids[lo:hi] == [s] * e.length
        assert batch.num_loss_tokens == sum(
            sum(x != IGNORE_INDEX for x in encoded[i].labels[1:]) for i in batch.sample_indices
        )


def test_shift_by_hand():
    e = EncodedSample([5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8])
    f = EncodedSample([9, 10], [IGNORE_INDEX, 10])
    (batch,), _ = pack([e, f], 8)
    assert batch.sample_indices == [0, 1]  # longest first
    assert batch.input_ids.tolist() == [5, 6, 7, 8, 9, 10]
    assert batch.labels.tolist() == [IGNORE_INDEX, 7, 8, IGNORE_INDEX, 10, IGNORE_INDEX]
    assert batch.position_ids.tolist() == [0, 1, 2, 3, 0, 1]
    assert batch.cu_seqlens.tolist() == [0, 4, 6] and batch.max_seqlen == 4


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
