"""Builds r4b: the Python package ``r4b`` (kernels included, at ``r4b/kernels/``),
when csrc/ holds C++ sources the pybind11 extension ``r4b._C``, and where torch
has CUDA and nvcc exists the CUDA extension ``r4b._cuda_ext`` (csrc/cuda/), which ``r4b._cuda`` loads
after importing torch.

Metadata lives in pyproject.toml; this file only says what pyproject cannot: the native build.
"""

import os
import shutil
from glob import glob

from setuptools import find_packages, setup


def native_extensions() -> list:
    sources = sorted(glob("csrc/*.cpp"))
    if not sources:
        return []
    from pybind11.setup_helpers import Pybind11Extension

    return [Pybind11Extension("r4b._C", sources, cxx_std=17, extra_compile_args=["-O3"])]


def cuda_extensions() -> tuple[list, dict]:
    """r4b._cuda_ext and the build command it needs, or nothing where torch lacks CUDA or there is no toolkit.

    The CPU build of torch lacks the CUDA headers the glue includes, so a CPU machine builds only
    r4b._C (r4b.shared_prefix then runs its torch implementation).
    """
    try:
        import torch
    except ImportError:  # an isolated build without torch: nothing to link against
        return [], {}
    if not (torch.cuda.is_available() or torch.version.cuda):
        return [], {}
    root = cuda_toolkit()
    if root is None:
        print("r4b: torch has CUDA but no CUDA toolkit (nvcc and headers) was found; not building r4b._cuda_ext")
        return [], {}
    os.environ["CUDA_HOME"] = root  # read when cpp_extension is imported
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(glob("csrc/cuda/*.cpp") + glob("csrc/cuda/*.cu"))
    # r4b/_cuda.py imports torch, then this (the extension needs torch's libraries loaded first).
    extension = CUDAExtension("r4b._cuda_ext", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    return [extension], {"build_ext": BuildExtension}


def cuda_toolkit() -> str | None:
    """The first of $CUDA_HOME, $CUDA_PATH, nvcc's parent and /usr/local/cuda holding bin/nvcc and the
    headers: nvcc on PATH may be a wrapper script outside the toolkit (torch would take /usr/local)."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    candidates += [nvcc and os.path.dirname(os.path.dirname(nvcc)), "/usr/local/cuda"]
    for root in filter(None, candidates):
        if all(os.path.exists(os.path.join(root, *part)) for part in (("bin", "nvcc"), ("include", "cuda_runtime.h"))):
            return root
    return None


CUDA_EXTENSIONS, CUDA_CMDCLASS = cuda_extensions()


setup(
    packages=find_packages(include=["r4b", "r4b.*"]),
    ext_modules=native_extensions() + CUDA_EXTENSIONS,
    cmdclass=CUDA_CMDCLASS,
)
