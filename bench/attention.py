"""Packed varlen attention: r4b against flash-attn (or torch's FA2 varlen), FlexAttention and SDPA with a dense mask.

    python bench/attention.py             # H100 sizes: 8k-64k packed tokens, head_dim 128, GQA 32/8, bf16
    python bench/attention.py --impls r4b-schedule r4b-kernel torch-fa2 flex   # those rows only, in that order
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

Rows, timed one implementation at a time over every layout, in this order unless ``--impls`` names others:
``r4b-schedule`` (r4b's kernels walking the tile schedule; Triton: a GPU or the interpreter), ``r4b-kernel`` (r4b's
varlen Triton kernel, ``r4b.kernels.varlen_attention``: the row named ``r4b`` before 2026-12), ``r4b`` (what a user
gets by default: the ``r4b_varlen`` plug-in's backend, ``R4B_ATTENTION_BACKEND`` else ``auto``), ``torch-fa2``
(torch's FlashAttention-2 varlen kernel, ``torch.nn.attention.varlen.varlen_attn``, torch >= 2.11, plain masks,
through r4b's fa2 adapter) where flash-attn is not installed, else ``flash-attn``, ``flex``, ``sdpa-dense-mask``.
Every row names the kernel that ran (``backend``: for ``r4b``, the one ``auto`` picked) and is checked: one more
forward+backward of what was timed, its output and dq, dk, dv on the layout's first documents (at least one, up
to ``--check-tokens``; documents never interact, so those rows of the full call are exact) against
``r4b.kernels.reference.varlen_attention_reference`` in float64 on the same inputs, one document and kv head at a
time: relative errors ``out_rel_err``, ``dq_rel_err``, ``dk_rel_err``, ``dv_rel_err``, their ``max_rel_err`` and
``within_tolerance`` (``TOLERANCE``: the dtype's bound). Rows stream into ``rows-<device>-<date>.jsonl`` and the
JSON as they are measured (bench/common.py: Results). Writes bench/results/attention-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import itertools
import os
import sys
import traceback
from pathlib import Path

if "--smoke" in sys.argv and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    Results,
    build_competitor,
    compile_fresh,
    error_row,
    error_text,
    exit_code,
    free_device_memory,
    median_ms,
    peak_gib,
    print_table,
    within_tolerance,
)
from kernel_inspect import current_kernel_stats

from r4b.kernels import varlen_attention
from r4b.kernels._backend import use_triton
from r4b.kernels.attention_schedule import default_blocks, schedule_for
from r4b.kernels.packed_layout import PackedLayout
from r4b.kernels.reference import attention_mask_reference, varlen_attention_reference
from r4b.models import attention_backends as backends
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


def vision_tiles(n_tokens: int, tile: int, heads: tuple[int, int, int] = (16, 16, 72)) -> Layout:
    """A vision tower's batch: one document per image tile, full attention, SigLIP-so400m heads (16 x 72)."""
    return Layout([tile] * max(1, n_tokens // tile), causal=False, heads=heads)


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


def r4b_default_fn(layout: Layout):
    """What the r4b_varlen plug-in runs by default: the process's backend setting (``R4B_ATTENTION_BACKEND``, else
    ``auto``), its block mask or tile schedule built once per layout, as in a model's forward."""
    return lambda q, k, v: packed_attention(q, k, v, layout.packed, causal=layout.causal)


def r4b_schedule_fn(layout: Layout, dtype: torch.dtype):
    """r4b's kernels walking the exact tile schedule (built once per layout, outside the timed region; its tiles
    are the kernels' for ``dtype``); None where Triton does not run (the call would be the reference)."""
    if not use_triton(torch.empty(0, dtype=dtype, device=layout.cu.device)):
        return None
    block_m, block_n = default_blocks(dtype)
    schedule_for(layout.packed, causal=layout.causal, block_m=block_m, block_n=block_n)
    return lambda q, k, v: packed_attention(q, k, v, layout.packed, causal=layout.causal, backend="r4b-schedule")


def r4b_kernel_fn(layout: Layout):
    """r4b's varlen kernel, ``r4b.kernels.varlen_attention`` (its own dispatch: see :func:`kernel_dispatch`)."""
    max_len = max(layout.lengths)
    return lambda q, k, v: varlen_attention(
        q, k, v, layout.cu, max_len, causal=layout.causal, segment_ids=layout.seg, bidir_ids=layout.bidir,
        cu_seqlens_host=layout.packed.host,
    )  # fmt: skip


def tile_efficiency(layout: Layout, mask: str, block_m: int = 128, block_n: int = 64) -> dict:
    """The current forward kernel's tiles (at its first config, 128 x 64) against the exact schedule."""
    stats = current_kernel_stats(
        layout.cu, causal=layout.causal, segment_ids=layout.seg, bidir_ids=layout.bidir,
        block_m=block_m, block_n=block_n,
    )  # fmt: skip
    return {"mask": mask, "tokens": layout.n, **stats}


# Every row's name, in the order timed unless --impls names others: the kernels a GPU has not timed first, then
# today's kernel and the anchors, the dense mask last.
IMPLS = ("r4b-schedule", "r4b-kernel", "r4b", "torch-fa2", "flash-attn", "flex", "sdpa-dense-mask")


def build_impl(name: str, layout: Layout, args: argparse.Namespace, device: str):
    """The function timed for ``name`` on ``layout``; None where it does not apply (a mask it lacks, a package or
    device it needs); one that fails to build is a stand-in raising its error (an error row)."""
    dtype = getattr(torch, args.dtype)
    if name == "r4b-schedule":
        return build_competitor(r4b_schedule_fn, layout, dtype)
    if name == "r4b-kernel":
        return build_competitor(r4b_kernel_fn, layout)
    if name == "r4b":
        return build_competitor(r4b_default_fn, layout)
    if name == "torch-fa2":
        return build_competitor(torch_fa2_fn, layout)
    if name == "flash-attn":
        return build_competitor(flash_attn_fn, layout)
    if name == "flex":
        return build_competitor(flex_attention_fn, layout, device) if args.flex else None
    if name == "sdpa-dense-mask":
        return build_competitor(sdpa_dense_fn, layout) if layout.n <= args.sdpa_max_tokens else None
    raise SystemExit(f"attention: unknown impl {name!r}; known: {list(IMPLS)}")


def kernel_dispatch(layout: Layout, dtype: torch.dtype, device: str) -> str:
    """Which code ``varlen_attention`` runs for this layout: flash-attn (plain 16-bit masks on a GPU, where
    installed), r4b's Triton kernel, or the float reference."""
    plain = layout.seg is None and layout.bidir is None
    half = dtype in (torch.float16, torch.bfloat16)
    probe = torch.empty(0, dtype=dtype, device=device)
    if device == "cuda" and plain and half and importlib.util.find_spec("flash_attn") is not None:
        return "flash-attn"
    return "r4b-triton" if use_triton(probe) else "reference"


def backend_of(name: str, layout: Layout, args: argparse.Namespace, device: str) -> dict:
    """What a row ran: ``backend`` (the kernel) and, for ``r4b``, the setting that chose it."""
    dtype = getattr(torch, args.dtype)
    if name == "r4b":
        setting = backends.attention_backend()
        probe = torch.empty(0, dtype=dtype, device=device)
        kind = backends.resolve_backend(setting, probe, causal=layout.causal, segment_ids=layout.seg,
                                        bidir_ids=layout.bidir)  # fmt: skip
        if kind == "r4b" or (kind == "r4b-schedule" and not use_triton(probe)):
            kind = kernel_dispatch(layout, dtype, device)
        return {"backend": kind, "backend_setting": setting}
    if name == "r4b-kernel":
        return {"backend": kernel_dispatch(layout, dtype, device)}
    if name == "r4b-schedule":
        return {"backend": "r4b-schedule (tiles {}x{})".format(*default_blocks(dtype))}
    if name == "torch-fa2":
        q_heads, kv_heads, _ = layout.heads or (args.q_heads, args.kv_heads, args.head_dim)
        takes = fa2_varlen() is not None and "enable_gqa" in inspect.signature(fa2_varlen()).parameters
        how = "enable_gqa=True" if takes else "fewer kv heads passed through"
        return {"backend": "fa2 varlen_attn", "fa2_gqa": how if q_heads != kv_heads else "no gqa"}
    return {"backend": {"flex": "flex_attention (torch.compile)", "sdpa-dense-mask": "sdpa"}.get(name, name)}


def make_inputs(layout: Layout, args: argparse.Namespace, device: str):
    """q, k, v (leaves) and the upstream gradient of one layout, the same for every implementation (seeded)."""
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    q_heads, kv_heads, head_dim = layout.heads or (args.q_heads, args.kv_heads, args.head_dim)
    q = torch.randn(layout.n, q_heads, head_dim, device=device, dtype=dtype, generator=gen)
    k, v = (torch.randn(layout.n, kv_heads, head_dim, device=device, dtype=dtype, generator=gen) for _ in range(2))
    grad = torch.randn(q.shape, device=device, dtype=dtype, generator=gen)
    return [t.requires_grad_() for t in (q, k, v)], grad


def checked_documents(layout: Layout, max_tokens: int) -> int:
    """How many leading documents the check covers: whole documents up to ``max_tokens``, at least one."""
    count, total = 0, 0
    for length in layout.lengths:
        if count and total + length > max_tokens:
            break
        count, total = count + 1, total + length
    return count


def reference_outputs(layout: Layout, q, k, v, grad, docs: int) -> dict:
    """float64 out, dq, dk, dv of the first ``docs`` documents (r4b.kernels.reference.varlen_attention_reference,
    one document and kv head at a time, so its [heads, L, L] scores stay small)."""
    n_check = sum(layout.lengths[:docs])
    group = q.shape[1] // k.shape[1]
    ref = {"out": q.new_empty(n_check, *q.shape[1:], dtype=torch.float64)}
    ref["dq"] = torch.empty_like(ref["out"])
    ref["dk"] = k.new_empty(n_check, *k.shape[1:], dtype=torch.float64)
    ref["dv"] = torch.empty_like(ref["dk"])
    offset = 0
    for length in layout.lengths[:docs]:
        rows = slice(offset, offset + length)
        cu = torch.tensor([0, length], dtype=torch.int32, device=q.device)
        ids = {name: None if t is None else t[rows] for name, t in (("segment_ids", layout.seg),
                                                                     ("bidir_ids", layout.bidir))}  # fmt: skip
        for head in range(k.shape[1]):
            heads = slice(head * group, (head + 1) * group)
            qs, ks, vs = (t[rows, h].detach().double().requires_grad_() for t, h in
                          ((q, heads), (k, slice(head, head + 1)), (v, slice(head, head + 1))))  # fmt: skip
            out = varlen_attention_reference(qs, ks, vs, cu, length, causal=layout.causal, **ids)
            (out * grad[rows, heads].double()).sum().backward()
            ref["out"][rows, heads], ref["dq"][rows, heads] = out.detach(), qs.grad
            ref["dk"][rows, head : head + 1], ref["dv"][rows, head : head + 1] = ks.grad, vs.grad
        offset += length
    return ref


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.detach().double() - expected).norm() / expected.norm().clamp(min=1e-300))


def check_errors(fn, q, k, v, grad, reference: dict) -> dict:
    """One forward+backward of ``fn`` on the full inputs; its first documents' output and gradients against the
    float64 reference: relative (Frobenius) errors and their maximum."""
    n_check = reference["out"].shape[0]
    q.grad = k.grad = v.grad = None
    out = fn(q, k, v)
    out.backward(grad)
    errors = {f"{name}_rel_err": _rel_err(t[:n_check], reference[name])
              for name, t in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad))}  # fmt: skip
    errors["max_rel_err"] = max(errors.values())
    return errors


# A row is within tolerance when its largest relative error is at or under its dtype's bound (the kernel tests'
# gradient bounds: 16-bit P and dS products).
TOLERANCE = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 4e-2}


class Case:
    """One layout of the benchmark, set up once: on the device, its visible pairs, its float64 reference."""

    def __init__(self, mask: str, layout: Layout, args: argparse.Namespace, device: str) -> None:
        self.mask, self.layout = mask, layout.to(device)
        self.extra = {"mask": mask, "visible_pairs": layout.visible_pairs()}
        self.reference = None
        if args.check:
            (q, k, v), grad = make_inputs(layout, args, device)
            self.reference = reference_outputs(layout, q, k, v, grad, checked_documents(layout, args.check_tokens))
            self.extra["checked_tokens"] = self.reference["out"].shape[0]


def time_impl(name: str, fn, case: Case, args: argparse.Namespace, device: str) -> list[dict]:
    """The forward and forward+backward rows of one implementation on one layout, timed, then checked."""
    layout = case.layout
    (q, k, v), grad = make_inputs(layout, args, device)
    q_heads, _, head_dim = layout.heads or (args.q_heads, args.kv_heads, args.head_dim)
    pair_flops = 4 * head_dim * q_heads * case.extra["visible_pairs"]

    def forward():
        with torch.no_grad():
            fn(q, k, v)

    def train():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(grad)

    ran = backend_of(name, layout, args, device)
    rows = []
    for mode, call, mult in (("fwd", forward, 1.0), ("fwd+bwd", train, 3.5)):
        row = {"impl": name, "mode": mode, "tokens": layout.n, **case.extra, **ran}
        with error_row(row):  # OOM, a backend refusing the shape, a compile failure: this row's error
            row["ms"] = median_ms(call, warmup=args.warmup, repeats=args.repeats)
            row["peak_gib"] = peak_gib(call)
            row["tflops"] = mult * pair_flops / (row["ms"] * 1e-3) / 1e12
        rows.append(row)
    if case.reference is not None and not any("error" in row for row in rows):
        check(rows, fn, (q, k, v), grad, case.reference, args.dtype)
    return rows


def check(rows: list[dict], fn, qkv, grad, reference: dict, dtype: str) -> None:
    """Put the errors of one checked call on the forward row (output) and the forward+backward row (all); a check
    that fails is ``check_error`` on both (their timings stay)."""
    try:
        errors = check_errors(fn, *qkv, grad, reference)
    except Exception as err:
        for row in rows:
            row["check_error"] = error_text(err)
        traceback.print_exc()
        return
    forward, train = rows
    forward |= {"out_rel_err": errors["out_rel_err"], "max_rel_err": errors["out_rel_err"]}
    train |= errors
    for row in rows:
        row["within_tolerance"] = within_tolerance(row, {"max_rel_err": TOLERANCE[dtype]})


def layouts_of(n_tokens: int, args: argparse.Namespace) -> list[tuple[str, Layout]]:
    groups = max(1, n_tokens // (args.prompt + 16 * args.response))
    return [
        ("causal-docs", causal_documents(n_tokens, args.doc_len)),
        ("vision-tiles", vision_tiles(n_tokens, args.tile, tuple(args.vision_heads))),
        ("shared-prefix", bpo_groups(groups, args.prompt, args.image, 16, args.response, shared=True)),
    ]


def prepare_cases(args: argparse.Namespace, device: str, results: Results) -> list[Case]:
    """Every (size, mask) layout set up, its tile efficiency recorded; one that cannot be set up is an error row."""
    cases = []
    for n_tokens in args.sizes:
        for mask, layout in layouts_of(n_tokens, args):
            try:
                cases.append(Case(mask, layout, args, device))
                results.add("tiles", tile_efficiency(layout, mask))
            except Exception as err:  # this layout could not be set up: one error row, the next layout
                results.add("rows", {"impl": "all", "mask": mask, "tokens": layout.n, "error": error_text(err)})
                free_device_memory()
    return cases


def run(args: argparse.Namespace, results: Results) -> None:
    """One implementation at a time over every layout (the most wanted rows first), then the BPO batch."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = prepare_cases(args, device, results)
    for name in args.impls:
        for case in cases:
            fn = build_impl(name, case.layout, args, device)
            if fn is None:
                continue
            for row in time_impl(name, fn, case, args, device):
                results.add("rows", row)
            free_device_memory()
    if not args.bpo_batch:
        return
    for shared in (True, False):
        layout = bpo_groups(args.bpo_groups, args.prompt, args.image, 16, args.response, shared=shared)
        case = Case("shared-prefix" if shared else "unshared", layout, args, device)
        for row in time_impl("r4b-kernel", r4b_kernel_fn(case.layout), case, args, device):
            results.add("bpo_rows", row)


# The rows every other row is compared with (same mask, size and mode): r4b's default, its kernel, its schedule.
BASES = ("r4b", "r4b-kernel", "r4b-schedule")


def ratios(mask_rows: list[dict], bpo_rows: list[dict]) -> list[dict]:
    """``r4b_speedup`` = the other row's time / the base row's time (> 1: the base is faster), same run; and the
    BPO batch's unshared / shared packing."""
    ok = lambda r: "ms" in r and "error" not in r
    out = []
    for base_name in BASES:
        ours = {(r["mask"], r["tokens"], r["mode"]): r for r in mask_rows if r["impl"] == base_name and ok(r)}
        for r in mask_rows:
            base = ours.get((r.get("mask"), r.get("tokens"), r.get("mode")))
            if r["impl"] != base_name and base is not None and ok(r):
                out.append({"mask": r["mask"], "tokens": r["tokens"], "mode": r["mode"], "base": base_name,
                            "vs": r["impl"], "r4b_speedup": r["ms"] / base["ms"]})  # fmt: skip
    by_mode = {(r["mask"], r["mode"]): r for r in bpo_rows if ok(r)}
    for mode in ("fwd", "fwd+bwd"):
        shared, unshared = by_mode.get(("shared-prefix", mode)), by_mode.get(("unshared", mode))
        if shared and unshared:
            out.append({"mask": "bpo batch", "tokens": shared["tokens"], "mode": mode, "base": "r4b-kernel",
                        "vs": "unshared packing", "r4b_speedup": unshared["ms"] / shared["ms"],
                        "token_ratio": unshared["tokens"] / shared["tokens"]})  # fmt: skip
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 sizes: a CPU check that the benchmark runs")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS,
                        help="rows to time, in this order (default: all)")  # fmt: skip
    parser.add_argument("--doc-len", type=int, default=2048, help="document length of the causal-docs mask")
    parser.add_argument("--tile", type=int, default=729, help="tokens per image tile of the vision-tiles mask")
    parser.add_argument("--vision-heads", type=int, nargs=3, default=[16, 16, 72], metavar=("Q", "KV", "D"),
                        help="heads of the vision-tiles mask (SigLIP-so400m's)")  # fmt: skip
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens of a BPO group")
    parser.add_argument("--image", type=int, default=729, help="image tokens inside the prompt (a bidir block)")
    parser.add_argument("--response", type=int, default=300, help="mean response tokens")
    parser.add_argument("--bpo-groups", type=int, default=4)
    parser.add_argument("--no-bpo-batch", dest="bpo_batch", action="store_false",
                        help="skip the BPO batch (shared vs unshared packing, r4b's kernel)")  # fmt: skip
    parser.add_argument("--sdpa-max-tokens", type=int, default=16384, help="skip the dense mask above this")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-flex", dest="flex", action="store_false", help="skip FlexAttention")
    parser.add_argument(
        "--check-tokens",
        type=int,
        default=4096,
        help="tokens of whole leading documents checked against float64 (at least one document)",
    )
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the float64 check of each row")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.doc_len, args.tile, args.q_heads, args.kv_heads, args.head_dim = [96], 40, 48, 2, 1, 16
        args.vision_heads = [2, 2, 24]  # not a power of two, as 72
        args.prompt, args.image, args.response, args.bpo_groups = 24, 10, 8, 1
        args.dtype, args.warmup, args.repeats, args.flex = "float32", 0, 1, False
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results = Results("attention", args.out, ("flash-attn",), config)
    status = results.run(lambda: run(args, results))
    rows, bpo_rows = results.section("rows"), results.section("bpo_rows")
    results.update(ratios=ratios(rows, bpo_rows))
    path = results.finish(status)
    columns = ["impl", "mask", "tokens", "mode", "backend", "ms", "peak_gib", "tflops", "max_rel_err",
               "within_tolerance", "error"]  # fmt: skip
    print_table(f"varlen attention, {results.env['device']}", rows, columns)
    print_table("BPO batch: shared-prefix vs unshared packing (r4b's kernel)", bpo_rows, columns)
    tile_columns = ["mask", "tokens", "q_tiles", "nonempty_tiles", "full_tiles", "visited_tiles", "iterated_tiles",
                    "idle_programs", "visited_per_nonempty", "visible_per_visited_pairs", "full_share"]  # fmt: skip
    print_table("tile efficiency of r4b's forward kernel (128 x 64 tiles)", results.section("tiles"), tile_columns)
    print_table("ratios (same run)", results.payload["ratios"],
                ["mask", "tokens", "mode", "base", "vs", "r4b_speedup", "token_ratio"])  # fmt: skip
    print(f"wrote {path} ({status}; rows also in {results.rows_path})")
    return exit_code(status)


if __name__ == "__main__":
    raise SystemExit(main())
