"""The transformers range pyproject.toml declares is the range CI tests.

CI runs the whole suite on the newest transformers (``make test``) and the model, data, SFT, BPO and eval tests on
the lower bound (``make test-transformers-compat``, the GPU image's 5.17). These tests tie the two together and
cover what differs between the versions at import: every r4b module imports, and R-4B's config defaults its text
model to Qwen3 whether or not this transformers has ``SubConfigSpec`` (5.17 has not).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest
import transformers
from packaging.requirements import Requirement
from packaging.version import Version

import r4b
from r4b.models.r4b_model import RConfig

ROOT = Path(__file__).resolve().parents[2]


def declared_transformers() -> Requirement:
    text = (ROOT / "pyproject.toml").read_text()
    (line,) = re.findall(r'^\s*"(transformers[^"]*)"', text, flags=re.M)
    return Requirement(line)


def test_lower_bound_is_the_version_ci_tests():
    specifier = declared_transformers().specifier
    (lower,) = [s.version for s in specifier if s.operator == ">="]
    (compat,) = re.findall(r"^TRANSFORMERS_COMPAT \?= (\S+)$", (ROOT / "Makefile").read_text(), flags=re.M)
    assert Version(lower) == Version(compat)
    assert compat in specifier and not specifier.contains("6.0")


def test_every_lower_bound_is_installed_in_the_compat_venv():
    """Each ``>=`` bound of a runtime dependency is pinned in the Makefile's LOWER_BOUNDS (the compat venv), except
    torch (the GPU image's 2.11: scripts/gpu_checks.sh) and triton (make test-triton-compat)."""
    (pins,) = re.findall(r"^LOWER_BOUNDS := (.+)$", (ROOT / "Makefile").read_text(), flags=re.M)
    pinned = dict(pin.split("==") for pin in pins.replace("$(TRANSFORMERS_COMPAT)", "COMPAT").split())
    text = (ROOT / "pyproject.toml").read_text()
    block = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    for line in re.findall(r'^\s*"([^"]+)"', block, flags=re.M):
        requirement = Requirement(line)
        lower = [s.version for s in requirement.specifier if s.operator == ">="]
        if not lower or requirement.name in ("torch", "triton"):
            continue
        if requirement.name == "transformers":
            assert pinned["transformers"] == "COMPAT", pins
        else:
            assert requirement.name in pinned and Version(pinned[requirement.name]) == Version(lower[0]), (
                requirement.name,
                lower,
                pins,
            )


def test_installed_transformers_is_in_the_declared_range():
    assert transformers.__version__ in declared_transformers().specifier


def test_every_r4b_module_imports():
    failed = {}
    for module in pkgutil.walk_packages(r4b.__path__, "r4b."):
        if module.name.endswith("__main__") or module.name == "r4b._cuda":  # runs the CLI / needs CUDA torch
            continue
        try:
            importlib.import_module(module.name)
        except Exception as e:  # pragma: no cover - the assertion reports it
            failed[module.name] = repr(e)
    assert not failed


@pytest.mark.parametrize(
    "text_config, model_type",
    [(None, "qwen3"), ({"hidden_size": 64, "num_attention_heads": 4}, "qwen3"), ({"model_type": "qwen2"}, "qwen2")],
)
def test_text_model_defaults_to_qwen3(text_config, model_type):
    config = RConfig(text_config=text_config)
    assert config.text_config.model_type == model_type
    if text_config is not None and "hidden_size" in text_config:
        assert config.text_config.hidden_size == 64
    again = RConfig.from_dict(config.to_dict())
    assert again.text_config.model_type == model_type
    assert again.text_config.to_dict() == config.text_config.to_dict()
    assert again.vision_config.model_type == config.vision_config.model_type == "siglip_vision_model"
