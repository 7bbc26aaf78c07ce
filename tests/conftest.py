"""Test setup shared by every op's tests.

Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter, which has to be switched on
before triton is first imported; with a GPU they run compiled on CUDA tensors. Each backend is tested
by forcing it through HARMONIZER_FAST_BACKEND (a forced backend never falls back silently). The C++ CPU
backend is tested once per instruction-set build of its hot loops (baseline, avx2, avx512): every build
this machine's CPU executes runs, the others are skipped with the reason, and the session's summary names
the CPU and the builds that ran.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("HARMONIZER_FAST_BACKEND", None)  # a user's override must not leak into the tests
os.environ.pop("HARMONIZER_FAST_CPU_ISA", None)

import pytest  # noqa: E402

from harmonizer_fast import _backend  # noqa: E402

# (backend, device[, CPU build]) cases; each is skipped with the backend report's reason where it cannot run.
BACKEND_CASES = [
    ("torch", "cpu"),
    *[("cpu", "cpu", isa) for isa in _backend.CPU_ISAS],
    ("triton", "cpu"),
    ("torch", "cuda"),
    ("triton", "cuda"),
    ("cuda", "cuda"),
]
CPU_CASES = [c for c in BACKEND_CASES if c[1] == "cpu"]
GPU_CASES = [c for c in BACKEND_CASES if c[1] == "cuda"]


def rand(shape, device="cpu", dtype=torch.float64, seed=0, scale=1.0):
    """Seeded normal values drawn in float64 on the CPU, then cast: the same numbers on every backend."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def case_id(case):
    return "-".join(case[:1] + case[2:] + case[1:2])  # e.g. "cpu-avx2-cpu"


def _cpu_model() -> str:
    from harmonizer_fast.profiler import cpu_model

    return cpu_model()


def cpu_builds_line() -> str:
    supported = _backend.supported_cpu_isas()
    if not supported:
        return "C++ CPU kernels: not built, their cases were skipped"
    missing = [isa for isa in _backend.CPU_ISAS if isa not in supported]
    lacks = f" (this CPU cannot execute {', '.join(missing)})" if missing else ""
    return f"C++ CPU kernel builds tested on {_cpu_model()}: {', '.join(supported)}{lacks}"


def pytest_terminal_summary(terminalreporter):  # also under -q, where the session header is not shown
    terminalreporter.write_line(cpu_builds_line())


@pytest.fixture
def use_backend(monkeypatch):
    """Force a backend (and for the C++ CPU kernels one instruction-set build) for the rest of the test;
    skip when it cannot run here."""
    restore = []

    def force(backend: str, device: str, isa: str = "") -> torch.device:
        why = _backend._unavailable(backend, device)
        if why:
            pytest.skip(f"{backend} backend on {device}: {why}")
        if isa:
            if isa not in _backend.supported_cpu_isas():
                pytest.skip(f"the {isa} build of the CPU kernels: this CPU ({_cpu_model()}) cannot execute it")
            restore.append(_backend.set_cpu_isa(isa))
        monkeypatch.setenv(_backend.ENV_BACKEND, backend)
        return torch.device(device)

    yield force
    for isa in restore:
        _backend.set_cpu_isa(isa)


@pytest.fixture(autouse=True)
def _no_silent_triton_fallback():
    """On a GPU, a Triton plan that fails and falls back is a test failure, never a silent slowdown
    (gpu_check.sh runs the suite there)."""
    if not torch.cuda.is_available():
        yield
        return
    before = _backend.triton_failures()
    yield
    new = {k: v for k, v in _backend.triton_failures().items() if k not in before}
    assert not new, f"Triton plans fell back on this GPU: {new}"
