"""Fused linear + BPO loss: r4b against torch eager, torch.compile, liger-kernel and the log-prob kernels of TRL,
cut-cross-entropy and verl.

    python bench/fused_loss.py                # Qwen3-4B sizes on a GPU, bf16
    python bench/fused_loss.py --smoke        # tiny sizes on a CPU: a check that it runs

Times forward+backward of the full BPO loss (off-policy ratio, clip-higher,
beta * k3 KL to a reference, token-mean) and forward-only log-probs (old and
reference policies), with the peak memory each adds over its inputs, and the
achieved TFLOP/s against the measured bf16 matmul rate (2·N·H·V FLOPs forward,
6·N·H·V forward+backward). Writes bench/results/fused_loss-<device>-<date>.json.

r4b runs three ways in the same run: ``r4b`` (method "recompute": Triton logits, recomputed in the
backward), ``r4b-cublas`` and ``r4b-cublas-fast`` (cuBLAS logits per token chunk, gradients made in the
forward; r4b.kernels.fused_grad). The cuBLAS rows are skipped where that path cannot run (CPU tensors
without TRITON_INTERPRET). ``ratios`` compares each r4b row (``base``) with every competitor;
``method_ratios`` the cuBLAS rows with ``r4b``; ``accuracy`` (at the first size) each r4b method's loss,
gradients and log-probs against the materialized loss on the same inputs in fp32.

The log-prob kernels trainers ship are timed in both modes, their per-token log-probs feeding the same BPO loss
(``bpo_loss_from_logprobs``): ``trl`` (``trl.kernels.ChunkedLogProbFunction``, as TRL's GRPOTrainer calls it),
``cce`` (Apple's ``cut_cross_entropy.linear_cross_entropy``, reduction "none", its default gradient filter) and
``verl`` (``verl.utils.kernel.linear_cross_entropy``). A package that is not installed, or a kernel that fails
(cut-cross-entropy and verl run on CUDA only), is that competitor's error row.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from pathlib import Path

if "--smoke" in sys.argv and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # on a CPU, time the Triton path (interpreted), not the reference

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    build_competitor,
    compile_fresh,
    environment,
    error_row,
    error_text,
    free_device_memory,
    matmul_tflops,
    median_ms,
    peak_gib,
    print_table,
    write_results,
)

from r4b.kernels import bpo_loss_from_logprobs, fused_grad, fused_linear_bpo_loss, linear_logprobs
from r4b.kernels._backend import use_triton

BETA, EPS_LOW, EPS_HIGH, TEMPERATURE = 0.04, 0.2, 0.28, 1.0


def materialized_logprobs(hidden, weight, targets, with_entropy=False):
    """What trainers do without a fused kernel: full [N, V] logits, log_softmax, gather."""
    logits = (hidden @ weight.t()).float() / TEMPERATURE
    log_probs = torch.log_softmax(logits, dim=-1)
    logp = log_probs.gather(1, targets[:, None]).squeeze(1)
    entropy = -(log_probs.exp() * log_probs).sum(-1) if with_entropy else None
    return logp, entropy


def materialized_logprob_values(hidden, weight, targets):
    return materialized_logprobs(hidden, weight, targets)[0]


def bpo_loss_on(logprobs_fn, hidden, weight, targets, batch):
    """The benchmark's BPO loss on the log-probs (and entropy, for its metric) of ``logprobs_fn``."""
    logp, entropy = logprobs_fn(hidden, weight, targets, with_entropy=True)
    return bpo_loss_from_logprobs(
        logp, batch["advantages"], seq_ids=batch["seq_ids"], loss_mask=batch["loss_mask"],
        old_logprobs=batch["old"], ref_logprobs=batch["ref"], entropy=None if entropy is None else entropy.detach(),
        clip_eps_low=EPS_LOW, clip_eps_high=EPS_HIGH, beta=BETA,
    )[0]  # fmt: skip


def materialized_bpo_loss(hidden, weight, targets, batch):
    return bpo_loss_on(materialized_logprobs, hidden, weight, targets, batch)


def r4b_bpo_loss(hidden, weight, targets, batch, method="recompute", chunk_bytes=None):
    return fused_linear_bpo_loss(
        hidden, weight, targets, batch["advantages"], seq_ids=batch["seq_ids"], loss_mask=batch["loss_mask"],
        old_logprobs=batch["old"], ref_logprobs=batch["ref"], clip_eps_low=EPS_LOW, clip_eps_high=EPS_HIGH,
        beta=BETA, temperature=TEMPERATURE, method=method, chunk_bytes=chunk_bytes,
    )[0]  # fmt: skip


def liger_bpo_loss_factory(compiled: bool, seq_len: int):
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        return None
    module = LigerFusedLinearGRPOLoss(
        beta=BETA, compiled=compiled, use_ref_model=True, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
        loss_type="bnpo", temperature=TEMPERATURE,
    )  # fmt: skip

    def loss(hidden, weight, targets, batch):
        b = hidden.shape[0] // seq_len
        shape = (b, seq_len)
        return module(
            hidden.view(b, seq_len, -1), weight, targets.view(shape), batch["loss_mask"].view(shape).long(),
            batch["advantages"].view(shape)[:, 0], ref_per_token_logps=batch["ref"].view(shape),
            old_per_token_logps=batch["old"].view(shape),
        )[0]  # fmt: skip

    return loss


# TRL's vocabulary tile (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE, what its GRPOTrainer passes).
TRL_CHUNK_SIZE = 32768


def trl_logprobs_factory():
    from trl.kernels import ChunkedLogProbFunction

    def logprobs(hidden, weight, targets, with_entropy=False):
        outputs = ("entropy",) if with_entropy else ()
        logp, entropy, *_ = ChunkedLogProbFunction.apply(
            hidden, weight, None, targets, TEMPERATURE, TRL_CHUNK_SIZE, None, 1.0, outputs
        )
        return logp, entropy

    return logprobs


def cce_logprobs_factory():
    from cut_cross_entropy import linear_cross_entropy

    if TEMPERATURE != 1.0:
        raise NotImplementedError("cut-cross-entropy has no temperature")

    def logprobs(hidden, weight, targets, with_entropy=False):
        return -linear_cross_entropy(hidden, weight, targets, reduction="none"), None

    return logprobs


def verl_logprobs_factory():
    from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

    def logprobs(hidden, weight, targets, with_entropy=False):
        return linear_cross_entropy(hidden, weight, targets, float(TEMPERATURE), "none")  # (logprobs, entropy)

    return logprobs


# Row name -> factory of a log-prob kernel (hidden, weight, targets, with_entropy) -> (logprobs, entropy or None).
LOGPROB_COMPETITORS = {"trl": trl_logprobs_factory, "cce": cce_logprobs_factory, "verl": verl_logprobs_factory}


def logprob_values_of(logprobs_fn, hidden, weight, targets):
    return logprobs_fn(hidden, weight, targets)[0]


def make_batch(n: int, h: int, v: int, seq_len: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, device=device, dtype=dtype, generator=gen).requires_grad_()
    weight = (torch.randn(v, h, device=device, dtype=dtype, generator=gen) * h**-0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device, generator=gen)
    with torch.no_grad():
        policy, _ = linear_logprobs(hidden, weight, targets)
    seq_ids = torch.arange(n, device=device) // seq_len
    batch = {
        "seq_ids": seq_ids,
        "loss_mask": torch.rand(n, device=device, generator=gen) > 0.05,
        "advantages": torch.randn(n // seq_len + 1, device=device, generator=gen)[seq_ids],
        "old": policy + 0.1 * torch.randn(n, device=device, generator=gen),
        "ref": policy + 0.1 * torch.randn(n, device=device, generator=gen),
    }
    return hidden, weight, targets, batch


def r4b_logprob_values(hidden, weight, targets, method="recompute", chunk_bytes=None):
    return linear_logprobs(hidden, weight, targets, method=method, chunk_bytes=chunk_bytes)[0]


# The r4b rows: today's Triton recompute path and the cuBLAS methods of r4b.kernels.fused_grad.
R4B_IMPLS = {"r4b": "recompute", "r4b-cublas": "cublas", "r4b-cublas-fast": "cublas-fast"}


def cublas_runs() -> bool:
    """Whether the cuBLAS methods run here (elsewhere they would time the torch reference again)."""
    probe = torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu")
    return use_triton(probe)


def competitors(args: argparse.Namespace) -> tuple[dict, dict]:
    """The implementations timed at one size, (fwd+bwd, fwd-only), built afresh for it: dynamo's caches are
    dropped (liger compiles its chunk function on a GPU) and the torch.compile ones compile for this size alone.
    A competitor that fails to build is timed as a stand-in raising its error (an error row)."""
    torch._dynamo.reset()
    fwd_bwd = {"r4b": r4b_bpo_loss}
    fwd_only = {"r4b": r4b_logprob_values}
    if cublas_runs():
        for name, method in R4B_IMPLS.items():
            if method != "recompute":
                fwd_bwd[name] = functools.partial(r4b_bpo_loss, method=method, chunk_bytes=args.chunk_bytes)
                fwd_only[name] = functools.partial(r4b_logprob_values, method=method, chunk_bytes=args.chunk_bytes)
    fwd_bwd["torch"] = materialized_bpo_loss
    fwd_only["torch"] = materialized_logprob_values
    if args.compile:
        fwd_bwd["torch.compile"] = build_competitor(compile_fresh, materialized_bpo_loss)
        fwd_only["torch.compile"] = build_competitor(compile_fresh, materialized_logprob_values)
    liger = build_competitor(liger_bpo_loss_factory, compiled=torch.cuda.is_available(), seq_len=args.seq_len)
    if liger is not None:
        fwd_bwd["liger"] = liger
    for name, factory in LOGPROB_COMPETITORS.items():
        logprobs = build_competitor(factory)  # a missing package: a stand-in raising its ImportError
        fwd_bwd[name] = functools.partial(bpo_loss_on, logprobs)
        fwd_only[name] = functools.partial(logprob_values_of, logprobs)
    return fwd_bwd, fwd_only


def run(args: argparse.Namespace) -> dict:
    dtype = getattr(torch, args.dtype)
    ceiling = matmul_tflops(args.sizes[-1], args.hidden, min(args.vocab, 16384), dtype, repeats=args.repeats)
    rows = []
    for n in args.sizes:
        try:
            rows += bench_size(n, args, *competitors(args), ceiling)
        except Exception as err:  # the inputs of this size could not be made: one error row, the next size
            rows.append({"impl": "all", "mode": "-", "N": n, "error": error_text(err)})
            print(rows[-1], flush=True)
            free_device_memory()
    return {
        "matmul_tflops": ceiling,
        "rows": rows,
        "ratios": ratios_to_r4b(rows),
        "method_ratios": method_ratios(rows),
        "accuracy": accuracy(args.sizes[0], args) if args.accuracy else [],
    }


class _no_tf32:
    """True fp32 products for the reference, whatever the process-wide TF32 setting."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().float(), expected.detach().float()
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-30))


def accuracy(n: int, args: argparse.Namespace) -> list[dict]:
    """Each r4b method in the benchmark's dtype against the materialized loss on the same inputs in fp32 (true
    fp32 products): relative error of the loss, d_hidden and d_weight, and the largest log-prob error."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    try:
        hidden, weight, targets, batch = make_batch(
            n, args.hidden, args.vocab, args.seq_len, getattr(torch, args.dtype), device
        )
        h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
        with _no_tf32():
            loss_ref = materialized_bpo_loss(h32, w32, targets, batch)
            loss_ref.backward()
            with torch.no_grad():
                logp_ref = materialized_logprob_values(h32, w32, targets)
        h32.requires_grad_(False)
    except Exception as err:
        free_device_memory()
        return [{"impl": "reference", "N": n, "error": error_text(err)}]
    methods = {name: m for name, m in R4B_IMPLS.items() if m == "recompute" or cublas_runs()}
    for name, method in methods.items():
        row = {"impl": name, "N": n, "dtype": args.dtype}
        with error_row(row):
            hidden.grad = weight.grad = None
            loss = r4b_bpo_loss(hidden, weight, targets, batch, method=method, chunk_bytes=args.chunk_bytes)
            loss.backward()
            row["loss_rel_err"] = abs(loss.item() - loss_ref.item()) / max(abs(loss_ref.item()), 1e-30)
            row["d_hidden_rel_err"] = _rel_err(hidden.grad, h32.grad)
            row["d_weight_rel_err"] = _rel_err(weight.grad, w32.grad)
            with torch.no_grad():
                logp = r4b_logprob_values(hidden, weight, targets, method=method, chunk_bytes=args.chunk_bytes)
            row["logprob_max_abs_err"] = float((logp - logp_ref).abs().max())
        rows.append(row)
        print(row, flush=True)
    free_device_memory()
    return rows


def bench_size(n: int, args: argparse.Namespace, fwd_bwd: dict, fwd_only: dict, ceiling: float) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, targets, batch = make_batch(
        n, args.hidden, args.vocab, args.seq_len, getattr(torch, args.dtype), device
    )

    def train_step(fn):
        hidden.grad = weight.grad = None
        fn(hidden, weight, targets, batch).backward()

    def logprobs_only(fn):
        with torch.no_grad():
            fn(hidden, weight, targets)

    flops = 2 * n * args.hidden * args.vocab
    rows = []
    for mode, impls, step, mult in (("fwd+bwd", fwd_bwd, train_step, 3), ("fwd logprobs", fwd_only, logprobs_only, 1)):
        for name, fn in impls.items():
            row = {"impl": name, "mode": mode, "N": n, "H": args.hidden, "V": args.vocab, "dtype": args.dtype}
            call = functools.partial(step, fn)
            with error_row(row):  # any failure (OOM, torch.compile, liger) is this row's error; the run goes on
                row["ms"] = median_ms(call, warmup=args.warmup, repeats=args.repeats)
                row["peak_gib"] = peak_gib(call)
                row["tflops"] = mult * flops / (row["ms"] * 1e-3) / 1e12
                row["frac_of_matmul"] = row["tflops"] / ceiling
            if R4B_IMPLS.get(name, "recompute") != "recompute":
                row.update(cublas_plan(n, args, R4B_IMPLS[name], with_grad=mode == "fwd+bwd"))
            rows.append(row)
            print(row, flush=True)
    return rows


def cublas_plan(n: int, args: argparse.Namespace, method: str, *, with_grad: bool) -> dict:
    """The chunking a cuBLAS row ran with and the peak fused_grad.peak_bytes predicts for it (GiB), without the
    gradients themselves: train_step frees the previous ones first, as peak_gib measures."""
    dtype = getattr(torch, args.dtype)
    options = fused_grad.method_options(method)
    rows = fused_grad.chunk_rows(n, args.vocab, dtype, with_grad, args.chunk_bytes, options["logits_fp32"])
    peak = fused_grad.peak_bytes(
        n, args.hidden, args.vocab, dtype, need_hidden=with_grad, need_weight=with_grad,
        chunk_bytes=args.chunk_bytes, include_grads=False, **options,
    )  # fmt: skip
    return {"chunk_rows": rows, "chunks": math.ceil(n / rows), "predicted_peak_gib": peak / 2**30}


def ratios_to_r4b(rows: list[dict]) -> list[dict]:
    """competitor time / r4b time and r4b memory / competitor memory, same mode and size, same run, for each r4b
    row (``base``: r4b, r4b-cublas, r4b-cublas-fast) against each competitor (``vs``)."""
    out = []
    for base_impl in R4B_IMPLS:
        ours = {(r["mode"], r["N"]): r for r in rows if r["impl"] == base_impl and "ms" in r and "error" not in r}
        for r in rows:
            base = ours.get((r["mode"], r["N"]))
            if r["impl"] in R4B_IMPLS or base is None or "ms" not in r or "error" in r:
                continue
            mem = r.get("peak_gib") and base.get("peak_gib") and base["peak_gib"] / r["peak_gib"]
            speedup = r["ms"] / base["ms"]
            out.append(
                {"mode": r["mode"], "N": r["N"], "base": base_impl, "vs": r["impl"], "r4b_speedup": speedup,
                 "r4b_mem_ratio": mem}
            )  # fmt: skip
    return out


def method_ratios(rows: list[dict]) -> list[dict]:
    """Each cuBLAS r4b row against the ``r4b`` (recompute) row: time ratio and memory ratio, same run."""
    timed = {(r["impl"], r["mode"], r["N"]): r for r in rows if "ms" in r and "error" not in r}
    out = []
    for (impl, mode, n), r in timed.items():
        base = timed.get(("r4b", mode, n))
        if impl in R4B_IMPLS and impl != "r4b" and base is not None:
            mem = r.get("peak_gib") and base.get("peak_gib") and r["peak_gib"] / base["peak_gib"]
            out.append({"mode": mode, "N": n, "method": impl, "speedup_vs_r4b": base["ms"] / r["ms"],
                        "mem_vs_r4b": mem})  # fmt: skip
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 sizes: a CPU check that the benchmark runs")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 32768], help="tokens N")
    parser.add_argument("--hidden", type=int, default=2560)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (liger takes [B, T, H])")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    parser.add_argument(
        "--no-accuracy", dest="accuracy", action="store_false", help="skip the accuracy rows (first size only)"
    )
    parser.add_argument(
        "--chunk-bytes", type=int, default=None, help="chunk budget of the r4b-cublas rows (default: fused_grad's)"
    )
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.hidden, args.vocab, args.seq_len = [48, 96], 40, 200, 16
        args.dtype, args.warmup, args.repeats = "float32", 1, 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    payload = run(args)
    payload["environment"] = environment(("liger-kernel", "trl", "cut-cross-entropy", "verl"))
    payload["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    columns = ["impl", "mode", "N", "ms", "peak_gib", "tflops", "frac_of_matmul", "chunks", "predicted_peak_gib"]
    columns.append("error")
    print_table(f"fused BPO loss, {payload['environment']['device']}, matmul {payload['matmul_tflops']:.3g} TFLOP/s",
                payload["rows"], columns)  # fmt: skip
    print_table("r4b vs competitors (same run)", payload["ratios"],
                ["mode", "N", "base", "vs", "r4b_speedup", "r4b_mem_ratio"])  # fmt: skip
    print_table(f"accuracy against the fp32 materialized loss ({args.dtype} inputs)", payload["accuracy"],
                ["impl", "N", "loss_rel_err", "d_hidden_rel_err", "d_weight_rel_err", "logprob_max_abs_err",
                 "error"])  # fmt: skip
    print_table("cuBLAS methods vs r4b (same run)", payload["method_ratios"],
                ["mode", "N", "method", "speedup_vs_r4b", "mem_vs_r4b"])  # fmt: skip
    path = write_results("fused_loss", payload, *([args.out] if args.out else []))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
