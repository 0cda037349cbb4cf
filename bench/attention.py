"""Packed varlen attention: r4b against flash-attn (or torch's FA2 varlen), FlexAttention and SDPA with a dense mask.

    python bench/attention.py             # H100 sizes: 8k-64k packed tokens, head_dim 128, GQA 32/8, bf16
    python bench/attention.py --smoke     # tiny sizes on a CPU: a check that it runs

Two tables:
1. masks: plain causal documents, vision-tower tiles (729-token images, full
   attention, 16 heads of 72) and shared-prefix documents (a prompt with
   responses that see it but not each other, an image block inside the prompt
   attending bidirectionally), forward and forward+backward, TFLOP/s counted on
   the visible (query, key) pairs only.
2. a BPO batch (per group: a 1,024-token image prompt and 2g = 16 responses of
   ~300 tokens): shared-prefix packing (each prompt once) against unshared
   packing (each response with its own copy of the prompt): tokens and time.
3. tile efficiency of r4b's current forward kernel per layout (its tiles at 128 x 64), against the exact
   tile schedule (r4b.kernels.attention_schedule): tiles visited (computed) against non-empty tiles, loop
   steps, idle programs, and visible pairs against visited pairs.

Competitors: ``r4b`` (the Triton kernel), ``r4b-auto`` (what the ``r4b_varlen`` plug-in runs under
``R4B_ATTENTION_BACKEND=auto``), ``r4b-schedule`` (the kernels walking the tile schedule; GPU only),
``flash-attn`` where installed, else ``torch-fa2`` (torch's FlashAttention-2 varlen kernel,
``torch.nn.attention.varlen.varlen_attn``, torch >= 2.11, plain masks only), ``flex``, ``sdpa-dense-mask``.
Writes bench/results/attention-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

if "--smoke" in sys.argv and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    build_competitor,
    compile_fresh,
    environment,
    error_row,
    error_text,
    free_device_memory,
    median_ms,
    peak_gib,
    print_table,
    write_results,
)
from kernel_inspect import current_kernel_stats

from r4b.kernels import varlen_attention
from r4b.kernels.attention_schedule import default_blocks, schedule_for
from r4b.kernels.packed_layout import PackedLayout
from r4b.kernels.reference import attention_mask_reference
from r4b.models.attention_backends import fa2_varlen, fa2_varlen_attention, packed_attention


class Layout:
    """A packed batch: documents, segment ids (0 = prompt, k = response k), bidir ids, causality,
    and the attention heads it runs with (q heads, kv heads, head dim; None: the command line's)."""

    def __init__(self, lengths: list[int], segments: list[list[int]] | None = None, bidir: list[int] | None = None,
                 *, causal: bool = True, heads: tuple[int, int, int] | None = None):  # fmt: skip
        self.lengths = lengths
        self.causal = causal
        self.heads = heads
        self.cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        self.n = sum(lengths)
        self.seg = None if segments is None else torch.tensor([s for doc in segments for s in doc], dtype=torch.int32)
        self.bidir = None if bidir is None else torch.tensor(bidir, dtype=torch.int32)
        self.packed = self._packed()

    def to(self, device: str) -> Layout:
        for name in ("cu", "seg", "bidir"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        self.packed = self._packed()
        return self

    def _packed(self) -> PackedLayout:
        """r4b's per-batch layout (host values known: no device read in the timed calls)."""
        host = [0, *itertools.accumulate(self.lengths)]
        return PackedLayout(self.cu, host, segment_ids=self.seg, bidir_ids=self.bidir)

    def visible_pairs(self) -> int:
        """Pairs the mask allows, computed one document at a time (no N x N tensor)."""
        total, offset = 0, 0
        for length in self.lengths:
            cu = torch.tensor([0, length], dtype=torch.int32)
            seg = None if self.seg is None else self.seg[offset : offset + length].cpu()
            bidir = None if self.bidir is None else self.bidir[offset : offset + length].cpu()
            total += int(attention_mask_reference(cu, causal=self.causal, segment_ids=seg, bidir_ids=bidir).sum())
            offset += length
        return total


def causal_documents(n_tokens: int, doc_len: int) -> Layout:
    lengths = [doc_len] * (n_tokens // doc_len) + ([n_tokens % doc_len] if n_tokens % doc_len else [])
    return Layout(lengths)


def vision_tiles(n_tokens: int, tile: int) -> Layout:
    """A vision tower's batch: one document per image tile, full attention, SigLIP-so400m heads (16 x 72)."""
    return Layout([tile] * max(1, n_tokens // tile), causal=False, heads=(16, 16, 72))


def bpo_groups(num_groups: int, prompt: int, image: int, responses: int, mean_len: int, *, shared: bool, seed=0):
    """num_groups prompts with `responses` responses each, packed shared-prefix or unshared."""
    gen = torch.Generator().manual_seed(seed)
    lengths, segments, bidir = [], [], []
    for group in range(num_groups):
        resp = torch.randint(mean_len // 3, 5 * mean_len // 3, (responses,), generator=gen).tolist()
        image_ids = [0] * 8 + [group + 1] * image + [0] * (prompt - image - 8)
        if shared:
            lengths.append(prompt + sum(resp))
            segments.append([0] * prompt + [k for k, n in enumerate(resp, start=1) for _ in range(n)])
            bidir += image_ids + [0] * sum(resp)
        else:
            for n in resp:
                lengths.append(prompt + n)
                segments.append([0] * (prompt + n))
                bidir += image_ids + [0] * n
    return Layout(lengths, segments, bidir)


def flex_attention_fn(layout: Layout, device: str):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    lengths = torch.tensor(layout.lengths, device=device)
    doc = torch.repeat_interleave(torch.arange(len(layout.lengths), device=device), lengths)
    seg = layout.seg if layout.seg is not None else torch.zeros(layout.n, dtype=torch.int32, device=device)
    bidir = layout.bidir if layout.bidir is not None else torch.zeros(layout.n, dtype=torch.int32, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        if not layout.causal:
            return doc[q_idx] == doc[kv_idx]
        causal = (kv_idx <= q_idx) & ((seg[kv_idx] == 0) | (seg[kv_idx] == seg[q_idx]))
        both = (bidir[q_idx] == bidir[kv_idx]) & (bidir[kv_idx] != 0)
        return (doc[q_idx] == doc[kv_idx]) & (causal | both)

    block_mask = create_block_mask(mask_mod, None, None, layout.n, layout.n, device=device)
    compiled = compile_fresh(flex_attention)  # one compilation per layout: no recompiling across sizes

    def run(q, k, v):
        out = compiled(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                       block_mask=block_mask, enable_gqa=True)  # fmt: skip
        return out[0].transpose(0, 1)

    return run


def sdpa_dense_fn(layout: Layout):
    mask = attention_mask_reference(layout.cu, causal=layout.causal, segment_ids=layout.seg, bidir_ids=layout.bidir)

    def run(q, k, v):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask,
            enable_gqa=True,
        )  # fmt: skip
        return out[0].transpose(0, 1)

    return run


def flash_attn_fn(layout: Layout):
    if layout.seg is not None or layout.bidir is not None:
        return None  # flash-attn has no shared-prefix or bidir masks
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    max_len = max(layout.lengths)
    return lambda q, k, v: flash_attn_varlen_func(q, k, v, layout.cu, layout.cu, max_len, max_len, causal=layout.causal)


def torch_fa2_fn(layout: Layout):
    """torch's own FA2 varlen kernel, timed where flash-attn itself is not installed, through the adapter r4b's fa2
    backend runs (this torch's varlen_attn signature, GQA without K / V copies)."""
    if layout.seg is not None or layout.bidir is not None or fa2_varlen() is None or not layout.cu.is_cuda:
        return None
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        pass
    else:
        return None  # the flash-attn row times FlashAttention-2 already
    max_len = max(layout.lengths)
    return lambda q, k, v: fa2_varlen_attention(q, k, v, layout.cu, max_len, causal=layout.causal)


def r4b_auto_fn(layout: Layout):
    """What the r4b_varlen model plug-in runs with R4B_ATTENTION_BACKEND=auto (its block mask built once)."""
    return lambda q, k, v: packed_attention(q, k, v, layout.packed, causal=layout.causal, backend="auto")


def r4b_schedule_fn(layout: Layout, dtype: torch.dtype):
    """r4b's kernels walking the exact tile schedule (built once per layout, outside the timed region; its tiles
    are the kernels' for ``dtype``)."""
    block_m, block_n = default_blocks(dtype)
    schedule_for(layout.packed, causal=layout.causal, block_m=block_m, block_n=block_n)
    return lambda q, k, v: packed_attention(q, k, v, layout.packed, causal=layout.causal, backend="r4b-schedule")


def tile_efficiency(layout: Layout, mask: str, block_m: int = 128, block_n: int = 64) -> dict:
    """The current forward kernel's tiles (at its first config, 128 x 64) against the exact schedule."""
    stats = current_kernel_stats(
        layout.cu, causal=layout.causal, segment_ids=layout.seg, bidir_ids=layout.bidir,
        block_m=block_m, block_n=block_n,
    )  # fmt: skip
    return {"mask": mask, "tokens": layout.n, **stats}


def r4b_fn(layout: Layout):
    max_len = max(layout.lengths)
    return lambda q, k, v: varlen_attention(
        q, k, v, layout.cu, max_len, causal=layout.causal, segment_ids=layout.seg, bidir_ids=layout.bidir,
        cu_seqlens_host=layout.packed.host,
    )  # fmt: skip


def time_impl(name: str, fn, layout: Layout, args, extra: dict) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    q_heads, kv_heads, head_dim = layout.heads or (args.q_heads, args.kv_heads, args.head_dim)
    q = torch.randn(layout.n, q_heads, head_dim, device=device, dtype=dtype, generator=gen)
    k, v = (torch.randn(layout.n, kv_heads, head_dim, device=device, dtype=dtype, generator=gen) for _ in range(2))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    grad = torch.randn_like(q)
    pair_flops = 4 * head_dim * q_heads * extra["visible_pairs"]

    def forward():
        with torch.no_grad():
            fn(q, k, v)

    def train():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(grad)

    rows = []
    for mode, call, mult in (("fwd", forward, 1.0), ("fwd+bwd", train, 3.5)):
        row = {"impl": name, "mode": mode, "tokens": layout.n, **extra}
        with error_row(row):  # OOM, a backend refusing the shape, a compile failure: this row's error
            row["ms"] = median_ms(call, warmup=args.warmup, repeats=args.repeats)
            row["peak_gib"] = peak_gib(call)
            row["tflops"] = mult * pair_flops / (row["ms"] * 1e-3) / 1e12
        rows.append(row)
        print(row, flush=True)
    return rows


def competitors(layout: Layout, args) -> dict:
    """The implementations for one layout; one that fails to build is timed as a stand-in raising its error."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    impls = {
        "r4b": build_competitor(r4b_fn, layout),
        "flash-attn": build_competitor(flash_attn_fn, layout),
        "torch-fa2": build_competitor(torch_fa2_fn, layout),
    }
    if device == "cuda":  # on the CPU, auto is r4b's kernel itself
        impls["r4b-auto"] = build_competitor(r4b_auto_fn, layout)
        impls["r4b-schedule"] = build_competitor(r4b_schedule_fn, layout, getattr(torch, args.dtype))
    if args.flex:
        impls["flex"] = build_competitor(flex_attention_fn, layout, device)
    if layout.n <= args.sdpa_max_tokens:
        impls["sdpa-dense-mask"] = build_competitor(sdpa_dense_fn, layout)
    return {name: fn for name, fn in impls.items() if fn is not None}


def run(args) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mask_rows, tile_rows = [], []
    for n_tokens in args.sizes:
        for mask_name, layout in (
            ("causal-docs", causal_documents(n_tokens, args.doc_len)),
            ("vision-tiles", vision_tiles(n_tokens, args.tile)),
            ("shared-prefix", bpo_groups(max(1, n_tokens // (args.prompt + 16 * args.response)), args.prompt,
                                         args.image, 16, args.response, shared=True)),
        ):  # fmt: skip
            try:
                layout.to(device)
                extra = {"mask": mask_name, "visible_pairs": layout.visible_pairs()}
                impls = competitors(layout, args)
                tile_rows.append(tile_efficiency(layout, mask_name))
                print(tile_rows[-1], flush=True)
            except Exception as err:  # this layout could not be set up: one error row, the next layout
                mask_rows.append({"impl": "all", "mask": mask_name, "tokens": layout.n, "error": error_text(err)})
                free_device_memory()
                continue
            for name, fn in impls.items():
                mask_rows += time_impl(name, fn, layout, args, extra)

    bpo_rows = []
    for shared in (True, False):
        layout = bpo_groups(args.bpo_groups, args.prompt, args.image, 16, args.response, shared=shared).to(device)
        extra = {"mask": "shared-prefix" if shared else "unshared", "visible_pairs": layout.visible_pairs()}
        bpo_rows += time_impl("r4b", r4b_fn(layout), layout, args, extra)
    return {"rows": mask_rows, "bpo_rows": bpo_rows, "ratios": ratios(mask_rows, bpo_rows), "tiles": tile_rows}


def ratios(mask_rows: list[dict], bpo_rows: list[dict]) -> list[dict]:
    ok = lambda r: "ms" in r and "error" not in r
    ours = {(r["mask"], r["tokens"], r["mode"]): r for r in mask_rows if r["impl"] == "r4b" and ok(r)}
    out = []
    for r in mask_rows:
        base = ours.get((r["mask"], r["tokens"], r["mode"]))
        if r["impl"] != "r4b" and base is not None and ok(r):
            out.append({"mask": r["mask"], "tokens": r["tokens"], "mode": r["mode"], "vs": r["impl"],
                        "r4b_speedup": r["ms"] / base["ms"]})  # fmt: skip
    by_mode = {(r["mask"], r["mode"]): r for r in bpo_rows if ok(r)}
    for mode in ("fwd", "fwd+bwd"):
        shared, unshared = by_mode.get(("shared-prefix", mode)), by_mode.get(("unshared", mode))
        if shared and unshared:
            out.append({"mask": "bpo batch", "tokens": shared["tokens"], "mode": mode, "vs": "unshared packing",
                        "r4b_speedup": unshared["ms"] / shared["ms"],
                        "token_ratio": unshared["tokens"] / shared["tokens"]})  # fmt: skip
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 sizes: a CPU check that the benchmark runs")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--doc-len", type=int, default=2048, help="document length of the causal-docs mask")
    parser.add_argument("--tile", type=int, default=729, help="tokens per image tile of the vision-tiles mask")
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens of a BPO group")
    parser.add_argument("--image", type=int, default=729, help="image tokens inside the prompt (a bidir block)")
    parser.add_argument("--response", type=int, default=300, help="mean response tokens")
    parser.add_argument("--bpo-groups", type=int, default=4)
    parser.add_argument("--sdpa-max-tokens", type=int, default=16384, help="skip the dense mask above this")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-flex", dest="flex", action="store_false", help="skip FlexAttention")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.doc_len, args.tile, args.q_heads, args.kv_heads, args.head_dim = [96], 40, 48, 2, 1, 16
        args.prompt, args.image, args.response, args.bpo_groups = 24, 10, 8, 1
        args.dtype, args.warmup, args.repeats, args.flex = "float32", 0, 1, False
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    payload = run(args)
    payload["environment"] = environment(("flash-attn",))
    payload["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    columns = ["impl", "mask", "tokens", "mode", "ms", "peak_gib", "tflops", "error"]
    print_table(f"varlen attention, {payload['environment']['device']}", payload["rows"], columns)
    print_table("BPO batch: shared-prefix vs unshared packing (r4b)", payload["bpo_rows"], columns)
    tile_columns = ["mask", "tokens", "q_tiles", "nonempty_tiles", "full_tiles", "visited_tiles", "iterated_tiles",
                    "idle_programs", "visited_per_nonempty", "visible_per_visited_pairs", "full_share"]  # fmt: skip
    print_table("tile efficiency of r4b's forward kernel (128 x 64 tiles)", payload["tiles"], tile_columns)
    print_table("ratios (same run)", payload["ratios"], ["mask", "tokens", "mode", "vs", "r4b_speedup", "token_ratio"])
    path = write_results("attention", payload, *([args.out] if args.out else []))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
