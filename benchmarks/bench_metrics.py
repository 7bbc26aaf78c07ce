"""Multi-rater metric suite benchmark ([metrics-library]): ours against a numpy transcription in the style of
published evaluation code.

B = 32 images, K = 50 samples, N = 4 raters, 128 x 128 (sample probabilities, binary raters, a quarter of
the raters empty as in LIDC). The suite: GED (dpersona convention), HM-IoU, D_max, S_c, D_a, CI, sample
diversity and S_NCC per image.

- ``harmonizer_fast``: :func:`harmonizer_fast.ged` plus :func:`harmonizer_fast.metrics.set_level_metrics`
  (three calls of the pairwise-intersection kernel shared by every metric), and each metric's own function;
- ``numpy (published style)``: per image, per pair boolean TP/FP/FN counts (the Prob. U-Net / PHiSeg /
  CIMD-reimplementation style), scipy's Hungarian matching, PHiSeg's one-hot cross-entropy maps for S_NCC,
  ``np.var`` of each pair's difference map for D_a. It is slow, so it is timed on ``--numpy-images`` images
  (one round) and scaled to the batch; its values on those images are checked against ours (max abs
  difference in the JSON) before any time is reported.

Medians over interleaved rounds in one process:

    python benchmarks/bench_metrics.py [--quick] [--isa auto|all|baseline|avx2|avx512] [--out DIR]

Writes ``metrics-cpu[-<isa>][-quick].json`` and ``.md`` into benchmarks/results/.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_main, check_targets, interleaved_medians, machine_header, targets_table

import harmonizer_fast as hf
from harmonizer_fast import metrics

B, K, N, SIZE = 32, 50, 4, 128
NUMPY_IMAGES = 2
SPEEDUP_TARGET = 10.0
SUITE = ("ged", *metrics.SET_LEVEL_KEYS)
OURS, PEER = "harmonizer_fast (auto backend)", "numpy (published style)"


def make_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Raters: discs of varying centre and radius (one in four empty); samples: soft maps around the raters'
    discs with per-sample jitter, so masks overlap partly as a trained model's do."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")

    def discs(count: int, radius: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
        d2 = (yy - centre[..., 0, None, None]) ** 2 + (xx - centre[..., 1, None, None]) ** 2
        return (radius[..., None, None] ** 2 - d2).float() / (radius[..., None, None] ** 2 + 1)

    centre = SIZE / 2 + 12 * torch.randn(B, 1, 2, generator=g)
    raters = (discs(N, 6 + 10 * torch.rand(B, N, generator=g), centre + 3 * torch.randn(B, N, 2, generator=g)) > 0)
    raters = raters.float() * (torch.rand(B, N, 1, 1, generator=g) > 0.25)
    soft = discs(K, 4 + 12 * torch.rand(B, K, generator=g), centre + 4 * torch.randn(B, K, 2, generator=g))
    samples = torch.sigmoid(6 * soft + 0.5 * torch.randn(B, K, SIZE, SIZE, generator=g))
    return samples, raters


# ---------------------------------------------------------------------------------------------------------
# The numpy transcription, per image, in the style of published evaluation code.


def _tp_fp_fn(a: np.ndarray, b: np.ndarray) -> tuple[int, int, int]:
    return int(np.sum(a & b)), int(np.sum(a & ~b)), int(np.sum(~a & b))


def _iou(a: np.ndarray, b: np.ndarray, empty: float, eps: float = 0.0) -> float:
    tp, fp, fn = _tp_fp_fn(a, b)
    return empty if tp + fp + fn == 0 else tp / (tp + fp + fn + eps)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    tp, fp, fn = _tp_fp_fn(a, b)
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def _variances(masks: np.ndarray) -> list[float]:
    m = len(masks)
    return [float(np.var(masks[i].astype(int) - masks[j].astype(int))) for i in range(m) for j in range(m) if i != j]


def _xent(target: np.ndarray, sample: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    return -np.sum(target * np.log(sample + eps), axis=-1)


def _onehot(x: np.ndarray) -> np.ndarray:
    return np.stack([1 - x, x], axis=-1).astype(float)


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = a.std(), b.std()
    return 0.0 if sa == 0 or sb == 0 else float(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb))


def numpy_suite(s: np.ndarray, r: np.ndarray) -> dict[str, float]:
    """Every suite metric of one image: ``s (K, H, W)`` and ``r (N, H, W)`` boolean."""
    k, n = len(s), len(r)
    d = lambda xs, ys: np.mean([1 - _iou(x, y, 0.0, 1e-8) for x in xs for y in ys])  # noqa: E731
    out = {"ged": 2 * d(s, r) - d(s, s) - d(r, r)}
    iou = np.array([[_iou(x, y, 1.0) for y in (np.concatenate([r] * (k // n)) if k % n == 0 else r)] for x in s])
    rows, cols = linear_sum_assignment(-iou)
    out["hm_iou"] = float(iou[rows, cols].mean())
    out["d_max"] = float(np.mean([max(_dice(x, y) for x in s) for y in r]))
    union_s, union_r = s.any(0), r.any(0)
    out["combined_sensitivity"] = 1.0 if union_r.sum() == 0 else float((union_s & union_r).sum() / union_r.sum())
    vs, vr = _variances(s), _variances(r)
    out["diversity_agreement"] = 1 - (abs(max(vr) - max(vs)) + abs(min(vr) - min(vs))) / 2
    sc, dm, da = out["combined_sensitivity"], out["d_max"], out["diversity_agreement"]
    out["ci_score"] = 3 * sc * dm * da / (sc + dm + da)
    out["sample_diversity"] = float(np.mean([1 - _iou(s[a], s[b], 1.0) for a in range(k) for b in range(k) if a != b]))
    so, ro = _onehot(s), _onehot(r)
    mean = so.mean(0)
    e_ss = np.mean([_xent(mean, x) for x in so], axis=0)
    out["ncc"] = float(np.mean([_ncc(e_ss, np.mean([_xent(y, x) for x in so], axis=0)) for y in ro]))
    return out


# ---------------------------------------------------------------------------------------------------------


def ours_suite(samples: torch.Tensor, raters: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"ged": hf.ged(samples, raters), **metrics.set_level_metrics(samples, raters)}


def _single(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    fn = hf.ged if name == "ged" else getattr(metrics, name)
    return (lambda s, r: fn(s)) if name == "sample_diversity" else fn


def run(device: torch.device, quick: bool, numpy_images: int = NUMPY_IMAGES) -> dict[str, Any]:
    samples, raters = make_batch()
    s_np, r_np = (samples[:numpy_images] > 0.5).numpy(), (raters[:numpy_images] > 0.5).numpy()

    # values first: numpy on its images against ours
    ours_vals = ours_suite(samples[:numpy_images], raters[:numpy_images])
    np_rows = [numpy_suite(s, r) for s, r in zip(s_np, r_np)]
    max_diff = {m: float(np.max(np.abs(ours_vals[m].double().numpy() - [row[m] for row in np_rows]))) for m in SUITE}
    bad = {m: v for m, v in max_diff.items() if v > 1e-5}  # GED is float32
    if bad:
        raise SystemExit(f"bench_metrics: ours and the numpy transcription disagree: {bad}")

    cases: dict[str, Callable[[], Any]] = {"suite": lambda: ours_suite(samples, raters)}
    cases.update({m: functools.partial(_single(m), samples, raters) for m in SUITE})
    ours = interleaved_medians(cases, device, warmup=1, rounds=3 if quick else 7)

    # numpy: one round on its images, per metric and for the whole suite, scaled to B
    numpy_ms: dict[str, float] = {}
    t0 = time.perf_counter()
    for s, r in zip(s_np, r_np):
        numpy_suite(s, r)
    numpy_ms["suite"] = (time.perf_counter() - t0) * 1e3 * B / numpy_images
    rows = [{"variant": OURS, "op": "full suite" if key == "suite" else key, **stats} for key, stats in ours.items()]
    rows.insert(1, {"variant": PEER, "op": "full suite", "median_ms": numpy_ms["suite"], "repeats": 1,
                    "ours_speedup": numpy_ms["suite"] / ours["suite"]["median_ms"]})  # fmt: skip
    suite = {"speedup": rows[1]["ours_speedup"]}
    targets = check_targets([(f"numpy (published style) / ours, full suite, B={B} K={K} N={N} >= {SPEEDUP_TARGET:g}",
                              suite["speedup"], SPEEDUP_TARGET, True)])  # fmt: skip
    return {"shape": {"B": B, "K": K, "N": N, "H": SIZE, "W": SIZE}, "numpy_images": numpy_images,
            "max_abs_diff_vs_numpy": max_diff, "rows": rows, "targets": targets}  # fmt: skip


def report(payload: dict[str, Any]) -> str:
    shape = payload["shape"]
    lines = [
        "# Multi-rater metric suite: harmonizer_fast against a numpy transcription",
        "",
        f"{machine_header(payload)} Allocator policy `{payload['allocator']}`. B = {shape['B']}, K = {shape['K']}, "
        f"N = {shape['N']}, {shape['H']} x {shape['W']}; our medians over interleaved rounds; the numpy "
        f"transcription timed once on {payload['numpy_images']} images and scaled to B (its values on those "
        "images match ours: largest difference "
        f"{max(payload['max_abs_diff_vs_numpy'].values()):.1e}).",
        "",
        "| metric | variant | ms per batch | numpy / ours |",
        "|---|---|---|---|",
    ]
    for r in payload["rows"]:
        name = "full suite (GED + set_level_metrics)" if r["op"] == "full suite" else f"`{r['op']}` alone"
        scaled = " (scaled)" if r["variant"] == PEER else ""
        ratio = f"{r['ours_speedup']:.0f}x" if "ours_speedup" in r else "-"
        lines.append(f"| {name} | {r['variant']} | {r['median_ms']:.1f}{scaled} | {ratio} |")
    return "\n".join([*lines, "", *targets_table(payload["targets"], 1)]) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    # Recycled heap by default: harmonizer-fast evaluate keeps freed memory (harmonizer_fast._alloc), so the
    # metrics are timed as it runs them, not with a page fault on every (B, K, H, W) temporary.
    return bench_main("metrics", "", __doc__.splitlines()[0], (), run, argv, render=report,
                      quick_help="three interleaved rounds instead of seven", default_allocator="reuse")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
