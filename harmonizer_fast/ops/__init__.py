"""Layer 1 of the package: fast, autograd-aware, torch.compile-friendly ops (one module per op family)."""

from .attention_pool import token_attention_pool, token_attention_pool_reference
from .film import film, film_reference
from .ged import ged_sums, pairwise_intersection, pairwise_iou, soft_gram
from .haar import (
    haar_dwt2d,
    haar_dwt2d_reference,
    haar_dwt2d_split,
    haar_idwt2d,
    haar_idwt2d_reference,
    haar_idwt2d_split,
)
from .haar3d import haar_dwt3d, haar_dwt3d_reference, haar_idwt3d, haar_idwt3d_reference


def families() -> tuple[str, ...]:
    """The op families, discovered: every public module of this package is one (``haar``, ``ged``, ...), holding
    its custom ops, ``IMPLS``, ``SUPPORT`` and ``DECOMPOSITIONS``; a new op's module is found without a list
    to edit (tests/test_op_registry.py checks that each has every piece)."""
    import pkgutil

    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


def _merged(attr: str, *args) -> dict:
    """The families' tables ``attr`` (a dict, or a function of ``args`` giving one) merged into one."""
    import importlib

    table = {}
    for name in families():
        part = getattr(importlib.import_module(f"{__name__}.{name}"), attr)
        table.update(part(*args) if callable(part) else part)
    return table


def decompositions() -> dict:
    """Every custom op of ``torch.ops.harmonizer_fast`` mapped to its pure-torch reference: the table that
    ``torch.export``'s ``run_decompositions`` takes to turn a program into standard ATen ops (for ONNX, or a
    runtime without this package)."""
    return _merged("DECOMPOSITIONS")


def flop_formulas() -> dict:
    """Op name -> FLOPs of a call from its argument shapes, every op of every family (ops/_examples.py)."""
    return _merged("FLOPS")


def examples(scale: str = "test", dtype=None, device="cpu") -> dict:
    """Op name -> one argument tuple, every op of every family, at ``"test"`` or ``"bench"`` scale
    (ops/_examples.py); float64 by default."""
    import torch

    return _merged("examples", scale, dtype or torch.float64, device)


def _register_decompositions() -> None:
    """Put :func:`decompositions` into torch's global decomposition table.

    ``torch.onnx.export(..., dynamo=True)`` builds its table from ``torch._decomp.decomposition_table`` (the
    ATen decompositions without an ONNX function), so a user's model that calls these ops exports to ONNX with
    no extra step: the exporter replaces each op by its reference. Nothing else reads the table by default
    (eager calls, torch.compile and fake tensors dispatch to the registered kernels); torch's own export
    patches register into it the same way.
    """
    from torch._decomp import decomposition_table

    for op, fn in decompositions().items():
        decomposition_table.setdefault(op, fn)


_register_decompositions()

# GED's conventions and means moved to harmonizer_fast.metrics.energy, its loss to harmonizer_fast.losses
# ([op-registry] #37): the old names keep working for one release, with a DeprecationWarning.
_MOVED = {"ged": "metrics.energy", "ged_terms": "metrics.energy", "GEDTerms": "metrics.energy",
          "ged_loss": "losses", "ged_loss_per_image": "losses"}  # fmt: skip


def _moved(name: str):
    import importlib
    import warnings

    target = _MOVED[name]
    warnings.warn(f"harmonizer_fast.ops.{name} moved to harmonizer_fast.{target}.{name} (hf.{name} where public); "
                  "the old name will be removed", DeprecationWarning, stacklevel=3)  # fmt: skip
    return getattr(importlib.import_module(f"harmonizer_fast.{target}"), name)


def ged(*args, **kwargs):
    """Deprecated here: :func:`harmonizer_fast.metrics.energy.ged` (``hf.ged``)."""
    return _moved("ged")(*args, **kwargs)


def __getattr__(name: str):
    if name in _MOVED and name != "ged":  # ``ged`` is bound above: the submodule ops.ged would shadow a lazy name
        return _moved(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "decompositions",
    "families",
    "film",
    "film_reference",
    "ged_sums",
    "haar_dwt2d",
    "haar_dwt2d_reference",
    "haar_dwt2d_split",
    "haar_dwt3d",
    "haar_dwt3d_reference",
    "haar_idwt2d",
    "haar_idwt2d_reference",
    "haar_idwt2d_split",
    "haar_idwt3d",
    "haar_idwt3d_reference",
    "pairwise_intersection",
    "pairwise_iou",
    "soft_gram",
    "token_attention_pool",
    "token_attention_pool_reference",
]
