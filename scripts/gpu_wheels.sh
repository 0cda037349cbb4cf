#!/usr/bin/env bash
# Run HERE (the CPU machine, with network) before a device call: the pure-Python wheels the GPU image lacks, pinned
# in scripts/gpu_wheels.txt, into a fresh .whl/ (git-ignored through the repository's info/exclude) for Python 3.12
# on x86-64, with .whl/SHA256SUMS, which scripts/gpu_checks.sh checks before anything else. About 8 MB.
# pytest-xdist, execnet and pytest-timeout are not carried: the image has them.
# Not verl (bench/fused_loss.py's verl row): importing its kernel imports verl, which needs ray; that row is an error.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
PIP=${PIP:-.venv/bin/pip}
PINS=scripts/gpu_wheels.txt
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
rm -rf .whl # emptied first: a wheel of another version left here would be installed beside the pinned one
mkdir .whl
grep -v -e '^#' -e '^deepspeed==' "$PINS" >.whl/.binary-pins
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d .whl \
    -r .whl/.binary-pins
rm .whl/.binary-pins
# DeepSpeed publishes only an sdist: build its pure-Python wheel here (ops are JIT-built there if ever needed).
"$PIP" wheel -q --no-deps --no-build-isolation "$(grep '^deepspeed==' "$PINS")" -w .whl
(cd .whl && sha256sum -- *.whl >SHA256SUMS)
python3 scripts/gpu_report.py check-wheels .whl "$PINS"
du -sh .whl
