"""The attention backends of r4b_varlen (r4b, FlexAttention, torch's FA2 varlen) against the float64 reference."""

import types

import pytest
import torch
from helpers import DEVICE, rel_err
from kernel_cases import MASKS, mask_kwargs, mask_layout, packed_documents
from transformers import Qwen3Config, Qwen3ForCausalLM

from r4b.kernels.packed_layout import PackedLayout
from r4b.kernels.reference import varlen_attention_reference
from r4b.models import attention_backends as ab
from r4b.models import register_varlen_attention

LENGTHS = [7, 41, 1, 29]  # ragged, one single-token document


def inputs(dtype, *, seed=0, heads=(4, 2), head_dim=24):
    gen = torch.Generator().manual_seed(seed)
    n = sum(LENGTHS)
    return [torch.randn(n, h, head_dim, generator=gen, dtype=torch.float64).to(DEVICE, dtype) for h in (heads[0],
            heads[1], heads[1])]  # fmt: skip


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("backend", ["r4b", "flex"])
def test_backend_forward_matches_reference(backend, mask):
    """float64 on the CPU (FlexAttention eager; its backward needs CUDA), fp32 on a GPU with the backward."""
    dtype = torch.float32 if DEVICE == "cuda" else torch.float64
    cu, seg, bidir = packed_documents(LENGTHS, seed=len(mask), responses_in=(1, 3), bidir_in=(1, 3))
    kw = mask_kwargs(mask, seg, bidir)
    layout, causal = mask_layout(cu, mask, seg, bidir)
    q, k, v = inputs(dtype)
    grad = DEVICE == "cuda"
    q, k, v = (t.requires_grad_(grad) for t in (q, k, v))
    out = ab.packed_attention(q, k, v, layout, causal=causal, backend=backend)
    q64, k64, v64 = (t.detach().double().requires_grad_(grad) for t in (q, k, v))
    ref = varlen_attention_reference(q64, k64, v64, cu, max(LENGTHS), **kw)
    assert out.dtype == dtype and rel_err(out, ref) < 1e-5
    if grad:
        g = torch.randn_like(ref)
        (out.double() * g).sum().backward()
        (ref * g).sum().backward()
        for name, ours, theirs in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
            assert rel_err(ours.grad, theirs.grad) < 1e-4, name


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda" or ab.fa2_varlen() is None, reason="torch's FA2 varlen needs CUDA, torch>=2.11")
@pytest.mark.parametrize("causal", [True, False])
def test_fa2_varlen_matches_reference(causal):
    cu, _, _ = packed_documents(LENGTHS, seed=3)
    q, k, v = (t.requires_grad_() for t in inputs(torch.bfloat16, head_dim=64))
    assert ab.resolve_backend("fa2", q, causal=causal, segment_ids=None, bidir_ids=None) == "fa2"
    out = ab.packed_attention(q, k, v, PackedLayout(cu), causal=causal, backend="fa2")
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = varlen_attention_reference(q64, k64, v64, cu, max(LENGTHS), causal=causal)
    assert rel_err(out, ref) < 2e-2
    g = torch.randn_like(ref)
    (out.double() * g).sum().backward()
    (ref * g).sum().backward()
    for ours, theirs in ((q, q64), (k, k64), (v, v64)):
        assert rel_err(ours.grad, theirs.grad) < 4e-2


def test_auto_follows_the_h100_figures(monkeypatch):
    cuda_bf16 = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    cuda_fp32 = types.SimpleNamespace(is_cuda=True, dtype=torch.float32)
    cpu = torch.zeros(1)
    seg = torch.zeros(1, dtype=torch.int32)
    pick = lambda name, q, causal=True, **ids: ab.resolve_backend(
        name, q, causal=causal, segment_ids=ids.get("seg"), bidir_ids=ids.get("bidir")
    )
    monkeypatch.setattr(ab, "fa2_varlen", lambda: object())
    assert pick("auto", cuda_bf16) == "fa2"  # plain causal documents
    assert pick("auto", cuda_fp32) == "r4b"  # FA2 takes fp16/bf16 only
    assert pick("auto", cuda_bf16, seg=seg) == "flex"  # shared prefix
    assert pick("auto", cuda_bf16, bidir=seg) == "flex"
    assert pick("auto", cuda_bf16, causal=False) == "flex"  # vision tiles
    assert pick("auto", cpu) == pick("auto", cpu, seg=seg) == "r4b"  # the CPU: as before
    assert pick("fa2", cuda_bf16, seg=seg) == "r4b"  # fa2: plain masks only, r4b's kernel for the rest
    assert pick("fa2", cpu) == "r4b"
    assert pick("flex", cpu, seg=seg) == "flex" and pick("r4b", cuda_bf16) == "r4b"
    assert pick("r4b-schedule", cuda_bf16, seg=seg) == "r4b-schedule"  # chosen by name only, never by auto
    monkeypatch.setattr(ab, "fa2_varlen", lambda: None)  # torch < 2.11
    assert pick("auto", cuda_bf16) == "r4b"


def test_setting_precedence(monkeypatch):
    monkeypatch.delenv(ab.ENV_VAR, raising=False)
    assert ab.attention_backend() == "auto"
    monkeypatch.setenv(ab.ENV_VAR, "flex")
    assert ab.attention_backend() == "flex"
    ab.set_attention_backend("fa2")
    try:
        assert ab.attention_backend() == "fa2"
        with ab.use_attention_backend("r4b"):
            assert ab.attention_backend() == "r4b"
        assert ab.attention_backend() == "fa2"
    finally:
        ab.set_attention_backend(None)
    assert ab.attention_backend() == "flex"
    monkeypatch.setenv(ab.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="attention backend must be one of"):
        ab.attention_backend()


@pytest.fixture(scope="module")
def model():
    config = Qwen3Config(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(DEVICE).double()
    model.set_attn_implementation(register_varlen_attention())
    return model


def test_block_mask_built_once_per_forward_and_same_hidden_states(model):
    """A 3-layer model on FlexAttention: one block-mask build per packed batch, whatever the layers; the hidden
    states equal r4b's backend's."""
    cu, seg, _ = packed_documents(LENGTHS, seed=4, responses_in=(1, 3))
    ids = torch.randint(0, 97, (sum(LENGTHS),), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    positions = torch.cat([torch.arange(n, device=DEVICE) for n in LENGTHS])
    batch = dict(input_ids=ids[None], position_ids=positions[None], r4b_layout=PackedLayout(cu, segment_ids=seg))
    hidden = {}
    for backend in ("r4b", "flex"):
        before = ab.BUILDS["flex-block-mask"]
        with ab.use_attention_backend(backend), torch.no_grad():
            hidden[backend] = model.model(**batch).last_hidden_state
            model.model(**batch)  # the same micro-batch again (activation-checkpoint recompute): no new build
        assert ab.BUILDS["flex-block-mask"] - before == (backend == "flex")
    assert rel_err(hidden["flex"], hidden["r4b"]) < 1e-10
    before = ab.BUILDS["flex-block-mask"]
    with ab.use_attention_backend("flex"), torch.no_grad():
        model.model(**{**batch, "r4b_layout": PackedLayout(cu, segment_ids=seg)})  # a new micro-batch
    assert ab.BUILDS["flex-block-mask"] - before == 1


def test_unpacked_rows_on_flex(model):
    """Without cu_seq_lens_q each row is one document (a causal block mask per length, cached)."""
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    with torch.no_grad():
        with ab.use_attention_backend("r4b"):
            ref = model.model(input_ids=ids).last_hidden_state
        with ab.use_attention_backend("flex"):
            out = model.model(input_ids=ids).last_hidden_state
    assert rel_err(out, ref) < 1e-10


def _varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1)):  # fmt: skip
    """torch 2.11's and 2.12's signature: no enable_gqa, fewer kv heads handed to the FA2 kernel as they are."""
    _CALLS.append((key, value))
    return varlen_attention_reference(query, key, value, cu_seq_q, max_q, causal=window_size == (-1, 0),
                                      softmax_scale=scale)  # fmt: skip


def _varlen_attn_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1), enable_gqa=False, seqused_k=None, num_splits=None):  # fmt: skip
    """torch 2.13's: GQA only with enable_gqa=True (it raises otherwise)."""
    if not enable_gqa and key.shape[1] != query.shape[1]:
        raise ValueError("Expect query and key/value to have the same number of heads")
    _CALLS.append((key, value))
    return varlen_attention_reference(query, key, value, cu_seq_q, max_q, causal=window_size == (-1, 0),
                                      softmax_scale=scale)  # fmt: skip


_CALLS: list = []


@pytest.mark.parametrize("kernel", [_varlen_attn_2_11, _varlen_attn_2_13])
@pytest.mark.parametrize("causal", [True, False])
def test_fa2_call_follows_the_kernels_signature_without_kv_copies(kernel, causal, monkeypatch):
    """torch's varlen_attn changed its keywords between releases: GQA (4 query heads on 2 kv heads) and the scale
    reach either one, and K and V arrive as the very tensors given (no repeat to the query heads' count)."""
    monkeypatch.setattr(ab, "fa2_varlen", lambda: kernel)
    ab._fa2_takes_enable_gqa.cache_clear()
    _CALLS.clear()
    cu, _, _ = packed_documents(LENGTHS, seed=1, responses_in=(1, 1), bidir_in=(1, 1))
    q, k, v = (t.cpu() for t in inputs(torch.float64))
    assert q.shape[1] == 2 * k.shape[1]
    out = ab.fa2_varlen_attention(q, k, v, cu.cpu(), max(LENGTHS), causal=causal, softmax_scale=0.3)
    want = varlen_attention_reference(q, k, v, cu.cpu(), max(LENGTHS), causal=causal, softmax_scale=0.3)
    ab._fa2_takes_enable_gqa.cache_clear()
    assert rel_err(out, want) < 1e-12
    assert len(_CALLS) == 1 and _CALLS[0][0] is k and _CALLS[0][1] is v


def test_compiled_flex_does_not_recompile_per_micro_batch(monkeypatch):
    """torch.compile'd FlexAttention (what the flex backend runs on CUDA), here on the CPU: micro-batches whose packing
    (document lengths, segments, total tokens) changes reuse the compiled graphs. Dynamo compiles once for the first
    total length, once more when the total changes (automatic dynamic shapes), and never again; the block mask (a
    new mask_mod closure over new id tensors each micro-batch) adds no guard. Dynamo decides recompiles before any
    backend runs, so ``aot_eager`` stands in for inductor (minutes on a CPU, for the same guards)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(ab, "FLEX_COMPILE_ON_CPU", True)
    monkeypatch.setattr(ab, "_compiled_flex", lambda: compiled)
    compiled = torch.compile(ab._flex().flex_attention, backend="aot_eager")
    gen = torch.Generator().manual_seed(9)
    graphs = []
    for lengths in ([70, 58], [30, 41, 57], [100, 37], [200], [50, 50, 28, 33], [129, 1, 60], [64, 64, 64]):
        cu, seg, bidir = packed_documents(lengths, seed=len(lengths), responses_in=(0,), bidir_in=(len(lengths) - 1,))
        n = sum(lengths)
        q, k, v = (torch.randn(n, h, 16, generator=gen, dtype=torch.float32) for h in (4, 2, 2))
        with torch.no_grad():
            layout = PackedLayout(cu, segment_ids=seg, bidir_ids=bidir)
            out = ab.packed_attention(q, k, v, layout, backend="flex")
        ref = varlen_attention_reference(q.double(), k.double(), v.double(), cu, max(lengths), segment_ids=seg,
                                         bidir_ids=bidir)  # fmt: skip
        assert rel_err(out, ref) < 1e-5, lengths
        graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert graphs[0] == 1 and graphs[1] == 1, graphs  # a new packing of the same total: no recompile
    assert graphs[-1] == graphs[2] == 2, graphs  # a new total: one dynamic-shape graph, then none
