"""Builds r4b: the Python packages (``kernels/`` installed as ``r4b.kernels``) and,
when csrc/ holds C++ sources, the pybind11 extension ``r4b._C``.

Metadata lives in pyproject.toml; this file only says what pyproject cannot:
the package directory mapping and the native build.
"""

from glob import glob

from setuptools import find_packages, setup


def native_extensions() -> list:
    sources = sorted(glob("csrc/*.cpp"))
    if not sources:
        return []
    from pybind11.setup_helpers import Pybind11Extension

    return [Pybind11Extension("r4b._C", sources, cxx_std=17, extra_compile_args=["-O3"])]


setup(
    # `kernels/` is r4b.kernels: a top-level `kernels` package would shadow
    # Hugging Face's `kernels`, which transformers imports.
    packages=[*find_packages(include=["r4b", "r4b.*"]), "r4b.kernels"],
    package_dir={"r4b": "r4b", "r4b.kernels": "kernels"},
    ext_modules=native_extensions(),
)
