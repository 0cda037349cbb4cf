#!/usr/bin/env bash
# Run HERE (the CPU machine, with network) before a device call: the pure-Python wheels the GPU image lacks,
# into .whl/ (git-ignored via .git/info/exclude), for Python 3.12 on x86-64. About 8 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
PIP=${PIP:-.venv/bin/pip}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
mkdir -p .whl
# Missing on the image (read from /work/.library/device/KINDS.md): the fused-loss competitor, the ZeRO engine
# and its pydantic, math-verify for rewards, TRL (and datasets) for bench/bpo_step.py's competitor, pytest-xdist
# (Triton compiles the kernel tests on 8 CPU workers there), cut-cross-entropy for bench/fused_loss.py's cce row.
# Not verl (bench/fused_loss.py's verl row): importing its kernel imports verl, which needs ray; that row is an error.
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d .whl \
    liger-kernel==0.8.5 hjson pydantic pydantic-core annotated-types typing-inspection \
    math-verify==0.9.0 latex2sympy2_extended antlr4-python3-runtime==4.13.2 trl==1.16.0 datasets==5.2.0 dill multiprocess \
    pytest-xdist execnet cut-cross-entropy==25.1.1
# DeepSpeed publishes only an sdist: build its pure-Python wheel here (ops are JIT-built there if ever needed).
ls .whl/deepspeed-0.19.8-*.whl >/dev/null 2>&1 || "$PIP" wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
du -sh .whl
