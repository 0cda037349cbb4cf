"""What every r4b benchmark shares: timing, peak memory, the matmul ceiling, the results file."""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu-{platform.machine()}"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(extra_packages: tuple[str, ...] = ()) -> dict:
    import triton

    versions = {name: _version(name) for name in extra_packages}
    return {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "packages": versions,
    }


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], *, warmup: int, repeats: int) -> float:
    """Median wall time of fn in ms; device work is synchronized around each call."""
    for _ in range(warmup):
        fn()
    synchronize()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_gib(fn: Callable[[], object]) -> float | None:
    """Peak GPU memory of one call of fn above what was allocated before it (None on a CPU)."""
    if not torch.cuda.is_available():
        return None
    synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def matmul_tflops(m: int, k: int, n: int, dtype: torch.dtype, *, repeats: int) -> float:
    """Measured rate of one large torch.mm: the ceiling kernels are compared against."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    ms = median_ms(lambda: torch.mm(a, b), warmup=2, repeats=repeats)
    return 2 * m * k * n / (ms * 1e-3) / 1e12


def error_text(err: BaseException) -> str:
    """An exception in one line: its type and the first line of its message (at most 300 characters)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".strip()[:300]


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def error_row(row: dict) -> Iterator[dict]:
    """Time one competitor inside ``with error_row(row):``: any exception it raises (OOM, a backend refusing the
    shape, torch.compile failing, a missing feature) becomes ``row["error"]`` (its one-line text; the traceback
    goes to stderr) and the benchmark goes on with the next competitor. KeyboardInterrupt still stops it."""
    try:
        yield row
    except Exception as err:
        row["error"] = error_text(err)
        traceback.print_exc()
        free_device_memory()


def build_competitor(factory: Callable[..., object], *args, **kwargs) -> object:
    """``factory(*args, **kwargs)``, or where building raises, a stand-in that raises the same error when timed
    (so it lands in that competitor's rows as an error, like a failure while running)."""
    try:
        return factory(*args, **kwargs)
    except Exception as err:
        traceback.print_exc()
        failure = err

        def failed(*_args, **_kwargs):
            raise failure

        return failed


def compile_fresh(fn: Callable, **kwargs) -> Callable:
    """``torch.compile(fn)`` for one problem size: dynamo's caches are dropped first and shapes are static, so
    each size compiles once from scratch and no recompilation (its guards, its cache limits) spans sizes. A
    benchmark calls this again for every size (compilation is lazy: it happens in the warm-up)."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False, **kwargs)


def write_results(suite: str, payload: dict, out_dir: Path = RESULTS_DIR) -> Path:
    """bench/results/<suite>-<device>-<date>.json, in the format of ARCHITECTURE.md."""
    env = environment()
    today = dt.date.today().isoformat()
    slug = env["device"].lower().replace(" ", "-").replace("/", "-")
    record = {
        "suite": suite,
        **env,
        "date": today,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        **payload,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{suite}-{slug}-{today}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right" if column not in ("impl", "mode", "error") else "left")
    for row in rows:
        table.add_row(*(_cell(row.get(column)) for column in columns))
    Console(width=160).print(table)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)
