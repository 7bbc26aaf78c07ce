#!/usr/bin/env bash
# The two-phase pipeline on the real LIDC slices (../shared/data/lidc) at a fixed CPU budget: the small
# config's phase 1 for PHASE1_MINUTES, then phase 2 from the selected phase-1 model for PHASE2_MINUTES, then
# the paper's Table 1 (K = 16 prior samples) and Table 2 (the four rater heads, Dice_A1..A4) on the held-out
# test patients (fold 0 of 4, seed 0). Raters are in the LIDC readers' default order, by area, smallest first
# (D-Persona's convention). benchmarks/lidc_personalization_summary.py then adds the identity heads (z'_i = z)
# of the same phase-1 model and writes benchmarks/results/lidc-personalization-small-cpu.{json,md}.
#
#     bash benchmarks/lidc_personalization.sh [PHASE1_MINUTES] [PHASE2_MINUTES] [RUNS_DIR]   (10, 5, runs/lidc-pers)
#
# PHASE1=DIR reuses a finished phase-1 run (copied into RUNS_DIR/phase1) instead of training one, for a
# change that only touches phase 2; the report then says so and names the run.
set -euo pipefail
cd "$(dirname "$0")/.."
M1=${1:-10}
M2=${2:-5}
RUNS=${3:-runs/lidc-pers}
DATA=${DATA:-../shared/data/lidc}
PY=${PY:-python3}
rm -rf "$RUNS"
if [ -n "${PHASE1:-}" ]; then
  mkdir -p "$RUNS" && cp -r "$PHASE1" "$RUNS/phase1"
else
  "$PY" -m harmonizer_fast.cli train --data "$DATA" --config small --out "$RUNS/phase1" --phase 1 --epochs 100 \
    --max-minutes "$M1" --no-progress
fi
"$PY" -m harmonizer_fast.cli train --data "$DATA" --config small --out "$RUNS/phase2" --phase 2 --epochs2 150 \
  --init "$RUNS/phase1" --max-minutes "$M2" --no-progress
"$PY" -m harmonizer_fast.cli evaluate --checkpoint "$RUNS/phase2" --data "$DATA" --out "$RUNS/eval" --samples 16 \
  | tail -3
"$PY" benchmarks/lidc_personalization_summary.py "$RUNS" --data "$DATA" --minutes "$M1" "$M2" \
  ${PHASE1:+--reused-phase1 "$PHASE1"}
