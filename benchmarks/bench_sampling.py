"""Sampling benchmark of HarmonizerNet (paper config, 128 x 128, eval mode, no grad).

The hot path (one backbone pass per image, the split fcomb head fused per pixel) against two naive paths
of earlier probabilistic U-Net code: ``tiled fcomb`` (features once, then repeated K times and
concatenated with z before fcomb) and ``forward per sample`` (the whole network once per sample). Also
the issue's two checks: ``sample(K=50) + personalize`` for 4 raters on one image against the paper's
0.42 s per forward, and ``sample(K=50)`` against ``sample(K=1)`` at B = 16. Medians over interleaved rounds.

    python benchmarks/bench_sampling.py [--quick] [--device cpu|cuda] [--out DIR]

Writes ``sampling-<device>[-quick].json`` and ``.md`` into benchmarks/results/ and prints the table.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import check_targets, device_slug, interleaved_medians, machine_info, pin_allocator, write_results  # noqa: E402

from harmonizer_fast.model import HarmonizerConfig, HarmonizerNet  # noqa: E402

SIZE = 128
PAPER_FORWARD_S = 0.42


def naive_tiled(model: HarmonizerNet, images: torch.Tensor, k: int) -> torch.Tensor:
    with torch.no_grad():
        f, _ = model.features(images)
        prior = model.prior(images)
        z = prior.sample((k,)).transpose(0, 1)
        return torch.sigmoid(model.fcomb.naive(f, z))


def naive_per_sample(model: HarmonizerNet, images: torch.Tensor, k: int) -> torch.Tensor:
    with torch.no_grad():
        outs = []
        for _ in range(k):
            f, _ = model.features(images)
            z = model.prior(images).sample()
            outs.append(torch.sigmoid(model.fcomb.logits(f, z[:, None])))
        return torch.cat(outs, 1)


def run(device: torch.device, quick: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    model = HarmonizerNet(HarmonizerConfig.paper()).to(device).eval()
    one = torch.randn(1, 1, SIZE, SIZE, device=device)
    sixteen = torch.randn(16, 1, SIZE, SIZE, device=device)
    cases: dict[tuple[str, int, int], Callable[[], Any]] = {
        ("sample + personalize(4 raters)", 1, 50): lambda: (model.sample(one, 50), model.personalize(one)),
        ("sample", 1, 50): lambda: model.sample(one, 50),
        ("personalize(4 raters)", 1, 4): lambda: model.personalize(one),
        ("sample", 16, 1): lambda: model.sample(sixteen, 1),
        ("sample", 16, 16): lambda: model.sample(sixteen, 16),
        ("sample", 16, 50): lambda: model.sample(sixteen, 50),
        ("naive: tiled fcomb", 16, 50): lambda: naive_tiled(model, sixteen, 50),
    }
    if not quick or device.type == "cuda":
        cases[("naive: forward per sample", 16, 50)] = lambda: naive_per_sample(model, sixteen, 50)
    t = interleaved_medians(cases, device, warmup=1, rounds=3 if quick else 7)
    rows = []
    for (name, b, k), stats in t.items():
        s = stats["median_ms"] / 1e3
        rows.append({"variant": name, "B": b, "K": k, **stats, "images_per_s": b / s, "samples_per_s": b * k / s})
    return {"rows": rows, "targets": targets(t)}


def targets(t: dict) -> list[dict]:
    ms = {key: v["median_ms"] for key, v in t.items()}
    checks = [
        ("sample(K=50) + personalize(4) on one image <= 0.42 s", ms[("sample + personalize(4 raters)", 1, 50)] / 1e3,
         PAPER_FORWARD_S, False),
        ("sample(K=50) / sample(K=1) at B=16 <= 1.6", ms[("sample", 16, 50)] / ms[("sample", 16, 1)], 1.6, False),
    ]  # fmt: skip
    return check_targets(checks)


def report(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    gpu = m["gpu"]["name"] if m["gpu"] else "none"
    lines = [
        "# Sampling benchmark (HarmonizerNet, paper config)",
        "",
        f"`{' '.join(m['argv'])}` on {m['date']}. Device: **{payload['device']}**. CPU: {m['cpu']} "
        f"({m['cpu_cores']} cores, torch threads {m['torch_threads']}); GPU: {gpu}. torch {m['torch']}. "
        f"{SIZE} x {SIZE}, fp32, eval mode, no grad; medians over interleaved rounds.",
        "",
        "| variant | B | K | median ms | images/s | samples/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        lines.append(f"| {r['variant']} | {r['B']} | {r['K']} | {r['median_ms']:.1f} | {r['images_per_s']:.1f} "
                     f"| {r['samples_per_s']:.0f} |")  # fmt: skip
    lines += ["", "## Targets", "", "| target | measured | ok |", "|---|---|---|"]
    for t in payload["targets"]:
        lines.append(f"| {t['target']} | {t['value']:.3f} | {'yes' if t['ok'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds, and no forward-per-sample loop on CPU")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    pin_allocator("fresh")
    device = torch.device(args.device)
    t0 = time.perf_counter()
    payload: dict[str, Any] = {"benchmark": "sampling", "device": str(device), "quick": args.quick,
                               "machine": machine_info()}  # fmt: skip
    payload.update(run(device, args.quick))
    payload["wall_s"] = time.perf_counter() - t0
    md = report(payload)
    stem = f"sampling-{device_slug(device)}" + ("-quick" if args.quick else "")
    json_path, md_path = write_results(stem, payload, md, args.out)
    print(md)
    print(f"wrote {json_path} and {md_path} in {payload['wall_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
