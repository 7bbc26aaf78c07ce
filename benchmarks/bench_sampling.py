"""End-to-end sampling benchmark of HarmonizerNet (paper config, 128 x 128, eval mode, no grad).

``model.sample(images, K)`` (one backbone pass per image, the split fcomb head fused per pixel for all K)
for B in {1, 16, 64} and K in {1, 16, 50}, against the sampling loop of earlier probabilistic U-Net code:

- ``naive loop``: the features once, then for each sample a prior draw, z tiled over the image,
  concatenated with the features and run through fcomb (the PyTorch probabilistic U-Net's
  ``forward(..., training=False)`` then ``sample(testing=True)`` K times);
- ``forward per sample``: the whole network once per sample (evaluation scripts that call the model's
  forward K times), at B = 1.

Also the issue-5 checks: ``sample(K=50) + personalize`` for 4 raters on one image against the paper's 0.42 s
per forward, and ``sample(K=50)`` against ``sample(K=1)`` at B = 16. Medians over interleaved rounds;
images/s and samples/s from the medians.

    python benchmarks/bench_sampling.py [--quick] [--device cpu|cuda] [--out DIR]

Writes ``sampling-<device>[-quick].json`` and ``.md`` into benchmarks/results/ and prints the table.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_main, check_targets, interleaved_medians, machine_header, targets_table

from harmonizer_fast.model import HarmonizerConfig, HarmonizerNet

SIZE = 128
PAPER_FORWARD_S = 0.42
BATCHES, SAMPLES = (1, 16, 64), (1, 16, 50)
OURS, LOOP, PER_SAMPLE = "sample (ours)", "naive loop", "forward per sample"
SAMPLE_PERSONALIZE, PERSONALIZE = "sample + personalize(4 raters)", "personalize(4 raters)"


def naive_loop(model: HarmonizerNet, images: torch.Tensor, k: int) -> torch.Tensor:
    with torch.no_grad():
        f, _ = model.features(images)
        prior = model.prior(images)
        return torch.cat([torch.sigmoid(model.fcomb.naive(f, prior.sample()[:, None])) for _ in range(k)], 1)


def forward_per_sample(model: HarmonizerNet, images: torch.Tensor, k: int) -> torch.Tensor:
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
    images = {b: torch.randn(b, 1, SIZE, SIZE, device=device) for b in BATCHES}

    def sample(b: int, k: int) -> Callable[[], Any]:
        return lambda: model.sample(images[b], k)

    def loop(b: int, k: int) -> Callable[[], Any]:
        return lambda: naive_loop(model, images[b], k)

    def per_sample(b: int, k: int) -> Callable[[], Any]:
        return lambda: forward_per_sample(model, images[b], k)

    cases: dict[tuple[str, int, int], Callable[[], Any]] = {}
    for b in BATCHES:
        for k in SAMPLES:
            cases[(OURS, b, k)] = sample(b, k)
            cases[(LOOP, b, k)] = loop(b, k)
    for k in SAMPLES:
        cases[(PER_SAMPLE, 1, k)] = per_sample(1, k)
    cases[(SAMPLE_PERSONALIZE, 1, 50)] = lambda: (
        model.sample(images[1], 50),
        model.personalize(images[1], allow_untrained=True),
    )
    cases[(PERSONALIZE, 1, 4)] = lambda: model.personalize(images[1], allow_untrained=True)
    # Warm-up: the naive paths run the same code at every (B, K), so one small and one large call each warm
    # them (a warm-up of every case would double the run for nothing); every case of ours is warmed.
    for b in (BATCHES[0], BATCHES[-1]):
        loop(b, 1)()
    per_sample(1, 1)()
    for key, fn in cases.items():
        if key[0] in (OURS, SAMPLE_PERSONALIZE, PERSONALIZE):
            fn()
    t = interleaved_medians(cases, device, warmup=0, rounds=2 if quick else 5)
    rows = []
    for (name, b, k), stats in t.items():
        s = stats["median_ms"] / 1e3
        row = {"variant": name, "B": b, "K": k, **stats, "images_per_s": b / s, "samples_per_s": b * k / s}
        if name in (OURS, LOOP, PER_SAMPLE):
            row["ours_speedup"] = stats["median_ms"] / t[(OURS, b, k)]["median_ms"]
        rows.append(row)
    return {"rows": rows, "targets": targets(t)}


def targets(t: dict) -> list[dict]:
    ms = {key: v["median_ms"] for key, v in t.items()}
    checks = [
        ("sample(K=50) + personalize(4) on one image <= 0.42 s", ms[(SAMPLE_PERSONALIZE, 1, 50)] / 1e3,
         PAPER_FORWARD_S, False),
        ("sample(K=50) / sample(K=1) at B=16 <= 1.6", ms[(OURS, 16, 50)] / ms[(OURS, 16, 1)], 1.6, False),
    ]  # fmt: skip
    return check_targets(checks)


def report(payload: dict[str, Any]) -> str:
    lines = [
        "# End-to-end sampling benchmark (HarmonizerNet, paper config)",
        "",
        f"{machine_header(payload)} {SIZE} x {SIZE}, fp32, eval mode, no grad; medians over interleaved rounds. "
        "`xours` = variant time / `sample (ours)` time at the same B and K.",
        "",
        f"`{OURS}`: one backbone pass per image, the fcomb head fused over all K samples. `{LOOP}`: the sampling "
        "loop of earlier probabilistic U-Net code: the features once, then per sample a prior draw tiled over "
        f"the image, concatenated with the features and run through fcomb. `{PER_SAMPLE}`: the whole network "
        "once per sample.",
        "",
        "| variant | B | K | median ms | images/s | samples/s | xours |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        ratio = f"{r['ours_speedup']:.2f}" if "ours_speedup" in r else "-"
        lines.append(f"| {r['variant']} | {r['B']} | {r['K']} | {r['median_ms']:.1f} | {r['images_per_s']:.1f} "
                     f"| {r['samples_per_s']:.0f} | {ratio} |")  # fmt: skip
    return "\n".join([*lines, "", *targets_table(payload["targets"], 3)]) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    return bench_main("sampling", "", __doc__.splitlines()[0], (), run, argv, render=report,
                      quick_help="two interleaved rounds instead of five")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
