#!/usr/bin/env bash
# Every check only a GPU can do, in ONE device call, ordered by value so that a run cut off keeps what matters.
# First, here (with network):
#     bash scripts/gpu_wheels.sh                     # the pinned wheels the GPU image lacks, into a fresh .whl/
# then on the GPU machine (the device tool, carry [".whl"], timeout_s 600):
#     bash scripts/gpu_checks.sh                     # everything, within R4B_GPU_BUDGET seconds (default 540)
#     bash scripts/gpu_checks.sh bench-new|tests|train|bench   # one part (each installs first; bench: every row)
#     bash scripts/gpu_checks.sh plan                # the steps in order with their limits, nothing run
# and, here on a CPU, a dry run of the same stages at smoke sizes (a check of this script, not of a GPU):
#     R4B_GPU_DRY=1 bash scripts/gpu_checks.sh
#
# In order (`plan` prints it):
#  0. the carried wheels against scripts/gpu_wheels.txt and .whl/SHA256SUMS: one line and exit 3 if any is
#     missing, unpinned or damaged (without them liger is missing and the runs differ);
#  1. install r4b as a user would: the wheels and `pip install --no-build-isolation --no-deps` of this checkout
#     into a target directory, against the image's torch (no network), building r4b._C and r4b._cuda_ext; then
#     `import r4b._cuda` alone and `import r4b._C` from outside the checkout;
#  2. the rows no GPU has measured, alone on the GPU, autotuning on: fused_loss-new (r4b-cublas, r4b-cublas-fast
#     and r4b, N 4096 and 16384, each row checked against the fp32 materialized loss) and attention-new
#     (r4b-schedule, r4b-kernel, torch-fa2, flex and r4b, 16k and 64k tokens, each row checked against float64);
#  3. correctness, in parallel (sharing the GPU is fine): the tests of the kernels no GPU has run (the schedule
#     kernels at their Hopper bf16 config against float64, the cuBLAS methods, the liger drop-in), the older
#     kernel tests, the gpu-marked tests, and a short bf16 `r4b sft` and `r4b bpo` (configs/gpu/: FSDP2 in one
#     process on nccl without torchrun, liger on, r4b's attention, a ~84M random R-4B of real head shapes);
#  4. sft_step and bpo_step, alone on the GPU.
# Every benchmark row is appended to $OUT/rows-<device>-<date>.jsonl the moment it is measured and each suite's JSON
# is rewritten after it; a step at its limit gets SIGTERM (the suites then write their JSON, marked interrupted)
# and SIGKILL 10 s later. A SIGTERM to this script does the same to the running steps and skips the rest.
#
# Sizing (seconds on one H100; per-row times from the 2026-11-27 run, bench/results/h100-2026-11-27/, else ~
# estimates). A step's limit is cut to what is left of the budget, so the command ends by BUDGET + 10 s + the
# table: 540 + 15 < 600 (the device's limit); with the machine's start (1-2 min), the transfers and its 30 s idle,
# about 12 of the session's 15 minutes.
#   install          150  pip + nvcc of r4b._C and r4b._cuda_ext for this GPU's architecture only (~60-90)
#   import-*       2 x 30 an interpreter importing torch and r4b (~10)
#   fused_loss-new   120  4 methods x 2 modes x 2 sizes, 9 calls a row (2 warm-up, 5 timed, 1 peak, 1 check):
#                         9 x (26 + 109 + 8.6 + 34 ms r4b, measured; 20 + 79 + 6 + 24 and 15 + 60 + 5 + 20 ms
#                         cuBLAS, predicted) = 3.5 s; fp32 reference 3 x 2NHV at ~50 TFLOP/s: 1 s; imports and
#                         Triton autotuning of r4b's kernels (5 + 5 + 3 configs, ~2 s each): ~45 s
#   attention-new    210  timed: 9 calls x (33 + 150 ms, r4b's kernel on the 3 masks at 16k + 64k, measured) x 5
#                         rows, none predicted slower = 8 s; float64 references of 6 layouts ~5 s; compiles: r4b's
#                         kernel 7 configs x 3 masks (~40), the schedule kernels 3 x 3 (~30), FlexAttention per
#                         layout (6 x ~15) and in r4b's auto for the 4 non-causal (~40): ~210 at worst, flex
#                         and r4b timed last
#   in parallel      150  kernel-tests-new 120, kernel-tests 150, gpu-marked 90 (pinned autotuning, per-test
#                         timeout 60 s), train: prep 60, sft 120, bpo 150 (~84M model, ~1 GB checkpoint)
#   sft_step, bpo_step  90 + 120
# Expected: 80 + 20 + 45 + 150 = ~295 s to the end of step 2, the parallel group by ~450, the last two cut.
# Out, in $OUT (the device returns at most 8 files; these are 7): gpu_checks.log (every step's output, prefixed
# [step]), gpu_checks.jsonl (one line per step: status, rc, seconds, limit, its summary line; the first line is
# the environment), the rows JSONL and the four suites' JSON (copy those into bench/results/ and commit them).
# The end of the output is the table of steps and the rows measured.
# shellcheck disable=SC2329 # functions run through trap, parallel and bash -c
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
STAGE=${1:-all}
case $STAGE in all | bench-new | tests | train | bench | plan) ;; *) echo "usage: $0 [all|bench-new|tests|train|bench|plan]" >&2 && exit 2 ;; esac
PLAN=0
[ "$STAGE" = plan ] && PLAN=1 && STAGE=all
DRY=${R4B_GPU_DRY:-0}
if [ "$DRY" = 1 ] && [ -z "${PY:-}" ] && [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python; fi
PY=${PY:-python3}
REPORT=$REPO/scripts/gpu_report.py
WHEELS=${R4B_GPU_WHEELS:-$REPO/.whl}

# --- 0. the carried wheels, before anything else --------------------------------------------------------------
if [ "$DRY" != 1 ] && [ "$PLAN" != 1 ]; then
    "$PY" "$REPORT" check-wheels "$WHEELS" "$REPO/scripts/gpu_wheels.txt" || exit 3
fi

OUT=${OUT:-/tmp/r4b-gpu}
WORK=${R4B_GPU_WORK:-/tmp/r4b-gpu-work} # outside the checkout: python there imports the installed r4b
BUDGET=${R4B_GPU_BUDGET:-$([ "$DRY" = 1 ] && echo 3000 || echo 540)}
SITE=$WORK/site
LOG=$OUT/gpu_checks.log
JSONL=$OUT/gpu_checks.jsonl
RUNNING=$WORK/running # one file per running step: its timeout's pid
STOP=$WORK/stop       # exists once this script got SIGTERM or SIGINT: the running steps end, the rest skip
START=$(date +%s)
if [ "$PLAN" != 1 ]; then
    mkdir -p "$OUT" "$WORK/logs" "$RUNNING"
    rm -f "$STOP" "$RUNNING"/*
    : >"$LOG"
    : >"$JSONL"
fi
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false
# no network there: a library reaching for the Hugging Face Hub fails at once instead of hanging until the limit
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PATH=$SITE/bin:$PATH

# SIGTERM / SIGINT: end the running steps (their timeout passes the signal on, then SIGKILL 10 s later), skip the rest.
on_signal() {
    touch "$STOP"
    local pidfile
    for pidfile in "$RUNNING"/*; do
        [ -e "$pidfile" ] && kill -TERM "$(cat "$pidfile")" 2>/dev/null
    done
}
trap on_signal TERM INT

# wait_for PID: its exit status, waiting again when a signal's trap ends the wait early.
wait_for() {
    wait "$1"
    while kill -0 "$1" 2>/dev/null; do wait "$1"; done
    wait "$1" 2>/dev/null # the status again: bash keeps it for a job already waited for
}

skip() { # skip NAME WHY
    echo "=== $1: skipped, $2" | tee -a "$LOG"
    echo "skipped: $2" >"$WORK/logs/$1.out"
    "$PY" "$REPORT" record "$JSONL" "$1" skipped -1 0 0 "$WORK/logs/$1.out"
}

# step NAME LIMIT CMD...: CMD in $WORK under min(LIMIT, what is left of the budget) (at the limit: SIGTERM to its
# process group, SIGKILL 10 s later), its output into $WORK/logs/NAME.out and, as it comes, into the log prefixed
# [NAME]; one JSON line into the jsonl. Never stops the script; returns CMD's status.
step() {
    local name=$1 limit=$2
    shift 2
    if [ "$PLAN" = 1 ]; then
        printf '%-18s %4ss  %s\n' "$name" "$limit" "$(head -n 1 <<<"$*")"
        return 0
    fi
    [ -e "$STOP" ] && skip "$name" "this script got SIGTERM" && return 1
    local left=$((BUDGET - ($(date +%s) - START)))
    ((left < 20)) && skip "$name" "the budget ($BUDGET s) is spent" && return 1
    [ "$DRY" = 1 ] && limit=$((limit * 4)) # a CPU shared with others: the same steps, slower
    ((limit > left)) && limit=$left
    echo "=== $name (limit ${limit}s, from $(date +%FT%T)): $*" | tee -a "$LOG"
    local output=$WORK/logs/$name.out t0 pid tailer rc status=ok
    t0=$(date +%s)
    : >"$output"
    (cd "$WORK" && exec timeout -k 10 "$limit" "$@") >"$output" 2>&1 &
    pid=$!
    echo "$pid" >"$RUNNING/$name"
    tail -n +1 -s 0.5 -f --pid="$pid" "$output" 2>/dev/null | sed -u "s/^/[$name] /" >>"$LOG" &
    tailer=$!
    wait_for "$pid"
    rc=$?
    rm -f "$RUNNING/$name"
    wait "$tailer" 2>/dev/null
    ((rc == 124)) && status=timeout
    ((rc == 137)) && status=killed
    ((rc != 0)) && [ -e "$STOP" ] && status=terminated
    ((rc != 0)) && [ "$status" = ok ] && status=failed
    local seconds=$(($(date +%s) - t0))
    echo "=== $name $status rc=$rc in ${seconds}s" | tee -a "$LOG"
    "$PY" "$REPORT" record "$JSONL" "$name" "$status" "$rc" "$seconds" "$limit" "$output"
    return "$rc"
}

# parallel FN...: the functions at once (in order under `plan`), waiting for all.
parallel() {
    local fn pids=()
    if [ "$PLAN" = 1 ]; then
        echo "-- in parallel: $*"
        for fn; do "$fn"; done
        echo "-- end of the parallel group"
        return 0
    fi
    for fn; do
        "$fn" &
        pids+=($!)
    done
    for fn in "${pids[@]}"; do wait_for "$fn"; done
}

want() { [ "$STAGE" = all ] || [ "$STAGE" = "$1" ]; }

# --- the machine -------------------------------------------------------------------------------------------------
if [ "$PLAN" = 1 ]; then
    echo "plan (budget ${BUDGET}s; each step's limit is cut to what is left of it; x4 in a dry run):"
else
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
fi

# --- 1. install ----------------------------------------------------------------------------------------------------
install() {
    set -e
    rm -rf "$SITE"
    if [ "$DRY" != 1 ]; then
        "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
            --target "$SITE" "$WHEELS"/*.whl
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
    export REPO SITE DRY PY WHEELS
    step install 150 bash -c install
fi
if [ "$DRY" = 1 ]; then
    # no CUDA here: r4b._cuda must fail only for want of its extension
    step import-native 30 "$PY" -c 'import r4b._C, r4b.kernels, r4b.packing as p
try:
    import r4b._cuda
except ImportError as err:
    assert "_cuda_ext" in str(err), err
    print("r4b._cuda: not built here (no CUDA), as expected:", err)
print("r4b._C imports; packing backend", p.BACKEND, "; r4b from", r4b.__file__)'
else
    step import-cuda-alone 30 "$PY" -c 'import r4b._cuda; print("import r4b._cuda alone:", r4b._cuda.__file__)'
    step import-native 30 "$PY" -c 'import r4b, r4b._C, r4b.kernels, r4b.packing as p, r4b.shared_prefix as s
assert p.BACKEND == "native" and s._cuda is not None, (p.BACKEND, s._cuda)
print("r4b._C and r4b._cuda import; r4b from", r4b.__file__)'
fi

# --- 2. the rows no GPU has measured, alone on the GPU ------------------------------------------------------------
if [ "$DRY" = 1 ]; then # smoke sizes, r4b's kernels in Triton's interpreter (as the GPU runs them, not the reference)
    SIZES=(--smoke) FUSED_SIZES=(--smoke --no-compile) SMOKE=(--smoke) KERNEL_BENCH=(env TRITON_INTERPRET=1 "$PY")
else
    SIZES=(--sizes 16384 65536 --warmup 2 --repeats 5) FUSED_SIZES=(--sizes 4096 16384 --warmup 2 --repeats 5)
    SMOKE=() KERNEL_BENCH=("$PY")
fi
bench_new() {
    step fused_loss-new 120 "${KERNEL_BENCH[@]}" "$REPO/bench/fused_loss.py" "${FUSED_SIZES[@]}" \
        --impls r4b-cublas r4b-cublas-fast r4b --out "$OUT"
    step attention-new 210 "${KERNEL_BENCH[@]}" "$REPO/bench/attention.py" "${SIZES[@]}" \
        --impls r4b-schedule r4b-kernel torch-fa2 flex r4b --no-bpo-batch --out "$OUT"
}
want bench-new && bench_new

# --- 3. correctness, in parallel ----------------------------------------------------------------------------------
KERNEL_TESTS=(kernels/test_linear_logprobs.py kernels/test_losses.py kernels/test_liger_parity.py
    kernels/test_varlen_attention.py kernels/test_shared_prefix.py kernels/test_bad_input.py models/test_hf_attention.py)
# the paths no GPU has run: their own step, first, so a slow compile of the older ones cannot cut them
NEW_KERNEL_TESTS=(kernels/test_attention_schedule.py kernels/test_fused_grad.py kernels/test_liger_dropin.py
    models/test_attention_backends.py kernels/test_custom_ops.py)
# The fp32 walking-kernel tests compile fp32 configs no training runs (a minute of ptxas each); on a GPU the bf16
# Hopper-config test checks the kernels against float64 instead (the CPU runs all of them in the interpreter).
NO_FP32_WALKING=(-k "not test_schedule_walking_kernels_match_reference and not test_schedule_walking_kernels_head_dims")
# -v: each test's result as it ends, so a step cut at its limit still reports the tests that ran; a per-test
# timeout well under the step's limit turns a hang into one failed test
PYTEST=("$PY" -m pytest -v -p no:cacheprovider -rfE --durations=8 --timeout=60)
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "${R4B_GPU_TEST_WORKERS:-4}")

kernel_tests_new() {
    local files=("${NEW_KERNEL_TESTS[@]/#/$REPO/tests/}")
    if [ "$DRY" = 1 ]; then # the CPU interpreter would take an hour: collect them against the installed r4b
        step kernel-tests-new 120 "${PYTEST[@]}" --collect-only "${files[@]}"
    else
        step kernel-tests-new 120 env R4B_AUTOTUNE=0 "${PYTEST[@]}" --continue-on-collection-errors "${XDIST[@]}" \
            "${NO_FP32_WALKING[@]}" "${files[@]}"
    fi
}

kernel_tests() {
    local files=("${KERNEL_TESTS[@]/#/$REPO/tests/}")
    if [ "$DRY" = 1 ]; then
        step kernel-tests 150 "${PYTEST[@]}" --collect-only "${files[@]}"
    else
        step kernel-tests 150 env R4B_AUTOTUNE=0 "${PYTEST[@]}" --continue-on-collection-errors "${XDIST[@]}" \
            "${files[@]}"
    fi
}

gpu_marked() {
    step gpu-marked 90 env R4B_AUTOTUNE=0 "${PYTEST[@]}" --continue-on-collection-errors -m gpu "$REPO/tests" \
        --ignore "$REPO/tests/real_vllm" # vllm_checks runs them, alone on the GPU
}

train() {
    # One process without torchrun: r4b's engines make their one-process group on 127.0.0.1 themselves (torchrun's
    # rendezvous publishes the host's name, which an offline machine may not resolve: a hang until the limit).
    local preset=small synth=(--sft 128 --rl 32 --eval 16) sft=() bpo=()
    local run=(env NCCL_SOCKET_IFNAME=lo R4B_AUTOTUNE=0 R4B_ATTENTION_BACKEND=r4b "$PY" -m r4b)
    if [ "$DRY" = 1 ]; then # FSDP2 on gloo, fp32, the tiny shape, one step each
        preset=tiny synth=(--sft 16 --rl 8 --eval 4)
        sft=(--max-steps 1 'engine.mixed_precision="no"' train.global_batch_samples=8)
        bpo=(--max-steps 1 'engine.mixed_precision="no"' train.prompts_per_step=2 rollout.max_new_tokens=8
            train.eval_max_new_tokens=8)
    fi
    [ "$PLAN" = 1 ] || rm -rf "$WORK/runs/gpu"
    step prep 60 bash -c "'$PY' '$REPO/scripts/make_random_model.py' --out runs/gpu/model --preset $preset \
        && '$PY' -m r4b data synth --out runs/gpu/data ${synth[*]}" || return
    # r4b's own attention kernels in the model (the auto backend would send these masks to FA2 / FlexAttention)
    step sft 120 "${run[@]}" sft --config "$REPO/configs/gpu/sft.yaml" "${sft[@]}"
    step sft-result 20 "$PY" "$REPORT" run runs/gpu/sft
    step bpo 150 "${run[@]}" bpo --config "$REPO/configs/gpu/bpo.yaml" "${bpo[@]}"
    step bpo-result 20 "$PY" "$REPORT" run runs/gpu/bpo
}

# The vLLM rollout engine on the GPU: what vLLM's CPU build (make test-vllm) cannot show, CUDA graphs and sleep mode
# (tests/real_vllm/test_vllm_gpu.py), then the CPU tests' parity, sync and BPO/eval checks on CUDA, then the rollout
# benchmark with compiled graphs. Only where the image has vLLM: its CUDA wheels do not fit what a call carries.
vllm_checks() {
    if [ "$PLAN" != 1 ] && ! "$PY" -c "import vllm" 2>/dev/null; then
        skip vllm "vLLM is not installed on this image (pip install -e '.[vllm]')"
        return 0
    fi
    step vllm-tests 300 "${PYTEST[@]}" --timeout=600 "$REPO/tests/real_vllm"
    step vllm-bench 150 "$PY" "$REPO/bench/rollout.py" "${SMOKE[@]}" --compiled --out "$OUT"
}

jobs_to_run=()
if want tests; then jobs_to_run+=(kernel_tests_new kernel_tests gpu_marked); fi
if want train; then jobs_to_run+=(train); fi
((${#jobs_to_run[@]})) && parallel "${jobs_to_run[@]}"
want tests && vllm_checks # alone: vLLM takes its share of the GPU's memory

# --- 4. the whole-step benchmarks, alone on the GPU (in `bench`: every row of every suite first) ---------------
if [ "$STAGE" = bench ]; then
    step fused_loss 150 "${KERNEL_BENCH[@]}" "$REPO/bench/fused_loss.py" "${FUSED_SIZES[@]}" --out "$OUT"
    step attention 240 "${KERNEL_BENCH[@]}" "$REPO/bench/attention.py" "${SIZES[@]}" --out "$OUT"
fi
if want bench; then
    step sft_step 90 "$PY" "$REPO/bench/sft_step.py" "${SMOKE[@]}" --out "$OUT"
    step bpo_step 120 "$PY" "$REPO/bench/bpo_step.py" "${SMOKE[@]}" --out "$OUT"
fi

[ "$PLAN" = 1 ] && exit 0
echo "=== done in $(($(date +%s) - START))s (budget ${BUDGET}s); results in $OUT: $(ls "$OUT" | tr '\n' ' ')" |
    tee -a "$LOG"
"$PY" "$REPORT" table "$JSONL" "$OUT"/rows-*.jsonl
[ -e "$STOP" ] && exit 143
exit 0
