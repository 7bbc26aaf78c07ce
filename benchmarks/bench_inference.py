"""Inference cost per instruction-set build ([cpu-speed]): what a user pays for K samples and the heads.

Paper config, 128 x 128, fp32, eval mode, no grad, medians over interleaved rounds in one process:

- ``sample`` at B = 16 for K = 1 and K = 50: the K samples should cost little over one (the fused head);
- ``predict`` (K prior samples and the 4 raters' personalized heads from one backbone pass) against the
  separate calls ``sample`` then ``personalize`` (two backbone passes), at B = 16, K = 16 and B = 1, K = 50;
- ``stream_samples`` (what ``harmonizer-fast sample`` runs: predict, float16 conversion and the streamed
  npz writer) over 64 synthetic 128 x 128 images at B = 16, K = 16, heads included: images/s;
- FiLM (paper Eq. 3) forward + backward at (16, 64, 128, 128): ours against the eager composite and
  ``torch.compile`` of the reference.

The model's weights are random (the personalizer marked trained so that the heads run): cost does not
depend on the weights' values. Run it under every build the CPU executes with ``--isa all`` (each build in
its own process, our kernels, ATen and oneDNN capped alike: benchmarks/common.py ISA_ENV):

    python benchmarks/bench_inference.py [--quick] [--isa auto|all|baseline|avx2|avx512] [--out DIR]

Writes ``inference-cpu[-<isa>][-quick].json`` and ``.md`` (and with ``--isa all`` also
``inference-cpu-isas[-quick].*``, the builds side by side) into benchmarks/results/.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_main, check_targets, interleaved_medians, machine_header, targets_table

import harmonizer_fast as hf
from harmonizer_fast.data import make_synthetic
from harmonizer_fast.model import HarmonizerConfig, HarmonizerNet
from harmonizer_fast.ops.film import film_reference
from harmonizer_fast.sampling import stream_samples

SIZE, RATERS, STREAM_IMAGES = 128, 4, 64
FILM_SHAPE = (16, 64, 128, 128)
LATENCY_TARGET_S = 0.12
K_RATIO_TARGET = 1.3


def _model() -> HarmonizerNet:
    torch.manual_seed(0)
    model = HarmonizerNet(HarmonizerConfig.paper(num_raters=RATERS)).eval()
    model.personalizer.trained_steps.fill_(1)  # the heads run as for a trained model
    return model


def model_cases(model: HarmonizerNet, tmp: Path) -> dict[tuple[str, int, int], Callable[[], Any]]:
    x = {b: torch.rand(b, 1, SIZE, SIZE) for b in (1, 16)}
    data = make_synthetic(STREAM_IMAGES, size=SIZE, raters=RATERS, seed=0)

    def separate(b: int, k: int) -> Callable[[], Any]:
        return lambda: (model.sample(x[b], k), model.personalize(x[b]))

    return {
        ("sample", 16, 1): lambda: model.sample(x[16], 1),
        ("sample", 16, 50): lambda: model.sample(x[16], 50),
        ("predict + heads", 16, 16): lambda: model.predict(x[16], 16),
        ("sample, then personalize", 16, 16): separate(16, 16),
        ("predict + heads", 1, 50): lambda: model.predict(x[1], 50),
        ("sample, then personalize", 1, 50): separate(1, 50),
        ("stream_samples (CLI sample)", 16, 16): lambda: stream_samples(
            model, data, range(STREAM_IMAGES), tmp / "s.npz", num_samples=16, batch=16, progress=False
        ),
    }


def film_cases(notes: list[str]) -> dict[tuple[str, int, int], Callable[[], Any]]:
    g = torch.Generator().manual_seed(0)
    b, c = FILM_SHAPE[:2]
    x = torch.randn(FILM_SHAPE, generator=g).requires_grad_()
    dy = torch.randn(FILM_SHAPE, generator=g)
    gamma, beta = (torch.randn(b, c, generator=g).requires_grad_() for _ in range(2))
    compiled = torch.compile(film_reference, fullgraph=True, dynamic=False)

    def eager(x, gamma, beta):
        return x * gamma[..., None, None] + beta[..., None, None]

    def fb(fn: Callable) -> Callable[[], Any]:
        return lambda: torch.autograd.grad(fn(x, gamma, beta), (x, gamma, beta), dy)

    cases = {("FiLM fwd+bwd: harmonizer_fast", b, c): fb(hf.film), ("FiLM fwd+bwd: eager composite", b, c): fb(eager),
             ("FiLM fwd+bwd: torch.compile(reference)", b, c): fb(compiled)}  # fmt: skip
    try:
        cases[("FiLM fwd+bwd: torch.compile(reference)", b, c)]()  # compile outside the timed rounds
    except Exception as exc:  # inductor's C++ codegen under ATEN_CPU_CAPABILITY=default fails (torch 2.13)
        del cases[("FiLM fwd+bwd: torch.compile(reference)", b, c)]
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        notes.append(f"torch.compile(reference) failed under this build, left out: {type(exc).__name__}: {first}")
    return cases


def run(device: torch.device, quick: bool) -> dict[str, Any]:
    if device.type != "cpu":
        raise SystemExit("bench_inference.py measures the CPU builds: --device cpu")
    model = _model()
    with tempfile.TemporaryDirectory() as tmp:
        cases = model_cases(model, Path(tmp))  # sample, predict, personalize, stream_samples: no grad inside
        notes: list[str] = []
        cases.update(film_cases(notes))
        # 7 rounds: the K = 50 / K = 1 ratio is a quotient of two medians on a VM whose speed drifts by 10%
        t = interleaved_medians(cases, device, warmup=1, rounds=2 if quick else 7)
    rows = []
    for (name, b, k), stats in t.items():
        row = {"variant": name, "B": b, "K": k, **stats}
        if name.startswith("stream_samples"):
            row["images_per_s"] = STREAM_IMAGES / (stats["median_ms"] / 1e3)
        rows.append(row)
    return {"rows": rows, "targets": targets(t), "cpu_isa": hf.cpu_isa(), "notes": notes}


def targets(t: dict) -> list[dict]:
    ms = {key: v["median_ms"] for key, v in t.items()}
    film = {name.split(": ", 1)[1]: v for (name, _, _), v in ms.items() if name.startswith("FiLM")}
    checks = [
        (f"sample(K=50) / sample(K=1) at B=16 <= {K_RATIO_TARGET}", ms[("sample", 16, 50)] / ms[("sample", 16, 1)],
         K_RATIO_TARGET, False),
        (f"predict(K=50) + 4 heads, one image <= {LATENCY_TARGET_S} s", ms[("predict + heads", 1, 50)] / 1e3,
         LATENCY_TARGET_S, False),
        ("separate calls / predict at B=16, K=16 >= 1", ms[("sample, then personalize", 16, 16)]
         / ms[("predict + heads", 16, 16)], 1.0, True),
        ("FiLM fwd+bwd: eager / ours >= 2", film["eager composite"] / film["harmonizer_fast"], 2.0, True),
    ]  # fmt: skip
    if "torch.compile(reference)" in film:
        checks.append(("FiLM fwd+bwd: torch.compile / ours >= 1",
                       film["torch.compile(reference)"] / film["harmonizer_fast"], 1.0, True))  # fmt: skip
    return check_targets(checks)


def report(payload: dict[str, Any]) -> str:
    lines = [
        "# Inference cost (HarmonizerNet paper config) and FiLM",
        "",
        f"{machine_header(payload)} Allocator policy `{payload['allocator']}`. {SIZE} x {SIZE}, fp32, eval mode, "
        "no grad; medians over interleaved rounds; "
        f"{RATERS} rater heads. `stream_samples` is the `harmonizer-fast sample` path over {STREAM_IMAGES} "
        "synthetic images (float16 npz written to a temporary folder).",
        "",
        "| variant | B | K (FiLM: C) | median ms | images/s |",
        "|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        ips = f"{r['images_per_s']:.1f}" if "images_per_s" in r else f"{r['B'] / (r['median_ms'] / 1e3):.1f}"
        if r["variant"].startswith("FiLM"):
            ips = "-"
        lines.append(f"| {r['variant']} | {r['B']} | {r['K']} | {r['median_ms']:.1f} | {ips} |")
    notes = [f"Note: {n}" for n in payload.get("notes", [])]
    return "\n".join([*lines, "", *notes, *([""] if notes else []), *targets_table(payload["targets"], 3)]) + "\n"


def isa_summary(per_isa: dict[str, dict[str, Any]]) -> list[str]:
    """The measures across builds, for ``--isa all`` (the README quotes this table)."""
    isas = list(per_isa)

    def ms(isa: str, variant: str, b: int, k: int) -> Optional[float]:
        return next((r["median_ms"] for r in per_isa[isa]["rows"] if (r["variant"], r["B"], r["K"]) == (variant, b, k)),
                    None)  # fmt: skip

    def cell(isa: str, variant: str, b: int, k: int, ref: Optional[tuple[str, int, int]] = None) -> str:
        v = ms(isa, variant, b, k)
        if v is None:
            return "failed"
        return f"{v:.0f} ms" + (f" ({v / ms(isa, *ref):.2f}x)" if ref else "")

    def film(isa: str) -> str:
        parts = [ms(isa, f"FiLM fwd+bwd: {v}", *FILM_SHAPE[:2]) for v in
                 ("harmonizer_fast", "eager composite", "torch.compile(reference)")]  # fmt: skip
        return " / ".join("failed" if p is None else f"{p:.1f}" for p in parts) + " ms"

    def stream(isa: str) -> str:
        return f"{next(r['images_per_s'] for r in per_isa[isa]['rows'] if 'images_per_s' in r):.1f} images/s"

    rows = [
        ("`sample(K=1)`, B = 16", lambda i: cell(i, "sample", 16, 1)),
        ("`sample(K=50)`, B = 16 (x K = 1)", lambda i: cell(i, "sample", 16, 50, ("sample", 16, 1))),
        ("`predict(K=16)` + 4 heads, B = 16", lambda i: cell(i, "predict + heads", 16, 16)),
        ("`sample(K=16)` then `personalize`, B = 16 (x predict)",
         lambda i: cell(i, "sample, then personalize", 16, 16, ("predict + heads", 16, 16))),
        ("`predict(K=50)` + 4 heads, one image", lambda i: cell(i, "predict + heads", 1, 50)),
        ("`harmonizer-fast sample` path, K = 16 + heads, B = 16", stream),
        ("FiLM fwd+bwd (16, 64, 128, 128): ours / eager / torch.compile", film),
    ]  # fmt: skip
    return ["| measure | " + " | ".join(isas) + " |", "|---|" + "---|" * len(isas),
            *(f"| {name} | " + " | ".join(f(i) for i in isas) + " |" for name, f in rows)]  # fmt: skip


def main(argv: Optional[list[str]] = None) -> int:
    # Recycled heap by default: harmonizer-fast sample and the trainer keep freed memory (harmonizer_fast._alloc),
    # so inference is timed as they run it, not with a page fault on every activation of a B = 16 batch.
    return bench_main("inference", "", __doc__.splitlines()[0], (), run, argv, render=report,
                      quick_help="two interleaved rounds instead of seven", default_allocator="reuse",
                      isa_summary=isa_summary)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
