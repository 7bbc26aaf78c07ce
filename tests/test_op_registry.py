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
    assert {"attention_pool", "fcomb", "film", "ged", "haar", "haar3d"} <= set(ops.families())  # and any new one
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


def _family_ops(mod) -> set[str]:
    return {op.name().split("::")[1].split(".")[0] for op in mod.DECOMPOSITIONS}


@pytest.mark.parametrize("family", ops.families())
def test_every_family_describes_each_of_its_ops(family):
    """Example inputs at both scales, a FLOP formula and, in its kernels module, the plans a call runs and
    the compile check's rules: what the export test, the profiler, the compile report and the GPU resource
    script read instead of keeping lists ([op-registry] #37 item 1)."""
    from harmonizer_fast.profiler import count_work

    mod = importlib.import_module(f"harmonizer_fast.ops.{family}")
    kernels = importlib.import_module(f"harmonizer_fast.kernels.{family}")
    names = _family_ops(mod)
    assert set(mod.examples("test")) == set(mod.FLOPS) == names, family
    bench = mod.examples("bench", torch.float32, "meta")  # shapes only: nothing is allocated
    assert set(bench) == names, family
    ours = {getattr(kernels, n) for n in dir(kernels) if n.endswith("_kernel") and hasattr(getattr(kernels, n), "fn")}
    for name, args in mod.examples("test").items():
        work = count_work(lambda: getattr(torch.ops.harmonizer_fast, name)(*args))  # noqa: B023
        assert work and sum(w.flops for w in work.values()) > 0, name  # the formula is registered and counts
        plans = kernels.plans_for(name, *bench[name])
        assert plans and {p.kernel for p in plans} <= ours, name  # this family's own kernels
    assert set(kernels.COMPILE_RULES) <= {k.fn.__name__ for k in ours}, family
    assert {p.name for p in kernels.gpu_plans()} <= set(kernels.COMPILE_RULES), family  # every kernel has rules


def test_kernel_names_are_unique_across_families():
    """The compile check finds a kernel's rules by its name."""
    names = [k for f in ops.families() for k in importlib.import_module(f"harmonizer_fast.kernels.{f}").COMPILE_RULES]
    assert len(names) == len(set(names))


def test_a_typo_in_the_scale_is_an_error():
    with pytest.raises(ValueError, match="scale must be one of"):
        ops.examples("benchmark")
