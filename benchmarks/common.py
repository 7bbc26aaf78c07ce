"""Shared benchmark plumbing (docs/architecture.md, "Performance method"): timing with medians after warm-up,
the machine description that goes next to every number, forced backends, and atomic JSON + markdown output."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, TypeVar

import torch

from harmonizer_fast._io import write_atomic
from harmonizer_fast.profiler import cpu_model, time_call

RESULTS_DIR = Path(__file__).resolve().parent / "results"
K = TypeVar("K")


def _gpu_info() -> Optional[dict[str, Any]]:
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    info: dict[str, Any] = {
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "sm_count": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}",
    }
    try:  # NVML (nvidia-ml-py) adds what the driver reports
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        info["nvml_name"] = pynvml.nvmlDeviceGetName(h)
        info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        info["max_sm_clock_mhz"] = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)
        info["max_mem_clock_mhz"] = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)
        pynvml.nvmlShutdown()
    except Exception as exc:  # NVML missing or not permitted: the torch-side facts still stand
        info["nvml_error"] = f"{type(exc).__name__}: {exc}"
    return info


def machine_info() -> dict[str, Any]:
    import harmonizer_fast as hf

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": _gpu_info(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "harmonizer_fast": hf.__version__,
        "backends": {k: v.available for k, v in hf.backend_info().items()},
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "isa": isa_info(),
    }


# How each instruction-set build is run: our C++ CPU kernels' clone (HARMONIZER_FAST_CPU_ISA), and the
# same cap for oneDNN (the convolutions) and for ATen's vectorized kernels, so that one AVX-512 machine
# measures what an AVX2-only CPU (or a pre-AVX2 one) would execute. Caches, clocks and memory stay this
# machine's: an emulated figure says which build ran, not which CPU. Both caps must be set before torch
# initializes, hence the re-execution in pin_environment.
_ISA_CAPS = {"avx512": ("AVX512_CORE", "avx512"), "avx2": ("AVX2", "avx2"), "baseline": ("SSE41", "default")}
ISA_ENV = {
    isa: {"HARMONIZER_FAST_CPU_ISA": isa, "ONEDNN_MAX_CPU_ISA": onednn, "ATEN_CPU_CAPABILITY": aten}
    for isa, (onednn, aten) in _ISA_CAPS.items()
}


def isa_info() -> dict[str, Any]:
    """Which builds ran: this CPU's, our kernels', ATen's, and oneDNN's cap (from the environment)."""
    import harmonizer_fast as hf

    return {
        "cpu_supports": list(hf.supported_cpu_isas()),
        "kernels": hf.cpu_isa(),
        "aten": torch.backends.cpu.get_cpu_capability(),
        "onednn_max": os.environ.get("ONEDNN_MAX_CPU_ISA", "(all)"),
    }


def isa_label(info: dict[str, Any]) -> str:
    """One line for a report: the builds that ran, and that it is an emulation where it is."""
    best = info["cpu_supports"][-1] if info["cpu_supports"] else None
    emulated = "" if info["kernels"] == best else f", emulated on a CPU that executes {best}"
    return f"ISA {info['kernels']} (ATen {info['aten']}, oneDNN {info['onednn_max']}{emulated})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stats(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    return {
        "median_ms": statistics.median(times),
        "min_ms": times[0],
        "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
        "repeats": len(times),
    }


def interleaved_medians(
    cases: Mapping[K, Callable[[], Any]],
    device: torch.device,
    *,
    warmup: int,
    rounds: int,
    inner: Callable[[K], int] = lambda key: 1,
    around: Callable[[K], contextlib.AbstractContextManager] = lambda key: contextlib.nullcontext(),
) -> dict[K, dict[str, float]]:
    """Median time (ms) of every case, measured in interleaved rounds.

    Each round times every case once (``inner(key)`` back-to-back calls for fast cases), in an order
    rotated from round to round, so that slow drifts of the machine (allocator and page-cache state, clock
    boost, a neighbour's load) hit all variants alike instead of whichever ran last. CUDA work is timed
    with events, CPU work with ``time.perf_counter``. ``around(key)`` wraps each call (e.g. a forced backend).
    """
    keys = list(cases)
    for key in keys:
        with around(key):
            for _ in range(warmup):
                cases[key]()
    _sync(device)
    times: dict[K, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            n = inner(key)
            with around(key):
                total = 1e3 * sum(time_call(cases[key], device) for _ in range(n))
            times[key].append(total / n)
    return {k: _stats(v) for k, v in times.items()}


@contextlib.contextmanager
def forced_backend(name: Optional[str]) -> Iterator[None]:
    """Run the block with ``HARMONIZER_FAST_BACKEND=name`` (None: the automatic choice)."""
    old = os.environ.get("HARMONIZER_FAST_BACKEND")
    if name is None:
        os.environ.pop("HARMONIZER_FAST_BACKEND", None)
    else:
        os.environ["HARMONIZER_FAST_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HARMONIZER_FAST_BACKEND", None)
        else:
            os.environ["HARMONIZER_FAST_BACKEND"] = old


def timed_backends(op: str, impls: Mapping[str, Any], support: Any, device: torch.device) -> tuple[str, list[str]]:
    """(the backend the automatic choice uses for ``op`` on ``device``, the other backends worth timing).

    The Triton interpreter is a correctness tool, not a fast path: it is never timed on CPU.
    """
    from harmonizer_fast import _backend

    probe = torch.zeros(1, 1, 2, 2, device=device)
    auto = _backend.selected_backend(op, probe, impls, support)
    others = [
        b
        for b in ("triton", "cuda", "cpu")
        if b != auto
        and not _backend._cannot_run(op, b, probe, support)
        and not (b == "triton" and device.type == "cpu")
    ]
    return auto, others


def run_machine() -> dict[str, Any]:
    """The machine line of the LIDC scripts' JSON: the CPU model, torch, Python and the date."""
    return {"cpu": cpu_model(), "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}  # fmt: skip


def measured_or_rendered(out: Path, render: bool, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The result behind ``<out>.json``: ``measure()`` written there atomically, or with ``render`` the JSON
    read back (the scripts that redraw their markdown and figures from it)."""
    json_path = out.with_suffix(".json")
    if render:
        return json.loads(json_path.read_text())
    result = measure()
    write_atomic(json_path, json.dumps(result, indent=1, default=float) + "\n")
    return result


def write_results(stem: str, payload: dict[str, Any], markdown: str, out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    write_atomic(json_path, json.dumps(payload, indent=2, default=str) + "\n")
    write_atomic(md_path, markdown)
    return json_path, md_path


# glibc's malloc serves a large buffer either from fresh mmap pages (first touch page-faults, which on a
# 2-core VM costs more than the transform itself) or from its recycled heap, and by default its mmap
# threshold moves with the allocation history, so one kernel's time depends on what ran before it. The
# benchmarks therefore pin the policy before torch starts and record it next to the numbers.
ALLOCATOR_POLICIES = {
    "fresh": {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)},  # every large tensor: new pages (glibc's start state)
    "reuse": {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**33)},  # recycle, no faults
    "system": {},  # leave glibc's adaptive threshold alone (order-dependent)
}


def pin_environment(policy: str, isa: str = "auto") -> None:
    """Re-execute this script with the glibc allocator policy and the instruction-set build (``ISA_ENV``;
    "auto": the machine's best) set, before torch starts work (no-op when they already are)."""
    env = dict(ALLOCATOR_POLICIES[policy]) if sys.platform == "linux" else {}
    if isa != "auto":
        import harmonizer_fast as hf

        if isa not in hf.supported_cpu_isas():
            raise SystemExit(f"--isa {isa}: this CPU ({cpu_model()}) executes {list(hf.supported_cpu_isas())}")
        env.update(ISA_ENV[isa])
    if all(os.environ.get(k) == v for k, v in env.items()):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        return "gpu-" + torch.cuda.get_device_name(device).lower().replace("nvidia", "").strip().replace(" ", "-")
    return "cpu"


def make_rows(
    shape: Any,
    medians: Mapping[tuple[str, str], dict[str, float]],
    ours: str,
    floor: Optional[str] = None,
    bytes_moved: Optional[Callable[[str], int]] = None,
) -> list[dict[str, Any]]:
    """Result rows from ``{(variant, op): stats}``, with ratios to our variant and to the floor of each op."""
    rows = []
    for (name, op), stats in medians.items():
        row = {"shape": list(shape), "op": op, "variant": name, **stats}
        row["ours_speedup"] = stats["median_ms"] / medians[(ours, op)]["median_ms"]
        if floor is not None and (floor, op) in medians:
            row["of_copy_floor"] = stats["median_ms"] / medians[(floor, op)]["median_ms"]
        if bytes_moved is not None:
            row["gb_per_s"] = bytes_moved(op) / (stats["median_ms"] * 1e-3) / 1e9
        rows.append(row)
    return rows


def machine_header(payload: dict[str, Any]) -> str:
    """The sentence that opens every benchmark report: the command, when, the device, CPU, GPU and versions."""
    m = payload["machine"]
    gpu = m["gpu"]["name"] if m["gpu"] else "none"
    isa = f" {isa_label(m['isa'])}." if "isa" in m else ""
    return (f"`{' '.join(m['argv'])}` on {m['date']}. Device: **{payload['device']}**. CPU: {m['cpu']} "
            f"({m['cpu_cores']} cores, torch threads {m['torch_threads']}); GPU: {gpu}. torch {m['torch']}, "
            f"triton {m['triton']}, Python {m['python']}.{isa}")  # fmt: skip


def report_markdown(title: str, payload: dict[str, Any], ops: Sequence[str]) -> str:
    """Machine header, one table per shape (variants x ops) and the targets, as markdown."""
    m = payload["machine"]
    lines = [
        f"# {title}",
        "",
        f"{machine_header(payload)} Allocator policy `{payload['allocator']}` "
        f"({m['malloc_env'] or 'glibc defaults'}). fp32; medians in ms over interleaved rounds; "
        "`xours` = variant time / harmonizer_fast (auto) time (above 1: ours is faster); "
        "`xcopy` = time / the same-size copy floor.",
        "",
    ]
    rows = payload["rows"]
    for shape in dict.fromkeys(tuple(r["shape"]) for r in rows):
        lines += [f"## {shape}", "", "| variant | " + " | ".join(ops) + " |", "|---|" + "---|" * len(ops)]
        for name in dict.fromkeys(r["variant"] for r in rows if tuple(r["shape"]) == shape):
            mine = {r["op"]: r for r in rows if tuple(r["shape"]) == shape and r["variant"] == name}
            cells = []
            for op in ops:
                r = mine.get(op)
                if r is None:
                    cells.append("n/a")
                    continue
                extra = f", x{r['of_copy_floor']:.2f} copy" if "of_copy_floor" in r else ""
                cells.append(f"{r['median_ms']:.2f} (x{r['ours_speedup']:.2f} ours{extra})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines + targets_table(payload["targets"], 2)) + "\n"


def targets_table(targets: Sequence[dict[str, Any]], digits: int) -> list[str]:
    """The ``## Targets`` section of a benchmark's markdown, as lines."""
    lines = ["## Targets", "", "| target | measured | ok |", "|---|---|---|"]
    return lines + [f"| {t['target']} | {t['value']:.{digits}f} | {'yes' if t['ok'] else 'NO'} |" for t in targets]


def check_targets(checks: Sequence[tuple[str, float, float, bool]]) -> list[dict[str, Any]]:
    """``(target, measured, bound, higher_is_better)`` tuples as pass/fail records."""
    return [
        {"target": name, "value": value, "ok": value >= bound if higher else value <= bound}
        for name, value, bound, higher in checks
    ]


def bench_main(
    name: str,
    title: str,
    description: str,
    ops: Sequence[str],
    run: Callable[[torch.device, bool], dict[str, Any]],
    argv: Optional[list[str]] = None,
    render: Optional[Callable[[dict[str, Any]], str]] = None,
    quick_help: str = "fewer interleaved rounds (a third of the full run)",
    default_allocator: str = "fresh",
    isa_summary: Optional[Callable[[dict[str, Any]], list[str]]] = None,
    flags: Optional[Mapping[str, str]] = None,
) -> int:
    """Command line shared by the benchmarks: parse, pin the allocator, run, write JSON + markdown
    (``render(payload)``, by default the variants x ops tables of :func:`report_markdown`). ``flags``: the
    benchmark's own on/off options (name -> help), which it reads before calling this and which ``--isa all``
    passes on to every build's run."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help=quick_help)
    for flag, help_text in (flags or {}).items():
        p.add_argument(flag, action="store_true", help=help_text)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for the JSON and markdown files")
    p.add_argument(
        "--allocator",
        choices=sorted(ALLOCATOR_POLICIES),
        default=default_allocator,
        help="glibc malloc policy for CPU buffers: fresh pages for every large tensor, recycled heap (kernel "
        "time without page faults), or glibc's adaptive default (order-dependent); default: %(default)s",
    )
    p.set_defaults(default_allocator=default_allocator)
    p.add_argument("--isa", choices=("auto", "all", *ISA_ENV), default="auto",
                   help="instruction-set build to run (ISA_ENV: our kernels, ATen and oneDNN capped alike); all: "
                   "each one this CPU executes, in turn, plus a file that puts their targets side by side")  # fmt: skip
    raw = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(raw)
    if args.isa == "all":
        return run_per_isa(name, raw, args, isa_summary)
    pin_environment(args.allocator, args.isa)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    payload = {
        "benchmark": name,
        "device": str(device),
        "quick": args.quick,
        "allocator": args.allocator,
        "machine": machine_info(),
    }
    payload.update(run(device, args.quick))
    payload["wall_s"] = time.perf_counter() - t0
    md = render(payload) if render is not None else report_markdown(title, payload, ops)
    stem = f"{name}-{device_slug(device)}" + ("" if args.allocator == default_allocator else f"-{args.allocator}")
    stem += "" if args.isa == "auto" else f"-{args.isa}"
    stem += "-quick" if args.quick else ""
    json_path, md_path = write_results(stem, payload, md, args.out)
    print(md)
    print(f"wrote {json_path} and {md_path} in {payload['wall_s']:.0f} s", file=sys.stderr)
    return 0


def without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option`` and its value (``--opt value`` or ``--opt=value``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def run_per_isa(
    name: str, argv: list[str], args: Any, summary: Optional[Callable[[dict[str, Any]], list[str]]] = None
) -> int:
    """``--isa all``: this benchmark once per build the CPU executes (each in its own process), then
    ``<name>-<device>-isas[-quick].json`` and ``.md`` with every build's targets side by side, and
    ``summary({isa: payload})``'s markdown lines (a benchmark's own table across builds) after them."""
    import subprocess

    import harmonizer_fast as hf

    script = Path(sys.argv[0]).resolve()
    base = without_option(without_option(argv, "--isa"), "--out")
    payloads: dict[str, Any] = {}
    markdowns: dict[str, str] = {}
    for isa in hf.supported_cpu_isas():
        print(f"[{name}] --isa {isa} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, str(script), *base, "--isa", isa, "--out", str(args.out)], check=True)
        stem = f"{name}-{device_slug(torch.device(args.device))}"
        allocator = getattr(args, "allocator", "fresh")
        stem += ("" if allocator == getattr(args, "default_allocator", "fresh") else f"-{allocator}") + f"-{isa}"
        stem += "-quick" if args.quick else ""
        payloads[isa] = json.loads((args.out / f"{stem}.json").read_text())
        markdowns[isa] = (args.out / f"{stem}.md").read_text()
    combined = {"benchmark": f"{name}-isas", "device": args.device, "quick": args.quick, "machine": machine_info(),
                "per_isa": payloads}  # fmt: skip
    isas = list(payloads)
    lines = [f"# {name}: every instruction-set build this CPU executes", "",
             f"`{' '.join([Path(sys.argv[0]).name, *argv])}` on {combined['machine']['date']}; CPU "
             f"{combined['machine']['cpu']}. Each build ran in its own process with our kernels, ATen and oneDNN "
             "capped to it (benchmarks/common.py ISA_ENV): a build below the CPU's best is an emulation "
             "(this machine's caches and clocks), which shows what that build costs, not another CPU.", "",
             "| target | " + " | ".join(isas) + " |", "|---|" + "---|" * len(isas)]  # fmt: skip
    # Every build's targets, in first-seen order: a build may lack one (a peer that failed under it).
    targets = list(dict.fromkeys(t["target"] for isa in isas for t in payloads[isa].get("targets", [])))
    for target in targets:
        cells = []
        for isa in isas:
            t = next((t for t in payloads[isa].get("targets", []) if t["target"] == target), None)
            cells.append("-" if t is None else f"{t['value']:.3g} ({'ok' if t['ok'] else 'NO'})")
        lines.append(f"| {target} | " + " | ".join(cells) + " |")
    if summary is not None:
        lines += ["", *summary(payloads)]
    for isa in isas:
        body = markdowns[isa].splitlines()
        lines += ["", f"## {isa}", "", *("#" + ln if ln.startswith("#") else ln for ln in body[1:])]
    stem = f"{name}-{device_slug(torch.device(args.device))}-isas" + ("-quick" if args.quick else "")
    json_path, md_path = write_results(stem, combined, "\n".join(lines).rstrip() + "\n", args.out)
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0
