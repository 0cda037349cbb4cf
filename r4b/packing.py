"""Packing planner: which samples share a packed micro-batch, and which data-parallel rank gets which.

Two planners, each implemented twice with identical results on every input: natively in ``r4b._C``
(csrc/packing.cpp, used when the extension was built) and in pure Python here (the fallback, and the
reference the tests compare the native code with).

- :func:`plan_micro_batches`: best-fit-decreasing bin packing of samples under a token budget.
- :func:`balance_partitions`: Karmarkar-Karp k-way partition balancing per-rank cost, optionally with
  a quadratic attention term and equal sample counts per rank.

``BACKEND`` says which implementation the public functions use: ``"native"`` or ``"python"``.
"""

from __future__ import annotations

import bisect
import heapq
import math
import operator
from collections.abc import Sequence

try:
    from r4b import _C
except ImportError:  # the extension was not built: the Python twin below does the same work
    _C = None

__all__ = ["BACKEND", "balance_partitions", "plan_micro_batches"]

BACKEND = "native" if _C is not None else "python"

_INT64_MAX = 2**63 - 1


def plan_micro_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Pack samples into as few micro-batches as best-fit decreasing finds, each within ``max_tokens``.

    Samples are placed longest first (equal lengths: lower index first), each into the open bin with
    the least room left that still fits it (equal rooms: the earliest-opened bin); a new bin opens
    when none fits. O(n log n).

    Args:
        lengths: token count of each sample (a sequence of ints, a numpy array or a 1-D tensor).
        max_tokens: the token budget of one micro-batch.

    Returns:
        The bins in the order they were opened, each a list of sample indices in the order they were
        placed. Every index appears exactly once.

    Raises:
        ValueError: ``max_tokens <= 0``, a negative length, or a sample longer than the budget
            (``"sample 7 has 20000 tokens, over the budget of 16384"``).
    """
    return _plan_micro_batches(_as_list(lengths), max_tokens)


def balance_partitions(
    lengths: Sequence[int], k: int, *, attention_weight: float = 0.0, equal_size: bool = False
) -> list[list[int]]:
    """Split samples into ``k`` partitions of near-equal cost with Karmarkar-Karp (largest differencing).

    A sample of length L costs ``L + attention_weight * L**2`` (the quadratic term models attention,
    which is per sequence in a packed batch); a partition costs the sum of its samples' costs,
    evaluated from exact integer sums as ``float(sum(L)) + attention_weight * float(sum(L**2))``.
    The method heuristically minimizes the spread between the costliest and the cheapest partition;
    the spread it leaves is never more than the largest single sample's cost.

    Args:
        lengths: token count of each sample.
        k: number of partitions (e.g. data-parallel ranks). ``k`` may exceed the number of samples;
            the surplus partitions are then empty.
        attention_weight: weight of the quadratic term, finite and >= 0.
        equal_size: give every partition the same number of samples (needs ``len(lengths) % k == 0``).

    Returns:
        ``k`` lists of sample indices, each sorted ascending; partitions ordered by descending cost,
        equal costs by smallest index, empty partitions last. Every index appears exactly once.

    Raises:
        ValueError: ``k <= 0``, a negative or non-finite ``attention_weight``, a negative length,
            ``equal_size`` with a sample count not divisible by ``k``, or sums that overflow int64.
    """
    return _balance_partitions(_as_list(lengths), k, attention_weight=attention_weight, equal_size=equal_size)


def plan_ranks(
    costs: Sequence[int], world_size: int, max_tokens: int, *, attention_weight: float = 0.0
) -> list[list[list[int]]]:
    """The two-level plan of one optimizer step: items balanced over ``world_size`` ranks
    (:func:`balance_partitions` on ``costs``), then each rank's share packed into micro-batches of at most
    ``max_tokens`` (:func:`plan_micro_batches`).

    Returns, per rank, its micro-batches as lists of indices into ``costs``, each in placement order.
    """
    plans = []
    for share in balance_partitions(costs, world_size, attention_weight=attention_weight):
        bins = plan_micro_batches([costs[i] for i in share], max_tokens)
        plans.append([[share[j] for j in micro] for micro in bins])
    return plans


def _as_list(lengths: Sequence[int]) -> Sequence[int]:
    # numpy arrays and tensors: one bulk conversion instead of per-element scalar objects.
    tolist = getattr(lengths, "tolist", None)
    return tolist() if callable(tolist) else lengths


# ------------------------------------------------------------------------------------------------
# Pure-Python implementations. Every order and tie-break mirrors csrc/packing.cpp; change both.
# ------------------------------------------------------------------------------------------------


def _check_non_negative(lengths: list[int]) -> None:
    for i, length in enumerate(lengths):
        if length < 0:
            raise ValueError(f"sample {i} has a negative length ({length})")


def _python_plan_micro_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Pure-Python :func:`plan_micro_batches`."""
    lengths = [operator.index(length) for length in lengths]
    max_tokens = operator.index(max_tokens)
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    _check_non_negative(lengths)
    for i, length in enumerate(lengths):
        if length > max_tokens:
            raise ValueError(f"sample {i} has {length} tokens, over the budget of {max_tokens}")

    bins: list[list[int]] = []
    # Sorted (room left, bin id): bisect finds the best fit, earliest-opened among equal rooms.
    # O(n) list inserts keep this simple; the native version uses a balanced tree.
    rooms: list[tuple[int, int]] = []
    for item in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties by index
        length = lengths[item]
        at = bisect.bisect_left(rooms, (length, -1))
        if at == len(rooms):
            bisect.insort(rooms, (max_tokens - length, len(bins)))
            bins.append([item])
            continue
        room, bin_id = rooms.pop(at)
        bisect.insort(rooms, (room - length, bin_id))
        bins[bin_id].append(item)
    return bins


def _cost(tokens: int, squares: int, attention_weight: float) -> float:
    # Two roundings in this order, exactly as cost_of() in csrc/packing.cpp.
    return float(tokens) + attention_weight * float(squares)


class _Part:
    """One partition under construction; its items are a linked list threaded through ``next_item``."""

    __slots__ = ("cost", "first", "head", "squares", "tail", "tokens")

    def __init__(self, cost: float, first: int, tokens: int, squares: int, head: int, tail: int) -> None:
        self.cost = cost
        self.first = first  # smallest sample index in the part
        self.tokens = tokens
        self.squares = squares  # sum of squared lengths; 0 when attention_weight is 0
        self.head = head
        self.tail = tail

    def sort_key(self) -> tuple[float, int]:
        # Heaviest first; equal costs by smallest first index (unique across parts).
        return (-self.cost, self.first)


class _KarmarkarKarp:
    """Largest differencing over k-way states.

    A state is a partial partition of some samples: its non-empty parts sorted by ``_Part.sort_key``,
    with ``k - len(state)`` empty parts implied after them. The heap pops the state of largest spread
    (ties: smallest sample index in the state, which is unique); the two states popped are merged by
    joining the i-th heaviest part of one with the i-th lightest of the other.
    """

    def __init__(self, lengths: list[int], k: int, attention_weight: float, equal_size: bool) -> None:
        self.lengths, self.k, self.weight = lengths, k, attention_weight
        self.next_item = [-1] * len(lengths)
        self.heap: list[tuple[float, int, list[_Part]]] = []
        if not equal_size:
            for i in range(len(lengths)):
                self.push([self.single(i)])
            return
        # One part per sample over groups of k consecutive lengths (ascending, ties by index): each
        # merge then adds one sample to every part, so all parts end with n / k samples.
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        for start in range(0, len(order), k):
            self.push(sorted((self.single(i) for i in order[start : start + k]), key=_Part.sort_key))

    def run(self) -> list[list[int]]:
        if not self.heap:
            return [[] for _ in range(self.k)]
        while len(self.heap) > 1:
            a = heapq.heappop(self.heap)[2]
            b = heapq.heappop(self.heap)[2]
            self.push(self.merge(a, b))
        return self.groups(self.heap[0][2])

    def single(self, item: int) -> _Part:
        length = self.lengths[item]
        squares = length * length if self.weight > 0.0 else 0
        return _Part(_cost(length, squares, self.weight), item, length, squares, item, item)

    def push(self, state: list[_Part]) -> None:
        lightest = state[-1].cost if len(state) == self.k else 0.0
        spread = state[0].cost - lightest
        heapq.heappush(self.heap, (-spread, min(part.first for part in state), state))

    def merge(self, a: list[_Part], b: list[_Part]) -> list[_Part]:
        k, na, nb = self.k, len(a), len(b)
        merged = []
        # Only positions where a or b has a non-empty part: [0, na) and [k - nb, k).
        for i in [*range(na), *range(max(na, k - nb), k)]:
            j = k - 1 - i
            if i < na and j < nb:
                merged.append(self.join(a[i], b[j]))
            else:
                merged.append(a[i] if i < na else b[j])
        merged.sort(key=_Part.sort_key)
        return merged

    def join(self, x: _Part, y: _Part) -> _Part:
        self.next_item[x.tail] = y.head
        tokens, squares = x.tokens + y.tokens, x.squares + y.squares
        return _Part(_cost(tokens, squares, self.weight), min(x.first, y.first), tokens, squares, x.head, y.tail)

    def groups(self, state: list[_Part]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(self.k)]
        for group, part in zip(out, state, strict=False):  # the state omits the trailing empty parts
            item = part.head
            while item != -1:
                group.append(item)
                item = self.next_item[item]
            group.sort()
        return out


def _python_balance_partitions(
    lengths: Sequence[int], k: int, *, attention_weight: float = 0.0, equal_size: bool = False
) -> list[list[int]]:
    """Pure-Python :func:`balance_partitions`."""
    lengths = [operator.index(length) for length in lengths]
    k = operator.index(k)
    attention_weight = float(attention_weight)
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if not math.isfinite(attention_weight) or attention_weight < 0.0:
        raise ValueError(f"attention_weight must be finite and non-negative, got {attention_weight}")
    _check_non_negative(lengths)
    if equal_size and len(lengths) % k != 0:
        raise ValueError(f"equal_size needs the number of samples ({len(lengths)}) to be a multiple of k ({k})")
    # Part sums are exact integers; the native twin keeps them in int64, so refuse what would overflow it.
    squares = sum(length * length for length in lengths) if attention_weight > 0.0 else 0
    if sum(lengths) > _INT64_MAX or squares > _INT64_MAX:
        raise ValueError("lengths too large: their sums overflow 64-bit integers")
    return _KarmarkarKarp(lengths, k, attention_weight, bool(equal_size)).run()


_plan_micro_batches = _C.plan_micro_batches if _C is not None else _python_plan_micro_batches
_balance_partitions = _C.balance_partitions if _C is not None else _python_balance_partitions
