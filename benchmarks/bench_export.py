"""Export benchmark: what ``harmonizer-fast export`` writes and what the exported inference costs, per config.

For the small and the paper config (random weights, the personalizer marked trained so that the heads are
exported), K = 16, traced at 128 x 128: the export time and file size of each format (``pt2``, ``onnx``), and
the time of one batch of ``predict`` (K samples + every rater head) eager with our kernels, through the
exported program (``torch.export.load(...).module()``: stock ATen ops, the custom ops decomposed to their
references) and through onnxruntime when installed. Every variant's outputs are checked against eager on the
same draws before it is timed. Each runtime is timed in a block of its own (see ``block_medians``), in two
passes of opposite order; a figure is the mean of the two passes' medians. glibc's heap is recycled, as the
CLI runs.

    python benchmarks/bench_export.py [--quick] [--out DIR]

Writes ``export-cpu[-quick].json`` and ``.md`` into benchmarks/results/ and prints the table.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_main, interleaved_medians, machine_header

from harmonizer_fast import export as ex
from harmonizer_fast.model import HarmonizerConfig, HarmonizerNet

K = 16
SIZE = (128, 128)
BATCHES = (1, 16)
TOLERANCE = 1e-4  # largest |exported - eager| allowed on probabilities before a variant is timed


def _inputs(model: HarmonizerNet, batch: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(batch)
    c = model.config
    images = torch.randn(batch, c.in_channels, *SIZE, generator=g)
    return images, torch.randn(batch, K, c.latent_dim, generator=g), torch.randn(batch, c.prior_bank, c.latent_dim,
                                                                                    generator=g)  # fmt: skip


def block_medians(runners: dict[str, Any], args: tuple, rounds: int, order: int) -> dict[str, float]:
    """Median ms of each runner over ``rounds`` back-to-back calls after two warm-up calls, one runner after the
    other (``order`` 1 or -1: the runners' order or its reverse). Not interleaved call by call: torch's OpenMP
    threads and onnxruntime's keep spinning for a while after their work, and alternating the two runtimes
    made each one steal the other's cores."""
    out = {}
    for variant in list(runners)[::order]:
        times = interleaved_medians({variant: lambda fn=runners[variant]: fn(*args)}, torch.device("cpu"), warmup=2,
                                    rounds=rounds)  # fmt: skip
        out[variant] = times[variant]["median_ms"]
    return out


def measure_config(name: str, quick: bool, folder: Path) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    config = HarmonizerConfig.paper() if name == "paper" else HarmonizerConfig.small()
    model = HarmonizerNet(config).eval()
    model.personalizer.trained_steps += 1
    spec = ex.ExportSpec(K, "personalized", SIZE)
    t0 = time.perf_counter()
    program = ex.export_program(model, spec)
    trace_s = time.perf_counter() - t0
    files: dict[str, dict[str, Any]] = {}
    for fmt in ex.FORMATS:
        if fmt == "onnx" and ex.onnx_unavailable():
            print(f"  {name}: skipping onnx: {ex.onnx_unavailable()}", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        path = ex.save(program, spec, folder / f"{name}.{fmt}", fmt)
        files[fmt] = {"path": path, "save_s": time.perf_counter() - t0, "bytes": path.stat().st_size}
    runners = {"eager (harmonizer_fast kernels)": lambda *a: model.decode_draws(*a, heads="personalized")}
    loaded = torch.export.load(files["pt2"]["path"]).module()
    runners["exported .pt2 (stock ATen)"] = loaded
    if "onnx" in files:
        import onnxruntime as ort

        session = ort.InferenceSession(str(files["onnx"]["path"]), providers=["CPUExecutionProvider"])
        names = spec.input_names()
        runners["onnxruntime (CPU)"] = lambda *a: session.run(None, {n: t.numpy() for n, t in zip(names, a)})
    rows = []
    for batch in BATCHES:
        args = _inputs(model, batch)
        with torch.no_grad():
            want = [t.numpy() for t in model.decode_draws(*args, heads="personalized")]
            errors = {v: max(float(np.abs(np.asarray(o) - w).max()) for o, w in zip(fn(*args), want))
                      for v, fn in runners.items()}  # fmt: skip
            bad = {v: e for v, e in errors.items() if e > TOLERANCE}
            if bad:
                raise SystemExit(f"{name} B={batch}: outputs differ from eager: {bad}")
            big = name == "paper" and batch > 1
            rounds = (3 if quick else 5) if big else (5 if quick else 10)
            passes = [block_medians(runners, args, rounds, order) for order in (1, -1)]
        eager = np.mean([p["eager (harmonizer_fast kernels)"] for p in passes])
        for variant in runners:
            ms = float(np.mean([p[variant] for p in passes]))
            rows.append({"config": name, "batch": batch, "variant": variant, "median_ms": ms,
                         "pass_medians_ms": [p[variant] for p in passes], "vs_eager": ms / eager,
                         "max_abs_diff": errors[variant]})  # fmt: skip
    exports = [{"config": name, "format": fmt, "bytes": f["bytes"], "export_s": trace_s + f["save_s"],
                "parameters": sum(p.numel() for p in model.parameters())} for fmt, f in files.items()]  # fmt: skip
    return [{"kind": "export", **e} for e in exports] + [{"kind": "latency", **r} for r in rows]


def run(device: torch.device, quick: bool) -> dict[str, Any]:
    if device.type != "cpu":
        raise SystemExit("bench_export.py measures CPU deployment (onnxruntime's CPU provider); use --device cpu")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for name in ("small", "paper") for r in measure_config(name, quick, Path(tmp))]
    return {"rows": rows, "samples": K, "size": list(SIZE), "targets": []}


def render(payload: dict[str, Any]) -> str:
    lines = ["# Export: files and inference through the exported program", "", machine_header(payload), "",
             f"K = {payload['samples']} samples and every rater head per image, {payload['size'][0]} x "
             f"{payload['size'][1]}, float32, random weights (personalizer marked trained); each runtime timed "
             "in its own block, two passes of opposite order, the mean of their medians (per-pass medians in the "
             "JSON); `x eager` = time / the eager model's. Export time: tracing with torch.export, "
             "the decomposition of the custom ops and writing the file.", "",
             "| config | parameters | format | file | export time |", "|---|---|---|---|---|"]  # fmt: skip
    for r in (r for r in payload["rows"] if r["kind"] == "export"):
        lines.append(f"| {r['config']} | {r['parameters'] / 1e6:.2f} M | {r['format']} | {r['bytes'] / 2**20:.1f} MiB "
                     f"| {r['export_s']:.0f} s |")  # fmt: skip
    lines += ["", "| config | B | variant | ms per batch | x eager | max abs diff from eager |",
              "|---|---|---|---|---|---|"]
    for r in (r for r in payload["rows"] if r["kind"] == "latency"):
        lines.append(f"| {r['config']} | {r['batch']} | {r['variant']} | {r['median_ms']:.1f} | {r['vs_eager']:.2f} "
                     f"| {r['max_abs_diff']:.1e} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    # Heap recycled, as harmonizer-fast sample/evaluate run (onnxruntime keeps its own arena either way).
    return bench_main("export", "Export benchmark", __doc__.splitlines()[0], (), run, argv, render=render,
                      quick_help="fewer timing rounds", default_allocator="reuse")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
