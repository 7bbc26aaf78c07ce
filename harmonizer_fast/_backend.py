"""Backend selection (docs/architecture.md, "Backends").

Every op has up to four implementations:

``torch``   the pure-PyTorch reference: any device, any floating dtype; the definition of correct.
``triton``  Triton kernels for CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before
            Triton was imported (that is how CI checks them).
``cuda``    the CUDA C++ kernels of the extension ``harmonizer_fast._C``.
``cpu``     the C++ CPU kernels of the same extension.

The choice is made per call from the input: CUDA tensors try triton, then cuda, then torch; CPU tensors
try cpu, then torch. ``HARMONIZER_FAST_BACKEND=torch|triton|cuda|cpu`` forces one; a forced backend
that cannot run the call raises :class:`BackendUnavailableError` with the reason, while the automatic
choice falls back quietly. :func:`backend_info` reports what is available and why the rest is not.

The C++ CPU kernels' hot loops exist in three instruction-set builds (baseline x86-64, AVX2, AVX-512;
``csrc/include/cpu_isa.h``). The best one the CPU executes runs by default; ``HARMONIZER_FAST_CPU_ISA=
baseline|avx2|avx512`` or :func:`set_cpu_isa` selects another, so that one machine can test and benchmark
every build it can execute. A build the CPU cannot execute is refused, never emulated.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any, Optional

import torch

BACKENDS = ("torch", "triton", "cuda", "cpu")
ENV_BACKEND = "HARMONIZER_FAST_BACKEND"
ENV_NO_EXT = "HARMONIZER_FAST_NO_EXT"
ENV_CPU_ISA = "HARMONIZER_FAST_CPU_ISA"
CPU_ISAS = ("baseline", "avx2", "avx512")

_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}

# dtypes an op's backend handles, per device type; the reference ("torch") handles every floating dtype.
Support = Mapping[str, Mapping[str, frozenset]]

FLOATS_CPU = frozenset({torch.float32, torch.float64})
FLOATS_CUDA = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16})
# The Triton interpreter computes with numpy, which has no bfloat16; kernels take no half inputs there.
INTERPRETER_EXCLUDED = frozenset({torch.float16, torch.bfloat16})
# What every op's kernels take unless the op says otherwise: float32/float64 on CPU (C++ kernels and the
# Triton interpreter), plus float16/bfloat16 (computed in float32) on CUDA.
DEFAULT_SUPPORT: Support = {
    "triton": {"cuda": FLOATS_CUDA, "cpu": FLOATS_CPU},
    "cuda": {"cuda": FLOATS_CUDA},
    "cpu": {"cpu": FLOATS_CPU},
}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every implementation computes in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class BackendUnavailableError(RuntimeError):
    """A backend forced through ``HARMONIZER_FAST_BACKEND`` cannot run the requested call."""


class InvalidInputError(ValueError):
    """A kernel (or the check before it) found the user's values invalid, e.g. NaN samples or raters that are not
    0/1 masks: the user's error, raised as it is, never a reason to fall back to another backend."""


@dataclass(frozen=True)
class BackendStatus:
    """Availability of one backend on this machine; ``reason`` says why when it is not available."""

    name: str
    available: bool
    reason: str
    devices: tuple[str, ...]


@cache
def _extension() -> tuple[Optional[ModuleType], str]:
    if os.environ.get(ENV_NO_EXT) == "1":
        return None, f"disabled by {ENV_NO_EXT}=1"
    try:
        return importlib.import_module("harmonizer_fast._C"), ""
    except ModuleNotFoundError:
        return None, (
            "harmonizer_fast._C is not built (installed with HARMONIZER_FAST_NO_EXT=1 or without torch at "
            "build time); reinstall with `pip install --no-build-isolation .`"
        )
    except ImportError as exc:  # typically an ABI mismatch after upgrading torch
        return None, f"harmonizer_fast._C failed to load ({exc}); rebuild it against the installed torch"


def extension() -> Optional[ModuleType]:
    """The loaded extension module ``harmonizer_fast._C``, or None."""
    return _extension()[0]


def supported_cpu_isas() -> tuple[str, ...]:
    """The instruction-set builds of the C++ CPU kernels this CPU executes, lowest first (empty without
    the extension)."""
    ext = extension()
    return tuple(ext.supported_cpu_isas()) if ext is not None else ()


def cpu_isa() -> Optional[str]:
    """The build the C++ CPU kernels run now (``"baseline"``, ``"avx2"`` or ``"avx512"``), or None without
    the extension."""
    ext = extension()
    if ext is None:
        return None
    _cpu_isa_error()  # the environment's choice applies from the first use on
    return ext.cpu_isa()


def set_cpu_isa(name: Optional[str]) -> Optional[str]:
    """Run the C++ CPU kernels' ``name`` build from now on (None or ``"auto"``: the best this CPU executes);
    returns the previous one. Raises ValueError for a build this CPU cannot execute."""
    ext, why = _extension()
    if ext is None:
        raise BackendUnavailableError(f"set_cpu_isa: no C++ CPU kernels here: {why}")
    _cpu_isa_error()
    supported = supported_cpu_isas()
    choice = supported[-1] if name is None or name == "auto" else name
    if choice not in CPU_ISAS:
        raise ValueError(f"set_cpu_isa: expected one of {CPU_ISAS} or 'auto', got {name!r}")
    if choice not in supported:
        raise ValueError(f"set_cpu_isa: this CPU cannot execute the {choice} build; it executes {supported}")
    return ext.set_cpu_isa(choice)


@cache
def _cpu_isa_error() -> str:
    """Apply ``HARMONIZER_FAST_CPU_ISA`` once; the reason it cannot be applied, or ""."""
    ext = extension()
    name = os.environ.get(ENV_CPU_ISA, "").strip().lower()
    if ext is None or name in ("", "auto"):
        return ""
    supported = tuple(ext.supported_cpu_isas())
    if name not in CPU_ISAS:
        return f"{ENV_CPU_ISA}={name!r} is not a CPU build; expected one of {CPU_ISAS} or 'auto'"
    if name not in supported:
        return f"{ENV_CPU_ISA}={name}: this CPU cannot execute that build; it executes {supported}"
    ext.set_cpu_isa(name)
    return ""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@cache
def _triton_import_error() -> str:
    try:
        importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return ""


def _cuda_device_reason() -> str:
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return ""


# Triton failures on this machine: a failing launch plan is recorded by its key (kernel, dtypes, tiles;
# harmonizer_fast.kernels._plan), so only that plan falls back and the op's other plans stay on Triton; a
# failure outside any plan (an implementation raising before it launches) is recorded by op name and stops
# the automatic choice from trying Triton for that op. Each is warned about once.
_TRITON_FAILED: dict[str, str] = {}


class TritonFallbackWarning(UserWarning):
    """A Triton kernel failed and the call ran on the next backend (GPU tests turn it into an error)."""


def triton_failures() -> dict[str, str]:
    """Every Triton plan or op that failed in this process, with its error (empty when none did)."""
    return dict(_TRITON_FAILED)


def _unavailable(backend: str, device: str) -> str:
    """Why ``backend`` cannot run on ``device`` ("cpu" or "cuda") here, or "" when it can."""
    if backend == "torch":
        return _cuda_device_reason() if device == "cuda" else ""
    if backend == "triton":
        if _triton_import_error():
            return _triton_import_error()
        if device == "cpu" and not triton_interpreting():
            return (
                "Triton compiles for GPUs; it runs on CPU tensors only in its interpreter "
                "(set TRITON_INTERPRET=1 before triton is imported)"
            )
        return _cuda_device_reason() if device == "cuda" else ""
    ext, why = _extension()
    if ext is None:
        return why
    if backend == "cuda":
        if device != "cuda":
            return "the cuda backend runs on CUDA tensors only"
        if not getattr(ext, "with_cuda", 0):
            return "harmonizer_fast._C was built without CUDA kernels (no CUDA torch or no nvcc at build time)"
        return _cuda_device_reason()
    if backend == "cpu":
        return _cpu_isa_error() if device == "cpu" else "the cpu backend runs on CPU tensors only"
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


_BACKEND_DEVICES = {"torch": ("cpu", "cuda"), "triton": ("cuda", "cpu"), "cuda": ("cuda",), "cpu": ("cpu",)}


def backend_info() -> dict[str, BackendStatus]:
    """Report every backend's availability on this machine and, for each missing one, why.

    A backend counts as available when it can run on at least one device here; ``devices`` lists them.
    """
    out = {}
    for name, devices in _BACKEND_DEVICES.items():
        reasons = {d: _unavailable(name, d) for d in devices}
        usable = tuple(d for d in devices if not reasons[d])
        why = "" if usable else "; ".join(dict.fromkeys(reasons.values()))
        out[name] = BackendStatus(name, bool(usable), why, usable)
    return out


def format_backend_info() -> str:
    """``backend_info()`` as a small table, for humans."""
    lines = [f"{'backend':8} {'available':9} {'devices':10} reason"]
    for st in backend_info().values():
        lines.append(f"{st.name:8} {'yes' if st.available else 'no':9} {','.join(st.devices) or '-':10} {st.reason}")
    forced = os.environ.get(ENV_BACKEND)
    if forced:
        lines.append(f"{ENV_BACKEND}={forced}")
    if supported_cpu_isas():
        lines.append(f"cpu kernel builds: running {cpu_isa()}, this CPU executes {', '.join(supported_cpu_isas())}")
    return "\n".join(lines)


def forced_backend() -> Optional[str]:
    name = os.environ.get(ENV_BACKEND, "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in BACKENDS:
        raise BackendUnavailableError(f"{ENV_BACKEND}={name!r} is not a backend; expected one of {BACKENDS} or 'auto'")
    return name


def _cannot_run(op: str, backend: str, t: torch.Tensor, support: Support) -> str:
    device = t.device.type
    if device not in ("cpu", "cuda"):
        return "" if backend == "torch" else f"device {t.device} is served by the torch reference only"
    why = _unavailable(backend, device)
    if why:
        return why
    if backend == "torch":
        return ""
    dtypes = support.get(backend, {}).get(device, frozenset())
    if backend == "triton" and device == "cpu":
        dtypes = dtypes - INTERPRETER_EXCLUDED
    if t.dtype not in dtypes:
        names = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes)) or "nothing"
        return f"{op} on the {backend} backend supports {names} on {device}, got {str(t.dtype).replace('torch.', '')}"
    return ""


def _plan(op: str, t: torch.Tensor, impls: Mapping[str, Any], support: Support) -> list[str]:
    """Backends to try for input ``t``, best first; a forced backend that cannot run raises here."""
    forced = forced_backend()
    if forced is not None:
        why = f"{op} has no {forced} implementation" if forced not in impls else _cannot_run(op, forced, t, support)
        if why:
            raise BackendUnavailableError(f"{op}: {ENV_BACKEND}={forced} cannot run this call: {why}")
        return [forced]
    if t.device.type == "cpu" and "cpu" in impls and _cpu_isa_error():
        # An explicit build request that cannot be met is a configuration error, not a reason to fall back.
        raise BackendUnavailableError(f"{op}: {_cpu_isa_error()}")
    return [
        b
        for b in _AUTO_ORDER.get(t.device.type, ("torch",))
        if b in impls and not _cannot_run(op, b, t, support) and not (b == "triton" and op in _TRITON_FAILED)
    ]


def dispatch(
    op: str,
    t: torch.Tensor,
    impls: Mapping[str, Callable[..., Any]],
    support: Support,
    *args: Any,
    check: Optional[Callable[..., None]] = None,
) -> Any:
    """Run ``impls[backend](*args)`` for the backend chosen for input ``t``.

    ``check(backend, *args)`` validates the input's values for that backend (a backend may check them
    itself, at no extra cost) and runs before each backend is tried: its error is the user's, never a reason
    to fall back, and so is an :class:`InvalidInputError` from a kernel that checks while it computes. Only a
    failing Triton kernel (compile or launch) moves the call on to the next backend.
    """
    plan = _plan(op, t, impls, support)
    for backend in plan[:-1]:
        if check is not None:
            check(backend, *args)
        if backend != "triton":
            return impls[backend](*args)
        try:
            return impls[backend](*args)
        except InvalidInputError:  # the user's values, found by the kernel itself
            raise
        except Exception as exc:  # compile or launch failure on this GPU: fall back, and say so once
            key = getattr(exc, "plan_key", op)
            if key not in _TRITON_FAILED:
                _TRITON_FAILED[key] = f"{type(exc).__name__}: {exc}"
                warnings.warn(
                    f"{op}: Triton kernel failed ({_TRITON_FAILED[key]}); falling back",
                    TritonFallbackWarning,
                    stacklevel=3,
                )
    if check is not None:  # the next backend may check what the failed one would have checked in its kernel
        check(plan[-1], *args)
    return impls[plan[-1]](*args)


def selected_backend(op: str, t: torch.Tensor, impls: Mapping[str, Any], support: Support) -> str:
    """The backend :func:`dispatch` would use first for input ``t`` (for reports and benchmarks)."""
    return _plan(op, t, impls, support)[0]
