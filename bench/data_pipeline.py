"""The annealing data pipeline at scale: `r4b data prepare` against workers, start-up and RSS against dataset size.

    python bench/data_pipeline.py                       # prepare 10k samples with 1/2 workers; start-up at 10k, 100k
    python bench/data_pipeline.py --sizes 10000 100000 1000000
    python bench/data_pipeline.py --smoke               # tiny sizes: the CI check

Data: synthetic JSONL in r4b's format (text questions with a thinking or non-thinking answer, every fourth sample
with one shared image), tokenized with the embedded tiny model's tokenizer and processor, so the numbers are the
pipeline's, not a big tokenizer's. Start-up is measured in a fresh process per (size, format): from the data files to
the first micro-batch of step 0 on the device (`SFTDataset.from_files`, the `GlobalBatchPlanner`, its plan of step
0, the rank's first collate) with the global batch of R-4B (1024 samples, 16,384 tokens); RSS is the process's peak
resident memory above what it held once the tokenizer was loaded. JSON into bench/results/ (CPU runs are
``*-cpu-*.json``, git-ignored as checks), and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results

WORDS = [
    "the",
    "a",
    "of",
    "to",
    "in",
    "is",
    "what",
    "how",
    "many",
    "sum",
    "product",
    "area",
    "angle",
    "total",
    "left",
    "right",
    "red",
    "blue",
    "seven",
    "nine",
]


def write_jsonl(path: Path, n: int, seed: int = 0) -> None:
    """``n`` synthetic samples (about 1/3 thinking, 1/4 with an image), deterministic from ``seed``."""
    from PIL import Image

    image = path.parent / "shared.png"
    if not image.exists():
        Image.new("RGB", (56, 28), (200, 30, 30)).save(image)
    rng = random.Random(seed)
    with path.open("w") as handle:
        for i in range(n):
            question = " ".join(rng.choices(WORDS, k=rng.randint(6, 40))) + "?"
            answer = str(rng.randint(0, 999))
            if i % 3 == 0:
                reasoning = " ".join(rng.choices(WORDS, k=rng.randint(10, 80)))
                content, mode = f"<think>\n{reasoning}\n</think>\n\n{answer}", "thinking"
            else:
                content, mode = answer, "non_thinking"
            user: object = question
            record: dict = {"mode": mode}
            if i % 4 == 0:
                user = [{"type": "image"}, {"type": "text", "text": question}]
                record["images"] = [image.name]
            record["messages"] = [{"role": "user", "content": user}, {"role": "assistant", "content": content}]
            handle.write(json.dumps(record) + "\n")


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and of its finished children (the prepare workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(path: str) -> dict:
    """Start-up of one fresh process on ``path`` (JSONL or prepared DIR), to the first micro-batch of step 0."""
    from r4b.data.prepare import load_data_tools
    from r4b.train.batches import GlobalBatchPlanner
    from r4b.train.sft_data import SFTDataset

    tokenizer, processor = load_data_tools(None, None)
    base = _rss_mb()
    started = time.perf_counter()
    dataset = SFTDataset.from_files([path], tokenizer, processor, max_tokens=16384, on_error="skip")
    loaded = time.perf_counter()
    planner = GlobalBatchPlanner(
        dataset.lengths, dataset.loss_tokens, global_batch_samples=1024, max_tokens=16384, world_size=1
    )
    plan = planner.plan(0)
    dataset.collate(plan.for_rank(0)[0], "cpu")
    done = time.perf_counter()
    return {
        "samples": len(dataset.samples),
        "startup_s": done - started,
        "load_s": loaded - started,
        "rss_mb": _rss_mb() - base,
        "rss_total_mb": _rss_mb(),
    }


def measure_startup(path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(path)], check=True, capture_output=True, text=True, env=os.environ
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000], help="start-up dataset sizes")
    parser.add_argument("--prepare-samples", type=int, default=10_000, help="dataset size of the prepare timing")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="prepare worker counts")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    if args.smoke:
        args.sizes, args.prepare_samples, args.workers = [60], 120, [1, 2]

    from r4b.data.prepare import load_data_tools, prepare

    tokenizer, processor = load_data_tools(None, None)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="r4b-bench-data-") as tmp:
        tmp = Path(tmp)
        write_jsonl(tmp / "warmup.jsonl", 50)  # imports and first-call costs out of the timings
        prepare([tmp / "warmup.jsonl"], tmp / "warmup", tokenizer, processor, workers=1)
        source = tmp / f"prepare-{args.prepare_samples}.jsonl"
        write_jsonl(source, args.prepare_samples)
        for workers in args.workers:
            out = tmp / f"prepared-w{workers}"
            started, cpu = time.perf_counter(), _cpu_s()
            manifest = prepare([source], out, tokenizer, processor, workers=workers, shard_lines=1024)
            seconds, cpu = time.perf_counter() - started, _cpu_s() - cpu
            rows.append(
                {
                    "what": "prepare",
                    "workers": workers,
                    "samples": manifest["samples"],
                    "tokens": manifest["tokens"],
                    "seconds": seconds,
                    "samples_per_s": manifest["samples"] / seconds,
                    "tokens_per_s": manifest["tokens"] / seconds,
                    "cpu_s": cpu,  # this process and its workers: the work, whatever else shares the cores
                    "tokens_per_cpu_s": manifest["tokens"] / cpu,
                    "load_average": os.getloadavg()[0],
                }
            )
        one = next((r for r in rows if r["workers"] == 1), None)
        for row in rows:
            row["speedup"] = one["seconds"] / row["seconds"] if one else None
        for size in args.sizes:
            jsonl = tmp / f"data-{size}.jsonl"
            write_jsonl(jsonl, size)
            prepared = tmp / f"prepared-{size}"
            prepare([jsonl], prepared, tokenizer, processor, workers=max(args.workers), shard_lines=4096)
            for fmt, path in (("jsonl", jsonl), ("prepared", prepared)):
                # smoke: in this process (the fresh-process RSS is the real run's measurement)
                startup = child(str(path)) if args.smoke else measure_startup(path)
                rows.append({"what": "startup", "format": fmt, "samples": size, **startup})
    columns = ["what", "format", "workers", "samples", "seconds", "tokens_per_s", "speedup", "tokens_per_cpu_s"]
    columns += ["startup_s", "rss_mb", "rss_total_mb"]
    print_table("data pipeline (tiny tokenizer)", rows, columns)
    payload = {"smoke": args.smoke, "cpu_count": os.cpu_count(), "rows": rows}
    path = write_results("data_pipeline", payload, **({"out_dir": args.out} if args.out else {}))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
