"""varlen_attention against the float64 explicit-mask reference, forward and backward."""

import pytest
import torch
from helpers import DEVICE, rel_err
from kernel_cases import MASKS, mask_kwargs, packed_documents

from r4b.kernels import varlen_attention
from r4b.kernels.reference import attention_mask_reference, varlen_attention_reference

RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def check(lengths, heads, head_dim, dtype, *, seed, causal=True, segment_ids=None, bidir_ids=None, cu=None):
    hq, hkv = heads
    n = sum(lengths)
    gen = torch.Generator().manual_seed(seed)
    q64, k64, v64 = (torch.randn(n, h, head_dim, generator=gen, dtype=torch.float64) for h in (hq, hkv, hkv))
    q, k, v = (t.to(DEVICE, dtype).requires_grad_() for t in (q64, k64, v64))
    q_ref, k_ref, v_ref = (t.detach().double().requires_grad_() for t in (q, k, v))
    kw = dict(causal=causal, segment_ids=segment_ids, bidir_ids=bidir_ids)
    out = varlen_attention(q, k, v, cu, max(lengths), **kw)
    ref = varlen_attention_reference(q_ref, k_ref, v_ref, cu, max(lengths), **kw)
    assert out.dtype == dtype and out.shape == (n, hq, head_dim)
    assert rel_err(out, ref) < RTOL[dtype]
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    (out.double() * grad).sum().backward()
    (ref * grad).sum().backward()
    for name, ours, theirs in (("dq", q, q_ref), ("dk", k, k_ref), ("dv", v, v_ref)):
        assert rel_err(ours.grad, theirs.grad) < 2 * RTOL[dtype], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask", MASKS)
def test_masks(mask, dtype):
    lengths = [7, 41, 1, 29]  # ragged, one single-token document
    cu, seg, bidir = packed_documents(lengths, seed=len(mask), responses_in=(1, 3), bidir_in=(1, 3))
    kw = mask_kwargs(mask, seg, bidir)
    check(lengths, (4, 2), 24, dtype, seed=1, cu=cu, **kw)


@pytest.mark.parametrize("head_dim", [64, 72, 80, 96, 128])
def test_head_dims(head_dim):
    lengths = [19, 12]
    cu, seg, _ = packed_documents(lengths, seed=head_dim, responses_in=(0,))
    check(lengths, (2, 1), head_dim, torch.float32, seed=2, cu=cu, segment_ids=seg)


@pytest.mark.parametrize("heads", [(3, 3), (6, 2), (8, 1)], ids=str)
def test_gqa_groups(heads):
    lengths = [33, 17]
    cu, seg, bidir = packed_documents(lengths, seed=3, responses_in=(0,), bidir_in=(1,))
    check(lengths, heads, 16, torch.float32, seed=3, cu=cu, segment_ids=seg, bidir_ids=bidir)


def test_random_documents():
    gen = torch.Generator().manual_seed(7)
    for trial in range(3):
        lengths = torch.randint(3, 40, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen).tolist()
        cu, seg, bidir = packed_documents(
            lengths, seed=trial, responses_in=[i for i, n in enumerate(lengths) if n > 5], bidir_in=(0,)
        )
        check(lengths, (4, 2), 32, torch.float32, seed=trial, cu=cu, segment_ids=seg, bidir_ids=bidir)


def test_mask_contract_by_hand():
    """One document: prompt [0, 1], response 1 = [2, 3], response 2 = [4]; tokens 0 and 1 form a bidir block."""
    cu = torch.tensor([0, 5], dtype=torch.int32)
    seg = torch.tensor([0, 0, 1, 1, 2], dtype=torch.int32)
    bidir = torch.tensor([5, 5, 0, 0, 0], dtype=torch.int32)
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0],  # prompt token 0 sees token 1 through the bidir block
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 0, 0, 1],  # response 2 never sees response 1
        ],
        dtype=torch.bool,
    )
    assert torch.equal(attention_mask_reference(cu, segment_ids=seg, bidir_ids=bidir), expected)
    two_docs = torch.tensor([0, 2, 5], dtype=torch.int32)
    full = attention_mask_reference(two_docs, causal=False)
    assert full[:2, :2].all() and full[2:, 2:].all() and not full[:2, 2:].any()


def test_bad_input():
    q = torch.randn(10, 4, 16, device=DEVICE)
    kv = torch.randn(10, 2, 16, device=DEVICE)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        varlen_attention(q, torch.randn(10, 3, 16, device=DEVICE), torch.randn(10, 3, 16, device=DEVICE), cu, 6)
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32"):
        varlen_attention(q, kv, kv, cu.long(), 6)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] = 9 must equal the packed tokens N = 10"):
        varlen_attention(q, kv, kv, torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE), 6)
    with pytest.raises(ValueError, match=r"max_seqlen = 5 is shorter than the longest document \(6 tokens\)"):
        varlen_attention(q, kv, kv, cu, 5)
    with pytest.raises(ValueError, match="causal=False attends all pairs"):
        varlen_attention(q, kv, kv, cu, 6, causal=False, segment_ids=torch.zeros(10, dtype=torch.int32))
    with pytest.raises(ValueError, match="segment_ids must be int32"):
        varlen_attention(q, kv, kv, cu, 6, segment_ids=torch.zeros(10, dtype=torch.long, device=DEVICE))


def test_head_dim_with_non_unit_stride():
    """q sliced out of a wider tensor (stride over head_dim != 1) is made contiguous, not misread."""
    lengths = [9, 14]
    cu, _, _ = packed_documents(lengths, seed=5)
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(23, 2, 32, generator=gen, dtype=torch.float64).to(DEVICE)
    q = wide.float()[..., ::2]
    kv = torch.randn(23, 1, 16, generator=gen).to(DEVICE)
    out = varlen_attention(q, kv, kv, cu, 14)
    ref = varlen_attention_reference(q.double(), kv.double(), kv.double(), cu, 14)
    assert q.stride(-1) == 2 and rel_err(out, ref) < 1e-5


def test_head_chunks_and_stride_align():
    """Head dims that are not powers of two run as two power-of-two chunks (matrix work 80, 80, 96 columns for 72,
    80, 96, not 128); the alignment hint is the power of two dividing the head dim and every row / head stride."""
    from r4b.kernels.attention_tiles import head_chunks, stride_align

    assert {d: head_chunks(d) for d in (8, 16, 24, 64, 72, 80, 96, 112, 128, 192, 256)} == {
        8: (16, 0), 16: (16, 0), 24: (16, 16), 64: (64, 0), 72: (64, 16), 80: (64, 16), 96: (64, 32),
        112: (64, 64), 128: (128, 0), 192: (128, 64), 256: (256, 0),
    }  # fmt: skip
    q = torch.zeros(5, 4, 72)
    assert stride_align(128, torch.zeros(5, 4, 128)) == 16
    assert stride_align(72, q) == 8
    assert stride_align(72, q, torch.zeros(5, 12, 216)[:, :4, :72]) == 8  # a view of a fused qkv projection
    assert stride_align(24, torch.zeros(5, 3, 36)[..., :24]) == 4
    assert stride_align(24, torch.zeros(5, 3, 25)[..., :24]) == 1
