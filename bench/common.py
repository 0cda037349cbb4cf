"""What every r4b benchmark shares: timing, peak memory, the matmul ceiling, the results file and the rows stream.

A suite records through :class:`Results`: each row is appended to the run's rows JSONL the moment it is measured
(with the device and library versions) and the suite's JSON is rewritten after it, so a run cut off keeps what it
measured; a SIGTERM (``timeout``'s first signal) ends the suite through its finally-blocks with the JSON marked
interrupted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import json
import os
import platform
import signal
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


def _device_slug(device: str) -> str:
    return device.lower().replace(" ", "-").replace("/", "-")


def _run_record(suite: str, env: dict, payload: dict) -> dict:
    """The suite's JSON: run facts first, then the payload (the format of ARCHITECTURE.md)."""
    today = dt.date.today().isoformat()
    return {"suite": suite, **env, "date": today, "command": " ".join([Path(sys.executable).name, *sys.argv]),
            **payload}  # fmt: skip


def _write_json(path: Path, record: dict) -> None:
    """Replace ``path`` atomically: a reader (or a kill) never sees half a file."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(partial, path)


def write_results(suite: str, payload: dict, out_dir: Path = RESULTS_DIR) -> Path:
    """bench/results/<suite>-<device>-<date>.json, in the format of ARCHITECTURE.md."""
    env = environment()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{suite}-{_device_slug(env['device'])}-{dt.date.today().isoformat()}.json"
    _write_json(path, _run_record(suite, env, payload))
    return path


def library_versions(extra_packages: tuple[str, ...] = ()) -> dict:
    """What every row records of the software that ran it: r4b, torch, triton, CUDA and the suite's packages."""
    import triton

    import r4b

    versions = {"r4b": r4b.__version__, "torch": torch.__version__, "triton": triton.__version__}
    versions["cuda"] = torch.version.cuda
    return versions | {name: _version(name) for name in extra_packages}


class Terminated(BaseException):
    """A SIGTERM, raised in the main thread so that a suite's finally-blocks run (a BaseException: error rows,
    which catch Exception, do not swallow it)."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside: the first SIGTERM raises :class:`Terminated`; later ones are ignored (``timeout`` signals the command
    and its process group, so it arrives twice) so that they cannot cut the writing of the results."""

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Results:
    """A suite's results as they are measured. :meth:`add` stamps a row with the device and library versions,
    appends it to the rows JSONL (``rows-<device>-<date>.jsonl`` beside the JSON, one file for every suite of a
    run) and rewrites the suite's JSON (``status`` "running" until :meth:`finish`)."""

    def __init__(self, suite: str, out_dir: Path | None, packages: tuple[str, ...], config: dict) -> None:
        self.suite = suite
        self.out_dir = RESULTS_DIR if out_dir is None else Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.env = environment(packages)
        self.versions = library_versions(packages)
        stem = f"{_device_slug(self.env['device'])}-{dt.date.today().isoformat()}"
        self.path = self.out_dir / f"{suite}-{stem}.json"
        self.rows_path = self.out_dir / f"rows-{stem}.jsonl"
        self.payload: dict = {"status": "running", "environment": self.env, "config": config}
        self._write()

    def add(self, section: str, row: dict) -> dict:
        """Record one measured row of ``section`` ("rows", "bpo_rows", ...) at once; returns it, stamped."""
        row.setdefault("device", self.env["device"])
        row.setdefault("versions", self.versions)
        self.payload.setdefault(section, []).append(row)
        line = {"suite": self.suite, "section": section, "measured_at": dt.datetime.now().isoformat(timespec="seconds")}
        with open(self.rows_path, "a") as handle:  # one write per line: suites of one run share the file
            handle.write(json.dumps(line | row, default=str) + "\n")
        self._write()
        print(row, flush=True)
        return row

    def section(self, name: str) -> list[dict]:
        return self.payload.get(name, [])

    def update(self, **keys: object) -> None:
        self.payload.update(keys)
        self._write()

    def run(self, measure: Callable[[], None]) -> str:
        """Call ``measure`` (which adds the rows); the status it ended with: "complete", or "interrupted: SIGTERM"
        / "interrupted: SIGINT" with the rows measured so far kept."""
        try:
            with sigterm_raises():
                measure()
        except Terminated:
            return "interrupted: SIGTERM"
        except KeyboardInterrupt:
            return "interrupted: SIGINT"
        return "complete"

    def finish(self, status: str) -> Path:
        self.payload["status"] = status
        self._write()
        return self.path

    def _write(self) -> None:
        _write_json(self.path, _run_record(self.suite, self.env, self.payload))


def exit_code(status: str) -> int:
    """A suite's exit status: 0 when complete, 143 (128 + SIGTERM) or 130 (SIGINT) when cut off."""
    return {"complete": 0, "interrupted: SIGINT": 130}.get(status, 143)


def within_tolerance(errors: dict, bounds: dict) -> bool:
    """Every error of ``errors`` whose key has a bound in ``bounds`` at or under it (NaN fails)."""
    checked = [(errors[key], bound) for key, bound in bounds.items() if errors.get(key) is not None]
    return bool(checked) and all(value <= bound for value, bound in checked)


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
