"""GED benchmark: ours against the numpy evaluation code of published work and a plain torch matmul GED.

For K in {10, 50, 100, 1000} samples, N = 4 raters, 128 x 128 (B = 32 images, B = 4 at K = 1000), the
``dpersona`` GED of a batch by:

- ``harmonizer_fast`` (automatic backend) and each other backend that runs here;
- ``torch matmul``: threshold, one batched Gram product of the K + N masks, IoU, distance means, in plain
  torch (the fastest formulation a user would write; it stores the (K + N)^2 matrix);
- ``numpy (published style)``: the evaluation code of earlier work (probabilistic U-Net / PHiSeg lineage):
  one-hot boolean masks broadcast pair against pair, per-class IoU, in numpy (``phiseg`` convention; its
  values are checked against ``hf.ged(convention="phiseg")``, the work per pair is the same for every
  convention). It is slow, so it is timed on ``--numpy-images`` images (one round) and scaled to the
  batch; at K = 1000 it is not run (a million pairs per image, terabytes of temporaries);

plus the peak memory of one call above its inputs (CPU: the process's peak RSS, reset before the call
through /proc/self/clear_refs, in a child process per variant; CUDA: ``max_memory_allocated``). On a GPU,
a bf16 batched matmul of the same Gram product gives the tensor-core ceiling that binary GED is
compared with. Medians over interleaved rounds in one process.

    python benchmarks/bench_ged.py [--quick] [--device cpu|cuda] [--out DIR] [--numpy-images N]

Writes ``ged-<device>[-quick].json`` and ``.md`` into benchmarks/results/ and prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    ISA_ENV,
    check_targets,
    device_slug,
    forced_backend,
    interleaved_medians,
    machine_header,
    machine_info,
    pin_environment,
    run_per_isa,
    targets_table,
    timed_backends,
    write_results,
)

import harmonizer_fast as hf
from harmonizer_fast.ops.ged import IMPLS, SUPPORT

N_RATERS, SIZE = 4, 128
CASES = [(32, 10), (32, 50), (32, 100), (4, 1000)]  # (B, K)
OURS = "harmonizer_fast"
TORCH = "torch matmul"
NUMPY = "numpy (published style)"
BF16 = "bf16 bmm ceiling (same Gram)"


def make_inputs(b: int, k: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Blob-shaped probabilities (IoUs spread over (0, 1), as for real lesions) and binary rater masks."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, SIZE)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    radius = 0.15 + 0.3 * torch.rand((b, k + N_RATERS, 1, 1), generator=g)
    centre = 0.2 * (torch.rand((b, k + N_RATERS, 2, 1, 1), generator=g) - 0.5)
    dist = ((yy - centre[:, :, 0]) ** 2 + (xx - centre[:, :, 1]) ** 2).sqrt()
    prob = torch.sigmoid((radius - dist) * 30)
    return prob[:, :k].contiguous().to(device), (prob[:, k:] > 0.5).float().to(device)


def torch_matmul_ged(samples: torch.Tensor, raters: torch.Tensor) -> torch.Tensor:
    """dpersona GED in plain torch: one Gram product over the K + N thresholded masks."""
    k = samples.shape[1]
    x = torch.cat([(samples > 0.5).to(samples.dtype), raters], 1).flatten(2)
    inter = torch.bmm(x, x.transpose(1, 2))
    area = x.sum(-1)
    d = 1 - inter / (area[:, :, None] + area[:, None, :] - inter + 1e-8)
    return 2 * d[:, :k, k:].mean((1, 2)) - d[:, :k, :k].mean((1, 2)) - d[:, k:, k:].mean((1, 2))


def numpy_ged(samples: np.ndarray, raters: np.ndarray) -> np.ndarray:
    """GED the way the evaluation code of published work computes it (probabilistic U-Net / PHiSeg lineage):
    one-hot masks, every pair of masks broadcast against every other, per-class IoU with 0/0 read as 1,
    the background class dropped. That is the ``phiseg`` convention."""
    eye = np.eye(2, dtype=bool)

    def dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        inter = np.logical_and(a[:, None], b[None, :]).sum(-2)
        union = np.logical_or(a[:, None], b[None, :]).sum(-2)
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = inter / union
        iou[np.isnan(iou)] = 1.0
        return 1.0 - iou[..., 1:].mean(-1)

    out = []
    for s, y in zip(samples, raters):
        s1 = eye[(s > 0.5).reshape(len(s), -1).astype(int)]  # (K, pixels, classes)
        y1 = eye[(y > 0.5).reshape(len(y), -1).astype(int)]
        out.append(2 * dist(s1, y1).mean() - dist(s1, s1).mean() - dist(y1, y1).mean())
    return np.array(out)


def variants(device: torch.device) -> tuple[str, dict[str, tuple[Callable, Optional[str]]]]:
    auto, others = timed_backends("ged_sums", IMPLS["ged_sums"], SUPPORT, device)
    ours = f"{OURS} (auto: {auto})"
    out = {ours: (hf.ged, None), **{f"{OURS} [{b}]": (hf.ged, b) for b in others}, TORCH: (torch_matmul_ged, None)}
    return ours, out


# ---------------------------------------------------------------------------------------------------------
# Peak memory.


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(variant: str, b: int, k: int) -> dict[str, float]:
    """In a fresh process: peak RSS of one call above the RSS with its inputs in place (CPU)."""
    device = torch.device("cpu")
    _, table = variants(device)
    samples, raters = make_inputs(b, k, device)
    fn, backend = table[variant]
    with forced_backend(backend):
        fn(samples[:1, :2], raters[:1])  # load the extension and warm the code paths on a tiny case
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
        before = _rss_kb("VmRSS")
        fn(samples, raters)
        peak = _rss_kb("VmHWM")
    return {"extra_peak_mib": (peak - before) / 1024, "process_peak_mib": peak / 1024}


def peak_memory(variant: str, b: int, k: int, device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        _, table = variants(device)
        fn, backend = table[variant]
        samples, raters = make_inputs(b, k, device)
        with forced_backend(backend):
            fn(samples, raters)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(samples, raters)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        return {"extra_peak_mib": (peak - base) / 2**20, "process_peak_mib": peak / 2**20}
    cmd = [sys.executable, __file__, "--memory-child", variant, str(b), str(k)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------
# Timing.


def measure(b: int, k: int, device: torch.device, quick: bool, numpy_images: int) -> list[dict[str, Any]]:
    samples, raters = make_inputs(b, k, device)
    ours, table = variants(device)
    ref = torch_matmul_ged(samples.double(), raters.double()).cpu()
    for fn, backend in table.values():  # every variant computes the same numbers
        with forced_backend(backend):
            torch.testing.assert_close(fn(samples, raters).double().cpu(), ref, rtol=1e-5, atol=1e-5)
    cases = {name: (lambda fn=fn: fn(samples, raters)) for name, (fn, _) in table.items()}
    if device.type == "cuda":
        x = torch.cat([(samples > 0.5), raters.bool()], 1).flatten(2).to(torch.bfloat16)
        cases[BF16] = lambda: torch.bmm(x, x.transpose(1, 2))
    big = k >= 1000
    t = interleaved_medians(
        cases,
        device,
        warmup=1,
        rounds=(3 if quick else 7) if big else (5 if quick else 15),
        around=lambda name: forced_backend(table.get(name, (None, None))[1]),
    )
    rows = []
    gram_flops = 2.0 * b * (k + N_RATERS) ** 2 * SIZE * SIZE  # the full Gram product, as a GEMM would do it
    for name, stats in t.items():
        rows.append({"B": b, "K": k, "variant": name, **stats})
    if k < 1000 and numpy_images > 0:
        m = min(b, numpy_images)
        s_np, r_np = samples[:m].cpu().numpy(), raters[:m].cpu().numpy()
        t0 = time.perf_counter()
        got = numpy_ged(s_np, r_np)
        per_image = (time.perf_counter() - t0) * 1e3 / m
        phiseg = hf.ged(samples[:m], raters[:m], convention="phiseg").double().cpu().numpy()
        np.testing.assert_allclose(got, phiseg, rtol=1e-5, atol=1e-5)
        row = {"B": b, "K": k, "variant": NUMPY, "median_ms": per_image * b, "images_timed": m, "repeats": 1}
        if m < b:
            row["note"] = f"timed on {m} image(s), scaled to B = {b}"
        rows.append(row)
    ours_ms = t[ours]["median_ms"]
    for row in rows:
        row["ours_speedup"] = row["median_ms"] / ours_ms
        row["ms_per_image"] = row["median_ms"] / b
        row["gram_tflops"] = gram_flops / (row["median_ms"] * 1e-3) / 1e12
        if row["variant"] in table and (device.type == "cuda" or row["variant"] == ours or row["variant"] == TORCH):
            row.update(peak_memory(row["variant"], b, k, device))
    return rows


def targets(rows: list[dict], device: torch.device) -> list[dict]:
    def ms(b: int, k: int, prefix: str) -> Optional[float]:
        hits = [r["median_ms"] for r in rows if r["B"] == b and r["K"] == k and r["variant"].startswith(prefix)]
        return hits[0] if hits else None

    ours = f"{OURS} (auto"
    checks = []
    numpy_ms = ms(32, 50, NUMPY)
    if numpy_ms is not None:
        checks.append(("ged B=32, K=50: >= 300x faster than the numpy peer", numpy_ms / ms(32, 50, ours), 300.0, True))
    checks.append(("ged B=32, K=50: time / torch matmul <= 1.1", ms(32, 50, ours) / ms(32, 50, TORCH), 1.1, False))
    mem = next(r.get("process_peak_mib") for r in rows if r["K"] == 1000 and r["variant"].startswith(ours))
    if mem is not None:
        checks.append(("ged B=4, K=1000: process peak memory < 2048 MiB", mem, 2048.0, False))
    if device.type == "cuda":
        rate = ms(4, 1000, BF16) / ms(4, 1000, ours)
        checks.append(("binary GED K=1000 >= 0.5x the bf16 matmul rate", rate, 0.5, True))
    return check_targets(checks)


def report(payload: dict[str, Any]) -> str:
    lines = [
        "# GED benchmark",
        "",
        f"{machine_header(payload)} dpersona GED of a batch, N = {N_RATERS} raters, "
        f"{SIZE} x {SIZE}, float32 probabilities. Medians in ms over interleaved rounds; `x ours` = variant "
        "time / harmonizer_fast (auto) time; TFLOP/s counts the full (K+N)^2 Gram product a GEMM would do; "
        "memory = peak above the inputs (and the whole process's peak).",
        "",
        "| B | K | variant | median ms | ms / image | x ours | Gram TFLOP/s | peak MiB above inputs (process) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        mem = f"{r['extra_peak_mib']:.0f} ({r['process_peak_mib']:.0f})" if "extra_peak_mib" in r else ""
        note = f" ({r['note']})" if "note" in r else ""
        lines.append(f"| {r['B']} | {r['K']} | {r['variant']}{note} | {r['median_ms']:.2f} | {r['ms_per_image']:.3f} "
                     f"| {r['ours_speedup']:.2f} | {r['gram_tflops']:.3f} | {mem} |")  # fmt: skip
    return "\n".join([*lines, "", *targets_table(payload["targets"], 2)]) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--memory-child"]:
        print(json.dumps(memory_child(argv[1], int(argv[2]), int(argv[3]))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds, and the numpy peer on 2 images")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--numpy-images", type=int, default=None, help="images the numpy peer is timed on "
                   "(default: the whole batch, 2 with --quick; 0 skips it)")  # fmt: skip
    p.add_argument("--isa", choices=("auto", "all", *ISA_ENV), default="auto",
                   help="instruction-set build (benchmarks/common.py ISA_ENV); all: each one in turn")
    args = p.parse_args(argv)
    if args.isa == "all":
        return run_per_isa("ged", list(argv), args)
    pin_environment("fresh", args.isa)
    device = torch.device(args.device)
    numpy_images = args.numpy_images if args.numpy_images is not None else (2 if args.quick else 32)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    payload: dict[str, Any] = {"benchmark": "ged", "device": str(device), "quick": args.quick,
                               "allocator": "fresh", "machine": machine_info()}  # fmt: skip
    rows = []
    for b, k in CASES:
        print(f"  ged B={b} K={k}", file=sys.stderr, flush=True)
        rows += measure(b, k, device, args.quick, numpy_images)
    payload["rows"] = rows
    payload["targets"] = targets(rows, device)
    payload["wall_s"] = time.perf_counter() - t0
    md = report(payload)
    stem = f"ged-{device_slug(device)}" + ("" if args.isa == "auto" else f"-{args.isa}")
    stem += "-quick" if args.quick else ""
    json_path, md_path = write_results(stem, payload, md, args.out)
    print(md)
    print(f"wrote {json_path} and {md_path} in {payload['wall_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
