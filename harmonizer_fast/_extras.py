"""Optional dependencies: one place that knows which extra installs which module, and one error that says so.

The required dependencies (pyproject.toml) cover import, training, evaluation and prediction on PNG, NumPy
and NIfTI inputs; the rest are extras, imported only by the code paths that need them through
:func:`require`, so a user missing one gets a single line naming the ``pip install`` that fixes it (the
command line prints it and exits 2).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# top-level module -> the extra of harmonizer-fast that installs it (pyproject.toml [project.optional-dependencies])
EXTRAS = {
    "h5py": "h5",
    "pydicom": "dicom",
    "onnx": "export",
    "onnxscript": "export",
    "onnxruntime": "export",
    "torchmetrics": "adapters",
    "monai": "adapters",
    "triton": "gpu",
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def install_hint(modules: list[str]) -> str:
    extras = sorted({EXTRAS[m.split(".")[0]] for m in modules})
    return f"pip install 'harmonizer-fast[{','.join(extras)}]'"


def missing(*modules: str) -> list[str]:
    """The modules of ``modules`` that cannot be imported here (found, not imported)."""
    return [m for m in modules if importlib.util.find_spec(m.split(".")[0]) is None]


def missing_extra(module: str, purpose: str) -> MissingExtraError:
    """The error for ``purpose`` (e.g. "reading DICOM") when ``module`` cannot be imported."""
    top = module.split(".")[0]
    return MissingExtraError(f"{purpose} needs {top}, which is not installed: {install_hint([top])}")


def require(module: str, purpose: str) -> ModuleType:
    """``import module`` for ``purpose``, or :class:`MissingExtraError` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise missing_extra(module, purpose) from exc


def check_available(purpose: str, *modules: str) -> None:
    """Raise :class:`MissingExtraError` for ``purpose`` unless every module of ``modules`` can be imported."""
    absent = missing(*modules)
    if absent:
        raise MissingExtraError(f"{purpose} needs {' and '.join(absent)}, not installed: {install_hint(absent)}")
