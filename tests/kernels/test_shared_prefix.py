"""Shared-prefix packing of BPO groups (r4b.shared_prefix): layout, round trips, validation, CUDA kernels.

Oracles: a hand-worked example; pack_shared_prefix_reference (the layout transcribed token by token);
properties every packing must have (each response token once, with its target, position and segment);
and the attention each loss token sees, which must be the same shared or unshared. The CUDA kernels
are compared with the torch implementation on a GPU, and their per-position code (``__host__
__device__``) is replayed on the host through ctypes wherever nvcc exists.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import random
import shutil
import subprocess
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor

from r4b import shared_prefix as sp
from r4b.kernels.reference import attention_mask_reference
from r4b.packed_row import PackedRow
from r4b.shared_prefix import (
    IGNORE_INDEX,
    pack_responses,
    pack_shared_prefix,
    pack_unshared,
    unpack_responses,
)

CSRC_CUDA = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
needs_cuda_ext = pytest.mark.skipif(
    not torch.cuda.is_available() or sp._cuda is None,
    reason="needs a CUDA device and the r4b._cuda extension (built by setup.py where torch has CUDA)",
)

X = IGNORE_INDEX


def pack_shared_prefix_reference(
    prompts: Sequence[Tensor],
    responses: Tensor,
    response_lengths: Tensor,
    group_index: Tensor,
    advantages: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    shared: bool = True,
) -> PackedRow:
    """:func:`pack_shared_prefix` (or, with ``shared=False``, :func:`pack_unshared`) transcribed token
    by token from the layout, in Python: the oracle of these tests, not a fast path."""
    lengths, groups = sp._validate(
        prompts, responses, response_lengths, group_index, advantages, old_logprobs, ref_logprobs
    )
    if not shared:
        prompts, groups = sp._one_group_per_response(prompts, groups)
    zeros = [[0.0] * responses.shape[1]] * responses.shape[0]
    old, ref = (zeros if t is None else t.tolist() for t in (old_logprobs, ref_logprobs))
    adv, tokens, group_of, length_of = advantages.tolist(), responses.tolist(), groups.tolist(), lengths.tolist()
    rows, doc_lengths, starts = [], [], []  # a row: one packed position's values, in _COLUMNS order
    for g, prompt in enumerate(prompts):
        p, doc_start = prompt.tolist(), len(rows)
        rows += [(p[i], i, 0, IGNORE_INDEX, 0.0, -1, 0.0, 0.0) for i in range(len(p) - 1)]
        for k, i in enumerate((i for i, gi in enumerate(group_of) if gi == g), start=1):
            n = length_of[i]
            starts.append(len(rows))
            for j, token in enumerate([p[-1], *tokens[i][:n]]):
                loss = j < n
                rows.append((
                    token, len(p) - 1 + j, k if shared else 0, tokens[i][j] if loss else IGNORE_INDEX,
                    adv[i] if loss else 0.0, i if loss else -1, old[i][j] if loss else 0.0, ref[i][j] if loss else 0.0,
                ))  # fmt: skip
        doc_lengths.append(len(rows) - doc_start)

    device = responses.device
    columns = zip(_COLUMNS, zip(*rows, strict=True), strict=True)
    cols = {name: torch.tensor(col, dtype=dtype, device=device) for (name, dtype), col in columns}
    for name, given in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        cols[name] = cols[name] if given is not None else None
    if not shared:
        cols["segment_ids"] = None  # plain causal documents
    bounds = (0, *itertools.accumulate(doc_lengths))
    return PackedRow(
        **cols,
        loss_mask=cols["targets"] != IGNORE_INDEX,
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        cu_seqlens_host=bounds,
        loss_tokens=sum(length_of),
        max_seqlen=max(doc_lengths),
        response_starts=torch.tensor(starts, dtype=torch.long, device=device),
        response_lengths=lengths.to(device),
        max_response_len=responses.shape[1],
    ).to(device)


_COLUMNS = (
    ("input_ids", torch.long), ("position_ids", torch.long), ("segment_ids", torch.int32), ("targets", torch.long),
    ("advantages", torch.float32), ("seq_ids", torch.long), ("old_logprobs", torch.float32),
    ("ref_logprobs", torch.float32),
)  # fmt: skip


def hand_batch() -> dict:
    """Two groups: prompt [10, 11, 12] with responses [1, 2] and [3, 4, 5]; prompt [20] with [6]."""
    return dict(
        prompts=[torch.tensor([10, 11, 12]), torch.tensor([20])],
        responses=torch.tensor([[1, 2, 0], [3, 4, 5], [6, 0, 0]]),
        response_lengths=torch.tensor([2, 3, 1]),
        group_index=torch.tensor([0, 0, 1]),
        advantages=torch.tensor([0.5, -1.0, 2.0]),
        old_logprobs=torch.tensor([[-0.1, -0.2, 9.0], [-0.3, -0.4, -0.5], [-0.6, 9.0, 9.0]]),
    )


def random_batch(seed: int, *, per_token: bool = True, max_len: int = 8) -> dict:
    """G groups of 1..5 responses, prompts of 1..9 tokens, random padding (which must never be read)."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    num_groups = rng.randint(1, 4)
    counts = torch.tensor([rng.randint(1, 5) for _ in range(num_groups)])
    num, width = int(counts.sum()), rng.randint(1, max_len)
    batch = dict(
        prompts=[torch.randint(0, 1000, (rng.randint(1, 9),), generator=gen) for _ in range(num_groups)],
        responses=torch.randint(0, 1000, (num, width), generator=gen),
        response_lengths=torch.randint(1, width + 1, (num,), generator=gen),
        group_index=torch.repeat_interleave(torch.arange(num_groups), counts),
        advantages=torch.randn(num, generator=gen, dtype=torch.float64),
    )
    if per_token:
        batch["old_logprobs"] = -torch.rand(num, width, generator=gen)
        batch["ref_logprobs"] = -torch.rand(num, width, generator=gen, dtype=torch.float64)
    return batch


def to(batch: dict, device: str) -> dict:
    return {k: [p.to(device) for p in v] if k == "prompts" else v.to(device) for k, v in batch.items()}


def assert_packed_equal(actual: PackedRow, expected: PackedRow) -> None:
    for field in dataclasses.fields(PackedRow):
        a, e = getattr(actual, field.name), getattr(expected, field.name)
        if isinstance(e, torch.Tensor):
            assert a is not None and a.dtype == e.dtype, field.name
            assert torch.equal(a.cpu(), e.cpu()), f"{field.name}: {a.tolist()} != {e.tolist()}"
        else:
            assert a == e, field.name


@pytest.fixture(params=["vectorized", "reference"])
def pack(request):
    return pack_shared_prefix if request.param == "vectorized" else pack_shared_prefix_reference


def test_hand_worked_layout(pack) -> None:
    packed = pack(**hand_batch())
    # group 0: body [10, 11], segment 1 [12, 1, 2], segment 2 [12, 3, 4, 5]; group 1: segment 1 [20, 6]
    assert packed.input_ids.tolist() == [10, 11, 12, 1, 2, 12, 3, 4, 5, 20, 6]
    assert packed.position_ids.tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 5, 0, 1]
    assert packed.segment_ids.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2, 1, 1]
    assert packed.targets.tolist() == [X, X, 1, 2, X, 3, 4, 5, X, 6, X]
    assert packed.loss_mask.tolist() == [t != X for t in packed.targets.tolist()]
    assert packed.advantages.tolist() == [0, 0, 0.5, 0.5, 0, -1, -1, -1, 0, 2, 0]
    assert packed.seq_ids.tolist() == [-1, -1, 0, 0, -1, 1, 1, 1, -1, 2, -1]
    expected_old = torch.tensor([0, 0, -0.1, -0.2, 0, -0.3, -0.4, -0.5, 0, -0.6, 0])
    assert torch.equal(packed.old_logprobs, expected_old)
    assert packed.ref_logprobs is None
    assert packed.cu_seqlens.tolist() == [0, 9, 11] and packed.cu_seqlens.dtype == torch.int32
    assert packed.cu_seqlens_host == (0, 9, 11) and packed.max_seqlen == 9 and packed.loss_tokens == 6
    assert packed.response_starts.tolist() == [2, 5, 9]
    assert (packed.num_tokens, packed.num_responses, packed.max_response_len) == (11, 3, 3)


def test_hand_worked_unshared() -> None:
    packed = pack_unshared(**hand_batch())
    assert packed.input_ids.tolist() == [10, 11, 12, 1, 2, 10, 11, 12, 3, 4, 5, 20, 6]
    assert packed.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1]
    assert packed.segment_ids is None  # plain causal documents
    assert packed.targets.tolist() == [X, X, 1, 2, X, X, X, 3, 4, 5, X, 6, X]
    assert packed.cu_seqlens.tolist() == [0, 5, 11, 13] and packed.max_seqlen == 6
    assert_packed_equal(packed, pack_shared_prefix_reference(**hand_batch(), shared=False))


@pytest.mark.parametrize("seed", range(12))
def test_vectorized_matches_reference(seed: int) -> None:
    batch = random_batch(seed, per_token=seed % 3 != 0)
    assert_packed_equal(pack_shared_prefix(**batch), pack_shared_prefix_reference(**batch))
    assert_packed_equal(pack_unshared(**batch), pack_shared_prefix_reference(**batch, shared=False))


@pytest.mark.parametrize("seed", range(8))
def test_every_response_token_once(seed: int) -> None:
    """Each response token is the target of exactly one position: the one holding the previous token
    (the repeated last prompt token for token 0), in its group's document, at position P-1+j."""
    b = random_batch(seed)
    packed = pack_shared_prefix(**b)
    lengths, groups = b["response_lengths"].tolist(), b["group_index"].tolist()
    doc = torch.repeat_interleave(torch.arange(len(b["prompts"])), packed.cu_seqlens.diff())
    loss = packed.loss_mask.nonzero().squeeze(1)
    assert Counter(packed.seq_ids[loss].tolist()) == Counter({i: n for i, n in enumerate(lengths)})
    assert packed.num_tokens == sum(p.numel() - 1 for p in b["prompts"]) + sum(n + 1 for n in lengths)
    for i, (n, g) in enumerate(zip(lengths, groups, strict=True)):
        prompt, tokens, k = b["prompts"][g], b["responses"][i, :n], i - groups.index(g) + 1
        at = loss[packed.seq_ids[loss] == i]
        assert torch.equal(packed.targets[at], tokens)
        assert torch.equal(packed.input_ids[at], torch.cat([prompt[-1:], tokens[:-1]]))
        assert torch.equal(packed.input_ids[at + 1], tokens)  # the next position holds the target
        assert torch.equal(packed.position_ids[at], prompt.numel() - 1 + torch.arange(n))
        assert (packed.segment_ids[at] == k).all() and (packed.segment_ids[at + 1] == k).all()
        assert (doc[at] == g).all() and (doc[at + 1] == g).all()
        assert (packed.advantages[at] == b["advantages"][i].float()).all()
        assert torch.equal(packed.old_logprobs[at], b["old_logprobs"][i, :n])
        assert torch.equal(packed.ref_logprobs[at], b["ref_logprobs"][i, :n].float())
    off = ~packed.loss_mask
    assert (packed.targets[off] == X).all() and (packed.seq_ids[off] == -1).all()
    assert (packed.advantages[off] == 0).all() and (packed.old_logprobs[off] == 0).all()
    for g, prompt in enumerate(b["prompts"]):  # each prompt body once, at the head of its document
        body = (doc == g) & (packed.segment_ids == 0)
        assert torch.equal(packed.input_ids[body], prompt[:-1])
        assert torch.equal(packed.position_ids[body], torch.arange(prompt.numel() - 1))


def loss_tokens(packed: PackedRow) -> Counter:
    at = packed.loss_mask
    columns = (packed.targets, packed.position_ids, packed.advantages, packed.seq_ids, packed.old_logprobs)
    return Counter(zip(*(c[at].tolist() for c in columns), strict=True))


def visible_context(packed: PackedRow) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """For each loss token (response, target index): the (token, position) pairs its query attends to."""
    mask = attention_mask_reference(packed.cu_seqlens, segment_ids=packed.segment_ids)
    out = {}
    for q in packed.loss_mask.nonzero().squeeze(1).tolist():
        i = int(packed.seq_ids[q])
        keys = mask[q].nonzero().squeeze(1)
        out[i, q - int(packed.response_starts[i])] = sorted(
            zip(packed.input_ids[keys].tolist(), packed.position_ids[keys].tolist(), strict=True)
        )
    return out


@pytest.mark.parametrize("seed", range(6))
def test_shared_and_unshared_are_the_same_loss(seed: int) -> None:
    """Same loss tokens (target, position, advantage, response, old log-prob), and each sees the same
    tokens at the same positions: a causal decoder computes the same log-probs from either layout."""
    b = random_batch(seed)
    shared, unshared = pack_shared_prefix(**b), pack_unshared(**b)
    assert loss_tokens(shared) == loss_tokens(unshared)
    assert visible_context(shared) == visible_context(unshared)
    counts = torch.bincount(b["group_index"]).tolist()
    saved = sum((c - 1) * (p.numel() - 1) for c, p in zip(counts, b["prompts"], strict=True))
    assert unshared.num_tokens - shared.num_tokens == saved  # each prompt body stored once per group


@pytest.mark.parametrize("packer", [pack_shared_prefix, pack_unshared])
@pytest.mark.parametrize("seed", range(4))
def test_unpack_round_trips(packer, seed: int) -> None:
    b = random_batch(seed)
    packed = packer(**b)
    valid = torch.arange(b["responses"].shape[1]) < b["response_lengths"][:, None]
    assert torch.equal(unpack_responses(packed, packed.targets), b["responses"] * valid)
    assert torch.equal(unpack_responses(packed, packed.old_logprobs), b["old_logprobs"] * valid)
    assert torch.equal(pack_responses(packed, b["old_logprobs"]), packed.old_logprobs)  # the inverse
    features = torch.randn(packed.num_tokens, 2, 3).to(torch.bfloat16)
    out = unpack_responses(packed, features)
    assert out.shape == (*b["responses"].shape, 2, 3) and out.dtype == torch.bfloat16
    for i, n in enumerate(b["response_lengths"].tolist()):
        start = int(packed.response_starts[i])
        assert torch.equal(out[i, :n], features[start : start + n]) and not out[i, n:].any()


def test_unpack_is_differentiable_off_cuda() -> None:
    packed = pack_shared_prefix(**random_batch(3))
    values = torch.randn(packed.num_tokens, requires_grad=True)
    unpack_responses(packed, values).sum().backward()
    assert torch.equal(values.grad, packed.loss_mask.float())  # every loss position gathered once


def with_(batch: dict, **changes) -> dict:
    return {**batch, **changes}


BAD_INPUTS = [
    (dict(prompts=[]), r"prompts must be a non-empty sequence"),
    (dict(prompts=[torch.tensor([1]), torch.tensor([], dtype=torch.long)]), r"prompts\[1\] is empty"),
    (dict(prompts=[torch.tensor([1.0]), torch.tensor([2])]), r"prompts\[0\] must be a 1-D integer tensor"),
    (dict(responses=torch.tensor([1, 2, 3])), r"responses must be a non-empty \[R, Lmax\] integer tensor"),
    (dict(responses=torch.zeros(3, 3)), r"responses must be an integer tensor of shape \(3, 3\)"),
    (dict(response_lengths=torch.tensor([2, 3])), r"response_lengths must be an integer tensor of shape \(3,\)"),
    (dict(response_lengths=torch.tensor([2, 0, 1])), r"response_lengths\[1\] = 0 is outside \[1, 3\]"),
    (dict(response_lengths=torch.tensor([2, 3, 4])), r"response_lengths\[2\] = 4 is outside \[1, 3\]"),
    (dict(group_index=torch.tensor([0, 1, 0])), r"group_index\[2\] = 0 follows 1: .* contiguous and groups in order"),
    (dict(group_index=torch.tensor([1, 1, 1])), r"group_index\[0\] = 1: prompts\[0\] has no responses"),
    (dict(group_index=torch.tensor([0, 0, 0])), r"prompts\[1\] has no responses \(group_index ends at 0\)"),
    (dict(group_index=torch.tensor([0, 0, 7])), r"group_index\[2\] = 7 is out of range for 2 prompts"),
    (dict(group_index=torch.tensor([0.0, 0.0, 1.0])), r"group_index must be an integer tensor"),
    (dict(advantages=torch.tensor([1.0, 2.0])), r"advantages must be a floating tensor of shape \(3,\)"),
    (dict(advantages=torch.tensor([1, 2, 3])), r"advantages must be a floating tensor"),
    (dict(old_logprobs=torch.zeros(3, 2)), r"old_logprobs must be a floating tensor of shape \(3, 3\)"),
    (dict(ref_logprobs=torch.zeros(3, 3, dtype=torch.long)), r"ref_logprobs must be a floating tensor"),
]


@pytest.mark.parametrize("packer", [pack_shared_prefix, pack_unshared, pack_shared_prefix_reference])
@pytest.mark.parametrize(("changes", "message"), BAD_INPUTS)
def test_bad_input_is_named(packer, changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        packer(**with_(hand_batch(), **changes))


def test_skipped_group_is_named() -> None:
    batch = with_(hand_batch(), prompts=[torch.tensor([1])] * 3, group_index=torch.tensor([0, 0, 2]))
    with pytest.raises(ValueError, match=r"group_index\[2\] = 2 follows 0: prompts\[1\] has no responses"):
        pack_shared_prefix(**batch)


def test_unpack_bad_values_are_named() -> None:
    packed = pack_shared_prefix(**hand_batch())
    with pytest.raises(ValueError, match=r"values has shape \(10,\); its first dimension must be the packing's 11"):
        unpack_responses(packed, torch.zeros(10))


# ---------------------------------------------------------------------------------------------------
# The CUDA kernels: on a GPU against the torch implementation, and their device code replayed on the host

# Values to unpack, by the word the kernel copies them in: (number of tokens, device) -> tensor.
UNPACK_VALUES = {
    "float32": lambda n, d: torch.randn(n, device=d),  # 4-byte words
    "bfloat16 x3": lambda n, d: torch.randn(n, 3, device=d).to(torch.bfloat16),  # 6-byte rows: 2-byte words
    "float32 x4": lambda n, d: torch.randn(n, 4, device=d),  # 16-byte words
    "int64": lambda n, d: torch.randint(-5, 5, (n,), device=d),  # 8-byte words
    "bool": lambda n, d: torch.rand(n, device=d) < 0.5,  # bytes
    "float32 x3, offset view": lambda n, d: torch.randn(n + 1, 3, device=d)[1:],  # 12-byte offset: 4-byte words
}


def check_kernels_match_torch(device: str) -> None:
    for seed in range(10):
        batch = random_batch(seed, per_token=seed % 2 == 0, max_len=3000 if seed == 9 else 8)
        for packer in (pack_shared_prefix, pack_unshared):
            packed = packer(**to(batch, device))
            with sp_torch_only():
                expected = packer(**batch)
            assert_packed_equal(packed, expected)
            for make in UNPACK_VALUES.values():
                values = make(packed.num_tokens, device)
                actual = unpack_responses(packed, values)
                with sp_torch_only():
                    assert torch.equal(actual.cpu(), unpack_responses(expected, values.cpu()))


class sp_torch_only:
    """Within: every call takes the torch implementation."""

    def __enter__(self) -> None:
        self.saved, sp._cuda = sp._cuda, None

    def __exit__(self, *exc) -> None:
        sp._cuda = self.saved


@needs_cuda_ext
def test_cuda_kernels_match_torch() -> None:
    check_kernels_match_torch("cuda")


@pytest.mark.subprocess
@needs_nvcc
def test_cuda_source_compiles(tmp_path: Path) -> None:
    subprocess.run(
        [NVCC, "-std=c++17", "-c", str(CSRC_CUDA / "shared_prefix.cu"), "-o", str(tmp_path / "shared_prefix.o")],
        check=True,
        capture_output=True,
    )


HOST_REPLAY = r"""
#include "shared_prefix.cu"
// The kernels' grids replayed on the host: every block, `threads` workers striding as a block's threads do.
extern "C" int64_t host_pack_args_size() { return sizeof(R4bPackArgs); }
extern "C" void host_pack(const R4bPackArgs* a, int64_t threads) {
    for (int64_t s = 0; s < a->num_responses + a->num_groups; ++s)
        for (int64_t t = 0; t < threads; ++t) pack_segment(*a, s, t, threads);
}
extern "C" int64_t host_unpack(const void* values, void* out, const int64_t* starts, const int64_t* lengths,
                               int64_t num_responses, int64_t max_len, int64_t row_bytes, int64_t threads) {
    return with_word_type(values, out, row_bytes, [&](auto word) {
        using Word = decltype(word);
        const int64_t row_words = row_bytes / int64_t(sizeof(Word));
        for (int64_t r = 0; r < num_responses; ++r)
            for (int64_t t = 0; t < threads; ++t)
                unpack_response(static_cast<const Word*>(values), static_cast<Word*>(out), starts, lengths, max_len,
                                row_words, r, t, threads);
        return int64_t(sizeof(Word));
    });
}
"""

# R4bPackArgs of csrc/cuda/shared_prefix.h, field by field (its size is checked against the compiler's).
PACK_INPUTS = ["prompt_tokens", "prompt_offsets", "doc_starts", "responses", "response_lengths", "response_starts",
               "group_index", "segment_index", "advantages", "old_logprobs", "ref_logprobs"]  # fmt: skip
PACK_SIZES = ["num_groups", "num_responses", "max_len", "max_segment_len"]
PACK_OUTPUTS = ["input_ids", "position_ids", "segment_ids", "targets", "loss_mask", "advantages_out",
                "old_logprobs_out", "ref_logprobs_out", "seq_ids"]  # fmt: skip


class PackArgs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in PACK_INPUTS] + [(n, ctypes.c_int64) for n in PACK_SIZES]
    _fields_ += [(n, ctypes.c_void_p) for n in PACK_OUTPUTS]


class HostReplay:
    """Stands in for r4b._cuda with the same call signature, running the device code on the host."""

    def __init__(self, lib: ctypes.CDLL, threads: int) -> None:
        self.lib, self.threads, self.word_sizes = lib, threads, set()

    def pack_shared_prefix(self, *args) -> None:
        inputs, max_segment_len, outputs = args[:11], args[11], args[12:]
        assert all(t is None or t.is_contiguous() for t in (*inputs, *outputs))  # as the glue checks
        doc_starts, responses = inputs[2], inputs[3]
        sizes = (doc_starts.numel(), responses.shape[0], responses.shape[1], max_segment_len)
        ptr = lambda t: None if t is None else t.data_ptr()
        self.lib.host_pack(ctypes.byref(PackArgs(*map(ptr, inputs), *sizes, *map(ptr, outputs))), self.threads)

    def unpack_responses(self, values, out, starts, lengths) -> None:
        row_bytes = values[0].numel() * values.element_size()
        args = [values.data_ptr(), out.data_ptr(), starts.data_ptr(), lengths.data_ptr()]
        self.word_sizes.add(self.lib.host_unpack(*args, out.shape[0], out.shape[1], row_bytes, self.threads))


@pytest.fixture(scope="module")
def host_replay_lib(tmp_path_factory) -> ctypes.CDLL:
    if NVCC is None:
        pytest.skip("nvcc is not on PATH")
    build = tmp_path_factory.mktemp("host_replay")
    (build / "replay.cu").write_text(HOST_REPLAY)
    lib_path = build / "replay.so"
    command = [NVCC, "-std=c++17", "-shared", "-Xcompiler", "-fPIC", f"-I{CSRC_CUDA}", str(build / "replay.cu")]
    subprocess.run([*command, "-o", str(lib_path)], check=True, capture_output=True)
    lib = ctypes.CDLL(str(lib_path))
    lib.host_pack_args_size.restype = lib.host_unpack.restype = ctypes.c_int64
    lib.host_pack.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.host_unpack.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4
    assert lib.host_pack_args_size() == ctypes.sizeof(PackArgs)
    return lib


@pytest.mark.parametrize("threads", [1, 3])
def test_cuda_device_code_replayed_on_host(host_replay_lib, monkeypatch, threads: int) -> None:
    """The kernels' per-position code, called from the Python dispatch as on a GPU, matches torch."""
    replay = HostReplay(host_replay_lib, threads)
    monkeypatch.setattr(sp, "_cuda", replay)
    monkeypatch.setattr(sp, "_use_cuda", lambda t: sp._cuda is not None)
    check_kernels_match_torch("cpu")
    assert replay.word_sizes == {1, 2, 4, 8, 16}


def test_cpu_tensors_take_the_torch_implementation() -> None:
    assert not sp._use_cuda(torch.zeros(1))
