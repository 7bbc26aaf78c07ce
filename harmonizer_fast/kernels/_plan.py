"""Launch plans as data: what a Triton launcher runs, in a form that can be compiled without launching.

Every launcher in this package builds a :class:`LaunchPlan` (kernel, pointer dtypes, constexprs,
num_warps, num_stages) from its input's shape and dtype with a ``plan_*`` function, then launches that
plan. The same functions feed ``harmonizer_fast.gpucheck``, which compiles the plans ahead of time for
real NVIDIA targets on a machine without a GPU (registers, spills, shared memory, tensor-core
instructions): the check compiles exactly what production launches, never a hand-copied list.

A plan that fails to compile or launch is remembered by its key, so only that plan (one kernel, one tile
configuration, one dtype) falls back; the op's other plans keep running on Triton.
Installed as ``harmonizer_fast.kernels._plan``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

# CUDA's grid limits: x up to 2^31 - 1, y and z up to 65,535 blocks.
GRID_LIMITS = (2**31 - 1, 65535, 65535)

_PTR_TYPES = {
    torch.float32: "*fp32",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.float64: "*fp64",
    torch.uint8: "*u8",
    torch.int32: "*i32",
    torch.int64: "*i64",
}

# The compile check's rules (harmonizer_fast.gpucheck.problems), which each kernel family states for its kernels
# in ``COMPILE_RULES`` (kernel name -> a set of these, or a function of the plan key giving one).
NO_SPILL = frozenset({"no_spill"})  # registers only: a spill on any target is a failure
TENSOR_CORES = frozenset({"tensor_cores"})  # the SASS must hold tensor-core instructions
IEEE_FP32 = frozenset({"ieee_fp32"})  # the SASS must hold no TF32 tensor-core instruction


def rules_for(table: dict[str, Any], kernel: str, plan_key: str) -> frozenset:
    """The rules ``table`` (a family's ``COMPILE_RULES``) states for one plan of ``kernel``; empty if none."""
    rule = table.get(kernel, frozenset())
    return rule(plan_key) if callable(rule) else rule

# Plans that failed on this machine, by key, with the error; see harmonizer_fast._backend.dispatch.
FAILED: dict[str, str] = {}


class TritonPlanError(RuntimeError):
    """A Triton plan failed to compile or launch (or failed before in this process)."""

    def __init__(self, plan_key: str, message: str) -> None:
        super().__init__(f"{plan_key}: {message}")
        self.plan_key = plan_key


def pointer_type(dtype: torch.dtype) -> str:
    """Triton's signature type of a pointer to ``dtype`` elements (``*fp32``, ...)."""
    return _PTR_TYPES[dtype]


def check_grid(grid: tuple[int, ...], what: str) -> tuple[int, ...]:
    """Raise ValueError when ``grid`` exceeds CUDA's launch limits (the caller must split the work)."""
    for axis, (n, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if n > limit:
            raise ValueError(f"{what}: grid axis {'xyz'[axis]} needs {n} blocks, CUDA allows at most {limit}")
    return grid


@dataclass(frozen=True)
class LaunchPlan:
    """One compiled configuration of one Triton kernel.

    ``pointers`` gives the element type of every pointer argument, ``floats`` names the scalar arguments
    passed as float32 (every other scalar is an integer), ``constexprs`` the compile-time constants.
    ``bounded`` names integer arguments whose products with in-range indices the launcher keeps below
    2^31 by a routing rule (a bigger input goes to another backend): the compile check's int32-offset rule
    (``gpucheck.int32_size_products``) trusts them.
    """

    kernel: Any  # a triton JITFunction
    pointers: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int = 4
    num_stages: int = 3
    floats: tuple[str, ...] = ()
    bounded: tuple[str, ...] = ()
    op: str = field(default="", compare=False)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def key(self) -> str:
        ptrs = ",".join(t.lstrip("*") for _, t in self.pointers)
        consts = ",".join(f"{k}={getattr(v, 'name', v)}" for k, v in self.constexprs)
        return f"{self.name}[{ptrs}|{consts}|w{self.num_warps}s{self.num_stages}]"

    def signature(self, large: frozenset[str] = frozenset()) -> dict[str, str]:
        """Triton's signature of the plan; integer scalars named in ``large`` are int64 (values >= 2^31)."""
        ptrs = dict(self.pointers)
        consts = dict(self.constexprs)
        sig = {}
        for arg in self.kernel.arg_names:
            if arg in consts:
                sig[arg] = "constexpr"
            elif arg in ptrs:
                sig[arg] = ptrs[arg]
            elif arg in self.floats:
                sig[arg] = "fp32"
            else:
                sig[arg] = "i64" if arg in large else "i32"
        missing = set(ptrs) - set(sig)
        if missing:
            raise ValueError(f"{self.name}: plan names unknown pointer arguments {sorted(missing)}")
        return sig

    def launch(self, grid: tuple[int, ...], *args: Any) -> None:
        """Launch on ``grid`` with ``args`` (every non-constexpr argument, in order), on the device of the
        first tensor argument (the current CUDA device may be another one)."""
        if self.key in FAILED:
            raise TritonPlanError(self.key, f"failed before in this process ({FAILED[self.key]})")
        check_grid(grid, self.name)
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        guard = torch.cuda.device(device) if device is not None and device.type == "cuda" else contextlib.nullcontext()
        try:
            with guard:
                self.kernel[grid](*args, **dict(self.constexprs), num_warps=self.num_warps, num_stages=self.num_stages)
        except Exception as exc:  # compile or launch failure of this plan on this machine
            FAILED[self.key] = f"{type(exc).__name__}: {exc}"
            raise TritonPlanError(self.key, FAILED[self.key]) from exc


def make_plan(kernel: Any, pointers: dict[str, torch.dtype], constexprs: dict[str, Any], **kwargs: Any) -> LaunchPlan:
    """A :class:`LaunchPlan` from torch dtypes per pointer argument."""
    return LaunchPlan(
        kernel,
        tuple((k, pointer_type(v)) for k, v in pointers.items()),
        tuple(constexprs.items()),
        **kwargs,
    )
