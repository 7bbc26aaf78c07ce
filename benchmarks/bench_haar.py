"""Haar DWT/IDWT benchmark: harmonizer_fast's backends against the peers, in one process.

Ops: forward (DWT), backward (gradient of the DWT), forward+backward, inverse (IDWT). Peers
(docs/architecture.md, "Performance method"): pytorch_wavelets, ptwt, PyWavelets (numpy, CPU), the eager
slicing formulation (our torch reference called directly), ``torch.compile`` of that reference, and the
floor: a same-size copy (``clone``). Every number is a median after warm-up; ratios compare variants measured
in this run.

``--3d`` benchmarks the volumetric pair (``haar_dwt3d`` / ``haar_idwt3d``) instead, against ptwt's
``wavedec3`` / ``waverec3`` and PyWavelets' ``dwtn`` / ``idwtn`` (pytorch_wavelets has no 3-D transform),
with the same targets as 2-D: forward at least 3x and inverse at least 5x the nearest peer, forward at most
1.5x a clone on CPU.

    python benchmarks/bench_haar.py [--3d] [--quick] [--device cpu|cuda] [--out DIR]

Writes ``haar[3d]-<device>[-quick].json`` and ``.md`` into benchmarks/results/ and prints the table.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_main, check_targets, forced_backend, interleaved_medians, make_rows, timed_backends

import harmonizer_fast as hf
from harmonizer_fast.ops import haar3d
from harmonizer_fast.ops.haar import IMPLS, SUPPORT, haar_dwt2d_reference, haar_idwt2d_reference

SHAPES = [(16, 64, 128, 128), (1, 16, 128, 128)]
SHAPES_3D = [(2, 8, 64, 128, 128), (1, 4, 32, 64, 64)]  # the first as many elements as SHAPES[0]
OPS = ("forward", "backward", "forward+backward", "inverse")
PEERS = ("pytorch_wavelets",)  # what the 2-D ratio targets compare against
PEERS_3D = ("ptwt", "PyWavelets (numpy)")  # the nearest (fastest) of these, per op
OURS = "harmonizer_fast"
FLOOR = "copy floor (clone)"


@dataclass
class Variant:
    name: str
    fwd: Callable[[Any], Any]  # x -> coefficients (tensor or nested tuple/list)
    inv: Callable[[Any], Any]  # coefficients from fwd -> x
    autograd: bool = True
    backend: Optional[str] = None  # forced through HARMONIZER_FAST_BACKEND while timed
    numpy: bool = False  # takes numpy arrays


def _ours(op: str, impls: Any, support: Any, fwd: Callable, inv: Callable, device: torch.device) -> list[Variant]:
    """Our op under the automatic backend choice, then each other backend worth timing here."""
    auto, others = timed_backends(op, impls, support, device)
    out = [Variant(f"{OURS} (auto: {auto})", fwd, inv)]
    return out + [Variant(f"{OURS} [{b}]", fwd, inv, backend=b) for b in others]


def _peers(device: torch.device, dims: int, ref_fwd: Callable, ref_inv: Callable) -> list[Variant]:
    """The peers both families share: ptwt (when installed), PyWavelets (CPU), our eager reference and
    torch.compile of it; ``dims`` 2 or 3 picks each library's transform of that rank."""
    out = []
    try:
        import ptwt

        dec, rec = (ptwt.wavedec2, ptwt.waverec2) if dims == 2 else (ptwt.wavedec3, ptwt.waverec3)
        out.append(Variant("ptwt", lambda x: dec(x, "haar", mode="zero", level=1), lambda c: rec(c, "haar")))
    except ImportError as exc:
        print(f"skipping ptwt: {exc}", file=sys.stderr)
    if device.type == "cpu":
        import pywt

        fwd, inv = (pywt.dwt2, pywt.idwt2) if dims == 2 else (pywt.dwtn, pywt.idwtn)
        axes = {} if dims == 2 else {"axes": (-3, -2, -1)}
        out.append(
            Variant(
                "PyWavelets (numpy)",
                lambda x: fwd(x, "haar", mode="zero", **axes),
                lambda c: inv(c, "haar", mode="zero", **axes),
                autograd=False,
                numpy=True,
            )
        )
    out.append(Variant("eager slicing (torch reference)", ref_fwd, ref_inv))
    out.append(
        Variant(
            "torch.compile(reference)",
            torch.compile(ref_fwd, fullgraph=True, dynamic=False),
            torch.compile(ref_inv, fullgraph=True, dynamic=False),
        )
    )
    return out


def variants(device: torch.device) -> list[Variant]:
    out = _ours("haar_dwt2d", IMPLS["haar_dwt2d"], SUPPORT, hf.haar_dwt2d, hf.haar_idwt2d, device)
    out.append(Variant(f"{OURS} DWTForward/DWTInverse", hf.DWTForward().to(device), hf.DWTInverse().to(device)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pytorch_wavelets as ptw
        fwd = ptw.DWTForward(J=1, wave="haar", mode="zero").to(device)
        out.append(Variant("pytorch_wavelets", fwd, ptw.DWTInverse(wave="haar", mode="zero").to(device)))
    except ImportError as exc:
        print(f"skipping pytorch_wavelets: {exc}", file=sys.stderr)
    return out + _peers(device, 2, haar_dwt2d_reference, haar_idwt2d_reference)


def variants_3d(device: torch.device) -> list[Variant]:
    impls = haar3d.IMPLS["haar_dwt3d"]
    out = _ours("haar_dwt3d", impls, haar3d.SUPPORT, hf.haar_dwt3d, hf.haar_idwt3d, device)
    return out + _peers(device, 3, haar3d.haar_dwt3d_reference, haar3d.haar_idwt3d_reference)


def variant_cases(v: Variant, x: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """One closure per op for a variant; the untimed first calls (compilation, inputs) happen here."""
    with forced_backend(v.backend):
        if v.numpy:
            xn = x.cpu().numpy()
            coeffs = v.fwd(xn)
            return {"forward": lambda: v.fwd(xn), "inverse": lambda: v.inv(coeffs)}
        coeffs = v.fwd(x)
        cases = {"forward": lambda: v.fwd(x), "inverse": lambda: v.inv(coeffs)}
        if v.autograd:
            xr = x.detach().requires_grad_()
            outs = tree_leaves(v.fwd(xr))
            grads = [torch.randn_like(o) for o in outs]
            cases["backward"] = lambda: torch.autograd.grad(outs, xr, grads, retain_graph=True)
            cases["forward+backward"] = lambda: torch.autograd.grad(tree_leaves(v.fwd(xr)), xr, grads)
            cases["forward+backward"]()  # compiles the backward graph of torch.compile variants
    return cases


def bytes_moved(shape: tuple[int, ...], op: str, itemsize: int = 4) -> int:
    """Signal plus sub-bands, read or written once each (2-D or 3-D: the trailing dims after (N, C))."""
    n, c, *dims = shape
    x = n * c * itemsize * math.prod(dims)
    y = n * c * itemsize * 2 ** len(dims) * math.prod((d + 1) // 2 for d in dims)
    return {"forward": x + y, "backward": x + y, "forward+backward": 2 * (x + y), "inverse": x + y}[op]


def measure_shape(
    shape: tuple[int, ...], device: torch.device, quick: bool, make_variants: Callable[[torch.device], list[Variant]]
) -> list[dict[str, Any]]:
    x = torch.randn(shape, device=device)
    big = x.numel() >= 2**22
    backends = {}
    cases: dict[tuple[str, str], Callable[[], Any]] = {
        (FLOOR, "copy"): lambda: x.clone(),
        (FLOOR, "copy x2"): lambda: (x.clone(), x.clone()),
    }
    for v in make_variants(device):
        print(f"  {shape} {v.name}: first calls", file=sys.stderr, flush=True)
        backends[v.name] = v.backend
        cases.update({(v.name, op): fn for op, fn in variant_cases(v, x).items()})
    rounds = (5 if quick else 15) if big else (10 if quick else 30)
    print(f"  {shape}: {rounds} interleaved rounds of {len(cases)} cases", file=sys.stderr, flush=True)
    t = interleaved_medians(
        cases,
        device,
        warmup=1 if quick else 2,
        rounds=rounds,
        inner=lambda key: 1 if big else 10,  # small shapes: 10 back-to-back calls per timing
        around=lambda key: forced_backend(backends.get(key[0])),
    )
    floor = {"copy": t.pop((FLOOR, "copy")), "copy x2": t.pop((FLOOR, "copy x2"))}
    for op in OPS:
        t[(FLOOR, op)] = floor["copy x2" if op == "forward+backward" else "copy"]
    ours = next(name for name, _ in t if name.startswith(f"{OURS} (auto"))
    ordered = dict(sorted(t.items(), key=lambda kv: name_order(kv[0], list(backends))))
    return make_rows(shape, ordered, ours, FLOOR, lambda op: bytes_moved(shape, op))


def run(device: torch.device, quick: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    rows = [row for shape in SHAPES for row in measure_shape(shape, device, quick, variants)]
    return {"rows": rows, "targets": targets(rows, device, SHAPES[0], PEERS)}


def run_3d(device: torch.device, quick: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    rows = [row for shape in SHAPES_3D for row in measure_shape(shape, device, quick, variants_3d)]
    return {"rows": rows, "targets": targets(rows, device, SHAPES_3D[0], PEERS_3D)}


def name_order(key: tuple[str, str], names: list[str]) -> tuple[int, int]:
    name, op = key
    return (-1 if name == FLOOR else names.index(name), OPS.index(op))


def _median(rows: list[dict], shape: tuple[int, ...], op: str, prefix: str) -> Optional[float]:
    for r in rows:
        if r["shape"] == list(shape) and r["op"] == op and r["variant"].startswith(prefix):
            return r["median_ms"]
    return None


def targets(rows: list[dict], device: torch.device, shape: tuple[int, ...], peers: Sequence[str]) -> list[dict]:
    """The must-reach figures at the first (large) fp32 shape, with pass/fail: forward and inverse against the
    nearest (fastest) of ``peers`` in this run, and the copy floor."""

    def ms(op: str, prefix: str) -> Optional[float]:
        return _median(rows, shape, op, prefix)

    ours = f"{OURS} (auto"
    checks = []  # (target, measured, bound, higher is better)
    for op, need in (("forward", 3.0), ("inverse", 5.0)):
        timed = {p: ms(op, p) for p in peers if ms(op, p)}
        if timed:
            nearest = min(timed, key=timed.get)
            checks.append((f"{op} >= {need:g}x faster than the nearest peer ({nearest})", timed[nearest] / ms(op, ours),
                           need, True))  # fmt: skip
    if device.type == "cpu":
        checks.append(("forward <= 1.5x the time of clone", ms("forward", ours) / ms("forward", FLOOR), 1.5, False))
    else:
        for op in ("forward", "inverse"):
            checks.append((f"{op} >= 80% of copy bandwidth", ms(op, FLOOR) / ms(op, ours), 0.8, True))
    return check_targets(checks)


def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    flags = {"--3d": "the volumetric transform (haar_dwt3d / haar_idwt3d) against ptwt and pywt's 3-D transforms"}
    if "--3d" in args:
        return bench_main("haar3d", "3-D Haar DWT/IDWT benchmark", __doc__.splitlines()[0], OPS, run_3d, args,
                          flags=flags)  # fmt: skip
    return bench_main("haar", "Haar DWT/IDWT benchmark", __doc__.splitlines()[0], OPS, run, args, flags=flags)


if __name__ == "__main__":
    sys.exit(main())
