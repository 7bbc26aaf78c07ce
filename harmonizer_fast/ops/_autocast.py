"""Autocast rules of the package's custom ops: compute in float32, return what the op promises.

Under ``torch.autocast`` an op receives whatever its producers returned: bfloat16 or float16 from
convolutions and matrix products, float32 from reductions and parameters, often mixed in one call. Without
a rule, torch's dispatcher passes them through untouched: the C++ CPU kernels take no bfloat16 (the call
would fall back to the slow reference) and the ops' same-dtype checks refuse mixed inputs. Each op here
registers one kernel for the ``AutocastCPU`` and ``AutocastCUDA`` dispatch keys that

1. casts every float16 / bfloat16 / float32 tensor argument to float32 (float64 is left alone, as torch's
   own autocast leaves it), so the kernels compute in float32 as docs/architecture.md asks;
2. runs the op with autocast disabled (its autograd records the casts, so gradients arrive in the input
   dtypes);
3. casts float32 results according to the op's policy:

   - ``"promote"``: to the widest floating dtype among the inputs as they arrived (one bfloat16 input gives
     bfloat16 back, bfloat16 with float32 gives float32): the ops that return their input's dtype outside
     autocast (Haar transforms, FiLM), like torch's own "promote" list (``cat``, ``stack``);
   - ``"float32"``: left in float32: softmax-like reductions, losses and metrics (attention pooling, the GED
     family, and the sampling head, whose probabilities are thresholded at 0.5 where bfloat16's spacing of
     2^-9 would flip pixels), as torch's float32 list does for ``softmax`` and the losses.

Argument checks that want one dtype for all tensors admit a mix of float16 / bfloat16 / float32 while
autocast is on for their device (:func:`mixable`), since the autocast kernel reconciles them; casting in the
public function instead would hide the input dtypes from the "promote" rule. Public functions whose every
result is float32 under their policy (attention pooling, the soft IoU and the GED loss) are decorated with
:func:`float32`: under autocast their whole body, the torch code around the op included (projections, sums,
IoU formulas), runs in float32 on float32 copies of the inputs. Rules are registered with :func:`register`
next to each op.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch
from torch import Tensor

F = TypeVar("F", bound=Callable)

POLICIES = ("promote", "float32")
DEVICES = ("cpu", "cuda")
_DISPATCH_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)
_LIB = torch.library.Library("harmonizer_fast", "FRAGMENT")
RULES: dict[str, str] = {}  # op name -> policy, for tests and docs


def active(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` in this thread."""
    return device_type in DEVICES and torch.is_autocast_enabled(device_type)


def mixable(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` may differ in dtype: both float16 / bfloat16 / float32 on one device with
    autocast on for it (the op's autocast kernel computes on both in float32)."""
    return a.device == b.device and a.dtype in _ELIGIBLE and b.dtype in _ELIGIBLE and active(a.device.type)


def _to_float32(value: object, device_type: str) -> object:
    if isinstance(value, Tensor):
        eligible = value.dtype in _ELIGIBLE and value.device.type == device_type
        return value.float() if eligible else value
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(v, device_type) for v in value)
    return value


def float32(fn: F) -> F:
    """Run ``fn`` in float32 under autocast: its positional tensor arguments (float16 / bfloat16 / float32 on
    the autocast device) as float32 copies, its body with autocast off; untouched when autocast is off."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        device = next((a.device.type for a in args if isinstance(a, Tensor)), "")
        if not active(device):
            return fn(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(*_to_float32(args, device), **kwargs)

    return wrapper  # type: ignore[return-value]


def _widest(args: tuple[object, ...]) -> torch.dtype:
    """torch's promotion of the half/single-precision tensor arguments: float16 with bfloat16 gives float32."""
    dtypes = {a.dtype for a in args if isinstance(a, Tensor) and a.dtype in _ELIGIBLE}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _cast_outputs(out: object, dtype: torch.dtype) -> object:
    if isinstance(out, Tensor):
        return out.to(dtype) if out.dtype == torch.float32 else out
    if isinstance(out, (list, tuple)):
        return type(out)(_cast_outputs(o, dtype) for o in out)
    return out


def register(op: object, policy: str) -> None:
    """Register the autocast kernel of ``op`` (a ``torch.library.custom_op`` of namespace harmonizer_fast) for
    CPU and CUDA autocast with ``policy`` (see the module docstring)."""
    if policy not in POLICIES:
        raise ValueError(f"autocast policy must be one of {POLICIES}, got {policy!r}")
    qualname = op._qualname if hasattr(op, "_qualname") else str(op)  # CustomOpDef has no public name
    namespace, name = qualname.split("::")
    if namespace != "harmonizer_fast":
        raise ValueError(f"register: {qualname} is not an op of harmonizer_fast")
    overload = getattr(torch.ops.harmonizer_fast, name).default
    for device_type in DEVICES:

        def kernel(*args: object, _device: str = device_type) -> object:
            with torch.autocast(_device, enabled=False):
                out = overload(*_to_float32(args, _device))
            return out if policy == "float32" else _cast_outputs(out, _widest(args))

        _LIB.impl(name, kernel, _DISPATCH_KEYS[device_type])
    RULES[name] = policy


__all__ = ["POLICIES", "RULES", "active", "float32", "mixable", "register"]
