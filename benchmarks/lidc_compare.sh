#!/usr/bin/env bash
# The committed comparisons on the real LIDC slices (../shared/data/lidc, raters in their stored area order).
#
#   bash benchmarks/lidc_compare.sh train    # the trainings of the equal-epochs comparison, one per command
#   bash benchmarks/lidc_compare.sh epochs   # [science] #35 item 6: `compare` over folds 0-2 at equal epochs
#   bash benchmarks/lidc_compare.sh budget   # the earlier comparison at an equal CPU budget, with the ablations
#   bash benchmarks/lidc_compare.sh split1   # a second draw: full model and Prob. U-Net, seed 1, its own split
#   bash benchmarks/lidc_compare.sh seeds    # Table 1's central ordering over training seeds 0, 1, 2 (FOLDS="0 1 2")
#
# epochs: the all-raters protocol (--min-raters 4), the small config, seed 0, folds 0, 1 and 2 of 4; every
# phase-1 training and the per-rater baseline 30 epochs, every phase-2 training 20 (D-Persona's heads at their
# own learning rate, 3e-3, chosen on fold 0's validation patients over 1e-2); K = 16. Variants: the full model,
# its identity heads (no-personalizer), the Prob. U-Net, D-Persona's heads on it, the per-rater baseline, and the
# no-GED-loss (the harmonizer kept), no-harmonizer (the GED loss kept) and unshared-harmonizer (one harmonizer
# per decoder layer) ablations; with --robustness every Table 1 row is scored again on the test images with
# noise, blur and a gamma curve (the harmonizer's purpose). The trainings of `train`
# (about 9 hours of one core, run two or three at a time; OMP_NUM_THREADS=1 each) are the runs of README "A
# convergence run on the all-raters protocol" and the ablations; `epochs` takes them in with --reuse, which checks each
# is the training `compare` would run (data, split, model config, recipe, phase-1 weights) and trains nothing
# else; without them `compare` trains every unit itself (drop the --reuse list). Writes
# benchmarks/results/lidc-compare-epochs-small-cpu.{json,md} and its GED-against-K figure; about 30 minutes.
#
# budget: the full model, the Prob. U-Net, D-Persona's heads and the no-personalizer, no-harmonizer and
# no-GED-loss ablations; folds 0 and 1, 6 minutes of compute for every phase-1 training and 4.5 for every
# phase-2 training; about 90 minutes on 2 cores. Writes benchmarks/results/lidc-compare-small-cpu.{json,md}.
#
# split1: a second draw of Table 1's central ordering. `train --seed 1` draws both the patient partition and the
# training noise from seed 1 (compare keeps split seed 0 for every seed, so these runs are not compare's units:
# its --reuse refuses them), so its folds 0 and 2 are other held-out patients. The full model (30 + 20 epochs)
# and the Prob. U-Net (30) on each, four trainings beside each other (about 60 minutes on 2 cores), scored by
# lidc_paired.py over each fold's patients and pooled. Writes benchmarks/results/lidc-paired-split1-*.{json,md}.
#
# seeds: Table 1's central ordering (the full model, 30 + 20 epochs, against the Prob. U-Net, 30; VARIANTS="full
# probunet no-ged-loss no-harmonizer" adds the two ablations, 30 epochs of phase 1 each) trained with
# seeds 0, 1 and 2 on split seed 0, so each fold's held-out patients are the same for every seed and every draw
# of the training is paired with the others (`train --split-seed 0`; seed 0 is the `train` mode's conv-a and
# conv-pu). The trainings run JOBS at a time (default 2, one core each; about 15-20 minutes of one core per
# phase-1 training, 60 for the full model's two phases), then `compare --folds $FOLDS --seeds 0,1,2` reuses
# them. Each unit's scores go to benchmarks/results/lidc-compare-seeds/ (--scores, committed): on another
# machine the mode trains only what has no score there. Writes benchmarks/results/lidc-compare-seeds-small-cpu.{json,md}, and the same comparison
# without seed 0 (lidc-compare-seeds12-small-cpu.{json,md}: how much of the result that one draw carries).
#
# Each mode is resumable: run it again to continue a killed one.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/lidc}
PY=${PY:-.venv/bin/python}
suffix() { [ "$1" = 0 ] && echo "" || echo "-f$1"; }
finished() { grep -q '"stopped": *"completed"' "$1/last.json" 2>/dev/null; }  # a training that ran all its epochs
resume() { [ -d "$1" ] && echo --resume; }  # a killed training continues from its last epoch
recipe() {  # the seeds mode's training of each variant (the full model's both phases, the others' phase 1)
  case $1 in
    full) echo --epochs 30 --epochs2 20 ;;
    probunet) echo --phase 1 --epochs 30 --no-harmonizer --no-personalizer --no-ged-loss ;;
    no-ged-loss) echo --phase 1 --epochs 30 --no-ged-loss ;;
    no-harmonizer) echo --phase 1 --epochs 30 --no-harmonizer ;;
    *) echo "seeds: no recipe for variant $1" >&2; exit 2 ;;
  esac
}
case "${1:-epochs}" in
  train)
    for F in 0 1 2; do
      S=$(suffix $F)
      OMP_NUM_THREADS=1 $PY -m harmonizer_fast.cli train --data "$DATA" --config small --out runs/conv-a$S \
        --min-raters 4 --epochs 30 --epochs2 20 --fold $F --no-progress
      OMP_NUM_THREADS=1 $PY -m harmonizer_fast.cli train --data "$DATA" --config small --out runs/conv-pu$S \
        --min-raters 4 --phase 1 --epochs 30 --fold $F --no-harmonizer --no-personalizer --no-ged-loss --no-progress
      OMP_NUM_THREADS=1 $PY -m harmonizer_fast.cli train --data "$DATA" --config small --out runs/dp-f$F-lr3e-3 \
        --min-raters 4 --phase 2 --epochs2 20 --lr2 3e-3 --fold $F --init runs/conv-pu$S --no-harmonizer \
        --no-ged-loss --personalizer dpersona --no-progress
      OMP_NUM_THREADS=1 $PY -m harmonizer_fast.per_rater --data "$DATA" --config small --out runs/pr-f$F \
        --fold $F --min-raters 4 --epochs 30
      OMP_NUM_THREADS=1 $PY -m harmonizer_fast.cli train --data "$DATA" --config small --out runs/ngl-f$F \
        --min-raters 4 --phase 1 --epochs 30 --fold $F --no-ged-loss --no-progress
      OMP_NUM_THREADS=1 $PY -m harmonizer_fast.cli train --data "$DATA" --config small --out runs/nh-f$F \
        --min-raters 4 --phase 1 --epochs 30 --fold $F --no-harmonizer --no-progress
      OMP_NUM_THREADS=1 $PY -m harmonizer_fast.cli train --data "$DATA" --config small --out runs/uh-f$F \
        --min-raters 4 --phase 1 --epochs 30 --fold $F --no-harmonizer-sharing --no-progress
    done ;;
  epochs)
    REUSE=()
    for F in 0 1 2; do
      S=$(suffix $F)
      REUSE+=("p1-full-f$F-s0=runs/conv-a$S" "p2-full-f$F-s0=runs/conv-a$S" "p1-probunet-f$F-s0=runs/conv-pu$S"
              "p2-dpersona-f$F-s0=runs/dp-f$F-lr3e-3" "per-rater-f$F-s0=runs/pr-f$F"
              "p1-no-ged-loss-f$F-s0=runs/ngl-f$F" "p1-no-harmonizer-f$F-s0=runs/nh-f$F"
              "p1-unshared-harmonizer-f$F-s0=runs/uh-f$F")
    done
    OMP_NUM_THREADS=1 $PY -m harmonizer_fast.cli compare --data "$DATA" --out runs/cmp-lidc \
      --variants full,no-personalizer,probunet,dpersona,per-rater,no-ged-loss,no-harmonizer,unshared-harmonizer \
      --folds 0,1,2 --min-raters 4 --epochs1 30 --epochs2 20 --samples 16 --robustness --report-dir benchmarks/results \
      --stem lidc-compare-epochs-small-cpu --reuse "${REUSE[@]}" ;;
  split1)
    for F in 0 2; do
      S=$(suffix $F)
      finished runs/conv-a$S-s1 || OMP_NUM_THREADS=1 $PY -m harmonizer_fast.cli train --data "$DATA" --config small \
        --out runs/conv-a$S-s1 $(resume runs/conv-a$S-s1) --min-raters 4 --epochs 30 --epochs2 20 --fold $F --seed 1 \
        --no-progress &
      finished runs/conv-pu$S-s1 || OMP_NUM_THREADS=1 $PY -m harmonizer_fast.cli train --data "$DATA" --config small \
        --out runs/conv-pu$S-s1 $(resume runs/conv-pu$S-s1) --min-raters 4 --phase 1 --epochs 30 --fold $F --seed 1 \
        --no-harmonizer --no-personalizer --no-ged-loss --no-progress &
    done
    wait
    for F in 0 2; do
      S=$(suffix $F)
      OMP_NUM_THREADS=1 $PY benchmarks/lidc_paired.py --data "$DATA" --runs full=runs/conv-a$S-s1 \
        probunet=runs/conv-pu$S-s1 --out benchmarks/results/lidc-paired-split1-f$F-small-cpu
    done
    $PY benchmarks/lidc_paired.py --pool benchmarks/results/lidc-paired-split1-f{0,2}-small-cpu.json \
      --out benchmarks/results/lidc-paired-split1-pooled-small-cpu ;;
  seeds)
    SCORES=benchmarks/results/lidc-compare-seeds
    FOLDS=${FOLDS:-0 1 2}
    VARIANTS=${VARIANTS:-full probunet}
    JOBS=${JOBS:-2}
    for V in $VARIANTS; do recipe $V > /dev/null; done  # an unknown variant stops here, before any training
    for F in $FOLDS; do
      for S in 0 1 2; do
        for V in $VARIANTS; do
          R=runs/$V-f$F-s$S
          [ -f $SCORES/$V-f$F-s$S.json ] || finished $R && continue
          # at most JOBS trainings at once: more than one per core only makes each slower and the peak memory larger
          while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
          OMP_NUM_THREADS=1 $PY -m harmonizer_fast.cli train --data "$DATA" --config small --out $R $(resume $R) \
            --min-raters 4 $(recipe $V) --fold $F --seed $S --split-seed 0 --no-progress &
        done
      done
    done
    wait
    # the same without seed 0 (whose fold-1 Prob. U-Net has an image-independent prior), then all three seeds
    for SEEDS in 1,2 0,1,2; do
      REUSE=()  # this comparison's finished trainings on this machine (compare refuses a unit of another seed)
      for F in $FOLDS; do
        for S in ${SEEDS//,/ }; do
          for V in $VARIANTS; do
            finished runs/$V-f$F-s$S || continue
            for P in p1 $([ $V = full ] && echo p2); do REUSE+=("$P-$V-f$F-s$S=runs/$V-f$F-s$S"); done
          done
        done
      done
      STEM=lidc-compare-seeds-small-cpu; [ $SEEDS = 0,1,2 ] || STEM=lidc-compare-seeds${SEEDS//,/}-small-cpu
      OMP_NUM_THREADS=1 $PY -m harmonizer_fast.cli compare --data "$DATA" --out runs/cmp-seeds --scores $SCORES \
        --variants "$(echo $VARIANTS | tr ' ' ,)" --folds "$(echo $FOLDS | tr ' ' ,)" --seeds $SEEDS --min-raters 4 \
        --epochs1 30 --epochs2 20 --samples 16 --report-dir benchmarks/results --stem $STEM \
        ${REUSE:+--reuse "${REUSE[@]}"}
    done ;;
  budget)
    $PY -m harmonizer_fast.cli compare --data "$DATA" --out runs/lidc-compare --folds 0,1 --seeds 0 --minutes1 6 \
      --minutes2 4.5 --variants full,probunet,dpersona,no-personalizer,no-harmonizer,no-ged-loss --samples 16 \
      --report-dir benchmarks/results --stem lidc-compare-small-cpu ;;
  *) echo "usage: bash benchmarks/lidc_compare.sh train|epochs|split1|seeds|budget" >&2; exit 2 ;;
esac
