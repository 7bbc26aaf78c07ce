"""Noise Harmonizer ops benchmark (FiLM and token-attention pooling): ours against eager composites.

FiLM (paper Eq. 3) forward, backward and forward+backward against the eager composite
``x * gamma[..., None, None] + beta[..., None, None]`` with autograd, ``torch.compile`` of our reference
and the floor, a same-size copy. Token-attention pooling (paper Eq. 2) forward and forward+backward
against the eager composite (project K and V, softmax, weighted sum), ``torch.compile`` of it, and the
same algebraic rewrite ours uses (scores = (Q W_k) x, out = (softmax x^T) W_v^T) in plain torch, which
shows how much comes from the algebra and how much from the kernel. Every number is a median over
interleaved rounds in one process.

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
from common import bench_main, check_targets, forced_backend, interleaved_medians, make_rows, timed_backends

import harmonizer_fast as hf
from harmonizer_fast.ops.attention_pool import IMPLS as POOL_IMPLS
from harmonizer_fast.ops.attention_pool import token_attention_pool_reference
from harmonizer_fast.ops.film import IMPLS as FILM_IMPLS
from harmonizer_fast.ops.film import SUPPORT, film_reference

FILM_SHAPES = [(16, 64, 128, 128), (1, 16, 128, 128)]
POOL_SHAPES = [(16, 64, 128, 128, 8, 32), (4, 256, 32, 32, 8, 32)]  # (B, C, H, W, M, Dh)
OPS = ("forward", "backward", "forward+backward")
OURS = "harmonizer_fast"
FLOOR = "copy floor (clone)"


def eager_film(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    return x * gamma[..., None, None] + beta[..., None, None]


def our_variants(op: str, impls: dict, fn: Callable, device: torch.device) -> tuple[str, dict]:
    """(name of our automatic variant, {name: (function, forced backend)}) for each backend that runs here."""
    auto, others = timed_backends(op, impls, SUPPORT, device)
    ours = f"{OURS} (auto: {auto})"
    return ours, {ours: (fn, None), **{f"{OURS} [{b}]": (fn, b) for b in others}}


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
    ours, variants = our_variants("film", FILM_IMPLS["film"], hf.film, device)
    variants["eager composite"] = (eager_film, None)
    variants["torch.compile(reference)"] = (torch.compile(film_reference, fullgraph=True, dynamic=False), None)
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


def rewritten_pool(x, queries, w_k, w_v):
    """Our algebra in plain torch: no K or V, but the M x HW scores are materialized."""
    a = queries @ w_k / w_k.shape[0] ** 0.5
    xf = x.flatten(2)
    return torch.softmax(a @ xf, dim=-1) @ xf.transpose(1, 2) @ w_v.t()


def measure_pool(shape: tuple[int, ...], device: torch.device, quick: bool) -> list[dict[str, Any]]:
    b, c, h, w, m, dh = shape
    x = torch.randn(b, c, h, w, device=device)
    q, w_k, w_v = (torch.randn(*s, device=device) / c**0.5 for s in ((m, dh), (dh, c), (dh, c)))
    ours, variants = our_variants("attention_pool", POOL_IMPLS["attention_pool"], hf.token_attention_pool, device)
    variants["eager composite"] = (token_attention_pool_reference, None)
    variants["torch.compile(eager composite)"] = (
        torch.compile(token_attention_pool_reference, fullgraph=True, dynamic=False),
        None,
    )
    variants["eager rewrite (scores materialized)"] = (rewritten_pool, None)
    cases: dict[tuple[str, str], Callable[[], Any]] = {}
    for name, (fn, backend) in variants.items():
        print(f"  token_attention_pool {shape} {name}: first calls", file=sys.stderr, flush=True)
        with forced_backend(backend):
            xr = x.detach().requires_grad_()
            dy = torch.randn(b, m, dh, device=device)
            cases[(name, "forward")] = lambda fn=fn: fn(x, q, w_k, w_v)
            cases[(name, "forward+backward")] = lambda fn=fn, xr=xr, dy=dy: torch.autograd.grad(
                fn(xr, q, w_k, w_v), xr, dy
            )
            cases[(name, "forward+backward")]()
    t = interleaved_medians(
        cases,
        device,
        warmup=1 if quick else 2,
        rounds=5 if quick else 15,
        around=lambda key: forced_backend(variants[key[0]][1]),
    )
    return make_rows(("token_attention_pool", *shape), t, ours)


def run(device: torch.device, quick: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    rows = [r for shape in FILM_SHAPES for r in measure_film(shape, device, quick)]
    rows += [r for shape in POOL_SHAPES for r in measure_pool(shape, device, quick)]
    return {"rows": rows, "targets": targets(rows, device)}


def targets(rows: list[dict], device: torch.device) -> list[dict]:
    def ms(shape: tuple, op: str, prefix: str) -> float:
        return next(r["median_ms"] for r in rows if tuple(r["shape"]) == shape and r["op"] == op
                    and r["variant"].startswith(prefix))  # fmt: skip

    film_big = ("film", *FILM_SHAPES[0])
    ours = f"{OURS} (auto"
    fb = ms(film_big, "forward+backward", "eager composite") / ms(film_big, "forward+backward", ours)
    pool_big = ("token_attention_pool", *POOL_SHAPES[0])
    pool = ms(pool_big, "forward", "eager composite") / ms(pool_big, "forward", ours)
    checks = [
        ("film forward+backward >= 1.5x faster than eager (16, 64, 128, 128)", fb, 1.5, True),
        ("token_attention_pool forward >= 2x faster than eager (16, 64, 128, 128), M=8, Dh=32", pool, 2.0, True),
    ]
    if device.type == "cuda":
        bw = ms(film_big, "forward", FLOOR) / ms(film_big, "forward", ours)
        checks.append(("film forward >= 80% of copy bandwidth", bw, 0.8, True))
    return check_targets(checks)


def main(argv: Optional[list[str]] = None) -> int:
    return bench_main("film", "Noise Harmonizer ops benchmark", __doc__.splitlines()[0], OPS, run, argv)


if __name__ == "__main__":
    sys.exit(main())
