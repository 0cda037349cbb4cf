"""A model exported by r4b loads wherever R-4B loads, without r4b.

Each export is opened in a subprocess that cannot import r4b (``python -I``, a meta-path blocker for ``r4b``): an
R-4B-family export with stock transformers and ``trust_remote_code=True`` (``AutoModelForImageTextToText``,
``AutoProcessor``: the remote code r4b copied into it), a Qwen2.5-VL / Qwen3-VL export with stock transformers
alone. Its chat template and processor must render the ids r4b's encoding gives, and greedy generation the tokens
r4b's own loader and rollout engine give, in all three modes (auto, thinking, non-thinking), for a prompt with one
image, one with two and one without. Tiny random models, a few tokens.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from r4b.format import MODES
from r4b.models import load_model_and_processor, save_model
from r4b.models.hub import CONFIG_AUTO_MAP, HUB_DIR, PROCESSOR_AUTO_MAP, REMOTE_CODE_FILES
from r4b.models.tokenizer import TEMPLATE_MODE
from r4b.rollout import HFRolloutEngine, Prompt, SamplingParams

MAX_NEW_TOKENS = 6
QUESTION = [{"type": "text", "text": "What is 3 + 4?"}]
PROMPTS = (  # (messages, image indices)
    ([{"role": "user", "content": [{"type": "image"}, *QUESTION]}], [0]),
    ([{"role": "user", "content": [{"type": "image"}, {"type": "image"}, *QUESTION]}], [1, 2]),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}], []),
)
IMAGE_SIZES = ((40, 90), (60, 30), (28, 28))  # (height, width)

# Runs in `python -I`: r4b cannot be imported (blocked before anything else loads), stock transformers only.
WORKER = r"""
import json
import sys


class BlockR4B:
    def find_spec(self, name, path=None, target=None):
        if name == "r4b" or name.startswith("r4b."):
            raise ModuleNotFoundError(f"r4b is blocked in this process: {name}")
        return None


sys.meta_path.insert(0, BlockR4B())
try:
    import r4b  # noqa: F401
    sys.exit("r4b was importable")
except ModuleNotFoundError:
    pass

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoTokenizer
from transformers.models.auto.image_processing_auto import AutoImageProcessor
from transformers.models.auto.processing_auto import AutoProcessor

directory, cases_path, out_path = sys.argv[1:4]
cases = json.loads(open(cases_path).read())
remote = json.loads(open(directory + "/config.json").read())["model_type"] == "rvl"
if remote:  # R-4B family: as the released R-4B, with the remote code in the directory
    model = AutoModelForImageTextToText.from_pretrained(directory, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
    tokenizer, render, placeholder = processor.tokenizer, processor.apply_chat_template, processor.image_token
    classes = [type(model).__module__, type(processor).__module__, type(processor.image_processor).__module__]
else:  # Qwen-VL: stock classes (their AutoProcessor needs torchvision for its video processor: expand by hand)
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    image_processor = AutoImageProcessor.from_pretrained(directory)
    render, placeholder = tokenizer.apply_chat_template, "<|image_pad|>"
    classes = [type(model).__module__, type(image_processor).__module__]
stops = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
results, pixels = [], []
for case in cases:
    images = [Image.open(p).convert("RGB") for p in case["images"]]
    text = render(case["messages"], add_generation_prompt=True, thinking_mode=case["thinking_mode"], tokenize=False)
    if remote:
        inputs = dict(processor(images=images or None, text=text, return_tensors="pt"))
    else:
        expanded, extra = text, {}
        if images:
            extra = dict(image_processor(images, return_tensors="pt"))
            counts = [int(g.prod()) // image_processor.merge_size**2 for g in extra["image_grid_thw"]]
            pieces = text.split(placeholder)
            expanded = pieces[0] + "".join(placeholder * c + p for c, p in zip(counts, pieces[1:]))
        inputs = dict(tokenizer(expanded, return_tensors="pt", add_special_tokens=False)) | extra
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == model.config.image_token_id).int()
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=case["max_new_tokens"], do_sample=False, eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id, suppress_tokens=[tokenizer.convert_tokens_to_ids(placeholder)],
        )
    width = inputs["input_ids"].shape[1]
    results.append({"text": text, "ids": inputs["input_ids"][0].tolist(), "response": out[0, width:].tolist()})
    pixels.append(inputs.get("pixel_values"))
torch.save(pixels, out_path + ".pt")
blocked = not any(name == "r4b" or name.startswith("r4b.") for name in sys.modules)
open(out_path, "w").write(json.dumps({"results": results, "classes": classes, "r4b_absent": blocked}))
"""


pytestmark = pytest.mark.usefixtures("torch_reference_kernels")  # tests/conftest.py


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for k, (h, w) in enumerate(IMAGE_SIZES):
        path = out / f"image{k}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def r4b_export(tmp_path_factory) -> Path:
    model, tokenizer, _ = load_model_and_processor(None, seed=5)
    return save_model(model, tmp_path_factory.mktemp("r4b") / "model", tokenizer)


def run_without_r4b(directory: Path, cases: list[dict], tmp: Path) -> dict:
    """The worker in a fresh `python -I` without r4b, its remote code cached under ``tmp``."""
    (tmp / "worker.py").write_text(WORKER)
    (tmp / "cases.json").write_text(json.dumps(cases))
    out = tmp / "out.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"HF_MODULES_CACHE": str(tmp / "modules"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    args = [sys.executable, "-I", str(tmp / "worker.py"), str(directory), str(tmp / "cases.json"), str(out)]
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    result["pixels"] = torch.load(str(out) + ".pt")
    return result


def expected_with_r4b(directory: Path, cases: list[dict]) -> tuple[list[dict], list]:
    """What r4b gives: its loader, its prompt encoding and its rollout engine, greedy."""
    model, tokenizer, processor = load_model_and_processor(directory, dtype=torch.float32)
    engine = HFRolloutEngine(model, tokenizer, processor, batch_size=1)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS)
    expected, pixels = [], []
    for case in cases:
        images = [Image.open(p).convert("RGB") for p in case["images"]]
        (rollout,) = engine.generate([Prompt(case["messages"], images)], n=1, mode=case["mode"], sampling=sampling)[0]
        text = tokenizer.apply_chat_template(
            case["messages"], tokenize=False, add_generation_prompt=True, thinking_mode=case["thinking_mode"]
        )
        expected.append({"text": text, "ids": rollout.prompt_ids, "response": rollout.response_ids})
        pixels.append(processor.preprocess(images)["pixel_values"] if images else None)
    return expected, pixels


def make_cases(image_files: list[Path]) -> list[dict]:
    return [
        {
            "messages": messages,
            "images": [str(image_files[i]) for i in indices],
            "mode": mode,
            "thinking_mode": TEMPLATE_MODE[mode],
            "max_new_tokens": MAX_NEW_TOKENS,
        }
        for messages, indices in PROMPTS
        for mode in MODES
    ]


def check_same(got: dict, expected: list[dict], expected_pixels: list, cases: list[dict]) -> None:
    assert got["r4b_absent"]
    for case, result, want, pixels, want_pixels in zip(
        cases, got["results"], expected, got["pixels"], expected_pixels, strict=True
    ):
        where = f"{case['mode']} / {len(case['images'])} image(s)"
        assert result["text"] == want["text"], where
        assert result["ids"] == want["ids"], where
        assert result["response"] == want["response"], where
        if want_pixels is None:
            assert pixels is None, where
        else:
            assert torch.equal(pixels.float(), want_pixels.float()), where
    assert sum(len(r["response"]) == MAX_NEW_TOKENS for r in expected) > len(expected) // 2  # real generations


def test_remote_code_imports_only_torch_and_transformers():
    allowed = {"__future__", "math", "collections", "torch", "transformers"}
    for name in REMOTE_CODE_FILES:
        tree = ast.parse((HUB_DIR / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            elif isinstance(node, ast.ImportFrom):  # relative: only the other remote-code files
                assert f"{node.module}.py" in REMOTE_CODE_FILES, (name, node.module)
                continue
            else:
                continue
            assert roots <= allowed, (name, roots)


def test_r4b_export_is_self_contained(r4b_export):
    for name in REMOTE_CODE_FILES:
        assert (r4b_export / name).read_bytes() == (HUB_DIR / name).read_bytes(), name
    config = json.loads((r4b_export / "config.json").read_text())
    assert config["auto_map"] == CONFIG_AUTO_MAP
    assert config["architectures"] == ["RForConditionalGeneration"] and config["model_type"] == "rvl"
    for name in ("preprocessor_config.json", "processor_config.json"):
        assert json.loads((r4b_export / name).read_text())["auto_map"] == PROCESSOR_AUTO_MAP, name
    # r4b's classes are the remote code's: one implementation
    from r4b.models import RConfig, RForConditionalGeneration

    assert RForConditionalGeneration.__module__ == "r4b.models.hub.modeling_r4b"
    assert RConfig.__module__ == "r4b.models.hub.configuration_r4b"


@pytest.mark.subprocess
def test_r4b_export_loads_and_generates_without_r4b(r4b_export, image_files, tmp_path):
    cases = make_cases(image_files)
    got = run_without_r4b(r4b_export, cases, tmp_path)
    assert all(module.startswith("transformers_modules.") for module in got["classes"]), got["classes"]
    expected, pixels = expected_with_r4b(r4b_export, cases)
    check_same(got, expected, pixels, cases)


@pytest.mark.subprocess
@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_vl_export_stays_stock_and_generates_without_r4b(kind, image_files, tmp_path):
    from qwen_vl_models import save_tiny_qwen_vl

    source = save_tiny_qwen_vl(kind, tmp_path / "source")
    model, tokenizer, processor = load_model_and_processor(source, dtype=torch.float32)
    export = save_model(model, tmp_path / "model", tokenizer, processor)
    assert not any((export / name).exists() for name in REMOTE_CODE_FILES)
    assert "auto_map" not in json.loads((export / "config.json").read_text())
    cases = make_cases(image_files)
    (tmp_path / "worker").mkdir()
    got = run_without_r4b(export, cases, tmp_path / "worker")
    assert all(module.startswith("transformers.") for module in got["classes"]), got["classes"]
    expected, pixels = expected_with_r4b(export, cases)
    check_same(got, expected, pixels, cases)


def test_model_card_lists_base_stages_data_config_metrics_and_eval(tmp_path):
    from r4b.models.model_card import read_card_data, update_model_card, write_model_card
    from r4b.train.bpo import BPOConfig
    from r4b.train.sft import SFTConfig

    model, tokenizer, _ = load_model_and_processor(None, seed=0)
    sft_data, rl_data = tmp_path / "sft.jsonl", tmp_path / "rl.jsonl"
    sft_data.write_text('{"a": 1}\n{"a": 2}\n\n{"a": 3}\n')
    rl_data.write_text('{"b": 1}\n')
    runs = {}
    for stage in ("sft", "bpo"):
        run = runs[stage] = tmp_path / stage
        save_model(model, run / "model", tokenizer)
        lines = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.25, "lrs": {"llm": 1}}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    sft = SFTConfig(output_dir=str(runs["sft"]))
    sft.data.train = [str(sft_data)]
    write_model_card(runs["sft"] / "model", stage="sft", config=sft, run_dir=runs["sft"], data_files=sft.data.train)
    bpo = BPOConfig(output_dir=str(runs["bpo"]))
    bpo.model.path, bpo.data.prompts = str(runs["sft"] / "model"), [str(rl_data)]
    write_model_card(runs["bpo"] / "model", stage="bpo", config=bpo, run_dir=runs["bpo"], data_files=bpo.data.prompts)

    card = (runs["bpo"] / "model" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "Base model: `the embedded tiny R-4B (r4b, seed 0)`" in card
    assert "Stages: bi-mode annealing (`r4b sft`) -> BPO (`r4b bpo`)" in card
    assert f"`{sft_data}` (3)" in card and f"`{rl_data}` (1)" in card
    assert "### Config (bpo)" in card and "group_size:" in card
    assert "| loss | 1.25 |" in card and "| step | 2 |" in card and "lrs" not in card.split("### Last")[1]
    assert "trust_remote_code=True" in card and "## Evaluation" not in card
    assert [s["stage"] for s in read_card_data(runs["bpo"] / "model")["stages"]] == ["sft", "bpo"]

    per_mode = {
        mode: {"n": 32, "accuracy": 0.5 + k / 10, "trigger_rate": k / 2, "mean_tokens": 10.0 * (k + 1)}
        for k, mode in enumerate(MODES)
    }
    report = {
        "data": "eval.jsonl",
        "models": {"bpo": per_mode, "other": per_mode},
        "settings": {"bpo": {"model": str(runs["bpo"] / "model"), "max_new_tokens": 96}, "other": {"model": "x"}},
    }
    assert update_model_card(runs["bpo"] / "model", report) is not None  # found by its path
    card = (runs["bpo"] / "model" / "README.md").read_text()
    assert "## Evaluation (`r4b eval`, per mode)" in card and "max_new_tokens=96" in card
    assert "| thinking | 32 | 0.600 | 0.500 | 20.0 | - |" in card
    assert "Stages: bi-mode annealing" in card  # the training part is kept
    assert update_model_card(runs["sft"] / "model", report) is None  # not in the report
    assert update_model_card(runs["sft"] / "model", report, "other") is not None
