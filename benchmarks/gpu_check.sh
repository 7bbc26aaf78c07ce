#!/usr/bin/env bash
# One-call GPU validation for a lent GPU machine (issue gpu-check; the device tool's README has the rules).
#
# Here, once per session (the GPU machine has no network, and lacks PyWavelets, pytorch_wavelets, ptwt):
#     bash benchmarks/gpu_check.sh fetch-wheels        # -> .whl/ (git-ignored), about 5 MiB
# Then through the device tool, from the repository root:
#     bash benchmarks/gpu_check.sh fetch-data          # -> .gpu_data/lidc-80.npz (git-ignored), about 15 MiB
#     run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".gpu_data"], timeout_s=480)
# Rehearsal on a machine without a GPU (every step that does not need one, CPU-sized):
#     REHEARSE=1 OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh
#
# Steps: machine facts; install the carried wheels; build harmonizer_fast._C with its CUDA kernels
# (editable install); the backend report; the GPU tests (every op's Triton and CUDA backends against the
# references in fp32/fp16/bf16, forward and backward), then the whole suite; the card's copy and bf16
# matmul ceilings; the profiler on the GPU; the benchmark report (harmonizer-fast bench); a short bf16 LIDC
# training run. Every step runs even if an earlier one failed; the summary at the end lists each step's exit
# status. Files written to $OUT (at most 8 come back): log.txt, tests.txt, gpu-plans.json, ceilings.json,
# profile.json, bench.tgz (the report, its charts, each benchmark's JSON and markdown) and train_log.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "fetch-data" ]; then
  # A patient subset of ../shared/data/lidc as a compressed npz (../shared does not travel; 64 MiB limit).
  mkdir -p .gpu_data
  grep -qxF '/.gpu_data/' .git/info/exclude 2>/dev/null || echo '/.gpu_data/' >>.git/info/exclude
  "${PY:-python3}" - <<'PYEOF'
import numpy as np
from harmonizer_fast.data import load_dataset
d = load_dataset("../shared/data/lidc")
keep = np.isin(d.patient_id, d.patients()[:80])
np.savez_compressed(".gpu_data/lidc-80.npz", images=(d.images[keep] * 255).round().astype(np.uint8),
                    masks=d.masks[keep], patient_id=d.patient_id[keep])
print("wrote .gpu_data/lidc-80.npz:", int(keep.sum()), "slices")
PYEOF
  ls -l .gpu_data
  exit 0
fi

if [ "${1:-}" = "fetch-wheels" ]; then
  mkdir -p .whl
  grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
  plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat \
    -d .whl "PyWavelets==1.8.0" "pytorch_wavelets==1.3.0" "ptwt==1.0.1" "setuptools==80.9.0"
  ls -l .whl
  exit 0
fi

OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
declare -a SUMMARY=()
step() {  # step NAME COMMAND...: run, log, remember the exit status
  local name=$1
  shift
  echo
  echo "=== $name: $* ($(date -u +%H:%M:%S))"
  local t0=$SECONDS
  "$@"
  local rc=$?
  SUMMARY+=("$name: rc=$rc, $((SECONDS - t0)) s")
  return 0
}

machine() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true
  command -v nvcc && nvcc --version | tail -1
  "$PY" -c 'import sys, torch, triton; print(sys.version.split()[0], "torch", torch.__version__, "cuda",
torch.version.cuda, "triton", triton.__version__, "gpu", torch.cuda.is_available())'
}

wheels() {
  if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    echo "the carried wheels are for the GPU machine's Python 3.12; not installing them into $("$PY" -V)"
  elif compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "no .whl/ carried: PyWavelets and the peers are missing, so their tests skip or fail"
  fi
}

build() {
  # Builds csrc/ with the CUDA kernels for the visible GPU when torch has CUDA (setup.py decides).
  MAX_JOBS=${MAX_JOBS:-16} "$PY" -m pip install -q --no-build-isolation --no-deps -e . &&
    "$PY" -m harmonizer_fast
}

gpu_tests() {
  "$PY" -m pytest -q -m gpu -rs tests/ 2>&1 | tee "$OUT/tests.txt"
  "$PY" -m pytest -q -x tests/ 2>&1 | tail -5 | tee -a "$OUT/tests.txt"
}

plan_resources() {
  # Registers, spills and shared memory of the kernels that really ran (beside the ahead-of-time
  # figures of benchmarks/results/gpu-compile.json); fails when any Triton plan fell back.
  "$PY" benchmarks/gpu_plan_resources.py --out "$OUT/gpu-plans.json"
}

ceilings() {
  "$PY" - "$OUT/ceilings.json" <<'PYEOF'
import json, sys, torch
if not torch.cuda.is_available():
    print("no GPU: ceilings skipped"); json.dump({"gpu": None}, open(sys.argv[1], "w")); sys.exit(0)
def time_ms(fn, reps=20):
    for _ in range(3): fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps): fn()
    e.record(); e.synchronize()
    return s.elapsed_time(e) / reps
x = torch.empty(2**28, dtype=torch.float32, device="cuda")  # 1 GiB
y = torch.empty_like(x)
copy_ms = time_ms(lambda: y.copy_(x))
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
mm_ms = time_ms(lambda: a @ a, reps=10)
out = {"gpu": torch.cuda.get_device_name(), "copy_gb_per_s_read_plus_write": 2 * x.numel() * 4 / copy_ms / 1e6,
       "bf16_matmul_tflop_per_s": 2 * 8192**3 / mm_ms / 1e9}
print(out); json.dump(out, open(sys.argv[1], "w"), indent=2)
PYEOF
}

profile() {
  local device=cuda
  [ -n "${REHEARSE:-}" ] && device=cpu
  "$PY" -m harmonizer_fast.cli profile --config paper --device $device --json "$OUT/profile.json"
}

benchmarks() {
  # The one-report command (harmonizer-fast bench): every op benchmark, the end-to-end sampling grid and
  # the profiler, with charts; the files travel back as one archive ($OUT returns at most 8 files). The
  # numpy GED peer takes about 1 s per image at K = 50: it is timed on one image per case.
  local args=(--numpy-images 1) dir="$OUT/bench"
  [ -n "${REHEARSE:-}" ] && args=(--quick --device cpu --numpy-images 1)
  "$PY" benchmarks/report.py "${args[@]}" --out "$dir" | sed -n '1,45p'  # reads all: no SIGPIPE
  local rc=${PIPESTATUS[0]}
  tar -C "$OUT" -czf "$OUT/bench.tgz" bench && rm -rf "$dir"
  return "$rc"
}

train() {
  # The paper config on the carried LIDC subset with bf16 autocast, for a short fixed budget; the run
  # directory stays on the machine (checkpoints exceed the 16 MiB per-file limit), its log comes back.
  local data=.gpu_data/lidc-80.npz args=(--config paper --max-minutes 1.5 --batch-size 16)
  [ -f "$data" ] || { echo "no $data carried (bash benchmarks/gpu_check.sh fetch-data)"; return 1; }
  rm -rf /tmp/gpu_run
  [ -n "${REHEARSE:-}" ] && args=(--config small --max-minutes 0.3 --batch-size 8)
  "$PY" -m harmonizer_fast.cli train --data "$data" --out /tmp/gpu_run --phase 1 --epochs 100 --no-progress \
    "${args[@]}"
  local rc=$?
  cp /tmp/gpu_run/log.jsonl "$OUT/train_log.jsonl" 2>/dev/null
  return $rc
}

step machine machine
step wheels wheels
step build build
if [ -z "${REHEARSE:-}" ] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "no CUDA device visible: stopping after the build (use REHEARSE=1 to exercise the rest on CPU)"
else
  step gpu_tests gpu_tests
  step plan_resources plan_resources
  step ceilings ceilings
  step profile profile
  step benchmarks benchmarks
  step train train
fi
echo
echo "=== summary"
printf '%s\n' "${SUMMARY[@]}"
ls -l "$OUT"
