#!/usr/bin/env bash
# The demo's paper signature on several seeds (issue 16): `r4b demo --seed S` for each seed, one at a time (the
# demo uses every core), then one table of the four targets, the forced-thinking trigger rate after BPO and the
# minutes per seed.
#
#   scripts/demo_sweep.sh                                   # seeds 0-4 under runs/demo-sweep (make demo-sweep)
#   SEEDS="2 3" OUT=runs/my-sweep scripts/demo_sweep.sh
#   OMP_NUM_THREADS=1 scripts/demo_sweep.sh                  # on a machine shared with other jobs (see README)
#   DEMO_ARGS="--bpo rollout.filter_groups=true" OUT=runs/sweep-filter scripts/demo_sweep.sh   # a BPO variant
#
# A seed whose report.json exists is kept, not rerun (delete its directory to redo it), so an interrupted sweep
# resumes; seed S writes OUT/seed-S/ (the demo's run directory, its wall time in OUT/seed-S/seconds) and its log
# OUT/seed-S.log. The table alone, from finished seeds: scripts/demo_sweep.sh --table
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"0 1 2 3 4"}
OUT=${OUT:-runs/demo-sweep}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
if [ "${1:-}" != "--table" ]; then
  for seed in $SEEDS; do
    dir="$OUT/seed-$seed"
    if [ -f "$dir/report.json" ]; then
      echo "seed $seed: kept ($dir/report.json exists)"
      continue
    fi
    rm -rf "$dir"
    echo "seed $seed: r4b demo --seed $seed --out $dir  (log: $OUT/seed-$seed.log)  $(date -u +%H:%M:%S) UTC"
    start=$(date +%s)
    # shellcheck disable=SC2086
    if ! TRITON_INTERPRET=0 "$PY" -m r4b demo --seed "$seed" --out "$dir" ${DEMO_ARGS:-} >"$OUT/seed-$seed.log" 2>&1; then
      echo "seed $seed: failed, see $OUT/seed-$seed.log"
    fi
    mkdir -p "$dir"
    echo $(($(date +%s) - start)) >"$dir/seconds"
  done
fi
# shellcheck disable=SC2086
"$PY" -c 'import sys; from r4b.demo import sweep_table; print(sweep_table(sys.argv[1], [int(s) for s in sys.argv[2:]]))' "$OUT" $SEEDS
