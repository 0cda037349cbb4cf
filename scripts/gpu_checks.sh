#!/usr/bin/env bash
# Run THERE (a lent GPU machine, through the device tool) every check only a GPU can do, in stages that each fit
# one 10-minute call. First `bash scripts/gpu_wheels.sh` here; then, with carry [".whl"]:
#     bash scripts/gpu_checks.sh tests      # build r4b._C / r4b._cuda, the whole suite compiled on the GPU (bf16 too)
#     bash scripts/gpu_checks.sh bench      # the four benchmarks at full size, JSON into $OUT
#     bash scripts/gpu_checks.sh all
# Everything lands in $OUT: gpu_checks.log (one log: the device tool returns at most 8 files) and the JSON results;
# copy the JSON into bench/results/ and commit it.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
OUT=${OUT:-/tmp/r4b-gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu_checks.log"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PY=${PY:-python3}

step() {  # step NAME SECONDS CMD...: run with a time limit, log everything, never stop the stage
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "=== $name rc=$rc in $((SECONDS - start)) s" | tee -a "$LOG"
}

if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi -L; "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton',
triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee -a "$LOG"

if [ "$stage" = tests ] || [ "$stage" = all ]; then
    step build 300 "$PY" setup.py -q build_ext --inplace
    step import-native 60 "$PY" -c "import r4b._C, r4b._cuda; print('r4b._C and r4b._cuda import')"
    step kernels 420 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_linear_logprobs.py tests/test_losses.py \
        tests/test_liger_parity.py tests/test_varlen_attention.py tests/test_shared_prefix.py tests/test_bad_input.py
    step gpu-marked 300 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
fi
if [ "$stage" = bench ] || [ "$stage" = all ]; then
    step fused_loss 300 "$PY" bench/fused_loss.py --out "$OUT"
    step attention 300 "$PY" bench/attention.py --out "$OUT"
    step sft_step 200 "$PY" bench/sft_step.py --out "$OUT"
    step bpo_step 300 "$PY" bench/bpo_step.py --out "$OUT"
fi
grep "^=== .* rc=" "$LOG"
