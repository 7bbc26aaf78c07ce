#!/usr/bin/env bash
# Compile-only check of the CUDA side on a machine without a GPU (CI runs it through `make test`):
#  1. every csrc/cuda/*.cu with nvcc for sm_80, sm_86, sm_89 and sm_90 (these files include no torch headers);
#  2. csrc/*.cpp (ops.cpp and the torch-side <op>_op.cpp files) with -DWITH_CUDA, syntax only, so the
#     torch-side CUDA wrappers are checked too. A CPU torch wheel lacks one CMake-generated c10 header;
#     a stub with its single define stands in for it.
# Usage: csrc/compile_check.sh [python]   (skips with a message when nvcc is not installed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ]; then
  echo "compile_check: nvcc not found, skipping the CUDA compile check"
  exit 0
fi
ARCHS=${CUDA_ARCHS:-"80 86 89 90"}
out=build/compile_check
mkdir -p "$out/stub/c10/cuda/impl"
gencode=""
for a in $ARCHS; do gencode="$gencode -gencode arch=compute_$a,code=sm_$a"; done
for f in csrc/cuda/*.cu; do
  echo "compile_check: nvcc $f (sm: $ARCHS)"
  "$NVCC" -std=c++17 -O3 -Icsrc/include $gencode -Xcompiler -Wall -Werror all-warnings -c "$f" \
    -o "$out/$(basename "$f" .cu).o"
done

cuda_include="$(dirname "$(dirname "$(readlink -f "$NVCC")")")/include"
[ -f "$cuda_include/cuda_runtime.h" ] || cuda_include=/usr/local/cuda/include
echo '#define C10_CUDA_BUILD_SHARED_LIBS' >"$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
read -r std torch_includes < <("$PY" - <<'PYEOF'
import torch
from torch.utils.cpp_extension import include_paths
major, minor = (int(v) for v in torch.__version__.split(".")[:2])
std = "c++20" if (major, minor) >= (2, 10) else "c++17"
print(std, " ".join("-I" + p for p in include_paths()))
PYEOF
)
py_include=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
echo "compile_check: g++ -fsyntax-only -DWITH_CUDA csrc/*.cpp ($std)"
# shellcheck disable=SC2086
g++ -std="$std" -fsyntax-only -DWITH_CUDA -Icsrc/include $torch_includes -I"$out/stub" -I"$cuda_include" \
  -I"$py_include" csrc/*.cpp
echo "compile_check: ok"
