"""``r4b._cuda``: the CUDA kernels of csrc/cuda (built by setup.py into ``r4b._cuda_ext`` where torch has CUDA
and a toolkit exists).

The extension links against torch's libraries (libc10, libtorch) without a run path to them: they are found
only once ``import torch`` has loaded them. This module imports torch first, so ``import r4b._cuda`` works on
its own; where the extension was not built it raises ImportError (r4b.shared_prefix then uses torch).
"""

import torch  # noqa: F401  (loads libc10 / libtorch before the extension needs them)

from r4b._cuda_ext import pack_shared_prefix, unpack_responses

__all__ = ["pack_shared_prefix", "unpack_responses"]
