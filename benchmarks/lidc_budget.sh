#!/usr/bin/env bash
# Equal-budget comparison on the real LIDC slices (../shared/data/lidc): the small config trained for a fixed
# CPU budget per variant, phase 1 only (GED over K prior samples is a phase-1 property; the personalizer only
# acts in phase 2), then evaluated with K = 16 on each run's held-out test patients (fold 0 of 4, seed 0).
# Variants: the full model (harmonizer + GED loss), the plain probabilistic U-Net baseline (both off), and
# each switch alone. Raters are in the LIDC readers' default order (by area, smallest first). Then
# benchmarks/lidc_summary.py writes benchmarks/results/lidc-small-cpu.{json,md}.
#
#     bash benchmarks/lidc_budget.sh [MINUTES] [RUNS_DIR]        (default 10 minutes, runs/lidc-budget)
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-10}
RUNS=${2:-runs/lidc-budget}
DATA=${DATA:-../shared/data/lidc}
PY=${PY:-python3}
run() {  # name, flags...
  local name=$1
  shift
  rm -rf "$RUNS/$name" "$RUNS/eval-$name"
  "$PY" -m harmonizer_fast.cli train --data "$DATA" --config small --out "$RUNS/$name" --phase 1 --epochs 100 \
    --max-minutes "$MINUTES" --no-progress "$@"
  "$PY" -m harmonizer_fast.cli evaluate --checkpoint "$RUNS/$name" --data "$DATA" --out "$RUNS/eval-$name" \
    --samples 16 | tail -3
}
run full
run baseline --no-harmonizer --no-ged-loss
run no-ged-loss --no-ged-loss
run no-harmonizer --no-harmonizer
"$PY" benchmarks/lidc_summary.py "$RUNS" --minutes "$MINUTES"
