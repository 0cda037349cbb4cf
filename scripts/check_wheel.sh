#!/usr/bin/env bash
# r4b installed from its wheel, as users who import the fused loss install it (`pip install .`, not editable): build
# the wheel, install it into a fresh venv, and from a directory outside the checkout import r4b.kernels, train one
# step of the shipped demo config (`--config configs/demo/sft.yaml` names no file there: the wheel's copy is used)
# and run `r4b demo --quick`. The fresh venv gets r4b's dependencies from the dev venv (a path in a .pth file, whose
# own .pth files, the editable r4b among them, are not read): nothing is downloaded.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export TRITON_INTERPRET=0 # the demo runs the kernels' torch references on a CPU

# built from a copy of the checkout's files (tracked and untracked, not ignored): no build/ left in the checkout
mkdir "$WORK/src"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$WORK/src"
"$PY" -m pip wheel --quiet --no-build-isolation --no-deps --wheel-dir "$WORK/dist" "$WORK/src"
"$PY" -m venv "$WORK/venv"
DEPS=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
SITE=$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$DEPS" >"$SITE/r4b-check-deps.pth"
"$WORK/venv/bin/python" -m pip install --quiet --no-index --no-deps "$WORK"/dist/r4b-*.whl

cd "$WORK"
venv/bin/python - "$SITE" <<'PY'
import sys
import r4b, r4b.kernels, r4b._C
assert r4b.__file__.startswith(sys.argv[1]), f"r4b imported from {r4b.__file__}, not the wheel in {sys.argv[1]}"
print("import r4b.kernels: the wheel's,", r4b.__file__)
PY
venv/bin/r4b data synth --out runs/demo/data --sft 16 --rl 4 --eval 4
venv/bin/r4b sft --config configs/demo/sft.yaml --output-dir runs/sft --max-steps 1 train.global_batch_samples=4
venv/bin/r4b demo --quick --out runs/demo-quick
echo "the wheel works: $(ls dist)"
