"""Where the model takes a CPU-only route or layout: each was measured on oneDNN's CPU kernels (2 Zen 4 cores,
figures in the callers' docstrings) and is left alone on GPUs, where it was not measured."""

from __future__ import annotations

import torch
from torch import Tensor


def eager_cpu(x: Tensor) -> bool:
    """Whether a CPU-only rewrite of a standard op may run: x on the CPU, and not under torch.compile or
    torch.export, whose graphs (ONNX included) should hold the one standard op."""
    return x.device.type == "cpu" and not (torch.compiler.is_compiling() or torch.compiler.is_exporting())


def channels_last_pays(x: Tensor) -> bool:
    """Whether the prior/posterior encoder's activations go channels-last: on the CPU with AVX2 or AVX-512
    (ATen's capability, which ``ATEN_CPU_CAPABILITY`` caps as the benchmarks' ``--isa`` does) oneDNN runs these
    narrow (16-64 channel) 3x3 convs faster on NHWC: the paper config's prior at B = 16 on 2 Zen 4 cores,
    forward 100-117 -> 81-94 ms, forward + backward 306 -> ~270 ms (AVX2) and 278 -> ~234 ms (AVX-512). Its
    SSE4.1 kernels are slower on NHWC (237-277 -> 355-401 ms), and on GPUs it was not measured: NCHW there."""
    return x.device.type == "cpu" and torch.backends.cpu.get_cpu_capability() != "DEFAULT"
