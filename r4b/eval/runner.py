"""``evaluate``: run one or several models over a benchmark in each mode and write the report.

For every model (loaded one at a time, released after) and mode (``auto``, ``thinking``, ``non_thinking``:
the prompt ends with the paper's suffix ``<think>``, ``<think>\\n`` or ``<think>\\n\\n</think>``) every question
is answered once, greedily by default, with :class:`r4b.rollout.HFRolloutEngine` in batches. Output under
``out_dir``:

- ``predictions.jsonl``: one line per generation: ``model``, ``benchmark``, ``id``, ``source`` (``file:line``),
  ``mode``, ``prompt`` (the rendered chat prompt, image placeholders unexpanded), ``question``, ``response``,
  ``response_ids``, ``tokens``, ``finished``, ``answer`` (the reference), ``options``, ``groups``,
  ``extracted``, ``correct``, ``think_state``, ``thinking``;
- ``report.json``, ``report.md``, ``accuracy_tokens.png`` and ``trigger_rate.png`` (:mod:`r4b.eval.report`).

:func:`rescore` recomputes every score and the report from a ``predictions.jsonl`` alone;
:func:`merge_reports` joins the runs of several directories (e.g. one model each) into one report.
"""

from __future__ import annotations

import dataclasses
import gc
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from r4b.eval.data import DEFAULT_GROUP_BY, EvalItem, load_items
from r4b.eval.errors import EvalError
from r4b.eval.metrics import score_response
from r4b.eval.report import build_report, write_report
from r4b.format import MODES, THINKING_STATES, full_text, think_state

if TYPE_CHECKING:
    from r4b.rollout.base import RolloutEngine, SamplingParams

__all__ = ["evaluate", "load_predictions", "merge_reports", "model_name", "rescore", "score_record"]

PREDICTIONS = "predictions.jsonl"
ModelSpec = Any  # "tiny" | a model directory | (model, tokenizer[, processor]) | a RolloutEngine


def model_name(spec: ModelSpec, index: int = 0) -> str:
    """The default report name of a model: ``tiny``, the directory's name, or ``model<index>`` for objects."""
    if isinstance(spec, (str, Path)):
        return "tiny" if str(spec) == "tiny" else Path(spec).resolve().name
    return f"model{index}"


def _engine(
    spec: ModelSpec,
    *,
    batch_size: int,
    seed: int,
    device: str | None,
    dtype: str | None,
    engine: str = "hf",
    vllm_args: Mapping[str, Any] | None = None,
) -> tuple[RolloutEngine, Any]:
    """``(engine, tokenizer or None)`` of a model spec; a name or directory is loaded here, the engine built by
    :func:`r4b.rollout.factory.build_rollout_engine`."""
    from r4b.rollout.base import RolloutEngine
    from r4b.rollout.factory import build_rollout_engine

    if isinstance(spec, RolloutEngine):
        return spec, getattr(spec, "tokenizer", None)
    if engine == "vllm":
        if device is not None:
            raise EvalError("device is for the hf engine; vLLM places the model itself (CUDA_VISIBLE_DEVICES)")
        return _vllm_engine(spec, seed=seed, dtype=dtype, vllm_args=vllm_args or {})
    if isinstance(spec, (str, Path)):
        model, tokenizer, processor = _load(spec, seed=seed, dtype=dtype)
        device = device or default_device()
    elif isinstance(spec, tuple) and len(spec) in (2, 3):
        model, tokenizer, processor = (*spec, None) if len(spec) == 2 else spec
    else:
        raise TypeError(
            f"a model is 'tiny', a directory, a (model, tokenizer[, processor]) tuple or a RolloutEngine, "
            f"not {type(spec).__name__}"
        )
    return build_rollout_engine(model, tokenizer, processor, batch_size=batch_size, device=device), tokenizer


def default_device() -> str:
    """Where a model that r4b loads generates unless told: the GPU when there is one (models load on the CPU)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _vllm_engine(
    spec: ModelSpec, *, seed: int, dtype: str | None, vllm_args: Mapping[str, Any]
) -> tuple[RolloutEngine, Any]:
    """A vLLM engine on a model directory (vLLM loads the weights; r4b only the tokenizer and processor)."""
    from r4b.models.loading import load_tokenizer_and_processor
    from r4b.rollout.factory import build_rollout_engine

    if not isinstance(spec, (str, Path)) or str(spec) == "tiny":
        raise EvalError(f"the vLLM engine loads model directories; {_describe(spec)} is not one (use engine='hf')")
    _check_spec(spec)
    tokenizer, processor = load_tokenizer_and_processor(spec)
    defaults: dict[str, Any] = {"seed": seed, "gpu_memory_utilization": 0.9}  # nothing else shares the GPU
    if dtype is not None:
        defaults["dtype"] = dtype
    engine = build_rollout_engine(spec, tokenizer, processor, engine="vllm", vllm_args=defaults | dict(vllm_args))
    return engine, tokenizer


def _check_spec(spec: ModelSpec) -> None:
    """Fail early (before data is read or any model loads) on a model name that cannot load."""
    if not isinstance(spec, (str, Path)) or str(spec) == "tiny":
        return
    path = Path(spec)
    if not path.is_dir():
        raise EvalError(f"model {spec}: not a directory (nor 'tiny')")
    if not (path / "config.json").is_file():
        raise EvalError(f"{path / 'config.json'}: missing (not a model directory)")
    from r4b.train.integrity import check_export  # an unfinished or damaged r4b export is refused, naming the file

    check_export(path)


def _check_dtype(dtype: str | None) -> None:
    import torch

    if dtype is not None and dtype != "auto" and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise EvalError(f"unknown dtype {dtype!r} (e.g. bfloat16, float16, float32, auto)")


def _load(spec: str | Path, *, seed: int, dtype: str | None) -> tuple[Any, Any, Any]:
    import torch

    from r4b.models.loading import load_model_and_processor

    _check_dtype(dtype)
    if str(spec) == "tiny":
        model, tokenizer, processor = load_model_and_processor(None, seed=seed)
        if dtype not in (None, "auto"):
            model = model.to(getattr(torch, dtype))
        return model, tokenizer, processor
    _check_spec(spec)
    path = Path(spec)
    kwargs = {} if dtype is None else {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    try:
        return load_model_and_processor(path, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise EvalError(f"{path}: cannot load the model: {error}") from error


def _describe(spec: ModelSpec) -> str:
    """What a model spec was, for the report's settings."""
    if isinstance(spec, (str, Path)):
        return str(spec)
    return type(spec[0] if isinstance(spec, tuple) else spec).__name__


def _free_memory() -> None:
    """Collect a dropped model and give its accelerator memory back."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def score_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """``extracted``, ``correct``, ``think_state`` and ``thinking`` of a prediction record, computed from its
    ``mode``, ``response``, ``answer`` and ``options`` (what :func:`rescore` recomputes)."""
    text = full_text(record["mode"], record["response"])
    extracted, correct = score_response(text, record["answer"], record.get("options") or None)
    state = think_state(text)
    return {"extracted": extracted, "correct": correct, "think_state": state, "thinking": state in THINKING_STATES}


def _render(tokenizer: Any, item: EvalItem, mode: str) -> str | None:
    if tokenizer is None:
        return None
    from r4b.rollout.prompts import render_prompt

    return render_prompt(tokenizer, item.prompt.messages, mode)


def _chunks(items: Sequence[EvalItem], size: int) -> Iterable[tuple[int, Sequence[EvalItem]]]:
    for index, start in enumerate(range(0, len(items), size)):
        yield index, items[start : start + size]


class _Progress:
    """A rich progress bar over generations (or nothing)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]eval[/bold] {task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("", total=total)
            self.bar.start()

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=text)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _models(model_or_dir: ModelSpec | Mapping[str, ModelSpec], name: str | None) -> dict[str, ModelSpec]:
    if isinstance(model_or_dir, Mapping):
        if name is not None:
            raise ValueError("name is for a single model; a {name: model} mapping names its models")
        if not model_or_dir:
            raise EvalError("no model to evaluate")
        return dict(model_or_dir)
    return {name if name is not None else model_name(model_or_dir): model_or_dir}


def evaluate(
    model_or_dir: ModelSpec | Mapping[str, ModelSpec],
    data_path: str | Path,
    out_dir: str | Path,
    *,
    modes: Sequence[str] = MODES,
    max_new_tokens: int = 8192,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    name: str | None = None,
    limit: int | None = None,
    benchmark: str | None = None,
    group_by: Sequence[str] = DEFAULT_GROUP_BY,
    device: str | None = None,
    dtype: str | None = None,
    engine: str = "hf",
    vllm_args: Mapping[str, Any] | None = None,
    progress: bool = True,
    plots: bool = True,
    on_model_done: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Evaluate one model, or several (``{name: model}``), on one benchmark in each mode; write the outputs
    (see the module docstring) and return the report (``report["models"][name][mode]`` holds the metrics).

    Args:
        model_or_dir: ``"tiny"`` (the untrained embedded tiny R-4B, initialised from ``seed``), an R-4B,
            Qwen2.5-VL or Qwen3-VL directory, a ``(model, tokenizer[, processor])`` tuple, a
            :class:`~r4b.rollout.RolloutEngine`, or a mapping of report names to any of these.
        data_path: a JSONL of prompts with ``answer`` or a VLMEvalKit ``.tsv`` (:mod:`r4b.eval.data`).
        modes: the modes to run, from ``auto``, ``thinking``, ``non_thinking``.
        max_new_tokens, temperature, top_p: sampling (the paper: greedy, 8192 new tokens).
        batch_size: questions per ``generate`` call.
        seed: the sampling seed (chunk ``k`` uses ``seed + k``) and the tiny model's init seed.
        name: the report name of a single model (default: ``tiny`` or the directory's name).
        limit: only the first ``limit`` questions.
        benchmark: the benchmark's name in the report (default: the data file's stem).
        group_by: the ``meta`` fields (JSONL) or columns (TSV) to break the metrics down by, when present.
        device: where a loaded model goes (default: ``cuda`` when available, else the CPU; a model object stays
            where it is); dtype: ``bfloat16``, ``float32``, ``auto``, ...
        engine: ``hf`` (transformers, anywhere) or ``vllm`` (model directories on a GPU, ``pip install r4b[vllm]``;
            ``batch_size`` questions go to vLLM at once, so make it large); vllm_args: ``vllm.LLM`` arguments.
        progress: show a progress bar; plots: write the PNG plots.
        on_model_done: called with ``(name, metrics of that model)`` after each model.

    Raises:
        r4b.data.DataError, EvalError: bad data (with ``file:line``), model, mode or name.
    """
    from r4b.rollout.base import RolloutEngine, SamplingParams

    modes = list(dict.fromkeys(modes))
    for mode in modes:
        if mode not in MODES:
            raise EvalError(f"unknown mode {mode!r} (expected some of {', '.join(MODES)})")
    if not modes:
        raise EvalError("no mode to evaluate")
    if batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {batch_size}")
    if engine not in ("hf", "vllm"):
        raise EvalError(f"engine must be 'hf' or 'vllm', got {engine!r}")
    try:
        sampling = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    except ValueError as error:
        raise EvalError(str(error)) from None
    specs = _models(model_or_dir, name)
    for spec in specs.values():
        _check_spec(spec)
    _check_dtype(dtype)
    items = load_items(data_path, limit=limit, group_by=group_by)  # bad data fails before a model loads
    benchmark = benchmark or Path(data_path).stem
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    records: list[dict[str, Any]] = []
    settings: dict[str, dict[str, Any]] = {}
    bar = _Progress(len(specs) * len(modes) * len(items), progress)
    try:
        with (out / PREDICTIONS).open("w") as handle:
            for label, spec in specs.items():
                owned = not isinstance(spec, RolloutEngine)  # built here, so closed here
                generator, tokenizer = _engine(
                    spec, batch_size=batch_size, seed=seed, device=device, dtype=dtype, engine=engine,
                    vllm_args=vllm_args,
                )  # fmt: skip
                settings[label] = {
                    "model": _describe(spec),
                    "engine": type(generator).__name__,
                    "temperature": sampling.temperature,
                    "top_p": sampling.top_p,
                    "max_new_tokens": max_new_tokens,
                    "seed": seed,
                    "batch_size": batch_size,
                    "limit": limit,
                }
                for mode in modes:
                    bar.describe(f"{label} / {mode}")
                    for rows in _generate(generator, tokenizer, items, mode, sampling, batch_size, bar):
                        for row in rows:
                            row = {"model": label, "benchmark": benchmark, **row}
                            records.append(row)
                            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                    handle.flush()
                if owned and hasattr(generator, "close"):  # vLLM keeps its GPU memory until shut down
                    generator.close()
                del generator, tokenizer
                _free_memory()
                if on_model_done is not None:
                    done = [r for r in records if r["model"] == label]
                    summary = build_report(done, benchmark=benchmark, data=str(data_path), settings=settings)
                    on_model_done(label, summary["models"][label])
    finally:
        bar.close()
    report = build_report(records, benchmark=benchmark, data=str(data_path), settings=settings)
    return write_report(report, out, plots=plots)


def _generate(
    engine: RolloutEngine,
    tokenizer: Any,
    items: Sequence[EvalItem],
    mode: str,
    sampling: SamplingParams,
    batch_size: int,
    bar: _Progress,
) -> Iterable[list[dict[str, Any]]]:
    from r4b.rl.shaping import thought_tokens  # the generating path alone needs torch's side

    close_id = _think_close_id(tokenizer)
    for chunk_index, chunk in _chunks(items, batch_size):
        params = dataclasses.replace(sampling, seed=sampling.seed + chunk_index)
        outputs = engine.generate([item.prompt for item in chunk], n=1, mode=mode, sampling=params)
        rows = []
        for item, (rollout,) in zip(chunk, outputs, strict=True):
            row = {
                "id": item.id,
                "source": item.source,
                "mode": mode,
                "prompt": _render(tokenizer, item, mode),
                "question": item.question,
                "response": rollout.text,
                "response_ids": [int(t) for t in rollout.response_ids],
                "tokens": len(rollout.response_ids),
                "finished": bool(rollout.finished),
                "answer": item.answer,
                "options": item.options,
                "groups": item.groups,
            }
            rows.append({**row, **score_record(row)})
            if close_id is not None and rows[-1]["thinking"]:  # the thought-length percentiles read it
                rows[-1]["thought_tokens"] = thought_tokens(rollout, close_id)
        bar.advance(len(chunk))
        yield rows


def _think_close_id(tokenizer: Any) -> int | None:
    """The id of ``</think>`` that thoughts are counted up to; None without a tokenizer that writes it as one."""
    from r4b.rl.shaping import think_close_token

    try:
        return None if tokenizer is None else think_close_token(tokenizer)
    except ValueError:
        return None


def load_predictions(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``predictions.jsonl`` (a bad line raises :class:`EvalError` with ``file:line``)."""
    path = Path(path)
    if path.is_dir():
        path = path / PREDICTIONS
    if not path.is_file():
        raise EvalError(f"{path}: no such predictions file")
    records = []
    required = ("model", "benchmark", "mode", "response", "answer", "finished")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                from r4b.data.json_lines import json_error_text

                raise EvalError(f"{path}:{number}: {json_error_text(error)}") from None
            missing = [key for key in required if key not in record]
            if "tokens" not in record and "response_ids" not in record:
                missing.append("tokens")
            if missing:
                raise EvalError(f"{path}:{number}: missing field(s) {', '.join(missing)}")
            if record["mode"] not in MODES:
                raise EvalError(f"{path}:{number}: field 'mode': unknown mode {record['mode']!r}")
            records.append(record)
    return records


def rescore(predictions_path: str | Path, out_dir: str | Path | None = None, *, plots: bool = True) -> dict[str, Any]:
    """Recompute every prediction's score (answer, correctness, thinking) and tokens from ``predictions.jsonl``
    (a file or its run directory) and the report from those; with ``out_dir``, write it there (report files
    and the rescored predictions). ``report["rescored_changes"]`` counts records whose stored ``correct`` or
    ``thinking`` differ from the recomputed ones (0 when the scorer has not changed)."""
    records = load_predictions(predictions_path)
    changes = 0
    rescored = []
    for record in records:
        new = {**record, **score_record(record)}
        if "response_ids" in record:
            new["tokens"] = len(record["response_ids"])
        changes += any(record.get(key) != new[key] for key in ("correct", "thinking", "tokens"))
        rescored.append(new)
    report = _report_of(rescored, Path(predictions_path))
    report["rescored_changes"] = changes
    if out_dir is not None:
        _write_predictions(rescored, Path(out_dir))
        write_report(report, out_dir, plots=plots)
    return report


def _report_of(records: Sequence[Mapping[str, Any]], where: Path) -> dict[str, Any]:
    """The report of records read back: settings from a ``report.json`` next to them when there is one."""
    if not records:
        raise EvalError(f"{where}: no predictions")
    benchmarks = list(dict.fromkeys(r["benchmark"] for r in records))
    if len(benchmarks) > 1:
        raise EvalError(f"{where}: predictions of several benchmarks ({', '.join(benchmarks)}); one per report")
    directory = where if where.is_dir() else where.parent
    saved = {}
    if (directory / "report.json").is_file():
        saved = json.loads((directory / "report.json").read_text())
    return build_report(
        records,
        benchmark=benchmarks[0],
        data=saved.get("data", str(directory)),
        settings=saved.get("settings", {}),
        group_keys=saved.get("group_keys"),
    )


def _write_predictions(records: Iterable[Mapping[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / PREDICTIONS).open("w") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def merge_reports(run_dirs: Sequence[str | Path], out_dir: str | Path, *, plots: bool = True) -> dict[str, Any]:
    """One report over the runs in ``run_dirs`` (each an ``evaluate`` output directory, e.g. one model each, on
    the same benchmark): their predictions are joined into ``out_dir/predictions.jsonl`` and rescored. Model
    names must be distinct across the runs (pass ``name=`` to :func:`evaluate`)."""
    records: list[dict[str, Any]] = []
    settings: dict[str, Any] = {}
    data, group_keys = None, None
    owner: dict[str, Path] = {}
    for run in map(Path, run_dirs):
        mine = load_predictions(run)
        for model in dict.fromkeys(r["model"] for r in mine):
            if model in owner:
                raise EvalError(f"model name {model!r} is in both {owner[model]} and {run}; rename one")
            owner[model] = run
        saved = json.loads((run / "report.json").read_text()) if (run / "report.json").is_file() else {}
        settings.update(saved.get("settings", {}))
        data = data or saved.get("data")
        if "group_keys" in saved:
            group_keys = list(dict.fromkeys([*(group_keys or []), *saved["group_keys"]]))
        records.extend(mine)
    out = Path(out_dir)
    if not records:
        raise EvalError("no predictions to merge")
    _write_predictions(records, out)
    carried = {"data": data or "", "settings": settings, **({"group_keys": group_keys} if group_keys else {})}
    (out / "report.json").write_text(json.dumps(carried) + "\n")  # read back by rescore, then rewritten
    return rescore(out, out, plots=plots)
