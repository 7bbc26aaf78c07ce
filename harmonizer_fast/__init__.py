"""harmonizer_fast: the Harmonizer Network (arXiv 2605.08210) for multi-rater medical segmentation, on
custom Triton, CUDA C++ and C++ CPU kernels.

Ops (layer 1), each with a pure-PyTorch reference and faster backends picked per call
(see :func:`backend_info` and ``HARMONIZER_FAST_BACKEND``; :func:`set_cpu_isa` picks the C++ CPU kernels'
instruction-set build):

- :func:`haar_dwt2d` / :func:`haar_idwt2d`: single-level 2-D Haar DWT and inverse (pywt convention);
- :func:`haar_dwt3d` / :func:`haar_idwt3d`: the volumetric (3-D) pair, ``pywt.dwtn`` over the last three axes;
- :class:`DWTForward` / :class:`DWTInverse`, :func:`dwt2` / :func:`idwt2`: drop-ins for pytorch_wavelets
  and PyWavelets (Haar, zero mode);
- :func:`film`: the Noise Harmonizer's FiLM modulation (paper Eq. 3) with a fused deterministic backward;
- :func:`token_attention_pool`: the Noise Harmonizer's token attention over positions (paper Eq. 2), one
  pass over the feature map with an online softmax;
- :func:`pairwise_iou`, :func:`ged` / :func:`ged_terms` (generalized energy distance, four published
  conventions) and :func:`ged_loss` (paper Eq. 7): K x K mask comparisons as fused Gram products.

Model (layer 2): :class:`HarmonizerNet` and :class:`HarmonizerConfig` (``paper()``, ``small()``,
``baseline()``), with its objectives in :mod:`harmonizer_fast.losses`.

Evaluation metrics of the field (Dice variants, calibration, uncertainty analyses): :mod:`harmonizer_fast.metrics`.

The workflow submodules (``hf.losses``, ``hf.metrics``, ``hf.evaluate``, ``hf.train``, ...) load on first
attribute access, so ``import harmonizer_fast`` stays light (no scipy, no data readers).
"""

import importlib

from ._backend import (
    BackendStatus,
    BackendUnavailableError,
    backend_info,
    cpu_isa,
    format_backend_info,
    set_cpu_isa,
    supported_cpu_isas,
)
from ._version import __version__
from .losses import ged_loss
from .model import HarmonizerConfig, HarmonizerNet
from .ops import (
    film,
    haar_dwt2d,
    haar_dwt3d,
    haar_idwt2d,
    haar_idwt3d,
    pairwise_iou,
    token_attention_pool,
)
from .wavelets import DWTForward, DWTInverse, dwt2, idwt2

# Submodules reachable as attributes without an explicit import (PEP 562): users write hf.losses.total_loss
# as they write torch.nn.functional.
_LAZY_SUBMODULES = frozenset(
    {"checkpoint", "data", "demo", "distributed", "evaluate", "figures", "losses", "metrics", "predict",
     "preprocessing", "pretrained", "profiler", "rundir", "sampling", "selection", "train"}
)  # fmt: skip


# Public names whose modules load on first use (prediction pulls in the image readers).
_LAZY_ATTRIBUTES = {"Predictor": "predict", "load_pretrained": "pretrained", "Preprocessing": "preprocessing",
                    "ged": "metrics.energy", "ged_terms": "metrics.energy", "GEDTerms": "metrics.energy"}  # fmt: skip


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_ATTRIBUTES:
        value = getattr(importlib.import_module(f".{_LAZY_ATTRIBUTES[name]}", __name__), name)
        globals()[name] = value  # an ordinary attribute from now on (torch.compile traces through it)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY_SUBMODULES | set(_LAZY_ATTRIBUTES))


__all__ = [
    "BackendStatus",
    "BackendUnavailableError",
    "DWTForward",
    "DWTInverse",
    "GEDTerms",
    "HarmonizerConfig",
    "HarmonizerNet",
    "__version__",
    "backend_info",
    "cpu_isa",
    "dwt2",
    "film",
    "format_backend_info",
    "ged",
    "ged_loss",
    "ged_terms",
    "haar_dwt2d",
    "haar_dwt3d",
    "haar_idwt2d",
    "haar_idwt3d",
    "idwt2",
    "pairwise_iou",
    "set_cpu_isa",
    "supported_cpu_isas",
    "token_attention_pool",
]
