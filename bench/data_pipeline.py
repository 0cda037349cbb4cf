"""The annealing data pipeline at scale: `r4b data prepare` against workers, start-up and RSS against dataset size,
and the training loader's throughput on R-4B-size images against ``data.workers``.

    python bench/data_pipeline.py                       # prepare 10k samples with 1/2 workers; start-up at 10k, 100k;
                                                        # the loader with 0/1/2 workers
    python bench/data_pipeline.py --sizes 10000 100000 1000000
    python bench/data_pipeline.py --smoke               # tiny sizes: the CI check

Data: synthetic JSONL in r4b's format (text questions with a thinking or non-thinking answer, every fourth sample
with one shared image), tokenized with the embedded tiny model's tokenizer and processor, so the numbers are the
pipeline's, not a big tokenizer's. Start-up is measured in a fresh process per (size, format): from the data files to
the first micro-batch of step 0 on the device (`SFTDataset.from_files`, the `GlobalBatchPlanner`, its plan of step
0, the rank's first collate) with the global batch of R-4B (1024 samples, 16,384 tokens); RSS is the process's peak
resident memory above what it held once the tokenizer was loaded. Sizes above 100k are the largest prepared DIR
below them replicated (its shards hard-linked, its index tiled: :func:`replicate_prepared`), as start-up reads
only the index and the shards' metadata; JSONL start-up is measured up to 100k (beyond, it is the linear cost the
prepared DIR removes).

Loader: R-4B-size data (1024x768 JPEG photos, each 7 SigLIP tiles of 384 pixels and 4,725 tokens with R-4B's
AnyRes pinpoints, one per sample with a short text), prepared, then ``MicroBatchLoader`` (what ``r4b sft`` runs)
building 16,384-token packed micro-batches (reading, packing, JPEG decoding, AnyRes tiling) with 0 (in the loop),
1 and 2 workers against a consumer that takes them at once: images/s and tokens/s, beside the tokens/s one H100
consumes in training R-4B (6 x 4.44B parameters x tokens at an assumed 40% of 989 dense bf16 TFLOP/s).

JSON into bench/results/ (CPU runs are ``*-cpu-*.json``, git-ignored as checks), and a table.
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


def replicate_prepared(source: Path, out: Path, times: int) -> None:
    """A prepared DIR holding ``source``'s samples ``times`` over: its shards hard-linked (no copy), its lengths
    index tiled. Start-up reads only the index and the shards' metadata, so this times a real DIR of that size."""
    import numpy as np

    from r4b.data.prepare import MANIFEST

    manifest = json.loads((source / MANIFEST).read_text())
    (out / "data").mkdir(parents=True)
    shards = []
    for copy in range(times):
        for shard in manifest["shards"]:
            name = f"data/copy{copy:03d}-{Path(shard).name}"
            os.link(source / shard, out / name)
            shards.append(name)
    for index in ("lengths.npy", "loss_tokens.npy"):
        np.save(out / index, np.tile(np.load(source / index), times))
    (out / "data_report.json").write_text((source / "data_report.json").read_text())
    manifest.update(
        samples=manifest["samples"] * times,
        tokens=manifest["tokens"] * times,
        shards=shards,
        shard_samples=manifest["shard_samples"] * times,
    )
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def measure_startup(path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(path)], check=True, capture_output=True, text=True, env=os.environ
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


R4B_PINPOINTS = [[384 * rows, 384 * cols] for rows in range(1, 7) for cols in range(1, 7)]  # LLaVA-OneVision's
R4B_PARAMS = 4.44e9  # Qwen3-4B (4.02B) + SigLIP2-so400m (0.40B) + projector
H100_BF16_FLOPS, ASSUMED_MFU = 989e12, 0.4


def r4b_image_processor():
    """R-4B's AnyRes geometry (384-pixel SigLIP tiles of 27x27 patches, 1x1 to 6x6 grids, anyres_max_9)."""
    from r4b.models.image_processing import RImageProcessor

    return RImageProcessor(image_size=384, patch_size=14, image_grid_pinpoints=R4B_PINPOINTS)


def write_photo_jsonl(path: Path, n: int, photos: int = 8, size: tuple[int, int] = (1024, 768)) -> None:
    """``n`` samples, each one of ``photos`` distinct photo-like JPEGs (smooth gradients and noise) and a question."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    width, height = size
    for k in range(photos):
        x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
        base = np.stack([x * 200, y * 180, (1 - x) * 160], -1) + rng.normal(0, 12, (height, width, 3)) + 20 * k
        Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(path.parent / f"photo{k}.jpg", quality=90)
    with path.open("w") as handle:
        for i in range(n):
            user = [{"type": "image"}, {"type": "text", "text": f"What is in photo {i}? Describe its colours."}]
            answer = "A smooth gradient of red, green and blue with some noise."
            record = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
            record.update(mode="non_thinking", images=[f"photo{i % photos}.jpg"])
            handle.write(json.dumps(record) + "\n")


def measure_loader(prepared: Path, tokenizer, processor, workers: int, micro_batches: int) -> dict:
    """Time ``MicroBatchLoader`` from its start (worker processes included) to its last micro-batch."""
    from r4b.train.batches import GlobalBatchPlanner
    from r4b.train.loader import MicroBatchLoader, rank_micro_batches
    from r4b.train.sft import padding_sample
    from r4b.train.sft_data import SFTDataset

    dataset = SFTDataset.from_files([str(prepared)], tokenizer, processor, max_tokens=16384, on_error="raise")
    planner = GlobalBatchPlanner(
        dataset.lengths, dataset.loss_tokens, global_batch_samples=len(dataset.lengths), max_tokens=16384
    )
    plan = planner.plan(0)
    keys = rank_micro_batches(planner, 0, 0, 1, lambda p: padding_sample(p, dataset.lengths))
    count = min(micro_batches, plan.micro_steps)
    images = tokens = 0
    started, cpu = time.perf_counter(), _cpu_s()
    with MicroBatchLoader(dataset.host_batch, keys, workers=workers, prefetch=2) as loader:
        for index in range(count):
            _, row, _ = loader.next(0, index)
            tokens += row.num_tokens
            images += int(row.pixel_values.shape[0]) if row.pixel_values is not None else 0
    seconds = time.perf_counter() - started
    return {
        "what": "loader",
        "workers": workers,
        "micro_batches": count,
        "images": images,
        "tokens": tokens,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "tokens_per_s": tokens / seconds,
        "cpu_s": _cpu_s() - cpu,  # the loop's process and (once joined) its workers
        "load_average": os.getloadavg()[0],
    }


def loader_rows(tmp: Path, tokenizer, samples: int, micro_batches: int, workers: list[int]) -> list[dict]:
    from r4b.data.prepare import prepare

    processor = r4b_image_processor()
    source = tmp / "photos" / "photos.jsonl"
    source.parent.mkdir()
    write_photo_jsonl(source, samples, photos=min(8, samples))
    prepared = tmp / "photos-prepared"
    prepare([source], prepared, tokenizer, processor, workers=1)
    rows = [measure_loader(prepared, tokenizer, processor, w, micro_batches) for w in workers]
    one = next((r for r in rows if r["workers"] == 1), None)
    h100 = H100_BF16_FLOPS * ASSUMED_MFU / (6 * R4B_PARAMS)
    for row in rows:
        row["speedup"] = one["seconds"] / row["seconds"] if one else None
        row["h100_tokens_per_s"] = h100  # what one H100 trains on per second (estimate)
        row["x_h100"] = row["tokens_per_s"] / h100
    return rows


def startup_rows(tmp: Path, tokenizer, processor, sizes: list[int], workers: int, smoke: bool) -> list[dict]:
    from r4b.data.prepare import prepare

    rows: list[dict] = []
    made: dict[int, Path] = {}
    for size in sorted(sizes):
        base = max((s for s in made if s <= 100_000 and size % s == 0), default=None)
        if size > 100_000 and base is not None:
            prepared = tmp / f"prepared-{size}"
            replicate_prepared(made[base], prepared, size // base)
            formats = [("prepared", prepared)]
        else:
            jsonl = tmp / f"data-{size}.jsonl"
            write_jsonl(jsonl, size)
            prepared = tmp / f"prepared-{size}"
            prepare([jsonl], prepared, tokenizer, processor, workers=workers, shard_lines=4096)
            made[size] = prepared
            formats = [("jsonl", jsonl), ("prepared", prepared)]
        for fmt, path in formats:
            # smoke: in this process (the fresh-process RSS is the real run's measurement)
            startup = child(str(path)) if smoke else measure_startup(path)
            rows.append({"what": "startup", "format": fmt, "samples": size, **startup})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000], help="start-up dataset sizes")
    parser.add_argument("--prepare-samples", type=int, default=10_000, help="dataset size of the prepare timing")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="prepare worker counts")
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts")
    parser.add_argument("--loader-samples", type=int, default=48, help="photo samples of the loader timing")
    parser.add_argument("--loader-batches", type=int, default=14, help="micro-batches timed per worker count")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    if args.smoke:
        args.sizes, args.prepare_samples, args.workers = [60], 120, [1, 2]
        args.loader_samples, args.loader_batches, args.loader_workers = 3, 1, [0, 2]

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
        rows += startup_rows(tmp, tokenizer, processor, args.sizes, max(args.workers), args.smoke)
        rows += loader_rows(tmp, tokenizer, args.loader_samples, args.loader_batches, args.loader_workers)
    columns = ["what", "format", "workers", "samples", "seconds", "tokens_per_s", "speedup", "tokens_per_cpu_s"]
    columns += ["startup_s", "rss_mb", "rss_total_mb", "images_per_s", "x_h100"]
    print_table("data pipeline (tiny tokenizer)", rows, columns)
    payload = {"smoke": args.smoke, "cpu_count": os.cpu_count(), "rows": rows}
    path = write_results("data_pipeline", payload, **({"out_dir": args.out} if args.out else {}))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
