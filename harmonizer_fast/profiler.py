"""Profiler: parameters per component, multiply-accumulates, latency and the paper's budget (appendix K:
0.42 s per forward and 2.4 G multiply-accumulates per 128 x 128 image on an RTX 3090).

MACs and FLOPs are counted with ``torch.utils.flop_counter`` plus formulas registered here for this
package's custom ops, which the counter would otherwise count as zero (FLOPs = 2 x MACs for products; the
memory-bound ops count one FLOP per arithmetic operation per element).
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from . import ops  # noqa: F401  (defines the custom ops the formulas attach to)
from .model import HarmonizerConfig, HarmonizerNet

PAPER_LATENCY_S = 0.42
PAPER_MACS = 2.4e9
PAPER_PARAMS_M = {"shared": 30.11, "harmonizer": 0.14, "personalizer": 0.07, "total": 30.31}
COMPONENTS = ("backbone", "prior", "posterior", "fcomb", "harmonizer", "personalizer")


def _numel(shape) -> int:
    return math.prod(shape)


# ---------------------------------------------------------------------------------------------------------
# FLOP formulas of the custom ops (arguments arrive as shapes).

_hf = torch.ops.harmonizer_fast


@register_flop_formula(_hf.film)
def _film_flops(x_shape, gamma_shape, beta_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(x_shape)  # one multiply-add per element


@register_flop_formula(_hf.film_backward)
def _film_backward_flops(dy_shape, x_shape, gamma_shape, *args, out_shape=None, **kwargs) -> int:
    return 4 * _numel(x_shape)  # dx = g dy; dgamma += dy x; dbeta += dy


@register_flop_formula(_hf.attention_pool)
def _attention_pool_flops(x_shape, a_shape, *args, out_shape=None, **kwargs) -> int:
    b, c = x_shape[:2]
    n = _numel(x_shape[2:])
    m = a_shape[1]
    return 4 * b * m * c * n  # scores (a x) and the weighted sum over positions


@register_flop_formula(_hf.attention_pool_backward)
def _attention_pool_backward_flops(dz_shape, x_shape, a_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _attention_pool_flops(x_shape, a_shape)


def _haar_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    return 4 * _numel(x_shape)  # each output: three additions and one scaling


for _name in ("haar_dwt2d", "haar_dwt2d_split"):
    register_flop_formula(getattr(_hf, _name))(_haar_flops)


@register_flop_formula(_hf.haar_idwt2d)
def _haar_idwt_flops(y_shape, *args, out_shape=None, **kwargs) -> int:
    return 4 * _numel(y_shape)


@register_flop_formula(_hf.haar_idwt2d_split)
def _haar_idwt_split_flops(lo_shape, hi_shape, *args, out_shape=None, **kwargs) -> int:
    return 4 * (_numel(lo_shape) + _numel(hi_shape))


@register_flop_formula(_hf.fcomb_head)
def _fcomb_head_flops(base_shape, bias_shape, hw_shape, *args, out_shape=None, **kwargs) -> int:
    b, c, p = base_shape
    k, layers = bias_shape[1], hw_shape[0]
    return b * k * p * (c + 2 * layers * c * c + 2 * c)  # bias add, hidden products, last dot


@register_flop_formula(_hf.pairwise_overlap)
def _overlap_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1] * a_shape[2]  # the Gram product


@register_flop_formula(_hf.ged_sums)
def _ged_sums_flops(s_shape, r_shape, *args, out_shape=None, **kwargs) -> int:
    b, k, p = s_shape
    n = r_shape[1]
    return 2 * b * p * (k * n + k * k + n * n)


# ---------------------------------------------------------------------------------------------------------


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


def _time(fn, device: torch.device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def profile(
    config: str = "paper",
    *,
    batch: int = 1,
    samples: int = 1,
    size: int = 128,
    device: str = "cpu",
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Profile one inference forward (features, prior, ``samples`` prior samples through the head) of the
    given config. The budget verdict uses one 128 x 128 image with one sample, as the paper states it."""
    dev = torch.device(device)
    preset = HarmonizerConfig.paper if config == "paper" else HarmonizerConfig.small
    torch.manual_seed(seed)
    model = HarmonizerNet(preset()).to(dev).eval()
    x = torch.randn(batch, model.config.in_channels, size, size, device=dev)
    g = torch.Generator().manual_seed(seed)

    def forward() -> torch.Tensor:
        return model.sample(x, samples, generator=g)

    flops = count_flops(forward)
    one = torch.randn(1, model.config.in_channels, 128, 128, device=dev)
    budget_macs = count_flops(lambda: model.sample(one, 1, generator=g)) / 2
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = _time(forward, dev, repeats, warmup)
    latency = statistics.median(times)
    one_times = _time(lambda: model.sample(one, 1, generator=g), dev, repeats, warmup)
    one_latency = statistics.median(one_times)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
        peak_kind = "CUDA max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak_kind = "process peak RSS"
    return {
        "config": config,
        "batch": batch,
        "samples": samples,
        "size": size,
        "device": _device_info(dev),
        "params": parameters(model),
        "paper_params_m": PAPER_PARAMS_M,
        "macs": flops / 2,
        "flops": flops,
        "latency_s": latency,
        "latency_times_s": times,
        "images_per_s": batch / latency,
        "samples_per_s": batch * samples / latency,
        "peak_memory_mib": peak,
        "peak_memory_kind": peak_kind,
        "budget_forward": {"macs": budget_macs, "latency_s": one_latency, "image": "1 x 128 x 128, 1 sample"},
        "budget": verdict(one_latency, budget_macs),
    }


def _device_info(dev: torch.device) -> dict[str, Any]:
    if dev.type != "cuda":
        import platform

        return {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    info: dict[str, Any] = {"type": "cuda", "name": torch.cuda.get_device_name(dev)}
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(dev.index or 0)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        info.update(memory_total_mib=mem.total / 2**20,
                    sm_clock_mhz=pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                    power_w=pynvml.nvmlDeviceGetPowerUsage(h) / 1e3,
                    utilization_pct=pynvml.nvmlDeviceGetUtilizationRates(h).gpu)  # fmt: skip
    except Exception as exc:  # NVML missing or not permitted: the torch name still identifies the card
        info["nvml"] = f"unavailable ({type(exc).__name__})"
    return info


def markdown(result: dict[str, Any]) -> str:
    p, ref = result["params"], result["paper_params_m"]
    shared = p["backbone"] + p["prior"] + p["posterior"] + p["fcomb"]
    b = result["budget"]
    lines = [
        "| quantity | measured | paper |",
        "|---|---|---|",
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
        f"| peak memory ({result['peak_memory_kind']}) | {result['peak_memory_mib']:.0f} MiB | |",
    ]
    return "\n".join(lines) + "\n"
