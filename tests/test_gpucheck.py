"""The ahead-of-time GPU compile check (harmonizer_fast.gpucheck) and the launch plans it compiles.

The check compiles every Triton plan for sm_80/86/89/90 without a GPU; `make test` runs it before the
suite, so the test here reads its cache (build/gpucheck) and takes seconds. The grid tests plan inputs far
beyond these machines on the meta device: the launchers run up to the launch, which is intercepted.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from harmonizer_fast import gpucheck
from harmonizer_fast.gpu_targets import TARGETS, occupancy

ROOT = Path(__file__).resolve().parent.parent
NO_NVIDIA = gpucheck.no_nvidia_backend()
needs_nvidia = pytest.mark.skipif(bool(NO_NVIDIA), reason=f"gpucheck cannot run: {NO_NVIDIA}")


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("TRITON_INTERPRET")}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpucheck") / "gpu-compile"
    proc = subprocess.run(
        [sys.executable, "-m", "harmonizer_fast.gpucheck", "--out", str(out)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    data = json.loads(Path(f"{out}.json").read_text())
    return proc, data


@needs_nvidia
def test_every_plan_compiles_for_every_target_within_its_limits(report):
    proc, data = report
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = data["records"]
    expected = {(p.key, t) for f in gpucheck.FAMILIES for p in gpucheck.family_plans(f) for t in TARGETS}
    assert {(r["plan"], r["target"]) for r in records} == expected
    for r in records:
        assert "error" not in r, r
        assert r["shared_bytes"] <= TARGETS[r["target"]].shared_per_block, r
        assert r["registers"] > 0, r  # the ptxas log of that compile was read
        assert r["blocks_per_sm"] >= 1, r


@needs_nvidia
def test_no_spills_and_tensor_cores_where_promised(report):
    _, data = report
    binary_ged = 0
    for r in data["records"]:
        rules = gpucheck.compile_rules(r["kernel"], r["plan"])  # each family's COMPILE_RULES
        if "no_spill" in rules:
            assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, r
        if "tensor_cores" in rules:
            assert any(i.startswith(("HMMA", "HGMMA")) for i in r["tensor_core"]), r
        if "ieee_fp32" in rules:
            assert not any("TF32" in i for i in r["tensor_core"]), r
        binary_ged += r["kernel"] == "_overlap_kernel" and "IEEE=False" in r["plan"]
    # the rules reach the kernels they were written for: every plain kernel must not spill, and the binary GED
    # path must run on tensor cores
    assert all("no_spill" in gpucheck.compile_rules(k, "") for k in ("_film_forward_kernel", "_haar_dwt3d_kernel"))
    assert binary_ged and gpucheck.compile_rules("_overlap_kernel", "x[IEEE=False]") >= {"no_spill", "tensor_cores"}


@needs_nvidia
def test_the_report_is_generated_from_its_json(report):
    _, data = report
    from harmonizer_fast import gpucheck_report

    md = gpucheck_report.markdown(data)
    assert md.count("\n| _") >= len(data["records"])
    assert "A projection, not a measurement" in md
    assert {p["shape"] for p in data["projection"]} and all(p["bytes"] > 0 for p in data["projection"])


def _record(**kw):
    base = {"kernel": "_haar_dwt2d_kernel", "plan": "_haar_dwt2d_kernel[fp32|x]", "target": "sm_86",
            "spill_store_bytes": 0, "spill_load_bytes": 0, "shared_bytes": 4096, "shared_limit": 101376,
            "tensor_core": []}  # fmt: skip
    base.update(kw)
    return base


def test_problems_flag_each_failing_condition():
    assert gpucheck.problems(_record()) == []
    assert "does not compile" in gpucheck.problems(_record(error="CompilationError: x"))[0]
    assert "shared memory" in gpucheck.problems(_record(shared_bytes=108544))[0]
    assert "spills" in gpucheck.problems(_record(spill_store_bytes=4))[0]
    ged = dict(kernel="_overlap_kernel", plan="_overlap_kernel[fp16|MODE=2,IEEE=False]")
    assert any("no tensor-core" in p for p in gpucheck.problems(_record(**ged)))
    assert gpucheck.problems(_record(**ged, tensor_core=["HMMA.16816.F32"])) == []
    soft = dict(kernel="_overlap_kernel", plan="_overlap_kernel[fp32|MODE=0,IEEE=True]")
    assert "IEEE fp32" in gpucheck.problems(_record(**soft, tensor_core=["HMMA.1684.F32.TF32"]))[0]
    # a spill in the soft GED path (IEEE fp32 FMAs) is reported in the table, not a failure
    assert gpucheck.problems(_record(**soft, spill_store_bytes=8)) == []


def test_occupancy_follows_the_occupancy_calculator():
    sm86 = TARGETS["sm_86"]
    # 64 registers x 128 threads: 8 KiB per block of 64 K -> 8 blocks; 1536 threads -> 12; blocks <= 16.
    assert occupancy(sm86, 64, 0, 4) == {"blocks_per_sm": 8, "warps_per_sm": 32, "occupancy_pct": 67,
                                         "limited_by": "registers"}  # fmt: skip
    # 20 KiB shared (+1 KiB reserved) of 100 KiB -> 4 blocks.
    assert occupancy(sm86, 32, 20480, 4)["blocks_per_sm"] == 4
    assert occupancy(sm86, 32, 20480, 4)["limited_by"] == "shared"
    assert occupancy(TARGETS["sm_90"], 16, 0, 4)["limited_by"] == "threads"


_BROKEN = """
import os, sys, json
sys.path.insert(0, {root!r})
from harmonizer_fast import gpucheck
gpucheck._worker_init()  # the real JIT and an empty triton cache, as the check's workers have
import triton, triton.language as tl, torch
from harmonizer_fast.kernels._plan import make_plan

@triton.jit
def _tiny_dot(a_ptr, o_ptr, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + r[:, None] * BLOCK + r[None, :])
    tl.store(o_ptr + r[:, None] * BLOCK + r[None, :], tl.dot(a, a))

@triton.jit
def _big_shared(a_ptr, o_ptr, N, BLOCK: tl.constexpr, STEP: tl.constexpr):
    r = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k in range(0, N, STEP):  # pipelined: each stage keeps a (BLOCK x STEP) and a (STEP x BLOCK) tile
        rk = k + tl.arange(0, STEP)
        a = tl.load(a_ptr + r[:, None] * N + rk[None, :])
        b = tl.load(a_ptr + rk[:, None] * N + r[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(o_ptr + r[:, None] * BLOCK + r[None, :], acc.to(tl.float16))

@triton.jit
def _strided_i32(a_ptr, o_ptr, S, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(o_ptr + r, tl.load(a_ptr + r * S))  # row * stride in int32: wraps past 2^31 elements

@triton.jit
def _strided_i64(a_ptr, o_ptr, S, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(o_ptr + r, tl.load(a_ptr + r * S))

out = {{}}
cases = (("dot8", _tiny_dot, dict(BLOCK=8), torch.float32),
         ("shared", _big_shared, dict(BLOCK=256, STEP=128), torch.float16),
         ("i32", _strided_i32, dict(BLOCK=128), torch.float32),
         ("i64", _strided_i64, dict(BLOCK=128), torch.float32))
for name, kern, consts, dt in cases:
    plan = make_plan(kern, dict(a_ptr=dt, o_ptr=dt), consts, num_warps=8)
    rec = gpucheck.compile_one(plan, "sm_86", {cache!r})
    out[name] = dict(problems=gpucheck.problems(rec), tensor_core=rec.get("tensor_core"), error=rec.get("error"))
print(json.dumps(out))
"""


@needs_nvidia
@pytest.mark.slow
def test_the_check_rejects_kernels_the_interpreter_accepts(tmp_path):
    """The proof the check can fail: a 256 x 256 fp16 dot pipelined over 128-wide steps, whose stages need
    128 KiB of shared memory (over sm_86's 99 KiB per block); a strided copy whose row x stride product is
    int32 (it would wrap past 2^31 elements, which no test here can allocate), while the same copy in int64
    passes. A tl.dot on 8 x 8 blocks runs under the interpreter and, in triton 3.9, compiles too (padded onto
    a TF32 MMA).
    """
    import triton
    import triton.language as tl

    @triton.jit
    def tiny_dot(a_ptr, o_ptr, BLOCK: tl.constexpr):
        r = tl.arange(0, BLOCK)
        a = tl.load(a_ptr + r[:, None] * BLOCK + r[None, :])
        tl.store(o_ptr + r[:, None] * BLOCK + r[None, :], tl.dot(a, a))

    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter runs the 8 x 8 dot without complaint
        a = torch.rand(8, 8)
        o = torch.empty(8, 8)
        tiny_dot[(1,)](a, o, BLOCK=8)
        torch.testing.assert_close(o, a @ a)
    script = tmp_path / "broken.py"
    script.write_text(textwrap.dedent(_BROKEN.format(root=str(ROOT), cache=str(tmp_path / "cache"))))
    proc = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    # triton 3.9 compiles an 8 x 8 tl.dot (padded onto a TF32 MMA), so only the shared case must fail
    assert found["dot8"]["error"] is None and found["dot8"]["tensor_core"], found
    assert any("shared memory" in p for p in found["shared"]["problems"]), found
    assert any("int32 products of a runtime size or stride" in p for p in found["i32"]["problems"]), found
    assert found["i64"]["problems"] == [] and found["i64"]["error"] is None, found


def test_every_cuda_kernel_has_a_launch_configuration():
    """The CUDA C++ rows' occupancy needs each kernel's block size and dynamic shared memory, which the cubin
    does not record: every __global__ kernel of csrc/cuda is in gpucheck_report.CUDA_LAUNCH, and a demangled
    name resolves to its entry (doubles double the attention pool's shared memory)."""
    import re
    from pathlib import Path

    from harmonizer_fast import gpucheck_report as rep

    sources = Path(__file__).resolve().parents[1].glob("csrc/cuda/*.cu")
    kernels = {k for f in sources for k in re.findall(r"__global__ void (\w+)", f.read_text())}
    assert kernels and kernels == set(rep.CUDA_LAUNCH), kernels ^ set(rep.CUDA_LAUNCH)
    assert rep.cuda_launch("void forward_kernel<float>(float const*, float const*)") == (256, (8 * 32 + 24) * 4)
    assert rep.cuda_launch("void forward_kernel<double>(double const*, double const*)") == (256, (8 * 32 + 24) * 8)
    assert rep.cuda_launch("distance_sum_kernel(unsigned int const*, float const*)") == (256, 0)
    assert rep.cuda_launch("_Z13mangled_kernelPf") is None


def test_the_compile_report_only_renders():
    """[op-registry] #37 item 2: gpucheck passes its findings to gpucheck_report as data; the report imports
    nothing from gpucheck (the one import cycle of the tree, and its only arrow back up)."""
    import ast

    from harmonizer_fast import gpucheck_report as rep

    tree = ast.parse(Path(rep.__file__).read_text())
    froms = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported = {n.module or "" for n in froms} | {a.name for n in froms for a in n.names}  # from . import x
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not [m for m in imported if m.split(".")[-1] == "gpucheck"], imported
