"""Mixed precision as on GPUs, in one process (two ranks: tests/train/test_collectives.py).

- bf16 autocast with r4b's varlen attention: Qwen3's q/k norm and RoPE give fp32 q and k beside a bf16 v; the
  attention casts all three to autocast's dtype (the Triton kernels then run in bf16 -- in the interpreter
  here, their bf16 dots upcast -- and the backward no longer meets mixed dtypes); q, k, v of different dtypes
  are refused by ``varlen_attention`` itself.
- the fused losses get the lm_head operands in the matmul's compute dtype (autocast's), the losses stay fp32.
- ``r4b sft`` / ``r4b bpo`` with ``engine.mixed_precision=bf16`` on the single engine train and track fp32:
  losses within :data:`LOSS_RTOL` (relative), grad norms within :data:`GRAD_NORM_RTOL`.
- host syncs: a packed row's forward never reads cu_seqlens back (its PackedLayout carries the host values);
  flash-attn's import is tried once; the process-group timeout is configurable (``engine.timeout_minutes``).
"""

from __future__ import annotations

import importlib
import json
import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from r4b.config import load_config
from r4b.kernels import varlen_attention
from r4b.kernels.packed_layout import PackedLayout
from r4b.models.attention import register_varlen_attention, varlen_attention_forward
from r4b.models.forward import lm_head_operands
from r4b.synth import write_synthetic

ROOT = Path(__file__).resolve().parents[2]
LOSS_RTOL = 1e-3  # bf16 vs fp32, tiny model, first 3 SFT steps (seen: 2e-5)
GRAD_NORM_RTOL = 2e-2  # (seen: 3e-3)

_attention = importlib.import_module("r4b.models.attention")
_varlen = importlib.import_module("r4b.kernels.varlen_attention")  # the module (the package exports the function)


def _packed_qwen3(dtype_autocast: bool, interpret: bool):
    """Loss and gradients of a 2-layer Qwen3 (r4b_varlen attention) on one packed row of two documents."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    model.set_attn_implementation(register_varlen_attention())
    ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(12), torch.arange(8)])[None]
    cu = torch.tensor([0, 12, 20], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype_autocast):
        out = model(input_ids=ids, position_ids=positions, labels=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                    max_length_q=12, max_length_k=12)  # fmt: skip
    out.loss.backward()
    return out.loss.detach().float(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_bf16_autocast_attention_trains_like_fp32_in_the_triton_kernels(monkeypatch):
    """Failed before: fp32 q/k (Qwen3's norm + RoPE) beside bf16 v reached the Triton backward's dot(do, v)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    loss32, grads32 = _packed_qwen3(False, True)
    loss16, grads16 = _packed_qwen3(True, True)
    assert abs(float(loss16) - float(loss32)) < 2e-2 * float(loss32)
    for name, g in grads32.items():
        err = float((grads16[name].float() - g).norm() / g.norm().clamp(min=1e-12))
        assert err < 5e-2, (name, err)


def test_q_k_v_of_different_dtypes_are_refused():
    q = torch.randn(6, 2, 8)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="share a dtype"):
        varlen_attention(q, q, q.bfloat16(), cu, 6)


def test_the_attention_casts_to_autocast_or_the_lowest_precision():
    q = torch.randn(1, 2, 5, 8)  # [B, H, T, D], fp32 as after Qwen3's q_norm and RoPE
    v = q.bfloat16()
    module = torch.nn.Module()
    out, _ = varlen_attention_forward(module, q, q, v, None)
    assert out.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = varlen_attention_forward(module, q, q, q, None)
    assert out.dtype == torch.bfloat16


def test_lm_head_operands_follow_the_matmul_compute_dtype():
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(8, 16, bias=False)
    hidden = torch.randn(3, 8)
    h, w = lm_head_operands(model, hidden)
    assert h.dtype == w.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, w = lm_head_operands(model, hidden)
    assert h.dtype == w.dtype == torch.bfloat16
    model.lm_head.to(torch.bfloat16)  # FSDP2 / DeepSpeed bf16: the gathered weight is bf16
    h, w = lm_head_operands(model, hidden)
    assert h.dtype == w.dtype == torch.bfloat16


def _count_reads(monkeypatch, *tensors: torch.Tensor) -> list[str]:
    """The host reads (tolist, item, int, ...) of ``tensors``' storage from now on, by name."""
    watched = {t.untyped_storage().data_ptr() for t in tensors}
    reads = []

    def counting(name, original):
        def read(self, *args):
            if self.untyped_storage().data_ptr() in watched:
                reads.append(name)
            return original(self, *args)

        return read

    for name in ("tolist", "item", "__int__", "__index__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    return reads


def test_a_layout_reaches_every_layer_without_a_device_read(monkeypatch):
    """r4b's forwards hand every layer the row's PackedLayout (host values known where the row was built): no layer
    reads cu_seqlens. A caller passing flash-attn's cu_seq_lens_q instead costs one read per call (its max length,
    even as a tensor as the Qwen2.5-VL vision tower gives it, is not read), and calls with equal packings share one
    layout (and its block mask / tile schedule); an in-place change is a new packing."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the kernel path (the explicit-mask reference is a fallback)
    q = torch.randn(1, 2, 10, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    fresh = cu.clone()
    reads = _count_reads(monkeypatch, cu, fresh)
    layout = PackedLayout(cu, [0, 4, 10])
    assert (layout.total, layout.max_seqlen, layout.shortest) == (10, 6, 4)
    module = torch.nn.Module()
    for _ in range(3):  # three layers
        varlen_attention_forward(module, q, q, q, None, r4b_layout=layout)
    assert reads == []
    for _ in range(3):
        varlen_attention_forward(module, q, q, q, None, cu_seq_lens_q=fresh, max_length_q=torch.tensor(6))
    assert reads == ["tolist"] * 3
    assert _attention._layout_of(fresh, None, None) is _attention._layout_of(cu, None, None)
    fresh[1] = 3
    assert _attention._layout_of(fresh, None, None).host == (0, 3, 10)
    with pytest.raises(ValueError, match="r4b_layout carries"):
        varlen_attention_forward(module, q, q, q, None, r4b_layout=layout, segment_ids=torch.zeros(1, 10))


def test_a_packed_row_runs_the_model_without_reading_cu_seqlens(monkeypatch, tiny_r4b):
    """The packed rows (shared-prefix, unshared, SFT) carry cu_seqlens' host values, which PackedRow.inputs() hands to
    the forward: the tiny R-4B's whole packed forward never reads cu_seqlens back."""
    from r4b.data import EncodedSample, collate_packed
    from r4b.models.forward import packed_final_hidden
    from r4b.shared_prefix import pack_shared_prefix, pack_unshared

    args = ([torch.tensor([1, 2, 3]), torch.tensor([4, 5])], torch.tensor([[6, 7], [8, 0], [9, 9]]),
            torch.tensor([2, 1, 2]), torch.tensor([0, 0, 1]), torch.zeros(3))  # fmt: skip
    samples = [EncodedSample([1, 2, 3], [-100, 2, 3]), EncodedSample([4, 5], [-100, 5])]
    for packed in (pack_shared_prefix(*args), pack_unshared(*args), collate_packed(samples, [0, 1]).to("cpu")):
        assert packed.cu_seqlens_host == tuple(packed.cu_seqlens.tolist())
        inputs = packed.inputs()
        assert inputs["cu_seqlens_host"] == packed.cu_seqlens_host
        model_inputs = ("input_ids", "position_ids", "cu_seqlens", "max_seqlen", "segment_ids", "cu_seqlens_host")
        reads = _count_reads(monkeypatch, packed.cu_seqlens)
        inputs["input_ids"] = inputs["input_ids"] + 30  # text tokens (the tiny vocabulary's low ids are specials)
        hidden = packed_final_hidden(tiny_r4b, **{k: v for k, v in inputs.items() if k in model_inputs})
        assert hidden.shape[0] == packed.num_tokens and reads == []
        monkeypatch.undo()


def test_flash_attn_import_is_tried_once():
    _varlen._flash_attn_varlen.cache_clear()
    for _ in range(3):
        _varlen._flash_attn_varlen()
    assert _varlen._flash_attn_varlen.cache_info().misses == 1


def test_process_group_timeout_is_configurable(monkeypatch):
    import torch.distributed as dist

    from r4b.train import engine

    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    engine.init_distributed()
    assert seen["timeout"] == timedelta(minutes=engine.EngineConfig.timeout_minutes) >= timedelta(hours=1)
    engine.init_distributed(7.5)
    assert seen["timeout"] == timedelta(minutes=7.5)
    with pytest.raises(ValueError, match="timeout_minutes"):
        engine.init_distributed(0)


# --------------------------------------------------------------------------------------------------------------
# the stages on the single engine


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, n_sft=16, n_rl=4, n_eval=2, seed=0)
    return out


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sft_bf16_tracks_fp32(data, tmp_path, monkeypatch):
    from r4b.train.sft import SFTConfig, train_sft

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the trainer on the CPU torch path (the kernels: above)
    common = [f"data.train=[{data / 'sft.jsonl'}]", "train.global_batch_samples=8", "train.max_steps=3",
              "train.progress=false", "train.tensorboard=false", "train.export=false"]  # fmt: skip
    demo = ROOT / "configs" / "demo" / "sft.yaml"
    fp32 = _rows(train_sft(load_config(SFTConfig, demo, [f"output_dir={tmp_path / 'a'}", *common])))
    bf16 = _rows(train_sft(load_config(SFTConfig, demo, [f"output_dir={tmp_path / 'b'}", *common,
                                                         "engine.mixed_precision=bf16"])))  # fmt: skip
    for a, b in zip(fp32, bf16, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=GRAD_NORM_RTOL)


def test_bpo_bf16_trains_and_its_first_step_tracks_fp32(data, tmp_path, monkeypatch):
    """End to end (its update against fp32 on a fixed batch: tests/rl/test_bpo_update.py). Only step 1 is compared:
    after one bf16 update the policies, hence the sampled rollouts, differ."""
    from r4b.train.bpo import BPOConfig, train_bpo

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = ["model.path=null", f"data.prompts=[{data / 'rl.jsonl'}]",
            "data.eval=null", "rollout.group_size=2", "rollout.max_new_tokens=6", "rollout.prompts_per_call=2",
            "train.prompts_per_step=4", "train.steps=4", "train.max_steps=2", "train.progress=false",
            "train.tensorboard=false", "train.export=false", "policy.beta=0.01", "policy.mini_batches=2",
            "reward.name=format"]  # fmt: skip
    demo = ROOT / "configs" / "demo" / "bpo.yaml"
    run = lambda name, *extra: _rows(train_bpo(load_config(BPOConfig, demo, [f"output_dir={tmp_path / name}", *args,
                                                                             *extra])))  # fmt: skip
    rows = run("bf16", "engine.mixed_precision=bf16")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["kl"] >= 0 for r in rows)
    assert "nonfinite" not in rows[-1]
    fp32 = run("fp32", "train.max_steps=1")
    assert rows[0]["reward"] == fp32[0]["reward"]  # the same rollouts
    assert rows[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=2e-2, abs=1e-3)
