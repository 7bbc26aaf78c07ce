"""Backend selection, the availability report, running without the extension, and packaging."""

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import harmonizer_fast as hf
from harmonizer_fast import _backend
from harmonizer_fast.ops.haar import IMPLS, SUPPORT

ROOT = Path(__file__).resolve().parents[1]


def test_backend_info_reports_every_backend_with_reasons():
    info = hf.backend_info()
    assert list(info) == ["torch", "triton", "cuda", "cpu"]
    assert info["torch"].available and "cpu" in info["torch"].devices
    for status in info.values():
        assert status.available == bool(status.devices)
        assert bool(status.reason) != status.available, status  # a reason exactly when missing
    if not torch.cuda.is_available():
        assert not info["cuda"].available
        assert "CUDA" in info["cuda"].reason or "not built" in info["cuda"].reason
    text = hf.format_backend_info()
    for name in info:
        assert name in text


def test_dispatch_falls_back_from_a_failing_triton_kernel_once(monkeypatch):
    if _backend._unavailable("triton", "cpu"):
        pytest.skip("needs the Triton interpreter")
    calls = []

    def broken(*args):
        calls.append("triton")
        raise RuntimeError("no kernel image for this GPU")

    impls = dict(IMPLS["haar_idwt2d"], triton=broken)
    monkeypatch.setitem(_backend._AUTO_ORDER, "cpu", ("triton", "cpu", "torch"))
    monkeypatch.setattr(_backend, "_TRITON_FAILED", {})
    y = torch.randn(1, 1, 4, 2, 2)
    args = (y[:, :, 0], y[:, :, 1:], 4, 4)
    with pytest.warns(UserWarning, match="Triton kernel failed"):
        out = _backend.dispatch("test_op", y, impls, SUPPORT, *args)
    torch.testing.assert_close(out, hf.haar_idwt2d(y))
    _backend.dispatch("test_op", y, impls, SUPPORT, *args)  # no second attempt, no second warning
    assert calls == ["triton"]
    monkeypatch.setenv(_backend.ENV_BACKEND, "triton")  # forced: the failure propagates
    with pytest.raises(RuntimeError, match="no kernel image"):
        _backend.dispatch("test_op", y, impls, SUPPORT, *args)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HARMONIZER_FAST_", "TRITON_"))}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True, text=True, timeout=300
    )


def test_package_works_without_the_extension():
    proc = _run(
        """
        import numpy as np, pywt, torch, harmonizer_fast as hf
        info = hf.backend_info()
        assert not info["cpu"].available and "HARMONIZER_FAST_NO_EXT" in info["cpu"].reason, info["cpu"]
        x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
        ca, (ch, cv, cd) = pywt.dwt2(x.numpy(), "haar", mode="zero")
        np.testing.assert_allclose(hf.haar_dwt2d(x).numpy(), np.stack([ca, ch, cv, cd], 2), atol=1e-12)
        import os; os.environ["HARMONIZER_FAST_BACKEND"] = "cpu"
        try:
            hf.haar_dwt2d(x)
        except hf.BackendUnavailableError as e:
            assert "HARMONIZER_FAST_NO_EXT" in str(e), e
        else:
            raise AssertionError("forced cpu backend ran without the extension")
        print("ok")
        """,
        HARMONIZER_FAST_NO_EXT="1",
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_wheel_installs_kernels_under_the_package(tmp_path):
    """`pip install .` puts kernels/ at harmonizer_fast/kernels, never as a top-level `kernels` package."""
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-compile",
         "--target", str(target), str(ROOT)],
        env={**os.environ, "HARMONIZER_FAST_NO_EXT": "1", "PIP_NO_INPUT": "1"}, capture_output=True, text=True,
        timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (target / "harmonizer_fast" / "kernels" / "haar.py").is_file()
    assert (target / "harmonizer_fast" / "ops" / "haar.py").is_file()
    assert not (target / "kernels").exists()
    check = subprocess.run(
        [sys.executable, "-c", "import harmonizer_fast.kernels, harmonizer_fast as hf; print(hf.__file__)"],
        env={**os.environ, "PYTHONPATH": str(target), "HARMONIZER_FAST_NO_EXT": "1"}, capture_output=True,
        text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip().startswith(str(target))


def _needs_extension():
    if not _backend.supported_cpu_isas():
        pytest.skip(f"the C++ CPU kernels are not built: {_backend._unavailable('cpu', 'cpu')}")


def test_cpu_isa_selection_and_refusals():
    _needs_extension()
    supported = hf.supported_cpu_isas()
    assert supported[0] == "baseline" and set(supported) <= set(_backend.CPU_ISAS)
    assert hf.cpu_isa() == supported[-1]  # the best build runs by default
    try:
        for isa in supported:
            hf.set_cpu_isa(isa)
            assert hf.cpu_isa() == isa
        for isa in [i for i in _backend.CPU_ISAS if i not in supported]:
            with pytest.raises(ValueError, match=f"cannot execute the {isa} build"):
                hf.set_cpu_isa(isa)
            assert hf.cpu_isa() == supported[-1]  # a refused request changes nothing
        with pytest.raises(ValueError, match="expected one of"):
            hf.set_cpu_isa("sse9")
    finally:
        hf.set_cpu_isa(None)
    assert hf.cpu_isa() == supported[-1]


def test_cpu_isa_switch_reaches_the_kernels():
    """The baseline build has no FMA, the avx2 build contracts a*b+c into FMA: the fused sampling head then
    rounds differently in the last bits, which shows each call ran the selected build (both stay within
    float32 tolerance of the reference, which the fcomb tests check per build)."""
    _needs_extension()
    if "avx2" not in hf.supported_cpu_isas():
        pytest.skip("needs a CPU that executes two builds")
    from harmonizer_fast.ops.fcomb import fcomb_head

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(s, generator=g) for s in ((2, 16, 8, 8), (2, 5, 16), (3, 16, 16), (3, 16), (16,), (1,))]
    out = {}
    try:
        for isa in ("baseline", "avx2"):
            hf.set_cpu_isa(isa)
            out[isa] = fcomb_head(*args)
    finally:
        hf.set_cpu_isa(None)
    torch.testing.assert_close(out["baseline"], out["avx2"])
    assert not torch.equal(out["baseline"], out["avx2"])


def test_cpu_isa_from_the_environment():
    _needs_extension()
    proc = _run(
        """
        import torch, harmonizer_fast as hf
        print(hf.cpu_isa())
        """,
        HARMONIZER_FAST_CPU_ISA="baseline",
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "baseline", proc.stderr
    proc = _run(
        """
        import torch, harmonizer_fast as hf
        print(hf.backend_info()["cpu"].reason)
        try:
            hf.haar_dwt2d(torch.randn(1, 1, 4, 4))
        except hf.BackendUnavailableError as e:
            print(e)
        """,
        HARMONIZER_FAST_CPU_ISA="sse9",
    )
    assert proc.returncode == 0, proc.stderr
    report, error = proc.stdout.strip().splitlines()
    assert "HARMONIZER_FAST_CPU_ISA='sse9' is not a CPU build" in report
    assert error.startswith("haar_dwt2d") and "not a CPU build" in error


def test_a_bad_input_raises_before_dispatch_and_keeps_triton(monkeypatch):
    """A NaN input on the automatic path is the user's error: it raises as such, and Triton stays the first
    choice for the next (valid) call instead of being disabled as if its kernel had failed."""
    if _backend._unavailable("triton", "cpu"):
        pytest.skip("needs the Triton interpreter")
    monkeypatch.setitem(_backend._AUTO_ORDER, "cpu", ("triton", "cpu", "torch"))
    monkeypatch.setattr(_backend, "_TRITON_FAILED", {})
    samples, raters = torch.rand(1, 3, 8, 8), (torch.rand(1, 2, 8, 8) > 0.5).float()
    with pytest.raises(ValueError, match=r"samples must hold probabilities, finite and within \[0, 1\]"):
        hf.ged(samples.masked_fill(samples > 0.9, float("nan")), raters)
    with pytest.raises(ValueError, match="raters must be binary"):
        hf.ged(samples, raters * 0.5)
    assert _backend._TRITON_FAILED == {}
    ged_mod = importlib.import_module("harmonizer_fast.ops.ged")
    probe = ged_mod._flat(samples)
    assert _backend.selected_backend("ged_sums", probe, ged_mod.IMPLS["ged_sums"], ged_mod.BINARY_SUPPORT) == "triton"
    got = hf.ged(samples, raters)  # on Triton (the interpreter)
    assert _backend._TRITON_FAILED == {}
    monkeypatch.setenv(_backend.ENV_BACKEND, "torch")
    torch.testing.assert_close(got, hf.ged(samples, raters))


def test_workflow_submodules_load_on_first_use():
    """``hf.losses.total_loss`` works after a bare ``import harmonizer_fast`` (the README's example), and the
    import itself pulls in neither scipy nor the workflow modules; an unknown name is still AttributeError."""
    proc = _run(
        """
        import sys, harmonizer_fast as hf
        assert "scipy" not in sys.modules and "harmonizer_fast.metrics" not in sys.modules
        assert callable(hf.losses.total_loss) and callable(hf.metrics.evaluate_batch)
        assert "harmonizer_fast.metrics" in sys.modules and "metrics" in dir(hf)
        try:
            hf.not_a_module
        except AttributeError as e:
            print(e)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "has no attribute 'not_a_module'" in proc.stdout
