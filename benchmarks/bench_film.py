"""Noise Harmonizer ops benchmark (FiLM and token-attention pooling): ours against eager composites.

FiLM (paper Eq. 3) forward, backward and forward+backward against the eager composite
``x * gamma[..., None, None] + beta[..., None, None]`` with autograd, ``torch.compile`` of our reference
and the floor, a same-size copy. Every number is a median over interleaved rounds in one process.

    python benchmarks/bench_film.py [--quick] [--device cpu|cuda] [--out DIR] [--allocator fresh|reuse|system]

Writes ``film-<device>[-quick].json`` and ``.md`` into benchmarks/results/ and prints the table.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_main, check_targets, forced_backend, interleaved_medians, make_rows  # noqa: E402

import harmonizer_fast as hf  # noqa: E402
from harmonizer_fast import _backend  # noqa: E402
from harmonizer_fast.ops.film import IMPLS, SUPPORT, film_reference  # noqa: E402

FILM_SHAPES = [(16, 64, 128, 128), (1, 16, 128, 128)]
OPS = ("forward", "backward", "forward+backward")
OURS = "harmonizer_fast"
FLOOR = "copy floor (clone)"


def eager_film(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    return x * gamma[..., None, None] + beta[..., None, None]


def film_variants(device: torch.device) -> tuple[str, dict[str, tuple[Callable, Optional[str]]]]:
    """(name of our automatic variant, {name: (function, forced backend)})."""
    probe = torch.zeros(1, 1, 1, 1, device=device)
    auto = _backend.selected_backend("film", probe, IMPLS["film"], SUPPORT)
    ours = f"{OURS} (auto: {auto})"
    out: dict[str, tuple[Callable, Optional[str]]] = {ours: (hf.film, None)}
    for backend in ("triton", "cuda", "cpu"):
        runnable = not _backend._cannot_run("film", backend, probe, SUPPORT)
        if backend != auto and runnable and not (backend == "triton" and device.type == "cpu"):
            out[f"{OURS} [{backend}]"] = (hf.film, backend)
    out["eager composite"] = (eager_film, None)
    out["torch.compile(reference)"] = (torch.compile(film_reference, fullgraph=True, dynamic=False), None)
    return ours, out


def film_cases(fn: Callable, backend: Optional[str], x, gamma, beta, dy) -> dict[str, Callable[[], Any]]:
    with forced_backend(backend):
        xr, gr, br = (t.detach().requires_grad_() for t in (x, gamma, beta))
        y = fn(xr, gr, br)
        cases = {
            "forward": lambda: fn(x, gamma, beta),
            "backward": lambda: torch.autograd.grad(y, (xr, gr, br), dy, retain_graph=True),
            "forward+backward": lambda: torch.autograd.grad(fn(xr, gr, br), (xr, gr, br), dy),
        }
        cases["forward+backward"]()  # compiles the backward of torch.compile variants
    return cases


def measure_film(shape: tuple[int, ...], device: torch.device, quick: bool) -> list[dict[str, Any]]:
    b, c = shape[:2]
    x, dy = torch.randn(shape, device=device), torch.randn(shape, device=device)
    gamma, beta = torch.randn(b, c, device=device), torch.randn(b, c, device=device)
    big = x.numel() >= 2**22
    ours, variants = film_variants(device)
    cases: dict[tuple[str, str], Callable[[], Any]] = {
        (FLOOR, "copy"): lambda: x.clone(),
        (FLOOR, "copy x2"): lambda: (x.clone(), x.clone()),
    }
    for name, (fn, backend) in variants.items():
        print(f"  film {shape} {name}: first calls", file=sys.stderr, flush=True)
        cases.update({(name, op): f for op, f in film_cases(fn, backend, x, gamma, beta, dy).items()})
    t = interleaved_medians(
        cases,
        device,
        warmup=1 if quick else 2,
        rounds=(5 if quick else 15) if big else (10 if quick else 30),
        inner=lambda key: 1 if big else 10,
        around=lambda key: forced_backend(variants.get(key[0], (None, None))[1]),
    )
    copy, copy2 = t.pop((FLOOR, "copy")), t.pop((FLOOR, "copy x2"))
    # floors: forward reads x and writes y (one copy); backward reads dy, x and writes dx (about 1.5 copies,
    # bounded below by one copy); forward+backward about two copies.
    t.update({(FLOOR, "forward"): copy, (FLOOR, "backward"): copy, (FLOOR, "forward+backward"): copy2})
    nbytes = x.numel() * x.element_size()
    traffic = {"forward": 2 * nbytes, "backward": 3 * nbytes, "forward+backward": 5 * nbytes}
    return make_rows(("film", *shape), t, ours, FLOOR, lambda op: traffic[op])


def run(device: torch.device, quick: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    rows = [r for shape in FILM_SHAPES for r in measure_film(shape, device, quick)]
    return {"rows": rows, "targets": targets(rows, device)}


def targets(rows: list[dict], device: torch.device) -> list[dict]:
    def ms(shape: tuple, op: str, prefix: str) -> float:
        return next(r["median_ms"] for r in rows if tuple(r["shape"]) == shape and r["op"] == op
                    and r["variant"].startswith(prefix))  # fmt: skip

    film_big = ("film", *FILM_SHAPES[0])
    ours = f"{OURS} (auto"
    fb = ms(film_big, "forward+backward", "eager composite") / ms(film_big, "forward+backward", ours)
    checks = [("film forward+backward >= 1.5x faster than eager (16, 64, 128, 128)", fb, 1.5, True)]
    if device.type == "cuda":
        bw = ms(film_big, "forward", FLOOR) / ms(film_big, "forward", ours)
        checks.append(("film forward >= 80% of copy bandwidth", bw, 0.8, True))
    return check_targets(checks)


def main(argv: Optional[list[str]] = None) -> int:
    return bench_main("film", "Noise Harmonizer ops benchmark", __doc__.splitlines()[0], OPS, run, argv)


if __name__ == "__main__":
    sys.exit(main())
