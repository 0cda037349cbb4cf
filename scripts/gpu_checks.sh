#!/usr/bin/env bash
# Every check only a GPU can do, in ONE device call (about 9 minutes on one H100). First, here (with network):
#     bash scripts/gpu_wheels.sh                       # the pure-Python wheels the GPU image lacks, into .whl/
# then on the GPU machine (the device tool, carry [".whl"], timeout_s 600):
#     bash scripts/gpu_checks.sh                       # everything, within R4B_GPU_BUDGET seconds (default 520)
#     bash scripts/gpu_checks.sh tests|train|bench     # one part (each installs first)
# and, here on a CPU, a dry run of the same stages at smoke sizes (a check of this script, not of a GPU):
#     R4B_GPU_DRY=1 bash scripts/gpu_checks.sh
#
# In order (a run cut off at the budget still has the first results):
#  1. install r4b as a user would: the carried wheels and `pip install --no-build-isolation --no-deps` of this
#     checkout into a target directory, against the image's torch (no network), which builds r4b._C and
#     r4b._cuda_ext; then `import r4b._cuda` alone and `import r4b._C` from outside the checkout.
#  2. at the same time, three jobs (correctness only, so sharing the GPU is fine):
#     - the kernel tests compiled on the GPU (fp32, fp16 and bf16 against the float64 references), with each
#       Triton autotune pinned to one config (R4B_AUTOTUNE=0) and pytest-xdist where the image has it;
#     - the gpu-marked tests;
#     - a ~1.2B random R-4B (scripts/make_random_model.py) and the synthetic data, then a short bf16 `r4b sft`
#       and `r4b bpo` (configs/gpu/: FSDP2 in one process on nccl via torchrun, liger on, r4b's attention).
#  3. the four benchmarks at full size, one after the other (timings: nothing else runs), autotuning on:
#     sft_step, bpo_step, fused_loss (N 4096 and 16384), attention (16k and 64k tokens).
# Out, in $OUT: gpu_checks.log (every step's output, prefixed [step] while steps run in parallel),
# gpu_checks.jsonl (one line per step: status, rc, seconds, limit, its summary line; the first line is the
# environment) and the benchmarks' JSON (copy those into bench/results/ and commit them). The device tool
# returns at most 8 files: these are 6. The end of the output is the table of steps.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
STAGE=${1:-all}
case $STAGE in all | tests | train | bench) ;; *) echo "usage: $0 [all|tests|train|bench]" >&2 && exit 2 ;; esac
DRY=${R4B_GPU_DRY:-0}
if [ "$DRY" = 1 ] && [ -z "${PY:-}" ] && [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python; fi
PY=${PY:-python3}
OUT=${OUT:-/tmp/r4b-gpu}
WORK=${R4B_GPU_WORK:-/tmp/r4b-gpu-work} # outside the checkout: python there imports the installed r4b
BUDGET=${R4B_GPU_BUDGET:-$([ "$DRY" = 1 ] && echo 3000 || echo 520)}
SITE=$WORK/site
LOG=$OUT/gpu_checks.log
JSONL=$OUT/gpu_checks.jsonl
REPORT=$REPO/scripts/gpu_report.py
mkdir -p "$OUT" "$WORK/logs"
: >"$LOG"
: >"$JSONL"
START=$(date +%s)
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false
# no network there: a library reaching for the Hugging Face Hub fails at once instead of hanging until the limit
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PATH=$SITE/bin:$PATH

# step NAME LIMIT CMD...: run CMD in $WORK under min(LIMIT, what is left of the budget) (its whole process
# group is killed at the limit), its output into the log prefixed [NAME], one JSON line into the jsonl.
# Never stops the script; returns CMD's status.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    local output=$WORK/logs/$name.out
    if ((left < 20)); then
        echo "=== $name: skipped, the budget is spent" | tee -a "$LOG"
        echo "skipped: the budget ($BUDGET s) is spent" >"$output"
        "$PY" "$REPORT" record "$JSONL" "$name" skipped -1 0 0 "$output"
        return 1
    fi
    [ "$DRY" = 1 ] && limit=$((limit * 4)) # a CPU shared with others: the same steps, slower
    ((limit > left)) && limit=$left
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0
    t0=$(date +%s)
    (cd "$WORK" && timeout -k 10 "$limit" "$@") 2>&1 | tee "$output" | sed -u "s/^/[$name] /" >>"$LOG"
    local rc=${PIPESTATUS[0]} status=ok
    ((rc == 124 || rc == 137)) && status=timeout
    ((rc != 0)) && [ "$status" = ok ] && status=failed
    local seconds=$(($(date +%s) - t0))
    echo "=== $name $status rc=$rc in ${seconds}s" | tee -a "$LOG"
    "$PY" "$REPORT" record "$JSONL" "$name" "$status" "$rc" "$seconds" "$limit" "$output"
    return "$rc"
}

want() { [ "$STAGE" = all ] || [ "$STAGE" = "$1" ]; }

# --- 0. the machine -------------------------------------------------------------------------------------------
{
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi (dry run: $DRY)"
    "$PY" - "$DRY" "$BUDGET" <<'EOF'
import json, sys
import torch, triton
try:
    import transformers
    tv = transformers.__version__
except Exception as err:  # noqa: BLE001
    tv = f"not importable: {err}"
env = {"environment": {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
       "triton": triton.__version__, "transformers": tv,
       "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
       "dry_run": sys.argv[1] == "1", "budget_s": int(sys.argv[2])}}
print(json.dumps(env))
EOF
} 2>&1 | tee -a "$LOG" | tail -n 1 >>"$JSONL"

# --- 1. install -----------------------------------------------------------------------------------------------
install() {
    set -e
    rm -rf "$SITE"
    if [ "$DRY" != 1 ] && compgen -G "$REPO/.whl/*.whl" >/dev/null; then
        "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
            --target "$SITE" "$REPO"/.whl/*.whl
    fi
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && [ "$DRY" != 1 ]; then # this GPU's architecture only: faster
        TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
        export TORCH_CUDA_ARCH_LIST
    fi
    MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip install --no-index --no-deps --no-build-isolation --no-cache-dir \
        --disable-pip-version-check --target "$SITE" "$REPO"
    ls "$SITE"/r4b/*.so
}
if [ "${R4B_GPU_SKIP_INSTALL:-0}" != 1 ]; then
    export -f install
    export REPO SITE DRY PY
    step install 240 bash -c install
fi
if [ "$DRY" = 1 ]; then
    # no CUDA here: r4b._cuda must fail only for want of its extension
    step import-native 60 "$PY" -c 'import r4b._C, r4b.kernels, r4b.packing as p
try:
    import r4b._cuda
except ImportError as err:
    assert "_cuda_ext" in str(err), err
    print("r4b._cuda: not built here (no CUDA), as expected:", err)
print("r4b._C imports; packing backend", p.BACKEND, "; r4b from", r4b.__file__)'
else
    step import-cuda-alone 60 "$PY" -c 'import r4b._cuda; print("import r4b._cuda alone:", r4b._cuda.__file__)'
    step import-native 60 "$PY" -c 'import r4b, r4b._C, r4b.kernels, r4b.packing as p, r4b.shared_prefix as s
assert p.BACKEND == "native" and s._cuda is not None, (p.BACKEND, s._cuda)
print("r4b._C and r4b._cuda import; r4b from", r4b.__file__)'
fi

# --- 2. correctness, three jobs at once -----------------------------------------------------------------------
KERNEL_TESTS=(kernels/test_linear_logprobs.py kernels/test_losses.py kernels/test_liger_parity.py
    kernels/test_varlen_attention.py kernels/test_shared_prefix.py kernels/test_bad_input.py models/test_hf_attention.py)
# the paths no GPU has compiled yet (issues 12 and 15): their own step, so a slow compile cannot cut the above
NEW_KERNEL_TESTS=(kernels/test_fused_grad.py models/test_attention_backends.py kernels/test_attention_schedule.py
    kernels/test_custom_ops.py)
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfE --durations=8)
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "${R4B_GPU_TEST_WORKERS:-8}")

kernel_tests() {
    local files=("${KERNEL_TESTS[@]/#/$REPO/tests/}")
    local new=("${NEW_KERNEL_TESTS[@]/#/$REPO/tests/}")
    if [ "$DRY" = 1 ]; then # the CPU interpreter would take an hour: collect them against the installed r4b
        step kernel-tests 300 "${PYTEST[@]}" --collect-only "${files[@]}" "${new[@]}"
    else
        step kernel-tests 180 env R4B_AUTOTUNE=0 "${PYTEST[@]}" --continue-on-collection-errors "${XDIST[@]}" "${files[@]}"
        step kernel-tests-new 120 env R4B_AUTOTUNE=0 "${PYTEST[@]}" --continue-on-collection-errors "${XDIST[@]}" "${new[@]}"
    fi
}

gpu_marked() {
    step gpu-marked 150 env R4B_AUTOTUNE=0 "${PYTEST[@]}" --continue-on-collection-errors -m gpu "$REPO/tests"
}

train() {
    local preset=1b synth=(--sft 128 --rl 32 --eval 16) sft=() bpo=() launch
    launch=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m r4b)
    if [ "$DRY" = 1 ]; then # FSDP2 on gloo, fp32, the tiny shape, one step each
        preset=tiny synth=(--sft 16 --rl 8 --eval 4)
        sft=(--max-steps 1 'engine.mixed_precision="no"' train.global_batch_samples=8)
        bpo=(--max-steps 1 'engine.mixed_precision="no"' train.prompts_per_step=2 rollout.max_new_tokens=8
            train.eval_max_new_tokens=8)
    fi
    rm -rf "$WORK/runs/gpu"
    step prep 90 bash -c "'$PY' '$REPO/scripts/make_random_model.py' --out runs/gpu/model-1b --preset $preset \
        && '$PY' -m r4b data synth --out runs/gpu/data ${synth[*]}" || return
    # r4b's own attention kernels in the model (the auto backend would send these masks to FA2 / FlexAttention)
    step sft 150 env R4B_AUTOTUNE=0 R4B_ATTENTION_BACKEND=r4b "${launch[@]}" sft --config "$REPO/configs/gpu/sft.yaml" "${sft[@]}"
    step sft-result 30 "$PY" "$REPORT" run runs/gpu/sft
    rm -rf "$WORK"/runs/gpu/sft/checkpoint-* # ~15 GB of optimizer state: the disk holds 64
    step bpo 150 env R4B_AUTOTUNE=0 R4B_ATTENTION_BACKEND=r4b "${launch[@]}" bpo --config "$REPO/configs/gpu/bpo.yaml" "${bpo[@]}"
    step bpo-result 30 "$PY" "$REPORT" run runs/gpu/bpo
}

pids=()
if want tests; then
    kernel_tests &
    pids+=($!)
    gpu_marked &
    pids+=($!)
fi
if want train; then
    train &
    pids+=($!)
fi
for pid in "${pids[@]}"; do wait "$pid"; done

# --- 3. benchmarks, one at a time -----------------------------------------------------------------------------
if want bench; then
    if [ "$DRY" = 1 ]; then
        FUSED=(--smoke --no-compile) ATTN=(--smoke) SMOKE=(--smoke)
    else
        FUSED=(--sizes 4096 16384 --warmup 2 --repeats 5) ATTN=(--sizes 16384 65536 --warmup 2 --repeats 5) SMOKE=()
    fi
    step sft_step 90 "$PY" "$REPO/bench/sft_step.py" "${SMOKE[@]}" --out "$OUT"
    step bpo_step 120 "$PY" "$REPO/bench/bpo_step.py" "${SMOKE[@]}" --out "$OUT"
    step fused_loss 150 "$PY" "$REPO/bench/fused_loss.py" "${FUSED[@]}" --out "$OUT"
    step attention 150 "$PY" "$REPO/bench/attention.py" "${ATTN[@]}" --out "$OUT"
fi

echo "=== done in $(($(date +%s) - START))s (budget ${BUDGET}s); results in $OUT: $(ls "$OUT" | tr '\n' ' ')" |
    tee -a "$LOG"
"$PY" "$REPORT" table "$JSONL"
