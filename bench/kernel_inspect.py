"""Inspection tools for r4b's attention kernels (development, not training): the tile efficiency of the varlen
kernel against the exact schedule, and the schedule-walking kernels compiled for Hopper without a GPU."""

from __future__ import annotations

import re

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from r4b.kernels import attention_schedule
from r4b.kernels.attention_schedule import build_tile_schedule, launch_config
from r4b.kernels.attention_tiles import kernel_flags
from r4b.kernels.packed_layout import PackedLayout


def current_kernel_stats(
    cu_seqlens: torch.Tensor,
    *,
    causal: bool = True,
    segment_ids: torch.Tensor | None = None,
    bidir_ids: torch.Tensor | None = None,
    block_m: int = 128,
    block_n: int = 64,
) -> dict:
    """Tile efficiency of ``varlen_attention``'s forward kernel on this layout, against the exact schedule.

    The kernel launches documents x cdiv(longest, block_m) programs per head; each active one loops over the
    key tiles below its causal bound (all of the document with bidir ids or ``causal=False``) and computes
    every tile it loops over, except that with segment or bidir ids it skips the empty ones (after loading
    their ids). ``visited`` = tiles computed (matmuls), ``iterated`` = loop steps."""
    layout = PackedLayout(cu_seqlens, segment_ids=segment_ids, bidir_ids=bidir_ids)
    schedule = build_tile_schedule(layout, causal=causal, block_m=block_m, block_n=block_n)
    stats = schedule.stats()
    lengths = cu_seqlens.diff().long()
    length = lengths[schedule.q_doc.long()]
    hi = length
    if causal and bidir_ids is None:
        hi = torch.minimum(length, schedule.q_start.long() + block_m)
    iterated = int(((hi + block_n - 1) // block_n).sum())
    visited = stats["nonempty_tiles"] if (segment_ids is not None or bidir_ids is not None) else iterated
    programs = (lengths.numel()) * int((int(lengths.max()) + block_m - 1) // block_m)
    pairs_per_tile = block_m * block_n
    return {
        **stats,
        "block_m": block_m,
        "block_n": block_n,
        "programs": programs,
        "idle_programs": programs - stats["q_tiles"],
        "iterated_tiles": iterated,
        "visited_tiles": visited,
        "visited_per_nonempty": visited / max(1, stats["nonempty_tiles"]),
        "visible_per_visited_pairs": stats["visible_pairs"] / max(1, visited * pairs_per_tile),
        "visible_per_nonempty_pairs": stats["visible_pairs"] / max(1, stats["nonempty_tiles"] * pairs_per_tile),
        "full_share": stats["full_tiles"] / max(1, stats["nonempty_tiles"]),
    }


def compile_for_sm90(
    head_dim: int, *, dtype: str = "bf16", capability: int = 90, group: int = 4, kernels=("fwd", "dq", "dkdv")
) -> dict:
    """Compile the walking kernels (``kernels``) for ``sm_<capability>`` at their launch configs, without a GPU
    (Triton's own ptxas): per kernel the shared memory its CTA needs, the async (cp.async) copies and wgmma dots in its
    Triton GPU IR. Shared-prefix + bidir masks, GQA ``group``, pointers and strides as the launcher specializes
    them (16-aligned; head strides only when the head dim is a multiple of 16). Needs TRITON_INTERPRET unset when
    this module was imported."""
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    block_m, block_n = 128, 64
    if torch_dtype.itemsize > 2:
        block_m = block_n = 64
    q = torch.empty((1, group, head_dim), dtype=torch_dtype, device="meta")
    kv = torch.empty((1, 1, head_dim), dtype=torch_dtype, device="meta")
    flags = kernel_flags(q, True, q, q, kv, kv)
    flags.update(UPCAST=False, GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n)
    out = {}
    table = {
        "fwd": attention_schedule.schedule_fwd_kernel,
        "dq": attention_schedule.schedule_dq_kernel,
        "dkdv": attention_schedule.schedule_dkdv_kernel,
    }
    for name in kernels:
        kernel = table[name]
        names = kernel.arg_names
        signature, attrs = {}, {}
        for i, arg in enumerate(names):
            if arg in flags:
                signature[arg] = "constexpr"
            elif arg in ("lse_ptr", "delta_ptr"):
                signature[arg] = "*fp32"
            elif arg.endswith("_ptr"):
                data = arg[:-4] in ("q", "k", "v", "o", "do", "dq", "dk", "dv")
                signature[arg] = f"*{dtype}" if data else "*i32"
            else:
                signature[arg] = "fp32" if "scale" in arg else "i32"
            if arg.endswith("_ptr") or (arg.startswith("stride") and (arg.endswith("n") or head_dim % 16 == 0)):
                attrs[(i,)] = [["tt.divisibility", 16]]
        source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in flags.items()
                           if k in names}, attrs=attrs)  # fmt: skip
        options = launch_config(name, torch_dtype, block_m, block_n)
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
        ir = compiled.asm["ttgir"]
        out[name] = {
            **options,
            "shared": compiled.metadata.shared,
            "async_copies": len(re.findall(r"async_copy_global_to_local", ir)),
            "wgmma": len(re.findall(r"warp_group_dot\b", ir)),
            "kv_buffers": sorted(set(re.findall(r"memdesc<(\d+)x\d+x\d+x" + dtype.replace("fp", "f"), ir))),
        }
    return out
