#!/bin/bash
# Table 2 of [science] #35 over folds 0-2 of the all-raters protocol (--min-raters 4), as committed in
# benchmarks/results/lidc-table2-*-small-cpu.{json,md}. Needs the convergence runs of README "A convergence
# run on the all-raters protocol": runs/conv-a{,-f1,-f2} (full model, 30 + 20 epochs) and runs/conv-pu{,-f1,-f2}
# (Prob. U-Net, phase 1, 30 epochs, --no-personalizer). One core per training (OMP_NUM_THREADS=1).
#
#   bash benchmarks/lidc_table2.sh train    # D-Persona's heads (lr 3e-3) and the per-rater baseline per fold
#   bash benchmarks/lidc_table2.sh score    # Table 2 per fold, then pooled over the folds' patients
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data/lidc}
LR=${LR:-3e-3}  # chosen on fold 0's validation patients over 1e-2 (README, Table 2)
suffix() { [ "$1" = 0 ] && echo "" || echo "-f$1"; }
case "${1:-score}" in
  train)
    for F in 0 1 2; do
      OMP_NUM_THREADS=1 $PY -m harmonizer_fast.cli train --data "$DATA" --config small --out runs/dp-f$F-lr$LR \
        --min-raters 4 --phase 2 --epochs2 20 --lr2 $LR --fold $F --init runs/conv-pu$(suffix $F) \
        --no-harmonizer --no-ged-loss --personalizer dpersona --no-progress
      OMP_NUM_THREADS=1 $PY -m harmonizer_fast.per_rater --data "$DATA" --config small --out runs/pr-f$F \
        --fold $F --min-raters 4 --epochs 30
    done ;;
  score)
    for F in 0 1 2; do
      $PY benchmarks/lidc_paired.py --data "$DATA" --table 2 --runs full=runs/conv-a$(suffix $F)@personalized \
        identity=runs/conv-a$(suffix $F)@identity dpersona=runs/dp-f$F-lr$LR@personalized per-rater=runs/pr-f$F \
        --out benchmarks/results/lidc-table2-f$F-small-cpu > /dev/null
    done
    $PY benchmarks/lidc_paired.py --pool benchmarks/results/lidc-table2-f0-small-cpu \
      benchmarks/results/lidc-table2-f1-small-cpu benchmarks/results/lidc-table2-f2-small-cpu \
      --out benchmarks/results/lidc-table2-pooled-small-cpu ;;
  *) echo "usage: bash benchmarks/lidc_table2.sh train|score" >&2; exit 2 ;;
esac
