"""Op families are discovered, not listed ([op-registry] #37 item 1): every public module of
``harmonizer_fast.ops`` is a family with every piece the central tools read, and every public module of
``harmonizer_fast.kernels`` a kernel family that gpucheck compiles."""

from __future__ import annotations

import importlib

import pytest
import torch

from harmonizer_fast import gpucheck, ops
from harmonizer_fast._backend import BACKENDS


def _namespace_ops() -> set[str]:
    return {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("harmonizer_fast::")}


def test_the_families_are_the_modules_on_disk():
    assert ops.families() == ("attention_pool", "fcomb", "film", "ged", "haar", "haar3d")
    assert gpucheck.FAMILIES == ops.families()  # every op family has its Triton kernels, checked by gpucheck


@pytest.mark.parametrize("family", ops.families())
def test_every_family_has_every_piece(family):
    mod = importlib.import_module(f"harmonizer_fast.ops.{family}")
    assert isinstance(mod.IMPLS, dict) and mod.IMPLS, family  # op name -> {backend: implementation}
    for name, table in mod.IMPLS.items():
        assert set(table) <= set(BACKENDS) and "torch" in table, (family, name, set(table))  # a reference
        assert hasattr(torch.ops.harmonizer_fast, name), name  # a registered custom op of the namespace
    assert isinstance(mod.SUPPORT, dict) and set(mod.SUPPORT) <= set(BACKENDS), family
    assert mod.DECOMPOSITIONS and all(op.name().startswith("harmonizer_fast::") for op in mod.DECOMPOSITIONS)
    kernels = importlib.import_module(f"harmonizer_fast.kernels.{family}")
    assert callable(kernels.gpu_plans) and kernels.gpu_plans(), family


def test_every_custom_op_belongs_to_a_family():
    decomposed = {op.name().split("::")[1].split(".")[0] for op in ops.decompositions()}
    assert decomposed == _namespace_ops()
