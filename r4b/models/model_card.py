"""The model card (``README.md``) of an exported model: base model, stages run, data, config, last metrics, eval.

Every training stage calls :func:`write_model_card` on its export (``runs/<run>/model``) after writing it; a stage
started from an r4b export carries that export's stages over, so a BPO model's card lists the annealing before it.
Where ``r4b eval`` ran on the model, :func:`update_model_card` adds its per-mode table (``r4b demo`` does this after
its evaluation). The card's data are kept, as JSON, in an HTML comment at its end (invisible on the hub), so that a
later stage or evaluation re-renders the card from them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = ["read_card_data", "render_model_card", "update_model_card", "write_model_card"]

CARD = "README.md"
DATA_MARK = "<!-- r4b-card-data "
DATA_PATTERN = re.compile(r"<!-- r4b-card-data (.*) -->\s*\Z", re.S)
STAGE_NAMES = {
    "sft": "bi-mode annealing (`r4b sft`)",
    "bpo": "BPO (`r4b bpo`)",
    "grpo": "GRPO baseline (`r4b bpo rollout.strategy=grpo`)",
}
EVAL_COLUMNS = (
    ("n", "n", "{:d}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("trigger_rate", "thinking trigger rate", "{:.3f}"),
    ("mean_tokens", "mean tokens", "{:.1f}"),
    ("unfinished_rate", "unfinished", "{:.3f}"),
)


def read_card_data(model_dir: str | Path | None) -> dict[str, Any] | None:
    """The data of an r4b model card in ``model_dir`` (None when there is none, e.g. a released model)."""
    if model_dir is None:
        return None
    path = Path(model_dir) / CARD
    if not path.is_file():
        return None
    found = DATA_PATTERN.search(path.read_text())
    return json.loads(found.group(1)) if found else None


def _count_records(path: str | Path) -> int | None:
    """Non-blank lines of a JSONL file (None when it cannot be read)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return sum(1 for line in handle if line.strip())
    except OSError:
        return None


def _last_metrics(run_dir: Path) -> dict[str, Any]:
    """The scalar entries of the run's last ``metrics.jsonl`` line."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        return {}
    last = json.loads(lines[-1])
    return {k: v for k, v in last.items() if isinstance(v, (int, float, str, bool)) and v is not None}


def write_model_card(
    model_dir: str | Path,
    *,
    stage: str,
    config: Any,
    run_dir: str | Path,
    data_files: Sequence[str | Path] = (),
    adapter: bool = False,
) -> Path:
    """Write ``model_dir/README.md`` for the export of one training stage.

    Args:
        stage: ``sft``, ``bpo`` or ``grpo``.
        config: the stage's config (a dataclass or a plain mapping); its ``model.path`` is the model trained.
        run_dir: the run directory (its last ``metrics.jsonl`` line goes into the card).
        data_files: the JSONL files trained on (each listed with its number of records).
        adapter: ``model_dir`` is peft's adapter directory of a ``model.lora`` run (``export.lora``), not a model.
    """
    from r4b.config import config_to_dict

    plain = config_to_dict(config) if not isinstance(config, Mapping) else dict(config)
    plain = json.loads(json.dumps(plain, default=str))
    start = (plain.get("model") or {}).get("path")
    earlier = read_card_data(start)
    if earlier is not None:
        base, stages = earlier["base_model"], list(earlier["stages"])
    else:
        seed = (plain.get("model") or {}).get("seed", 0)
        base, stages = start if start is not None else f"the embedded tiny R-4B (r4b, seed {seed})", []
    stages.append(
        {
            "stage": stage,
            "from": start if start is not None else base,
            "run_dir": str(run_dir),
            "data": [{"file": str(f), "records": _count_records(f)} for f in data_files],
            "config": plain,
            "metrics": _last_metrics(Path(run_dir)),
        }
    )
    data = {"name": Path(model_dir).resolve().name, "family": _family(model_dir), "base_model": base}
    data |= {"stages": stages, "eval": None}
    if adapter:
        data["adapter"] = True
    return _write(model_dir, data)


def update_model_card(model_dir: str | Path, report: Mapping[str, Any], name: str | None = None) -> Path | None:
    """Add an evaluation's per-mode table to the card of ``model_dir`` (written if there is none).

    ``report`` is ``r4b eval``'s report.json (the model is ``name``, else the one whose ``settings.model`` is
    ``model_dir``) or one model's ``{mode: metrics}``. Returns the card, or None when the report has no entry for
    the model."""
    per_mode = _model_entry(model_dir, report, name)
    if per_mode is None:
        return None
    data = read_card_data(model_dir) or {
        "name": Path(model_dir).resolve().name,
        "family": _family(model_dir),
        "base_model": "unknown",
        "stages": [],
    }
    data["eval"] = {
        "modes": {mode: {k: m.get(k) for k, _, _ in EVAL_COLUMNS} for mode, m in per_mode.items()},
        "data": report.get("data") if "models" in report else None,
        "settings": _settings(report, model_dir, name),
    }
    return _write(model_dir, data)


def _model_entry(model_dir: str | Path, report: Mapping[str, Any], name: str | None) -> dict[str, Any] | None:
    if "models" not in report:
        return dict(report)
    models = report["models"]
    if name is not None:
        return models.get(name)
    target = Path(model_dir).resolve()
    for label, settings in (report.get("settings") or {}).items():
        if label in models and _same_path(settings.get("model"), target):
            return models[label]
    return None


def _settings(report: Mapping[str, Any], model_dir: str | Path, name: str | None) -> dict[str, Any] | None:
    settings = report.get("settings") or {}
    if name is not None:
        return settings.get(name)
    target = Path(model_dir).resolve()
    return next((s for s in settings.values() if _same_path(s.get("model"), target)), None)


def _same_path(value: Any, target: Path) -> bool:
    return isinstance(value, str) and Path(value).resolve() == target


def _family(model_dir: str | Path) -> str:
    path = Path(model_dir) / "config.json"
    model_type = json.loads(path.read_text()).get("model_type") if path.is_file() else None
    return model_type or "rvl"


def _write(model_dir: str | Path, data: dict[str, Any]) -> Path:
    path = Path(model_dir) / CARD
    path.write_text(render_model_card(data))
    return path


def render_model_card(data: Mapping[str, Any]) -> str:
    """The card's markdown (hub front matter, usage, training, config, last metrics, evaluation) from its data."""
    remote = data["family"] == "rvl"
    stages = data["stages"]
    lines = [
        "---",
        f"library_name: {'peft' if data.get('adapter') else 'transformers'}",
        "pipeline_tag: image-text-to-text",
        "tags: [r4b, auto-thinking, multimodal]",
        "---",
        "",
        f"# {data['name']}",
        "",
        "An auto-thinking multimodal model trained with r4b, the open trainer of the R-4B "
        "recipe (bi-mode annealing, then BPO). It decides per query whether to think (`<think>\\n...</think>`) "
        "or answer directly (`<think>\\n\\n</think>`); the prompt's suffix forces either mode.",
        "",
        "## Usage",
        "",
    ]
    if data.get("adapter"):
        lines += [
            "LoRA adapters (peft) of the last stage below, to load onto its base model: "
            "`PeftModel.from_pretrained(base, path)` (`merge_and_unload()` gives the merged model).",
        ]
    elif remote:
        lines += [
            "R-4B's architecture (`RForConditionalGeneration`, model type `rvl`): the model code is in this "
            "directory, loaded as for the released R-4B with `trust_remote_code=True` (no r4b needed).",
            "",
            "```python",
            "from transformers import AutoModelForImageTextToText, AutoProcessor",
            "",
            "model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)",
            "processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)",
            'messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]',
            '# thinking_mode: "auto" (the model decides), "long" (thinking), "short" (non-thinking)',
            'text = processor.apply_chat_template(messages, add_generation_prompt=True, thinking_mode="auto")',
            'inputs = processor(images=[image], text=text, return_tensors="pt")',
            "output = model.generate(**inputs, max_new_tokens=1024)",
            "```",
        ]
    else:
        lines += [
            f"A stock transformers model (`{data['family']}`): `AutoModelForImageTextToText.from_pretrained(path)`. "
            "Its tokenizer's chat template takes `thinking_mode` (`auto`, `long`, `short`) as R-4B's does.",
        ]
    lines += ["", "## Training", "", f"- Base model: `{data['base_model']}`"]
    if stages:
        names = " -> ".join(STAGE_NAMES.get(s["stage"], s["stage"]) for s in stages)
        lines += [f"- Stages: {names}"]
        in_dir = lambda k: bool(data.get("adapter")) and k == len(stages)  # an adapter export's own stage
        lines += [_lora_line(k, s, in_dir(k)) for k, s in enumerate(stages, 1) if _lora(s)]
        lines += [""]
        lines += ["| # | stage | from | run | data (records) | steps |", "|---:|---|---|---|---|---:|"]
        for k, s in enumerate(stages, 1):
            files = "<br>".join(f"`{d['file']}` ({_fmt(d['records'])})" for d in s["data"]) or "-"
            step = s["metrics"].get("step", "-")
            lines.append(f"| {k} | {s['stage']} | `{s['from']}` | `{s['run_dir']}` | {files} | {step} |")
        last = stages[-1]
        lines += ["", f"### Config ({last['stage']})", "", "```yaml"]
        lines += [yaml.safe_dump(last["config"], sort_keys=False).rstrip(), "```", ""]
        lines += [f"### Last metrics ({last['stage']})", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in last["metrics"].items()] or ["| - | - |"]
    else:
        lines.append("- Stages: none recorded")
    evaluation = data.get("eval")
    if evaluation:
        lines += ["", "## Evaluation (`r4b eval`, per mode)", ""]
        if evaluation.get("data"):
            lines += [f"Data: `{evaluation['data']}`.", ""]
        settings = evaluation.get("settings") or {}
        if settings:
            shown = ", ".join(f"{k}={v}" for k, v in settings.items() if k != "model")
            lines += [f"Settings: {shown}.", ""]
        lines += ["| mode | " + " | ".join(h for _, h, _ in EVAL_COLUMNS) + " |"]
        lines += ["|---|" + "---:|" * len(EVAL_COLUMNS)]
        for mode, metrics in evaluation["modes"].items():
            cells = [_fmt(metrics.get(k), fmt) for k, _, fmt in EVAL_COLUMNS]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    # ">" escaped (valid JSON in strings, absent outside them): no "-->" can end the comment early
    lines += ["", DATA_MARK + json.dumps(data, sort_keys=True).replace(">", "\\u003e") + " -->", ""]
    return "\n".join(lines)


def _lora(stage: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``model.lora`` section of a stage that trained LoRA adapters, else None."""
    lora = ((stage.get("config") or {}).get("model") or {}).get("lora") or {}
    return lora if lora.get("rank") else None


def _lora_line(k: int, stage: Mapping[str, Any], in_this_directory: bool) -> str:
    lora = _lora(stage) or {}
    targets = ", ".join(f"`{t}`" for t in lora.get("targets", []))
    where = "the adapters are this directory" if in_this_directory else "merged into the weights"
    return (
        f"- LoRA-trained (stage {k}, {stage['stage']}): rank {lora['rank']}, alpha {_fmt(lora.get('alpha'))}, "
        f"dropout {_fmt(lora.get('dropout'))}, on {targets}; {where} (base + alpha/rank x BA)"
    )


def _fmt(value: Any, fmt: str | None = None) -> str:
    if value is None:
        return "-"
    if fmt is not None:
        try:
            return fmt.format(int(value) if fmt == "{:d}" else value)
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
