"""The checkout must not shadow what it imports: `python -m pytest`, `python -m r4b` and notebooks started in the
repository root put the root first on sys.path, so a top-level directory named like an installed module (Hugging
Face's `kernels`, which transformers imports) or a standard-library module would be imported in its place."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_no_top_level_directory_shadows_an_installed_or_standard_module():
    installed = importlib.metadata.packages_distributions()
    clashes = []
    for entry in sorted(ROOT.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        owners = [dist for dist in installed.get(entry.name, []) if dist != "r4b"]
        if owners or entry.name in sys.stdlib_module_names:
            clashes.append(f"{entry.name}/ (installed by {', '.join(owners) or 'the standard library'})")
    assert not clashes, f"top-level directories that shadow modules when the root is on sys.path: {clashes}"


@pytest.mark.subprocess
def test_transformers_imports_its_kernels_integration_from_the_repository_root():
    """What broke CI: `-c` puts the working directory first on sys.path, as `python -m pytest` does."""
    code = "import transformers.integrations.hub_kernels, r4b.kernels, r4b.models; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
