"""The compile check's report: kernel x plan x target tables, the CUDA C++ kernels' resources, and each
benchmark shape's chosen plan, bytes and FLOPs projected onto every target's datasheet peaks.

Written by ``python -m harmonizer_fast.gpucheck --out benchmarks/results/gpu-compile`` (JSON, then the
markdown generated from it); never edit the results by hand.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from .gpu_targets import TARGETS, nvidia_tool, occupancy

# How each CUDA C++ kernel is launched (csrc/cuda/*.cu), which the cubin does not record: the most threads per
# block its launcher uses (threads_for_row grows to 256 with the row; kThreads, kPackWarps * 32 and
# kGedTile x kGedTile are 256) and the dynamic shared memory per block, as a function of the accumulator's size
# in bytes (attention pooling: M queries x 32-position tiles, with the paper config's M = 8).
# tests/test_gpucheck.py checks that every __global__ kernel of csrc/cuda has an entry.
_PAPER_TOKENS = 8
CUDA_LAUNCH: dict[str, tuple[int, Any]] = {
    "haar_dwt2d_kernel": (256, 0), "haar_idwt2d_kernel": (256, 0),
    "haar_dwt3d_kernel": (256, 0), "haar_idwt3d_kernel": (256, 0),
    "film_forward_kernel": (256, 0), "film_backward_kernel": (256, 0),
    "forward_kernel": (256, lambda acc: (_PAPER_TOKENS * 32 + 3 * _PAPER_TOKENS) * acc),
    "backward_kernel": (256, lambda acc: 2 * _PAPER_TOKENS * 32 * acc),
    "pack_kernel": (256, 0), "overlap_binary_kernel": (256, 0), "overlap_soft_kernel": (256, 0),
    "distance_sum_kernel": (256, 0), "row_sum_kernel": (256, 0), "sum_partials_kernel": (32, 0),
}  # fmt: skip


def cuda_launch(function: str) -> tuple[int, int] | None:
    """(threads per block, dynamic shared bytes) of a demangled kernel name such as
    ``void forward_kernel<double>(...)`` (the accumulator is double for double kernels, float otherwise), or
    None for a name it does not know (a mangled one, without c++filt)."""
    name = re.search(r"(\w+)(?:<[^>]*>)?\(", function)
    if name is None or name.group(1) not in CUDA_LAUNCH:
        return None
    threads, shared = CUDA_LAUNCH[name.group(1)]
    acc = 8 if "<double>" in function else 4
    return threads, shared(acc) if callable(shared) else shared


def summary(records: list[dict]) -> str:
    """One line per kernel: worst registers, spills and shared memory over its plans and targets."""
    by_kernel: dict[str, list[dict]] = {}
    for r in records:
        by_kernel.setdefault(r["kernel"], []).append(r)
    head = f"{'kernel':24} {'plans':>5} {'fail':>4} {'max regs':>8} {'max spill B':>11} {'max shared B':>12}"
    lines = [head + "  tensor cores"]
    for kernel, rs in by_kernel.items():
        ok = [r for r in rs if "error" not in r]
        tc = sorted({i.split(".")[0] for r in ok for i in r["tensor_core"]}) or ["-"]
        lines.append(
            f"{kernel:24} {len({r['plan'] for r in rs}):5} {len(rs) - len(ok):4} "
            f"{max((r['registers'] for r in ok), default=0):8} "
            f"{max((r['spill_store_bytes'] for r in ok), default=0):11} "
            f"{max((r['shared_bytes'] for r in ok), default=0):12}  {','.join(tc)}"
        )
    return "\n".join(lines)


def cuda_objects(directory: str) -> list[dict]:
    """Per-kernel resources of the nvcc objects csrc/compile_check.sh built (empty when absent)."""
    rows = []
    for obj in sorted(Path(directory).glob("*.o")):
        usage = subprocess.run(
            [nvidia_tool("cuobjdump"), "--dump-resource-usage", str(obj)], capture_output=True, text=True
        ).stdout
        if shutil.which("c++filt"):  # demangle the kernel names
            usage = subprocess.run(["c++filt"], input=usage, capture_output=True, text=True).stdout
        sass = subprocess.run([nvidia_tool("cuobjdump"), "-sass", str(obj)], capture_output=True, text=True).stdout
        arch = ""
        for line in usage.splitlines():
            m = re.search(r"arch = (sm_\d+)", line)
            if m:
                arch = m.group(1)
            m = re.search(r"Function (.+):$", line.strip())
            if m:
                fn = re.sub(r"harmonizer_fast::\(anonymous namespace\)::", "", m.group(1))
            m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
            if m and arch:
                row = {"source": obj.stem, "function": fn, "target": arch, "registers": int(m.group(1)),
                       "stack_bytes": int(m.group(2)), "static_shared_bytes": int(m.group(3)),
                       "local_bytes": int(m.group(4))}  # fmt: skip
                launch = cuda_launch(fn)
                if launch is not None and arch in TARGETS:
                    row["threads"], row["dynamic_shared_bytes"] = launch
                    shared = row["static_shared_bytes"] + launch[1]
                    row.update(occupancy(TARGETS[arch], row["registers"], shared, launch[0] // 32))
                rows.append(row)
        tc = sorted(set(re.findall(r"\b((?:HMMA|HGMMA|IMMA|DMMA)\S*)", sass)))
        for r in rows:
            if r["source"] == obj.stem:
                r["tensor_core"] = tc
    return rows


def _projection_shapes() -> list[dict[str, Any]]:
    """Every op at the benchmarks' shapes (each family's ``examples("bench")``, paper config at 128 x 128), the
    plans it launches (its kernels' ``plans_for``) and its work counted by the profiler's formulas on CPU
    tensors. An op whose plans must use tensor cores (``COMPILE_RULES``) is projected at the fp16 tensor peak."""
    import importlib

    import torch

    from . import ops, profiler
    from .kernels._plan import rules_for

    out = []
    for family in ops.families():
        kernels = importlib.import_module(f"harmonizer_fast.kernels.{family}")
        examples = importlib.import_module(f"harmonizer_fast.ops.{family}").examples("bench", torch.float32)
        for name, args in examples.items():
            plans = kernels.plans_for(name, *args)
            work = profiler.count_work(lambda: getattr(torch.ops.harmonizer_fast, name)(*args))  # noqa: B023
            flops = sum(w.flops for w in work.values())
            moved = sum(w.bytes for w in work.values())
            tensor = any("tensor_cores" in rules_for(kernels.COMPILE_RULES, p.name, p.key) for p in plans)
            proj = {}
            for t in TARGETS.values():
                peak = t.fp16_tensor_flops if tensor else t.fp32_flops
                proj[t.name] = max(flops / peak, moved / t.dram_bytes_per_s)
            shapes = ", ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))
            out.append({"shape": f"{name} {shapes} fp32", "plans": [p.key for p in plans], "flops": flops,
                        "bytes": moved, "projected_s": proj})  # fmt: skip
    return out


def write(out: str, records: list[dict], problems: list[str], cuda: list[dict], targets, dtypes,
          seconds: float) -> None:  # fmt: skip
    """The report's JSON and markdown; ``problems`` are gpucheck's findings, passed in (this module only
    renders: it imports nothing from gpucheck)."""
    import triton

    data = {
        "triton": triton.__version__,
        "host": platform.processor() or platform.machine(),
        "targets": {t: vars(TARGETS[t]) for t in targets},
        "dtypes": list(dtypes),
        "seconds": round(seconds, 1),
        "records": records,
        "problems": list(problems),
        "cuda_cpp": cuda,
        "projection": _projection_shapes(),
        "note": "compiled ahead of time, no GPU; projected times are from datasheet peaks, not measurements",
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(data, indent=1))
    Path(f"{out}.md").write_text(markdown(data))


def markdown(data: dict) -> str:
    """The report's markdown, generated from its JSON."""
    targets = list(data["targets"])
    cached = sum(1 for r in data["records"] if r.get("cached"))
    compile_s = sum(r.get("compile_s", 0) for r in data["records"])
    lines = [
        "# GPU compile check (ahead of time, no GPU)",
        "",
        f"Generated by `python -m harmonizer_fast.gpucheck --out benchmarks/results/gpu-compile` (triton "
        f"{data['triton']}, {len(data['records'])} compiles, {cached} of them from the build/gpucheck cache, "
        f"{data['seconds']} s; uncached, the compile times in the JSON sum to {compile_s:.0f} CPU-s). "
        f"Every plan the launchers can "
        f"choose, compiled with `triton.compile` for explicit targets; registers and spills from that "
        f"compile's `ptxas -v`, tensor-core instructions from `cuobjdump -sass`. dtypes: {', '.join(data['dtypes'])}.",
        "",
        "Targets: "
        + "; ".join(
            f"{t} ({v['card']}, {v['shared_per_block']} B shared per block)" for t, v in data["targets"].items()
        ),  # fmt: skip
        "",
        f"Problems: {len(data['problems'])}" + "".join(f"\n- {p}" for p in data["problems"]),
        "",
        "## Triton plans",
        "",
        "| kernel | plan | target | regs | spill B (st/ld) | shared B | occupancy (warps/SM, bound) | tensor cores |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["records"]:
        plan = r["plan"][len(r["kernel"]) :]
        if "error" in r:
            lines.append(f"| {r['kernel']} | `{plan}` | {r['target']} | compile failed: {r['error']} | | | | |")
            continue
        tc = ", ".join(r["tensor_core"]) or ("none" if r.get("sass_inspected") else "no tl.dot")
        lines.append(
            f"| {r['kernel']} | `{plan}` | {r['target']} | {r['registers']} | {r['spill_store_bytes']}/"
            f"{r['spill_load_bytes']} | {r['shared_bytes']} | {r['warps_per_sm']} ({r['occupancy_pct']}%, "
            f"{r['limited_by']}) | {tc} |"
        )
    lines += ["", "## CUDA C++ kernels (csrc/cuda, nvcc objects of csrc/compile_check.sh)", ""]
    if data["cuda_cpp"]:
        lines += ["Occupancy at the most threads per block the kernel's launcher uses and its dynamic shared memory "
                  "(`gpucheck_report.CUDA_LAUNCH`; attention pooling at the paper config's 8 queries).", ""]
        lines += ["| source | kernel | target | regs | local B | shared B (static + dynamic) | threads | warps/SM "
                  "(occupancy, limit) | tensor cores |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in data["cuda_cpp"]:
            occ = f"{r['warps_per_sm']} ({r['occupancy_pct']}%, {r['limited_by']})" if "warps_per_sm" in r else "-"
            lines.append(
                f"| {r['source']} | `{r['function'][:60]}` | {r['target']} | {r['registers']} | {r['local_bytes']} | "
                f"{r['static_shared_bytes']} + {r.get('dynamic_shared_bytes', 0)} | {r.get('threads', '-')} | {occ} | "
                f"{', '.join(r.get('tensor_core', [])) or '-'} |"
            )
    else:
        lines.append("Not available: run `bash csrc/compile_check.sh` first (needs nvcc).")
    lines += [
        "",
        "## Benchmark shapes: chosen plan, work, projected time",
        "",
        "Bytes and FLOPs from the profiler's formulas (compulsory traffic); projected time = max(FLOPs / peak, "
        "bytes / DRAM bandwidth) at each target's datasheet peaks. **A projection, not a measurement.**",
        "",
        "| shape | plans | FLOPs | bytes | " + " | ".join(f"{t} projected" for t in targets) + " |",
        "|---|---|---|---|" + "---|" * len(targets),
    ]
    for p in data["projection"]:
        times = " | ".join(f"{p['projected_s'][t] * 1e6:.1f} us" for t in targets)
        plans = "<br>".join(f"`{k}`" for k in p["plans"])
        lines.append(f"| {p['shape']} | {plans} | {p['flops']:.3g} | {p['bytes']:.3g} | {times} |")
    return "\n".join(lines) + "\n"
