"""Ahead-of-time compile check of every Triton launch plan for real NVIDIA GPUs, on a machine without one.

    python -m harmonizer_fast.gpucheck [--out benchmarks/results/gpu-compile] [--targets sm_80,sm_86,...]

The Triton interpreter (how CI runs the kernels on CPU tensors) accepts programs a GPU compiler rejects or
runs badly: tl.dot shape and dtype rules, shared memory over a block's limit, register spills, fp32 dots
that never reach tensor cores. This module compiles every plan the launchers can choose (each kernel
module's ``gpu_plans()``, built by the same ``plan_*`` functions the launchers call) with ``triton.compile``
for an explicit ``GPUTarget`` and reads, per plan and target: registers per thread and spill bytes (the
``ptxas -v`` log of that very compile), shared memory against the target's per-block limit, the occupancy
those allow, and the tensor-core instructions in the SASS (``cuobjdump -sass`` of the cubin).

Failing conditions (exit status 1, and tests/test_gpucheck.py): a plan that does not compile; shared
memory over the limit; any spill in the Haar (2-D and 3-D), FiLM, fcomb, attention-pool or binary GED
kernels; the binary GED kernel without tensor-core instructions; the soft GED path using TF32 (it must stay
IEEE fp32); an int32 multiplication of an index or size by a runtime integer argument (a stride, a size) or
by the grid's x index in the kernel's TTIR (:func:`int32_size_products`): an offset that overflows at 2^31
elements, which no test on this machine's memory could reach.

Results are cached under ``build/gpucheck`` keyed by the kernel's source hash, the plan, the target and
the triton version, so an unchanged kernel is not compiled twice. The check skips (exit 0, with the reason)
when the installed triton has no NVIDIA backend.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import functools
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .gpu_targets import TARGETS, nvidia_tool, occupancy

CHECK_VERSION = 3  # bump when the recorded columns change


def _kernel_families() -> tuple[str, ...]:
    """Every public module of ``harmonizer_fast.kernels`` is a kernel family with ``gpu_plans``: discovered
    from the package's files (without importing triton), so a new op's kernels are checked with no list to
    edit (tests/test_op_registry.py)."""
    import importlib.util
    import pkgutil

    spec = importlib.util.find_spec("harmonizer_fast.kernels")
    paths = list(spec.submodule_search_locations or []) if spec is not None else []
    return tuple(sorted(m.name for m in pkgutil.iter_modules(paths) if not m.name.startswith("_")))


FAMILIES = _kernel_families()


@functools.cache
def _rules() -> dict:
    """Every family's ``COMPILE_RULES`` (kernel name -> rule), stated beside its kernels (kernels/_plan.py)."""
    table: dict = {}
    for family in FAMILIES:
        table.update(importlib.import_module(f"harmonizer_fast.kernels.{family}").COMPILE_RULES)
    return table


def compile_rules(kernel: str, plan: str) -> frozenset:
    """What the compile check requires of one compiled plan: a set of ``no_spill``, ``tensor_cores`` and
    ``ieee_fp32`` (kernels/_plan.py); empty for a kernel its family states no rule for."""
    from .kernels._plan import rules_for

    return rules_for(_rules(), kernel, plan)


DEFAULT_DTYPES = ("fp32", "fp16", "bf16")
_TENSOR_CORE = re.compile(r"\b((?:HMMA|HGMMA|IMMA|IGMMA|DMMA|WGMMA)\S*)")


_TTIR_OP = re.compile(r"^\s*(%[\w.#]+)(?::\d+)?\s*=\s*([\w.]+)\s*(.*)$")
# Ops whose result carries an operand's magnitude: a value built from a runtime size stays "runtime-sized".
_TTIR_CARRY = ("tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "arith.addi", "arith.subi",
               "arith.muli", "arith.divsi", "arith.remsi", "arith.maxsi", "arith.minsi", "arith.select")  # fmt: skip


def int32_size_products(ttir: str, bounded: tuple[str, ...] = ()) -> list[str]:
    """The int32 products in a kernel's TTIR that involve a runtime integer argument (strides and sizes arrive
    as i32 when they fit) or the grid's x index (up to 2^31 - 1), by the names Triton keeps from the source:
    ``row * stride`` in int32 wraps once a plane or a view spans 2^31 elements. Products in int64 (an operand
    cast with ``.to(tl.int64)`` first) and products of constexprs and bounded grid indices (y, z <= 65,535)
    pass, and so do the ``bounded`` arguments (LaunchPlan.bounded: the launcher keeps their products below
    2^31 by a routing rule). A dataflow over the TTIR text: values derived from such a source through the
    carrying ops stay tainted."""
    sig = re.search(r"tt\.func public @\w+\((.*?)\)\s*attributes", ttir, re.S)
    tainted = set(re.findall(r"(%\w+): i32", sig.group(1))) if sig else set()
    tainted -= {f"%{name}" for name in bounded}
    found = []
    for line in ttir.splitlines():
        m = _TTIR_OP.match(line)
        if not m:
            continue
        result, op, rest = m.groups()
        body = rest.split(" loc(")[0]
        operands = re.findall(r"%[\w.#]+", body.split(":")[0])
        if op == "tt.get_program_id" and body.strip().startswith("x"):
            tainted.add(result)
        elif op in _TTIR_CARRY and any(o in tainted for o in operands):
            tainted.add(result)
            result_type = body.rsplit(":", 1)[-1].strip()
            if op == "arith.muli" and (result_type == "i32" or result_type.endswith("xi32>")):
                found.append(f"{re.sub(r'_[0-9]+$', '', result.lstrip('%'))} = {' * '.join(operands)}")
    return found


def _dtypes(names: tuple[str, ...]) -> tuple[Any, ...]:
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
    return tuple(table[n] for n in names)


def family_plans(family: str, dtype_names: tuple[str, ...] = DEFAULT_DTYPES) -> list[Any]:
    """The launch plans of one kernel family, in a fixed order (the launchers' own ``gpu_plans``)."""
    import importlib

    mod = importlib.import_module(f"harmonizer_fast.kernels.{family}")
    dtypes = _dtypes(dtype_names)
    if family == "ged":  # binary masks are always read as float16 0/1 values; soft masks in their dtype
        import torch

        return mod.gpu_plans(tuple(d for d in dtypes if d != torch.float64))
    return mod.gpu_plans(dtypes)


def no_nvidia_backend() -> str:
    """Why the installed triton cannot compile for NVIDIA targets, or "" when it can."""
    try:
        from triton.backends import backends
    except Exception as exc:  # no triton, or a broken install
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    if "nvidia" not in backends:
        return "the installed triton has no NVIDIA backend"
    return ""


def _worker_init() -> None:
    # The interpreter swaps @triton.jit for an interpreted function that cannot be compiled; workers are
    # fresh processes, so dropping the variable before triton is imported gives them the real JIT.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated explicitly
    # A private, empty triton cache: a cache hit skips ptxas, and its -v log is where spills are read.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="hf-gpucheck-")


def _parse_ptxas(log: str) -> dict[str, int]:
    def grab(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return {
        "registers": grab(r"Used (\d+) registers"),
        "spill_store_bytes": grab(r"(\d+) bytes spill stores"),
        "spill_load_bytes": grab(r"(\d+) bytes spill loads"),
        "stack_bytes": grab(r"(\d+) bytes stack frame"),
    }


def compile_plan(family: str, index: int, target_name: str, dtype_names: tuple[str, ...], cache_dir: str) -> dict:
    """Compile plan ``index`` of ``family`` for one target (a pool worker's job)."""
    return compile_one(family_plans(family, dtype_names)[index], target_name, cache_dir, family)


def compile_one(plan: Any, target_name: str, cache_dir: str, family: str = "") -> dict:
    """Compile one plan for one target and return its resource record (cached by source hash).

    Needs the real Triton JIT: call it in a process where TRITON_INTERPRET is not set (the pool's workers).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = TARGETS[target_name]
    sig = plan.signature()
    # torch allocations are 256-byte aligned, so the launcher sees 16-divisible pointers (Triton
    # specializes on that); integer arguments are compiled unspecialized.
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(plan.kernel.arg_names) if sig[a].startswith("*")}
    src = ASTSource(plan.kernel, sig, constexprs=dict(plan.constexprs), attrs=attrs)
    options = {"num_warps": plan.num_warps, "num_stages": plan.num_stages}
    key = hashlib.sha256(
        json.dumps([CHECK_VERSION, src.hash(), target_name, options, triton.__version__, list(plan.bounded)]).encode()
    ).hexdigest()
    cached = Path(cache_dir) / f"{key}.json"
    if cached.exists():
        return {**json.loads(cached.read_text()), "cached": True}
    record: dict[str, Any] = {"family": family, "kernel": plan.name, "plan": plan.key, "target": target_name,
                              "num_warps": plan.num_warps, "num_stages": plan.num_stages}  # fmt: skip
    t0 = time.perf_counter()
    log = io.StringIO()
    triton.knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", target.arch, 32), options=options)
    except Exception as exc:
        record.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        record["compile_s"] = round(time.perf_counter() - t0, 2)
        return record  # failures are not cached: they are rerun until fixed
    record.update(_parse_ptxas(log.getvalue()))
    if "Used" not in log.getvalue():
        record["error"] = "no ptxas -v log captured (was the compile served from a triton cache?)"
        return record
    record["shared_bytes"] = int(compiled.metadata.shared)
    record["int32_size_products"] = int32_size_products(compiled.asm["ttir"], plan.bounded)
    record["shared_limit"] = target.shared_per_block
    # Disassembling costs more than compiling a small kernel (0.4 s), so only kernels with a tl.dot, the
    # only source of tensor-core instructions, are disassembled.
    record["sass_inspected"] = "tt.dot" in compiled.asm["ttir"]
    record["tensor_core"] = []
    if record["sass_inspected"]:
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "k.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            dump = [nvidia_tool("cuobjdump"), "-sass", str(cubin)]
            sass = subprocess.run(dump, capture_output=True, text=True).stdout
        record["tensor_core"] = sorted(set(_TENSOR_CORE.findall(sass)))
    record.update(occupancy(target, record["registers"], record["shared_bytes"], plan.num_warps))
    record["compile_s"] = round(time.perf_counter() - t0, 2)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = cached.with_suffix(f".tmp{os.getpid()}")
    tmp_path.write_text(json.dumps(record))
    os.replace(tmp_path, cached)  # atomic: a killed check never leaves a half-written entry
    return record


def problems(record: dict) -> list[str]:
    """What is wrong with one plan on one target (empty when nothing is)."""
    where = f"{record['plan']} on {record['target']}"
    if "error" in record:
        return [f"{where}: does not compile ({record['error']})"]
    out = []
    if record["shared_bytes"] > record["shared_limit"]:
        out.append(f"{where}: {record['shared_bytes']} B of shared memory, the limit is {record['shared_limit']} B")
    spills = record["spill_store_bytes"] + record["spill_load_bytes"]
    rules = compile_rules(record["kernel"], record["plan"])
    if spills and "no_spill" in rules:
        out.append(f"{where}: spills {record['spill_store_bytes']} B stored / {record['spill_load_bytes']} B loaded")
    if "tensor_cores" in rules and not record["tensor_core"]:
        out.append(f"{where}: {record['kernel']} has no tensor-core instruction")
    if record.get("int32_size_products"):
        out.append(f"{where}: int32 products of a runtime size or stride, which overflow at 2^31 elements: "
                   f"{'; '.join(record['int32_size_products'])} (cast one side with .to(tl.int64))")  # fmt: skip
    tf32 = [i for i in record["tensor_core"] if "TF32" in i] if "ieee_fp32" in rules else []
    if tf32:
        out.append(f"{where}: must stay IEEE fp32, found {', '.join(tf32)}")
    return out


def run_check(
    targets: tuple[str, ...] = tuple(TARGETS),
    dtype_names: tuple[str, ...] = DEFAULT_DTYPES,
    families: tuple[str, ...] = FAMILIES,
    jobs: int = 0,
    cache_dir: str = "build/gpucheck",
    progress: bool = True,
) -> list[dict]:
    """Compile every plan of ``families`` for every target; one record per (plan, target)."""
    work = [(f, i, t) for f in families for i in range(len(family_plans(f, dtype_names))) for t in targets]
    jobs = jobs or os.cpu_count() or 1
    records = []
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init) as pool:
        futures = [pool.submit(compile_plan, f, i, t, dtype_names, cache_dir) for f, i, t in work]
        for n, fut in enumerate(cf.as_completed(futures), 1):
            records.append(fut.result())
            if progress and (n % 25 == 0 or n == len(futures)):
                print(f"gpucheck: {n}/{len(futures)} compiled", file=sys.stderr, flush=True)
    order = {(f, i, t): n for n, (f, i, t) in enumerate(work)}
    plan_index = {}
    for f in families:
        for i, p in enumerate(family_plans(f, dtype_names)):
            plan_index[(f, p.key)] = i
    records.sort(key=lambda r: order[(r["family"], plan_index[(r["family"], r["plan"])], r["target"])])
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harmonizer_fast.gpucheck", description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, e.g. sm_80,sm_86,sm_89,sm_90")
    ap.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES), help="fp32,fp16,bf16 (and fp64 if wanted)")
    ap.add_argument("--jobs", type=int, default=0, help="parallel compiles (default: CPU count)")
    ap.add_argument("--cache", default="build/gpucheck", help="cache directory (default: build/gpucheck)")
    ap.add_argument("--out", default="", help="write OUT.json and OUT.md (the report)")
    ap.add_argument("--cuda-objects", default="build/compile_check", help="nvcc objects of csrc/compile_check.sh")
    args = ap.parse_args(argv)
    why = no_nvidia_backend()
    if why:
        print(f"gpucheck: skipped: {why}")
        return 0
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    for t in targets:
        if t not in TARGETS:
            print(f"gpucheck: --targets: unknown target {t!r}; expected some of {', '.join(TARGETS)}")
            return 2
    for d in dtypes:
        if d not in ("fp32", "fp16", "bf16", "fp64"):
            print(f"gpucheck: --dtypes: unknown dtype {d!r}; expected fp32, fp16, bf16 or fp64")
            return 2
    t0 = time.perf_counter()
    records = run_check(targets, dtypes, jobs=args.jobs, cache_dir=args.cache)
    found = [p for r in records for p in problems(r)]
    from . import gpucheck_report

    print(gpucheck_report.summary(records))
    if args.out:
        cuda = gpucheck_report.cuda_objects(args.cuda_objects)
        gpucheck_report.write(args.out, records, found, cuda, targets, dtypes, time.perf_counter() - t0)
        print(f"gpucheck: wrote {args.out}.json and {args.out}.md")
    for p in found:
        print(f"gpucheck: FAIL {p}")
    print(f"gpucheck: {len(records)} compiles, {len(found)} problems, {time.perf_counter() - t0:.0f} s")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
