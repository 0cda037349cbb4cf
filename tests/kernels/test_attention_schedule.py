"""The tile schedule against a brute-force scan of the dense mask, tile by tile, on random layouts."""

import itertools

import pytest
import torch
from helpers import DEVICE, ROOT, bench_module
from kernel_cases import MASKS, mask_kwargs, mask_layout
from transformers import Qwen3Config, Qwen3ForCausalLM

from r4b.kernels import attention_schedule as sched
from r4b.kernels.packed_layout import PackedLayout
from r4b.kernels.reference import attention_mask_reference
from r4b.models import attention_backends as ab
from r4b.models import register_varlen_attention


def random_layout(gen, *, docs: int, max_len: int):
    """Documents of ragged lengths (some of one token); in about half of them a prompt with 0-16 responses and
    a bidir block inside the prompt; bidir blocks elsewhere too."""
    lengths, seg, bidir, block = [], [], [], 0
    for _ in range(docs):
        kind = int(torch.randint(0, 4, (1,), generator=gen))
        n = 1 if kind == 0 else int(torch.randint(2, max_len, (1,), generator=gen))
        s = torch.zeros(n, dtype=torch.int32)
        b = torch.zeros(n, dtype=torch.int32)
        if kind >= 2 and n > 3:
            prompt = int(torch.randint(1, n, (1,), generator=gen))
            responses = int(torch.randint(0, 17, (1,), generator=gen))
            if responses and n - prompt >= 1:
                cuts = torch.randint(prompt, n, (responses - 1,), generator=gen).sort().values.tolist()
                for k, (a, z) in enumerate(zip([prompt, *cuts], [*cuts, n], strict=True), start=1):
                    s[a:z] = k  # an empty response (a == z) leaves no token
            if prompt > 2:  # an image inside the prompt
                a = int(torch.randint(0, prompt - 1, (1,), generator=gen))
                z = int(torch.randint(a + 1, prompt + 1, (1,), generator=gen))
                block += 1
                b[a:z] = block
        elif kind == 1 and n > 2:
            a = int(torch.randint(0, n - 1, (1,), generator=gen))
            block += 1
            b[a : a + int(torch.randint(1, n - a + 1, (1,), generator=gen))] = block
        lengths.append(n)
        seg.append(s)
        bidir.append(b)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return cu.to(DEVICE), torch.cat(seg).to(DEVICE), torch.cat(bidir).to(DEVICE)


def brute_force(cu, bm, bn, **mask_kw):
    """(query tile, key tile) -> full? for every non-empty tile, scanning the dense mask tile by tile."""
    mask = attention_mask_reference(cu.cpu(), **{k: v.cpu() for k, v in mask_kw.items() if k != "causal"},
                                    causal=mask_kw.get("causal", True))  # fmt: skip
    out, qt, kt = {}, 0, 0
    bounds = cu.tolist()
    for start, end in itertools.pairwise(bounds):
        length = end - start
        q_tiles = range(0, length, bm)
        k_tiles = range(0, length, bn)
        for a, i0 in enumerate(q_tiles):
            for c, j0 in enumerate(k_tiles):
                tile = torch.zeros(bm, bn, dtype=torch.bool)
                part = mask[start + i0 : start + min(i0 + bm, length), start + j0 : start + min(j0 + bn, length)]
                tile[: part.shape[0], : part.shape[1]] = part
                if tile.any():
                    out[(qt + a, kt + c)] = bool(tile.all())
        qt += len(q_tiles)
        kt += len(k_tiles)
    return out, int(mask.sum())


def listed(schedule: sched.TileSchedule):
    fwd, bwd = {}, {}
    offs, tiles, full = schedule.kv_offsets.tolist(), schedule.kv_tiles.tolist(), schedule.kv_full.tolist()
    for t in range(len(offs) - 1):
        row = tiles[offs[t] : offs[t + 1]]
        assert row == sorted(row)
        fwd.update({(t, u): f for u, f in zip(row, full[offs[t] : offs[t + 1]], strict=True)})
    offs, tiles, full = schedule.q_offsets.tolist(), schedule.q_tiles.tolist(), schedule.q_full.tolist()
    for u in range(len(offs) - 1):
        col = tiles[offs[u] : offs[u + 1]]
        assert col == sorted(col)
        bwd.update({(t, u): f for t, f in zip(col, full[offs[u] : offs[u + 1]], strict=True)})
    return fwd, bwd


@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (16, 32), (128, 64)], ids=str)
@pytest.mark.parametrize("mask", MASKS)
def test_schedule_equals_brute_force(mask, blocks):
    gen = torch.Generator().manual_seed(hash((mask, blocks)) % 1000)
    for trial in range(3):
        cu, seg, bidir = random_layout(gen, docs=int(torch.randint(1, 12, (1,), generator=gen)), max_len=150)
        kw = mask_kwargs(mask, seg, bidir)
        layout, causal = mask_layout(cu, mask, seg, bidir)
        schedule = sched.build_tile_schedule(layout, causal=causal, block_m=blocks[0], block_n=blocks[1])
        expected, pairs = brute_force(cu, *blocks, **kw)
        fwd, bwd = listed(schedule)
        assert fwd == expected, (mask, trial)
        assert bwd == expected, (mask, trial)
        assert int(schedule.visible_pairs) == pairs
        assert schedule.kv_tiles.device == cu.device
        stats = schedule.stats()
        assert stats["nonempty_tiles"] == len(expected)
        assert stats["full_tiles"] == sum(expected.values())


def edge_layout():
    """Every case the issue lists, by construction (random_layout draws them only by chance): one-token documents
    (first, between, last), a prompt with 0 responses and a bidir block, a prompt with exactly 16 responses (some
    of one token) and a bidir block inside the prompt, a prompt ending the document before any response, a bidir
    block over a whole document, ragged lengths around the tile sizes."""
    docs = []  # (segment ids, bidir ids) per document
    docs.append(([0], [0]))  # one token
    docs.append(([0] * 23, [0] * 5 + [1] * 9 + [0] * 9))  # a prompt with 0 responses, a block inside
    sixteen = [0] * 20 + [k for k in range(1, 17) for _ in range(1 + k % 3)]
    docs.append((sixteen, [0] * 3 + [2] * 12 + [0] * (len(sixteen) - 15)))  # 16 responses, an image in the prompt
    docs.append(([0], [0]))  # one token between
    docs.append(([0] * 33, [3] * 33))  # one bidir block over the whole document
    docs.append(([0] * 17 + [1] * 16, [0] * 33))  # a prompt and one response, exactly a tile's edge
    docs.append(([0], [4]))  # one token, a block of one
    seg = torch.tensor([s for d, _ in docs for s in d], dtype=torch.int32)
    bidir = torch.tensor([b for _, d in docs for b in d], dtype=torch.int32)
    lengths = [len(d) for d, _ in docs]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return cu.to(DEVICE), seg.to(DEVICE), bidir.to(DEVICE)


@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (16, 32), (8, 8)], ids=str)
def test_schedule_equals_brute_force_on_edge_layout(blocks):
    cu, seg, bidir = edge_layout()
    kinds = set()
    for mask in MASKS:
        kw = mask_kwargs(mask, seg, bidir)
        layout, causal = mask_layout(cu, mask, seg, bidir)
        schedule = sched.build_tile_schedule(layout, causal=causal, block_m=blocks[0], block_n=blocks[1])
        expected, pairs = brute_force(cu, *blocks, **kw)
        fwd, bwd = listed(schedule)
        assert fwd == expected == bwd, kw
        assert int(schedule.visible_pairs) == pairs, kw
        kinds |= set(expected.values())
    assert kinds == {True, False}  # full and partial tiles both checked


def test_shared_prefix_by_hand():
    """One document of 8: prompt [0, 4) with a bidir block [1, 4), responses [4, 6) and [6, 8); 2 x 2 tiles."""
    cu = torch.tensor([0, 8], dtype=torch.int32, device=DEVICE)
    seg = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2], dtype=torch.int32, device=DEVICE)
    bidir = torch.tensor([0, 1, 1, 1, 0, 0, 0, 0], dtype=torch.int32, device=DEVICE)
    s = sched.build_tile_schedule(PackedLayout(cu, segment_ids=seg, bidir_ids=bidir), block_m=2, block_n=2)
    fwd, _ = listed(s)
    # query tile 0 (tokens 0, 1): key tile 0 partial (0 does not see 1), key tile 1 (2, 3) partial (1 sees them)
    assert fwd[(0, 0)] is False and fwd[(0, 1)] is False and (0, 2) not in fwd
    assert fwd[(1, 1)] is True  # tokens 2, 3 see each other through the block
    assert fwd[(2, 0)] is True and fwd[(3, 0)] is True  # responses see the prompt in full
    assert (3, 2) not in fwd  # response 2 never sees response 1
    assert fwd[(3, 3)] is False  # causal within response 2


def test_current_kernel_stats_shared_prefix():
    """The current kernel visits every non-empty tile with segments but loops over all of the document's."""
    cu = torch.tensor([0, 64], dtype=torch.int32, device=DEVICE)
    seg = torch.tensor([0] * 16 + [k for k in range(1, 7) for _ in range(8)], dtype=torch.int32, device=DEVICE)
    bidir = torch.tensor([0] * 4 + [1] * 8 + [0] * 52, dtype=torch.int32, device=DEVICE)
    stats_of = bench_module("kernel_inspect").current_kernel_stats
    stats = stats_of(cu, segment_ids=seg, bidir_ids=bidir, block_m=8, block_n=8)
    assert stats["q_tiles"] == stats["k_tiles"] == 8 and stats["idle_programs"] == 0
    assert stats["iterated_tiles"] == 64  # bidir drops the causal bound
    assert stats["visited_tiles"] == stats["nonempty_tiles"]
    plain = stats_of(cu, block_m=8, block_n=8)
    assert plain["iterated_tiles"] == plain["visited_tiles"] == plain["nonempty_tiles"] == 36


def test_schedule_built_once_per_model_forward():
    """A 4-layer model on the r4b-schedule backend: one schedule build per packed batch, whatever the layers, and
    its backward builds none (every layer's three kernels share it); unpacked rows (no cu_seq_lens): one build per
    shape, not per layer."""
    config = Qwen3Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(DEVICE)
    model.set_attn_implementation(register_varlen_attention())
    gen = torch.Generator().manual_seed(1)
    for forward in range(2):
        cu, seg, _ = random_layout(gen, docs=3, max_len=20)
        n = int(cu[-1])
        positions = torch.cat([torch.arange(int(b - a), device=DEVICE) for a, b in itertools.pairwise(cu)])
        batch = dict(input_ids=torch.randint(0, 97, (1, n), generator=gen).to(DEVICE), position_ids=positions[None],
                     r4b_layout=PackedLayout(cu, segment_ids=seg))  # fmt: skip
        before = sched.BUILDS["count"]
        with ab.use_attention_backend("r4b-schedule"):
            if forward == 0:
                with torch.no_grad():
                    out = model.model(**batch).last_hidden_state
            else:  # forward and backward
                out = model.model(**batch).last_hidden_state
                out.sum().backward()
                assert all(p.grad is not None for p in model.model.layers[0].self_attn.parameters())
        with torch.no_grad(), ab.use_attention_backend("r4b"):
            ref = model.model(**batch).last_hidden_state
        assert sched.BUILDS["count"] - before == 1, forward
        assert (out - ref).abs().max().item() < 1e-5
    ids = torch.randint(0, 97, (2, 9), generator=gen).to(DEVICE)
    before = sched.BUILDS["count"]
    with torch.no_grad(), ab.use_attention_backend("r4b-schedule"):
        model.model(input_ids=ids)
        model.model(input_ids=ids + 1)  # the next batch of the same shape
    assert sched.BUILDS["count"] - before == 1


def walking_layout():
    """Two shared-prefix documents with an image block in the prompt, a one-token one, one with a block only."""
    spans = [  # (length, [(a, z, segment)], [(a, z, bidir block)])
        (70, [(34, 50, 1), (50, 51, 2), (51, 70, 3)], [(4, 21, 1)]),
        (1, [], []),
        (45, [], [(10, 30, 2)]),
        (64, [(40, 52, 1), (52, 64, 2)], [(0, 17, 3)]),
    ]
    seg, bidir = [], []
    for length, segments, blocks in spans:
        s, b = torch.zeros(length, dtype=torch.int32), torch.zeros(length, dtype=torch.int32)
        for a, z, i in segments:
            s[a:z] = i
        for a, z, i in blocks:
            b[a:z] = i
        seg.append(s)
        bidir.append(b)
    cu = torch.tensor([0, *torch.tensor([n for n, _, _ in spans]).cumsum(0).tolist()], dtype=torch.int32)
    return cu.to(DEVICE), torch.cat(seg).to(DEVICE), torch.cat(bidir).to(DEVICE)


@pytest.mark.parametrize("mask", ["causal", "shared-prefix+bidir", "full"])
def test_schedule_walking_kernels_match_reference(mask):
    """The kernels that walk the schedule (forward, dK/dV, dQ) against the float64 reference, fp32, GQA."""
    if DEVICE == "cpu" and not sched.interpreting():
        pytest.skip("Triton kernels: a GPU or TRITON_INTERPRET=1")
    gen = torch.Generator().manual_seed(11)
    cu, seg, bidir = walking_layout()
    layout, causal = mask_layout(cu, mask, seg, bidir)
    n = int(cu[-1])
    q, k, v = (torch.randn(n, h, 16, generator=gen, dtype=torch.float64) for h in (2, 1, 1))
    assert_walking_matches_reference(q, k, v, layout, causal, gen)


@pytest.mark.parametrize("head_dim", [64, 72, 80, 96, 128])
def test_schedule_walking_kernels_head_dims(head_dim):
    """Head dims that are and are not powers of two, GQA, a shared prefix with an image block."""
    if DEVICE == "cpu" and not sched.interpreting():
        pytest.skip("Triton kernels: a GPU or TRITON_INTERPRET=1")
    cu = torch.tensor([0, 19, 40], dtype=torch.int32, device=DEVICE)
    seg = torch.tensor([0] * 9 + [1] * 6 + [2] * 4 + [0] * 21, dtype=torch.int32, device=DEVICE)
    bidir = torch.tensor([0, 0] + [1] * 5 + [0] * 12 + [0] * 3 + [2] * 18, dtype=torch.int32, device=DEVICE)
    gen = torch.Generator().manual_seed(head_dim)
    q, k, v = (torch.randn(40, h, head_dim, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    assert_walking_matches_reference(q, k, v, PackedLayout(cu, segment_ids=seg, bidir_ids=bidir), True, gen)


def assert_walking_matches_reference(q, k, v, layout, causal: bool, gen) -> None:
    """The walking kernels in fp32 against the float64 reference on ``layout``'s mask: the output within 1e-5
    (relative), dq / dk / dv within 2e-5 under a random output gradient drawn from ``gen``."""
    from helpers import rel_err

    from r4b.kernels.reference import varlen_attention_reference

    ours = [t.to(DEVICE, torch.float32).requires_grad_() for t in (q, k, v)]
    ref = [t.to(DEVICE).requires_grad_() for t in (q, k, v)]
    out = sched.scheduled_varlen_attention(*ours, layout, causal=causal)
    expected = varlen_attention_reference(
        *ref, layout.cu_seqlens, layout.max_seqlen, causal=causal, segment_ids=layout.segment_ids,
        bidir_ids=layout.bidir_ids,
    )  # fmt: skip
    assert rel_err(out, expected) < 1e-5
    grad = torch.randn(expected.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    (out.double() * grad).sum().backward()
    (expected * grad).sum().backward()
    for name, a, b in zip(("dq", "dk", "dv"), ours, ref, strict=True):
        assert rel_err(a.grad, b.grad) < 2e-5, name


_COMPILE_SCRIPT = (
    f"""
import json, sys
sys.path.insert(0, {str(ROOT / "bench")!r})
from kernel_inspect import compile_for_sm90
"""
    + """
cases = {"72-bf16": (72, "bf16", ["fwd"]), "128-bf16": (128, "bf16", ["dq", "dkdv"])}
print(json.dumps({key: compile_for_sm90(d, dtype=t, kernels=k) for key, (d, t, k) in cases.items()}))
"""
)


@pytest.mark.subprocess
def test_walking_kernels_compile_for_hopper():
    """The walking kernels compile for sm_90 at their pinned launch configs (no GPU needed: Triton's ptxas), fit an
    H100's 227 KiB of shared memory per CTA, run wgmma (16-bit inputs), and multi-buffer their streamed tiles (the
    software pipeline), head dim 72 included (its ALIGN hint). The largest: dQ and dK/dV at 128 (the forward needs
    less). Not fp32 (the GPU test run's dtype, 64 x 64 tiles: 164,864 bytes for dK/dV at 128): a minute of ptxas
    on a CPU for its FMA dots."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    for case, kernels in report.items():
        for name, info in kernels.items():
            assert 0 < info["shared"] <= 232448, (case, name, info)
            assert info["wgmma"] > 0 and info["async_copies"] > 0, (case, name, info)
            assert info["kv_buffers"], (case, name, info)  # the K/V (or Q/dO) ring: multi-buffered
    assert report["72-bf16"]["fwd"]["shared"] == 82944  # 80 columns of K/V per stage, not 128 (132,096 at 128)
    assert (report["128-bf16"]["dq"]["num_stages"], report["128-bf16"]["dkdv"]["num_stages"]) == (3, 2)


def hopper_layout():
    """Documents spanning several 128 x 64 tiles, lengths off the tile sizes: a shared-prefix one (a 300-token prompt
    with an image block inside, 16 responses of ragged lengths, some of one token), a plain one, a one-token one and
    a shorter shared-prefix one (a prompt of 70 and 3 responses)."""
    gen = torch.Generator().manual_seed(25)
    responses = [1, 1, *torch.randint(2, 60, (14,), generator=gen).tolist()]
    docs = [  # (segment ids, the bidir block: (first, end, id))
        ([0] * 300 + [k for k, n in enumerate(responses, 1) for _ in range(n)], (20, 220, 1)),
        ([0] * 333, (0, 0, 0)),
        ([0], (0, 0, 0)),
        ([0] * 70 + [1] * 50 + [2] * 9 + [3] * 66, (5, 65, 2)),
    ]
    seg = torch.tensor([s for ids, _ in docs for s in ids], dtype=torch.int32)
    bidir = torch.zeros_like(seg)
    start = 0
    for ids, (first, end, block) in docs:
        bidir[start + first : start + end] = block
        start += len(ids)
    cu = torch.tensor([0, *torch.tensor([len(ids) for ids, _ in docs]).cumsum(0).tolist()], dtype=torch.int32)
    return cu.to(DEVICE), seg.to(DEVICE), bidir.to(DEVICE)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="the compiled kernels at the config a GPU trains with")
@pytest.mark.parametrize(
    ("mask", "heads", "head_dim"),
    [("causal", (8, 2), 128), ("shared-prefix+bidir", (8, 2), 128), ("full", (4, 4), 72)],
    ids=["causal-128", "shared-prefix+bidir-128", "full-72"],
)
def test_walking_kernels_at_their_hopper_bf16_config(mask, heads, head_dim):
    """The walking kernels as a GPU trains with them (bf16: 128 x 64 tiles, 8 warps, 3 / 3 / 2 stages for the
    forward, dQ and dK/dV) against float64 on the same bf16 inputs: GQA at head dim 128 on the language model's
    masks, the vision tower's full mask at 72 (its ALIGN path). The fp32 tests run other tiles (64 x 64)."""
    from helpers import GRAD_RTOL, rel_err

    from r4b.kernels.reference import varlen_attention_reference

    assert sched.default_blocks(torch.bfloat16) == (128, 64)
    launch = {kernel: sched.launch_config(kernel, torch.bfloat16, 128, 64) for kernel in ("fwd", "dq", "dkdv")}
    assert launch == {kernel: {"num_warps": w, "num_stages": s} for kernel, (w, s) in sched._LAUNCH_16BIT.items()}
    assert sched._LAUNCH_16BIT == {"fwd": (8, 3), "dq": (8, 3), "dkdv": (8, 2)}
    cu, seg, bidir = hopper_layout()
    kw = mask_kwargs(mask, seg, bidir)
    layout, causal = mask_layout(cu, mask, seg, bidir)
    n = int(cu[-1])
    gen = torch.Generator().manual_seed(head_dim)
    q, k, v = (torch.randn(n, h, head_dim, generator=gen, dtype=torch.float64) for h in (heads[0], heads[1], heads[1]))
    ours = [t.to(DEVICE, torch.bfloat16).requires_grad_() for t in (q, k, v)]
    ref = [t.detach().double().requires_grad_() for t in ours]  # the same bf16 values, in float64
    out = sched.scheduled_varlen_attention(*ours, layout, causal=causal)
    schedule = sched.schedule_for(layout, causal=causal, block_m=128, block_n=64)
    assert schedule.stats()["partial_tiles"] > 0 and schedule.stats()["full_tiles"] > 0  # both paths run
    expected = varlen_attention_reference(*ref, cu, int(cu.diff().max()), **kw)
    assert out.dtype == torch.bfloat16 and rel_err(out, expected) < 2e-2  # test_varlen_attention.py's bounds
    grad = torch.randn(expected.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    out.backward(grad.to(torch.bfloat16))
    (expected * grad.to(torch.bfloat16).double()).sum().backward()
    for name, a, b in zip(("dq", "dk", "dv"), ours, ref, strict=True):
        assert rel_err(a.grad, b.grad) < GRAD_RTOL[torch.bfloat16], name


def test_the_walking_kernels_check_their_inputs():
    """Mismatched kv heads or a layout of another length are one ValueError, not garbage."""
    from r4b.kernels.packed_layout import PackedLayout

    cu = torch.tensor([0, 5, 9], dtype=torch.int32, device=DEVICE)
    q, k = torch.randn(9, 4, 16, device=DEVICE), torch.randn(9, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"k and v must be \[N=9, Hkv, D=16\]"):
        sched.scheduled_varlen_attention(q, k, torch.randn(9, 1, 16, device=DEVICE), PackedLayout(cu))
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] = 9 must equal the packed tokens N = 8"):
        sched.scheduled_varlen_attention(q[:8], k[:8], k[:8], PackedLayout(cu))
