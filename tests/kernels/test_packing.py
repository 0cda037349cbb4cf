"""The packing planner (r4b.packing): best-fit decreasing and Karmarkar-Karp, native and Python.

Oracles: a naive O(n^2) best-fit-decreasing written here, a brute-force optimum for small
partitions, and hand-worked examples. Every random case is seeded, so thresholds are exact.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable

import numpy as np
import pytest
import torch

from r4b import packing

NATIVE = packing._C
needs_native = pytest.mark.skipif(NATIVE is None, reason="r4b._C was not built; only the Python planner exists")

Planner = Callable[..., list[list[int]]]


@pytest.fixture(params=["python", pytest.param("native", marks=needs_native)])
def impl(request) -> tuple[Planner, Planner]:
    """(plan_micro_batches, balance_partitions) of one implementation."""
    if request.param == "python":
        return packing._python_plan_micro_batches, packing._python_balance_partitions
    return NATIVE.plan_micro_batches, NATIVE.balance_partitions


def random_lengths(rng: random.Random, n: int, high: int) -> list[int]:
    return [rng.randint(0, high) for _ in range(n)]


def costs(lengths: list[int], parts: list[list[int]], w: float = 0.0) -> list[float]:
    """Per-partition cost, rounded as documented: float(sum L) + w * float(sum L^2)."""
    return [float(sum(lengths[i] for i in p)) + w * float(sum(lengths[i] ** 2 for i in p)) for p in parts]


def spread(lengths: list[int], parts: list[list[int]], w: float = 0.0) -> float:
    c = costs(lengths, parts, w)
    return max(c) - min(c)


def assert_each_index_once(groups: list[list[int]], n: int) -> None:
    flat = [i for group in groups for i in group]
    assert sorted(flat) == list(range(n))


def test_backend_matches_extension():
    expected = "native" if NATIVE is not None else "python"
    assert expected == packing.BACKEND
    if NATIVE is not None:
        assert packing._plan_micro_batches is NATIVE.plan_micro_batches
        assert packing._balance_partitions is NATIVE.balance_partitions


# ---------------------------------------------------------------------------------------------
# plan_micro_batches
# ---------------------------------------------------------------------------------------------


def naive_best_fit_decreasing(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """The definition, scanning every bin: O(n^2), independent of both implementations."""
    bins: list[list[int]] = []
    room: list[int] = []
    for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[item]]
        if fits:
            best = min(fits, key=lambda b: (room[b], b))
        else:
            best = len(bins)
            bins.append([])
            room.append(max_tokens)
        bins[best].append(item)
        room[best] -= lengths[item]
    return bins


@pytest.mark.parametrize(
    ("lengths", "max_tokens", "expected"),
    [
        # After 7 and 5 open two bins and 4 joins the 5, rooms are 3 and 1: best fit puts the 1 in the
        # second bin, where first fit would put it in the first.
        ([7, 5, 4, 1], 10, [[0], [1, 2, 3]]),
        # Equal rooms: the earliest-opened bin wins.
        ([4, 4, 2], 6, [[0, 2], [1]]),
        # Equal lengths: lower index first.
        ([3, 3, 3], 3, [[0], [1], [2]]),
        ([5, 3, 8, 2, 7, 1], 10, [[2, 3], [4, 1], [0, 5]]),
        ([0, 0, 4], 4, [[2, 0, 1]]),
        ([], 5, []),
    ],
)
def test_plan_hand_examples(impl, lengths, max_tokens, expected):
    plan, _ = impl
    assert plan(lengths, max_tokens) == expected
    assert naive_best_fit_decreasing(lengths, max_tokens) == expected


def test_plan_invariants_and_definition_on_random_inputs(impl):
    plan, _ = impl
    rng = random.Random(0)
    total_bins = 0
    for _ in range(200):
        max_tokens = rng.choice([1, 7, 100, 16384])
        lengths = random_lengths(rng, rng.randint(0, 80), max_tokens)
        bins = plan(lengths, max_tokens)
        assert_each_index_once(bins, len(lengths))
        loads = [sum(lengths[i] for i in b) for b in bins]
        assert all(b for b in bins) and max(loads, default=0) <= max_tokens
        # Placed longest first, so lengths never increase inside a bin.
        assert all(lengths[x] >= lengths[y] for b in bins for x, y in itertools.pairwise(b))
        # Any-fit property: a bin opens only when nothing fits, so no two bins are both at most half full.
        assert sum(2 * load <= max_tokens for load in loads) <= 1
        assert bins == naive_best_fit_decreasing(lengths, max_tokens)
        total_bins += len(bins)
    assert total_bins > 1000  # the cases above were not trivially small


def test_plan_errors(impl):
    plan, _ = impl
    lengths = [100] * 7 + [20000, 30000]
    with pytest.raises(ValueError, match=r"^sample 7 has 20000 tokens, over the budget of 16384$"):
        plan(lengths, 16384)
    with pytest.raises(ValueError, match=r"^sample 1 has a negative length \(-3\)$"):
        plan([1, -3], 10)
    with pytest.raises(ValueError, match=r"^max_tokens must be positive, got 0$"):
        plan([1], 0)
    with pytest.raises(TypeError):
        plan([1.5], 10)


# ---------------------------------------------------------------------------------------------
# balance_partitions
# ---------------------------------------------------------------------------------------------


def brute_force_spread(lengths: list[int], k: int, *, equal_size: bool = False) -> int:
    """The smallest max-min spread of per-partition token sums over every assignment."""
    n, best = len(lengths), math.inf
    for assignment in itertools.product(range(k), repeat=n):
        if equal_size and any(assignment.count(p) != n // k for p in range(k)):
            continue
        sums = [0] * k
        for i, p in enumerate(assignment):
            sums[p] += lengths[i]
        best = min(best, max(sums) - min(sums))
    return best


def assert_partition_shape(parts: list[list[int]], lengths: list[int], k: int, w: float = 0.0) -> None:
    assert len(parts) == k
    assert_each_index_once(parts, len(lengths))
    assert all(part == sorted(part) for part in parts)
    # Descending cost, equal costs by smallest index, empty partitions last.
    keys = [(-c, part[0] if part else len(lengths)) for c, part in zip(costs(lengths, parts, w), parts, strict=True)]
    assert keys == sorted(keys)


def test_balance_hand_example(impl):
    _, balance = impl
    # Worked by hand through the differencing steps: three partitions of cost 10, ordered by first index.
    assert balance([5, 3, 8, 2, 7, 1, 4], 3) == [[0, 5, 6], [1, 4], [2, 3]]
    # Largest differencing is not always optimal: here it leaves 2 while {8, 7} / {6, 5, 4} is exact.
    lengths = [8, 7, 6, 5, 4]
    assert spread(lengths, balance(lengths, 2)) == 2
    assert brute_force_spread(lengths, 2) == 0


@pytest.mark.parametrize(
    ("lengths", "k"),
    [([10, 10, 10, 10], 2), ([9, 1, 5, 5], 2), ([6, 6, 4, 4, 2, 2], 3), ([100, 1, 1, 1], 3), ([7, 3, 5, 5, 2], 2)],
)
def test_balance_optimal_where_known(impl, lengths, k):
    _, balance = impl
    parts = balance(lengths, k)
    assert_partition_shape(parts, lengths, k)
    assert spread(lengths, parts) == brute_force_spread(lengths, k)


@pytest.mark.parametrize("equal_size", [False, True])
def test_balance_near_brute_force_optimum(equal_size):
    rng = random.Random(1)
    cases = optimal = 0
    for _ in range(150):
        k = rng.randint(2, 3)
        n = rng.choice([x for x in range(2, 9) if x % k == 0]) if equal_size else rng.randint(2, 8)
        lengths = random_lengths(rng, n, rng.choice([10, 100, 1000]))
        parts = packing.balance_partitions(lengths, k, equal_size=equal_size)
        assert_partition_shape(parts, lengths, k)
        if equal_size:
            assert {len(part) for part in parts} == {n // k}
        best, got = brute_force_spread(lengths, k, equal_size=equal_size), spread(lengths, parts)
        assert best <= got <= best + max(lengths)
        cases += 1
        optimal += got == best
    # Seeded: measured 98% (free sizes) and 74% (equal sizes) optimal when this test was written.
    assert optimal >= (0.65 if equal_size else 0.9) * cases


def test_balance_invariants_on_random_inputs(impl):
    _, balance = impl
    rng = random.Random(2)
    for _ in range(300):
        k = rng.randint(1, 12)
        n = rng.randint(0, 60)
        equal_size = n % k == 0 and rng.random() < 0.5
        w = rng.choice([0.0, 1e-3, 0.5])
        lengths = random_lengths(rng, n, rng.choice([3, 100, 10000]))
        parts = balance(lengths, k, attention_weight=w, equal_size=equal_size)
        assert_partition_shape(parts, lengths, k, w)
        if equal_size:
            assert {len(part) for part in parts} == {n // k}
        if n:
            # Each differencing step keeps the spread within the larger of its inputs': at most one sample's cost.
            assert spread(lengths, parts, w) <= max(costs(lengths, [[i] for i in range(n)], w)) * (1 + 1e-12)


def test_balance_more_partitions_than_samples(impl):
    _, balance = impl
    assert balance([5, 1], 4) == [[0], [1], [], []]
    assert balance([], 3) == [[], [], []]
    assert balance([], 3, equal_size=True) == [[], [], []]


def test_balance_equal_size_errors(impl):
    _, balance = impl
    with pytest.raises(ValueError, match=r"^equal_size needs the number of samples \(5\) to be a multiple of k \(2\)$"):
        balance([1, 2, 3, 4, 5], 2, equal_size=True)
    with pytest.raises(ValueError, match=r"multiple of k \(4\)"):
        balance([1, 2], 4, equal_size=True)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (([1, 2], 0), {}, r"^k must be positive, got 0$"),
        (([1, 2], 2), {"attention_weight": -0.5}, r"^attention_weight must be finite and non-negative, got -0.5$"),
        (([1, 2], 2), {"attention_weight": math.nan}, r"^attention_weight must be finite and non-negative, got nan$"),
        (([1, -2], 2), {}, r"^sample 1 has a negative length \(-2\)$"),
        (([2**62, 2**62], 2), {}, r"^lengths too large"),
        (([2**32], 2), {"attention_weight": 1.0}, r"^lengths too large"),
    ],
)
def test_balance_errors(impl, args, kwargs, message):
    _, balance = impl
    with pytest.raises(ValueError, match=message):
        balance(*args, **kwargs)


def test_attention_weight_unloads_the_long_sequence():
    # Token-balanced, the 1000-token sample shares its rank with 200 more tokens; its attention cost
    # (1000 + 1e-3 * 1000^2 = 2000) is then the largest, so the weighted balance leaves it alone.
    lengths = [1000, 600] + [100] * 8
    plain = packing.balance_partitions(lengths, 2)
    weighted = packing.balance_partitions(lengths, 2, attention_weight=1e-3)
    assert costs(lengths, plain) == [1200, 1200]
    assert weighted[0] == [0]
    assert spread(lengths, weighted, 1e-3) < spread(lengths, plain, 1e-3)


def test_attention_weight_balances_quadratic_cost_on_random_inputs():
    rng = random.Random(3)
    better = worse = 0
    for _ in range(100):
        k = rng.randint(2, 4)
        lengths = [rng.randint(1, 2000) for _ in range(rng.randint(8, 40))]
        plain = spread(lengths, packing.balance_partitions(lengths, k), 1e-3)
        weighted = spread(lengths, packing.balance_partitions(lengths, k, attention_weight=1e-3), 1e-3)
        better += weighted < plain
        worse += weighted > plain
    assert better >= 90 and worse <= 3  # measured 97 / 0 when written


def test_array_inputs():
    lengths = [5, 3, 8, 2, 7, 1, 4]
    expected_plan = packing.plan_micro_batches(lengths, 10)
    expected_parts = packing.balance_partitions(lengths, 3, attention_weight=0.1)
    for array in (np.array(lengths, dtype=np.int64), torch.tensor(lengths), tuple(lengths)):
        assert packing.plan_micro_batches(array, 10) == expected_plan
        assert packing.balance_partitions(array, 3, attention_weight=0.1) == expected_parts


# ---------------------------------------------------------------------------------------------
# Native and Python agree exactly
# ---------------------------------------------------------------------------------------------


def outcome(fn: Planner, *args, **kwargs) -> object:
    """The result, or the error type and message."""
    try:
        return fn(*args, **kwargs)
    except ValueError as error:
        return ("ValueError", str(error))


@needs_native
def test_native_matches_python_on_random_inputs():
    rng = random.Random(4)
    errors = 0
    for case in range(2000):
        n = rng.randint(0, 50)
        # Small ranges force ties in lengths, rooms and costs: the tie-breaks are what could differ.
        lengths = random_lengths(rng, n, rng.choice([1, 3, 50, 5000, 10**9]))
        if case % 50 == 0 and lengths:
            lengths[rng.randrange(n)] = -1
        max_tokens = max(lengths, default=1) + rng.randint(-2, 20)
        plan = outcome(NATIVE.plan_micro_batches, lengths, max_tokens)
        assert plan == outcome(packing._python_plan_micro_batches, lengths, max_tokens)

        k = rng.randint(1, 10)
        kwargs = {
            "attention_weight": rng.choice([0.0, 1e-4, 1 / 3, 0.5, 2.0]),
            "equal_size": rng.random() < 0.3,
        }
        parts = outcome(NATIVE.balance_partitions, lengths, k, **kwargs)
        assert parts == outcome(packing._python_balance_partitions, lengths, k, **kwargs)
        errors += isinstance(plan, tuple) + isinstance(parts, tuple)
    assert 100 < errors < 2000  # both error paths and plain results were compared


@needs_native
def test_native_matches_python_at_scale():
    rng = random.Random(5)
    lengths = [rng.randint(1, 16384) for _ in range(64 * 300)]
    assert NATIVE.plan_micro_batches(lengths, 16384) == packing._python_plan_micro_batches(lengths, 16384)
    for kwargs in ({}, {"attention_weight": 1e-4}, {"equal_size": True}):
        assert NATIVE.balance_partitions(lengths, 64, **kwargs) == packing._python_balance_partitions(
            lengths, 64, **kwargs
        )


def test_plan_ranks_balances_then_packs_each_rank():
    """The two-level plan every trainer uses (SFT steps, BPO mini-batches): each item once, per rank the micro-batches
    plan_micro_batches makes of its balanced share, within the budget."""
    rng = random.Random(7)
    for world in (1, 2, 3):
        costs = [rng.randint(1, 40) for _ in range(rng.randint(world, 30))]
        plans = packing.plan_ranks(costs, world, 50, attention_weight=0.01)
        shares = packing.balance_partitions(costs, world, attention_weight=0.01)
        assert len(plans) == world
        assert sorted(i for rank in plans for micro in rank for i in micro) == list(range(len(costs)))
        for plan, share in zip(plans, shares, strict=True):
            assert sorted(i for micro in plan for i in micro) == share
            bins = packing.plan_micro_batches([costs[i] for i in share], 50)
            assert plan == [[share[j] for j in micro] for micro in bins]
            assert all(sum(costs[i] for i in micro) <= 50 for micro in plan)
