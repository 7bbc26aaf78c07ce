"""Run every benchmark and the profiler now, and write one markdown report with bar charts.

The op benchmarks, the end-to-end sampling benchmark and the profiler go into one markdown file with bar
charts of the speedups and the machine they ran on.

    harmonizer-fast bench [--quick] [--device cpu|cuda] [--out DIR] [--only haar,haar3d,film,ged,...]
                          [--isa auto|all|baseline|avx2|avx512]
    python benchmarks/report.py [same options]

``--isa`` runs everything under one instruction-set build (our C++ kernels, ATen and oneDNN capped alike,
benchmarks/common.py ISA_ENV; the report is then ``bench-<device>-<isa>[-quick]``); ``--isa all`` makes
one report per build this CPU executes.

Each benchmark runs in its own process (each pins its allocator policy and measures its own peak memory)
and writes into a fresh scratch folder; the report is built only from those files, so every figure in it
comes from this run. At the end the files move into ``--out`` (default benchmarks/results/):
``bench-<device>[-quick].md`` and ``.json``, one ``bench-<device>[-quick]-<name>.png`` chart per benchmark,
and each benchmark's own JSON and markdown. A benchmark that fails is reported as failed (exit status 1),
and the others still run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import ISA_ENV, RESULTS_DIR, device_slug, isa_label, machine_info, without_option, write_results

BENCHMARKS = {
    "haar": "Haar DWT / IDWT (forward, inverse, backward)",
    "haar3d": "3-D (volumetric) Haar DWT / IDWT against ptwt and PyWavelets",
    "film": "Noise Harmonizer ops: FiLM and token attention pooling",
    "ged": "GED of a batch of K samples against N raters",
    "sampling": "End-to-end sampling, HarmonizerNet paper config",
    "inference": "Inference cost per build: K samples, heads, the CLI sampler, FiLM",
    "metrics": "Multi-rater metric suite (GED, HM-IoU, D_max, S_c, D_a, CI, diversity, S_NCC)",
}
# Benchmarks that are a mode of another script: name -> (script's name, its extra arguments).
MODES = {"haar3d": ("haar", ["--3d"])}
OURS_PREFIXES = ("harmonizer_fast (auto", "sample (ours)")
FLOOR_PREFIXES = ("copy floor", "bf16 bmm ceiling")  # hardware floors, not peers: in the tables, not the charts
CASE_KEYS = ("shape", "op", "B", "K")


def _case(row: dict[str, Any]) -> str:
    parts = []
    for key in CASE_KEYS:
        if key in row:
            value = row[key]
            if key == "shape":  # (name, *dims) in the film benchmark, (*dims) elsewhere
                named = bool(value) and isinstance(value[0], str)
                value = (f"{value[0]} " if named else "") + "x".join(map(str, value[1:] if named else value))
            parts.append(f"{key}={value}" if key in ("B", "K") else value)
    return " ".join(str(p) for p in parts)


def speedup_bars(payload: dict[str, Any]) -> list[tuple[str, float]]:
    """(label, peer time / our time) for every peer row of a benchmark: above 1, ours is faster."""
    return [
        (f"{_case(r)}: {r['variant']}", r["ours_speedup"])
        for r in payload["rows"]
        if "ours_speedup" in r and not r["variant"].startswith(OURS_PREFIXES + FLOOR_PREFIXES)
    ]


def _save_figure(fig, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def chart(name: str, payload: dict[str, Any], path: Path) -> Path:
    """Horizontal bars of the speedups (log scale; green: ours faster, red: ours slower); for the sampling
    benchmark a second panel with our samples/s by batch and K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = speedup_bars(payload)
    sampling = name == "sampling"
    fig, axes = plt.subplots(1, 2 if sampling else 1, figsize=(13 if sampling else 9, 1.2 + 0.24 * len(bars)),
                             squeeze=False)  # fmt: skip
    ax = axes[0][0]
    labels, values = [b[0] for b in bars], [b[1] for b in bars]
    ax.barh(range(len(bars)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.set_yticks(range(len(bars)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("peer time / harmonizer_fast time (log; > 1: ours faster)")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.3g}x", va="center", fontsize=6)
    ax.set_title(f"{name}: speedup of harmonizer_fast over each peer", fontsize=9)
    if sampling:
        ours = [r for r in payload["rows"] if r["variant"].startswith("sample (ours)")]
        ks = sorted({r["K"] for r in ours})
        bs = sorted({r["B"] for r in ours})
        ax2 = axes[0][1]
        width = 0.8 / len(bs)
        for j, b in enumerate(bs):
            vals = [next((r["samples_per_s"] for r in ours if r["B"] == b and r["K"] == k), 0.0) for k in ks]
            ax2.bar([i + j * width for i in range(len(ks))], vals, width, label=f"B={b}")
        ax2.set_xticks([i + width * (len(bs) - 1) / 2 for i in range(len(ks))], [f"K={k}" for k in ks])
        ax2.set_ylabel("samples/s (ours)")
        ax2.set_yscale("log")
        ax2.legend(fontsize=8)
        ax2.set_title("sampling throughput", fontsize=9)
    _save_figure(fig, path)
    plt.close(fig)
    return path


def _demote(markdown: str) -> str:
    """A benchmark's own markdown, headings one level down, its title line dropped."""
    lines = markdown.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join("#" + line if line.startswith("#") else line for line in lines).strip() + "\n"


def render(report: dict[str, Any], stem: str, markdowns: dict[str, str]) -> str:
    m = report["machine"]
    gpu = m["gpu"]
    gpu_text = (f"{gpu['name']} ({gpu['memory_gib']} GiB, {gpu['sm_count']} SMs, driver {gpu.get('driver', '?')})"
                if gpu else "none")  # fmt: skip
    lines = [
        "# harmonizer_fast benchmark report",
        "",
        f"Regenerate with `{report['command']}`. Run on {m['date']} in {report['wall_s']:.0f} s; device "
        f"**{report['device']}**{' (quick: fewer rounds)' if report['quick'] else ''}. Every figure below comes "
        "from this run.",
        "",
        "## Machine",
        "",
        "| CPU | cores | torch threads | GPU | Python | torch | triton | harmonizer_fast | platform |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {m['cpu']} | {m['cpu_cores']} | {m['torch_threads']} | {gpu_text} | {m['python']} | {m['torch']} | "
        f"{m['triton']} | {m['harmonizer_fast']} | {m['platform']} |",
        "",
        "Backends available: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in m["backends"].items()) + ".",
        "",
        "Instruction-set build (--isa " + report.get("isa", "auto") + "): "
        + (isa_label(report["isa_info"]) if report.get("isa_info") else "not recorded") + ".",
        "",
        "## Targets",
        "",
        "| benchmark | target | measured | ok |",
        "|---|---|---|---|",
    ]
    for t in report["targets"]:
        lines.append(f"| {t['benchmark']} | {t['target']} | {t['value']:.3g} | {'yes' if t['ok'] else 'NO'} |")
    if report["failed"]:
        lines += ["", "**Failed:** " + "; ".join(f"{k} ({v})" for k, v in report["failed"].items())]
    if "profile" in markdowns:
        lines += ["", "## Profile (paper config)", "", markdowns["profile"].strip()]
    for name, title in BENCHMARKS.items():
        if name not in report["benchmarks"]:
            continue
        lines += ["", f"## {name}: {title}", "", f"![{name} speedups]({stem}-{name}.png)", "", _demote(markdowns[name])]
    return "\n".join(lines).rstrip() + "\n"


def _shown(path: Path) -> str:
    """A path as the report shows it: relative to the checkout when inside it (the children run there)."""
    try:
        return str(path.resolve().relative_to(HERE.parent))
    except ValueError:
        return str(path.resolve())


def _run(cmd: list[str], log: Path, env: Optional[dict[str, str]] = None) -> int:
    """Run one benchmark to its log. A SIGTERM to this process is passed on to the child, which is waited
    for (killed after 10 s), so stopping ``bench`` never leaves a benchmark running on its own
    ([reliability] #36); Ctrl-C reaches both already (one process group) and is waited for the same way."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=HERE.parent,
                                env=None if env is None else {**os.environ, **env})  # fmt: skip

        def stop(signum: int, _frame: Any) -> None:
            raise SystemExit(128 + signum)

        on_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, stop) if on_main else None
        try:
            return proc.wait()
        finally:
            if proc.poll() is None:  # stopped by a signal or an exception: take the child with us
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if on_main:
                signal.signal(signal.SIGTERM, previous)


def main(argv: Optional[list[str]] = None) -> int:
    import torch

    from harmonizer_fast._io import OutputPathError, check_output_dir
    from harmonizer_fast.cli import Parser, int_at_least

    p = Parser(prog="harmonizer-fast bench", description=__doc__.splitlines()[0])  # errors: one line, exit 2
    p.add_argument("--quick", action="store_true", help="every benchmark in its quick mode (fewer rounds)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the report (default: %(default)s)")
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    p.add_argument("--no-profile", action="store_true", help="leave the profiler out of the report")
    p.add_argument("--numpy-images", type=int_at_least(1), default=None,
                   help="passed to bench_ged.py: images its slow numpy peer is timed on")  # fmt: skip
    p.add_argument("--isa", choices=("auto", "all", *ISA_ENV), default="auto",
                   help="instruction-set build for every benchmark (ISA_ENV); all: one report per build")
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(raw_argv)
    if args.isa == "all":
        import harmonizer_fast as hf

        rest = without_option(raw_argv, "--isa")
        return max(main([*rest, "--isa", isa]) for isa in hf.supported_cpu_isas())
    if args.isa != "auto":
        import harmonizer_fast as hf

        if args.isa not in hf.supported_cpu_isas():
            p.error(f"--isa {args.isa}: this CPU executes {list(hf.supported_cpu_isas())}")
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        p.error(f"--only: expected names from {', '.join(BENCHMARKS)}, got {args.only!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    try:
        check_output_dir(args.out, "--out")
    except OutputPathError as exc:
        p.error(str(exc))
    device = torch.device(args.device)
    isa_args = [] if args.isa == "auto" else ["--isa", args.isa]
    isa_env = ISA_ENV.get(args.isa)
    stem = f"bench-{device_slug(device)}" + ("" if args.isa == "auto" else f"-{args.isa}")
    stem += "-quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix=".bench-", dir=args.out))
    try:
        payloads: dict[str, Any] = {}
        markdowns: dict[str, str] = {}
        failed: dict[str, str] = {}
        for name in names:
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            script, extra = MODES.get(name, (name, []))
            cmd = [sys.executable, _shown(HERE / f"bench_{script}.py"), *extra, "--device", args.device,
                   "--out", _shown(scratch)]  # fmt: skip
            cmd += (["--quick"] if args.quick else []) + isa_args
            if name == "ged" and args.numpy_images is not None:
                cmd += ["--numpy-images", str(args.numpy_images)]
            rc = _run(cmd, scratch / f"{name}.log")
            found = sorted(scratch.glob(f"{name}-*.json"))
            if rc != 0 or len(found) != 1:
                failed[name] = f"exit status {rc}, log {name}.log: " + _tail(scratch / f"{name}.log")
                continue
            # the files record the command that made them: show the folder they end up in, not the scratch one
            payloads[name] = json.loads(found[0].read_text().replace(_shown(scratch), _shown(args.out)))
            markdowns[name] = found[0].with_suffix(".md").read_text().replace(_shown(scratch), _shown(args.out))
            write_results(found[0].stem, payloads[name], markdowns[name], scratch)
        profile = None
        if not args.no_profile:
            print("[bench] profile ...", file=sys.stderr, flush=True)
            cmd = [sys.executable, "-m", "harmonizer_fast.cli", "profile", "--config", "paper", "--samples", "50",
                   "--device", args.device, "--json", str(scratch / "profile.json")]  # fmt: skip
            if _run(cmd, scratch / "profile.log", isa_env) == 0:
                profile = json.loads((scratch / "profile.json").read_text())
                from harmonizer_fast.profiler import markdown as profile_markdown

                markdowns["profile"] = profile_markdown(profile)
            else:
                failed["profile"] = "log profile.log: " + _tail(scratch / "profile.log")
        targets = [{"benchmark": n, **t} for n, pl in payloads.items() for t in pl.get("targets", [])]
        if profile is not None:
            b = profile["budget"]
            targets += [
                {"benchmark": "profile", "target": "G MACs per 128 x 128 forward within 10% of 2.4",
                 "value": profile["budget_forward"]["macs"] / 1e9, "ok": b["macs_ok"]},
                {"benchmark": "profile", "target": "latency per 128 x 128 forward <= 0.42 s",
                 "value": profile["budget_forward"]["latency_s"], "ok": b["latency_ok"]},
            ]  # fmt: skip
        report = {
            "benchmark": "report",
            "command": " ".join(["harmonizer-fast bench", *raw_argv]),
            "device": str(device),
            "quick": args.quick,
            "machine": machine_info(),
            "isa": args.isa,
            "isa_info": next((pl["machine"].get("isa") for pl in payloads.values()), None),
            "benchmarks": payloads,
            "profile": profile,
            "targets": targets,
            "failed": failed,
            "wall_s": time.perf_counter() - t0,
        }
        for name, payload in payloads.items():
            chart(name, payload, scratch / f"{stem}-{name}.png")
        md = render(report, stem, markdowns)
        for f in sorted(scratch.glob("*.json")) + sorted(scratch.glob("*.md")) + sorted(scratch.glob("*.png")):
            if f.name != "profile.json":
                os.replace(f, args.out / f.name)
        json_path, md_path = write_results(stem, report, md, args.out)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(scratch)
    print(md)
    print(f"wrote {md_path}, {json_path} and {len(payloads)} charts in {report['wall_s']:.0f} s", file=sys.stderr)
    return 1 if failed else 0


def _tail(log: Path, lines: int = 3) -> str:
    try:
        return " | ".join(log.read_text().strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


if __name__ == "__main__":
    sys.exit(main())
