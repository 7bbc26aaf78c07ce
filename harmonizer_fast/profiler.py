"""Profiler: parameters per component, multiply-accumulates, bytes moved, latency, the paper's budget
(appendix K: 0.42 s per forward and 2.4 G multiply-accumulates per 128 x 128 image on an RTX 3090) and a
roofline projection of the counted work onto that card.

MACs and FLOPs are counted with ``torch.utils.flop_counter`` plus the formulas each op family declares beside
its code (``FLOPS``, registered here), which the counter would otherwise count as zero (FLOPs = 2 x MACs for
products; the memory-bound ops count one FLOP per arithmetic operation per element).

Bytes are the compulsory traffic of each op, derived from the shapes: every input read once and every output
written once (views move nothing; a broadcast operand counts the memory it spans, not its logical size).
That is what a kernel that keeps its working set on chip moves, so it is the memory side of the roofline.
"""

from __future__ import annotations

import functools
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

from . import ops
from ._deprecation import renamed_kwargs
from .model import HarmonizerConfig, HarmonizerNet

PAPER_LATENCY_S = 0.42
PAPER_MACS = 2.4e9
PAPER_PARAMS_M = {"shared": 30.11, "harmonizer": 0.14, "personalizer": 0.07, "total": 30.31}
COMPONENTS = ("backbone", "prior", "posterior", "fcomb", "harmonizer", "personalizer")

# The card the paper's budget is stated for, from NVIDIA's datasheet (GA102 whitepaper v2.1, table "GeForce
# RTX 3090"): 82 SMs at 1695 MHz boost x 128 FP32 lanes x 2 FLOPs, and 19.5 Gbps GDDR6X on a 384-bit bus.
# Peaks, never reached in practice: a projection from them is a lower bound on time, not a measurement.
RTX_3090 = {
    "name": "NVIDIA GeForce RTX 3090 (datasheet peaks)",
    "fp32_flops": 35.58e12,
    "fp16_tensor_flops": 71.16e12,  # dense, FP32 accumulate (GeForce runs FP32-accumulate at half rate)
    "dram_bytes_per_s": 936.2e9,
}
# Eager PyTorch spends a few microseconds of host time per op (dispatch + kernel launch); with the GPU
# asynchronous, a forward of small kernels is bounded below by that host time as well. An assumption, stated.
LAUNCH_OVERHEAD_S = 5e-6


# FLOP formulas of the custom ops: each family's FLOPS, beside its code (ops/_examples.py), registered here.


def _register_flop_formulas() -> None:
    for name, formula in ops.flop_formulas().items():
        register_flop_formula(getattr(torch.ops.harmonizer_fast, name))(formula)


_register_flop_formulas()


# ---------------------------------------------------------------------------------------------------------


@dataclass
class OpWork:
    """What one op did: (FLOPs, compulsory bytes) of each call, kept apart because one op (a convolution)
    can be memory-bound in one layer and compute-bound in the next."""

    per_call: list[tuple[int, int]] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return len(self.per_call)

    @property
    def flops(self) -> int:
        return sum(f for f, _ in self.per_call)

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.per_call)


def _span_bytes(t: torch.Tensor) -> int:
    """Bytes of the memory a tensor addresses: its logical size, or less when strides repeat elements."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    return min(t.numel(), span) * t.element_size()


_ALLOCATIONS = {torch.ops.aten.empty, torch.ops.aten.empty_strided, torch.ops.aten.empty_like}


class WorkCounter(TorchDispatchMode):
    """Records :class:`OpWork` per op under the dispatcher: FLOPs from torch's flop registry (with this
    module's formulas) and compulsory bytes from the shapes. Ops without a formula and not decomposable
    count zero FLOPs, as in ``FlopCounterMode``, so the totals of the two agree."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, OpWork] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet not in flop_registry:
            with self:  # an op without a formula may be a composite of ones that have one (as FlopCounterMode)
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns):
            return out  # a view or an alias: no data moves
        tensors = {id(t): t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        moved = sum(_span_bytes(t) for t in tensors.values())
        if packet not in _ALLOCATIONS:  # an allocation writes nothing; the op that fills it counts the write
            moved += sum(_span_bytes(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        self.ops.setdefault(str(packet), OpWork()).per_call.append((int(flops), moved))
        return out


def count_work(fn: Callable[..., Any], *args: Any) -> dict[str, OpWork]:
    """Per-op :class:`OpWork` of ``fn(*args)`` (no grad)."""
    with torch.no_grad(), WorkCounter() as counter:
        fn(*args)
    return counter.ops


def roofline(work: dict[str, OpWork], peaks: dict[str, Any] = RTX_3090) -> dict[str, Any]:
    """Project counted work onto a device from its peaks (default: the RTX 3090 datasheet).

    Each call takes ``max(flops / fp32 peak, bytes / DRAM bandwidth)`` (the roofline); a call whose
    arithmetic intensity (FLOP/byte) is below the ridge point ``fp32 peak / bandwidth`` is memory-bound, and
    the rows sum the calls of one op on each side of the ridge. The forward
    is projected at ``max(sum of op times, calls x LAUNCH_OVERHEAD_S)``: the GPU's work or the host's
    dispatch of it, whichever is longer. A projection from peaks, not a measurement.
    """
    ridge = peaks["fp32_flops"] / peaks["dram_bytes_per_s"]
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for name, w in work.items():
        for flops, moved in w.per_call:
            bound = "memory" if flops < ridge * moved else "compute"
            row = groups.setdefault((name, bound), {"op": name, "bound": bound, "calls": 0, "flops": 0, "bytes": 0,
                                                    "projected_s": 0.0})  # fmt: skip
            row["calls"] += 1
            row["flops"] += flops
            row["bytes"] += moved
            row["projected_s"] += max(flops / peaks["fp32_flops"], moved / peaks["dram_bytes_per_s"])
    rows = list(groups.values())
    for row in rows:
        row["intensity_flop_per_byte"] = row["flops"] / row["bytes"] if row["bytes"] else None
    rows.sort(key=lambda r: -r["projected_s"])
    gpu_s = sum(r["projected_s"] for r in rows)
    calls = sum(r["calls"] for r in rows)
    memory_rows = [r for r in rows if r["bound"] == "memory"]
    return {
        "device": peaks["name"],
        "peaks": dict(peaks),
        "ridge_flop_per_byte": ridge,
        "launch_overhead_s": LAUNCH_OVERHEAD_S,
        "calls": calls,
        "roofline_s": gpu_s,
        "host_s": calls * LAUNCH_OVERHEAD_S,
        "projected_s": max(gpu_s, calls * LAUNCH_OVERHEAD_S),
        "memory_bound_bytes": sum(r["bytes"] for r in memory_rows),
        "memory_bound_s": sum(r["projected_s"] for r in memory_rows),
        "ops": rows,
        "note": "projection from datasheet peaks (a lower bound on time), not a measurement",
    }


def parameters(model: HarmonizerNet) -> dict[str, int]:
    """Parameters per paper component and in total."""
    out = {c: sum(p.numel() for p in getattr(model, c).parameters()) if getattr(model, c) is not None else 0
           for c in COMPONENTS}  # fmt: skip
    out["total"] = sum(p.numel() for p in model.parameters())
    return out


def count_flops(fn, *args: Any) -> int:
    """FLOPs of ``fn(*args)`` with this package's custom ops counted."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


def verdict(latency_s: float, macs: float) -> dict[str, Any]:
    """The paper's budget: at most 0.42 s per forward, and MACs within 10% of 2.4 G."""
    return {
        "latency_budget_s": PAPER_LATENCY_S,
        "macs_budget": PAPER_MACS,
        "latency_ok": bool(latency_s <= PAPER_LATENCY_S),
        "macs_ok": bool(abs(macs - PAPER_MACS) <= 0.1 * PAPER_MACS),
    }


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes: CUDA events on a GPU (the host returns before the kernels end),
    ``time.perf_counter`` on a CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _time(fn, device: torch.device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    return [time_call(fn, device) for _ in range(repeats)]


def cpu_model() -> str:
    """The CPU's model name (``platform.processor()`` is often empty on Linux; /proc/cpuinfo names it)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@renamed_kwargs(samples="num_samples")
def profile(
    config: str = "paper",
    *,
    batch: int = 1,
    num_samples: int = 1,
    size: int = 128,
    device: str = "cpu",
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Profile one inference forward (features, prior, ``num_samples`` prior samples through the head) of the
    given config. The budget verdict uses one 128 x 128 image with one sample, as the paper states it."""
    dev = torch.device(device)
    preset = HarmonizerConfig.paper if config == "paper" else HarmonizerConfig.small
    torch.manual_seed(seed)
    model = HarmonizerNet(preset()).to(dev).eval()
    x = torch.randn(batch, model.config.in_channels, size, size, device=dev)
    g = torch.Generator().manual_seed(seed)
    forward = functools.partial(model.sample, x, num_samples, generator=g)
    # one counting pass per forward: WorkCounter's FLOPs equal FlopCounterMode's (tests/test_profiler.py)
    work = count_work(forward)
    flops = sum(w.flops for w in work.values())
    one = torch.randn(1, model.config.in_channels, 128, 128, device=dev)
    budget_work = count_work(lambda: model.sample(one, 1, generator=g))
    budget_macs = sum(w.flops for w in budget_work.values()) / 2
    budget_projection = roofline(budget_work)
    projection = roofline(work)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = _time(forward, dev, repeats, warmup)
    latency = statistics.median(times)
    one_latency = statistics.median(_time(lambda: model.sample(one, 1, generator=g), dev, repeats, warmup))
    peak, peak_kind = _peak_memory_mib(dev)
    return {
        "config": config,
        "batch": batch,
        "samples": num_samples,  # the key of published profile JSONs
        "size": size,
        "device": _device_info(dev),
        "params": parameters(model),
        "paper_params_m": PAPER_PARAMS_M,
        "macs": flops / 2,
        "flops": flops,
        "bytes": sum(w.bytes for w in work.values()),
        "memory_bound_bytes": projection["memory_bound_bytes"],
        "latency_s": latency,
        "latency_times_s": times,
        "images_per_s": batch / latency,
        "samples_per_s": batch * num_samples / latency,
        "peak_memory_mib": peak,
        "peak_memory_kind": peak_kind,
        "achieved_flops_per_s": flops / latency,
        "budget_forward": {"macs": budget_macs, "latency_s": one_latency, "image": "1 x 128 x 128, 1 sample"},
        "budget": verdict(one_latency, budget_macs),
        "projection": projection,
        "budget_projection": {k: v for k, v in budget_projection.items() if k != "ops"},
    }


def _peak_memory_mib(dev: torch.device) -> tuple[float, str]:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20, "CUDA max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def _device_info(dev: torch.device) -> dict[str, Any]:
    if dev.type != "cuda":
        import os

        return {"type": "cpu", "name": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads()}
    info: dict[str, Any] = {"type": "cuda", "name": torch.cuda.get_device_name(dev)}
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(dev.index or 0)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        info.update(memory_total_mib=mem.total / 2**20, memory_used_mib=mem.used / 2**20,
                    sm_clock_mhz=pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                    max_sm_clock_mhz=pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
                    memory_clock_mhz=pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
                    power_w=pynvml.nvmlDeviceGetPowerUsage(h) / 1e3,
                    utilization_pct=pynvml.nvmlDeviceGetUtilizationRates(h).gpu)  # fmt: skip
    except Exception as exc:  # NVML missing or not permitted: the torch name still identifies the card
        info["nvml"] = f"unavailable ({type(exc).__name__})"
    return info


def markdown(result: dict[str, Any]) -> str:
    p, ref = result["params"], result["paper_params_m"]
    shared = p["backbone"] + p["prior"] + p["posterior"] + p["fcomb"]
    b = result["budget"]
    d = result["device"]
    if d["type"] == "cuda":
        units = {"memory_total_mib": "MiB", "sm_clock_mhz": "MHz SM", "max_sm_clock_mhz": "MHz SM max",
                 "memory_clock_mhz": "MHz memory", "power_w": "W", "utilization_pct": "% busy"}  # fmt: skip
        extra = ", ".join(f"{d[k]:.0f} {u}" for k, u in units.items() if k in d)
        device = f"{d['name']} ({extra or d.get('nvml', 'no NVML')})"
    else:
        device = f"{d['name']} ({d['cores']} cores, {d['threads']} torch threads)"
    lines = [
        "| quantity | measured | paper |",
        "|---|---|---|",
        f"| device | {device} | RTX 3090 |",
        f"| parameters: backbone + prior + posterior + fcomb | {shared / 1e6:.2f} M | {ref['shared']} M |",
        f"| parameters: harmonizer | {p['harmonizer'] / 1e6:.3f} M | {ref['harmonizer']} M |",
        f"| parameters: personalizer | {p['personalizer'] / 1e6:.3f} M | {ref['personalizer']} M |",
        f"| parameters: total | {p['total'] / 1e6:.2f} M | {ref['total']} M |",
        f"| MACs, 1 x 128 x 128, 1 sample | {result['budget_forward']['macs'] / 1e9:.3f} G | 2.4 G "
        f"({'ok' if b['macs_ok'] else 'NOT within 10%'}) |",
        f"| latency, 1 x 128 x 128, 1 sample | {result['budget_forward']['latency_s']:.3f} s | 0.42 s on an RTX 3090 "
        f"({'ok' if b['latency_ok'] else 'over'}) |",
        f"| this run: B={result['batch']}, K={result['samples']}, {result['size']}^2 | "
        f"{result['latency_s']:.3f} s, {result['macs'] / 1e9:.2f} G MACs, {result['images_per_s']:.1f} images/s, "
        f"{result['samples_per_s']:.0f} samples/s | |",
        f"| compulsory bytes, this run (of which memory-bound ops) | {result['bytes'] / 2**20:.1f} MiB "
        f"({result['memory_bound_bytes'] / 2**20:.1f} MiB) | |",
        f"| achieved rate, this run | {result['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s | |",
        f"| peak memory ({result['peak_memory_kind']}) | {result['peak_memory_mib']:.0f} MiB | |",
    ]
    bp, pr = result["budget_projection"], result["projection"]
    lines += [
        "",
        f"Roofline **projection** onto an RTX 3090 from its datasheet peaks ({pr['peaks']['fp32_flops'] / 1e12:.1f} "
        f"FP32 TFLOP/s, {pr['peaks']['dram_bytes_per_s'] / 1e9:.0f} GB/s, ridge {pr['ridge_flop_per_byte']:.0f} "
        f"FLOP/byte; host dispatch {pr['launch_overhead_s'] * 1e6:.0f} us per op). A lower bound on time, not a "
        "measurement.",
        "",
        "| forward | ops | roofline (GPU work) | host dispatch | projected | memory-bound part |",
        "|---|---|---|---|---|---|",
    ]
    for label, x in (("1 x 128 x 128, 1 sample (budget)", bp),
                     (f"this run: B={result['batch']}, K={result['samples']}", pr)):  # fmt: skip
        lines.append(f"| {label} | {x['calls']} | {x['roofline_s'] * 1e3:.3f} ms | {x['host_s'] * 1e3:.3f} ms | "
                     f"{x['projected_s'] * 1e3:.3f} ms | {x['memory_bound_bytes'] / 2**20:.1f} MiB, "
                     f"{x['memory_bound_s'] * 1e3:.3f} ms |")  # fmt: skip
    lines += ["", "| op (this run, top 10 by projected time) | calls | GFLOP | MiB moved | FLOP/byte | bound | "
              "projected ms |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in pr["ops"][:10]:
        ai = "-" if r["intensity_flop_per_byte"] is None else f"{r['intensity_flop_per_byte']:.1f}"
        lines.append(f"| {r['op']} | {r['calls']} | {r['flops'] / 1e9:.3f} | {r['bytes'] / 2**20:.1f} | {ai} | "
                     f"{r['bound']} | {r['projected_s'] * 1e3:.4f} |")  # fmt: skip
    return "\n".join(lines) + "\n"
