"""On a lent GPU: launch every op's Triton path at the benchmark shapes, then record the registers, spills
and shared memory of each kernel that actually ran, next to the ahead-of-time figures of
benchmarks/results/gpu-compile.json (python -m harmonizer_fast.gpucheck), so the two can be compared.

    python benchmarks/gpu_plan_resources.py --out OUT/gpu-plans.json     (gpu_check.sh runs it)

Fails (exit 1) when any Triton plan fell back: a fallback on a GPU is a bug, not a slowdown to accept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch


def _exercise(dtype: torch.dtype) -> None:
    """Every op of every family on its benchmark-scale example inputs (ops/_examples.py), on the GPU."""
    from harmonizer_fast import ops

    for name, args in ops.examples("bench", dtype, "cuda").items():
        getattr(torch.ops.harmonizer_fast, name)(*args)
    torch.cuda.synchronize()


def _compiled(kernel) -> list[dict]:
    rows = []
    for cache in getattr(kernel, "device_caches", {}).values():
        table = cache[0] if isinstance(cache, tuple) else cache
        for compiled in getattr(table, "values", lambda: [])():
            try:
                compiled._init_handles()
            except Exception:  # already initialised, or an API change: report what is there
                pass
            rows.append({"kernel": kernel.fn.__name__, "registers": getattr(compiled, "n_regs", None),
                         "spills": getattr(compiled, "n_spills", None),
                         "shared_bytes": int(getattr(compiled.metadata, "shared", -1)),
                         "num_warps": getattr(compiled.metadata, "num_warps", None)})  # fmt: skip
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_plan_resources: no CUDA device; nothing to record")
        return 0
    os.environ["HARMONIZER_FAST_BACKEND"] = "triton"  # every call on the Triton path, or an error
    import importlib

    from harmonizer_fast import _backend, ops

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        _exercise(dtype)
    rows = []
    for mod in (importlib.import_module(f"harmonizer_fast.kernels.{f}") for f in ops.families()):
        for name in dir(mod):
            obj = getattr(mod, name)
            if hasattr(obj, "device_caches") and name.endswith("_kernel"):
                rows += _compiled(obj)
    out = {"device": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
           "kernels": rows, "triton_failures": _backend.triton_failures()}  # fmt: skip
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"gpu_plan_resources: {len(rows)} compiled kernels recorded in {args.out}")
    if out["triton_failures"]:
        print(f"gpu_plan_resources: FAIL: Triton plans fell back: {out['triton_failures']}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
