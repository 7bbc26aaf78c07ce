"""Test setup shared by every op's tests.

Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter, which has to be switched on
before triton is first imported; with a GPU they run compiled on CUDA tensors. Each backend is tested
by forcing it through HARMONIZER_FAST_BACKEND (a forced backend never falls back silently).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("HARMONIZER_FAST_BACKEND", None)  # a user's override must not leak into the tests

import pytest  # noqa: E402

from harmonizer_fast import _backend  # noqa: E402

# (backend, device) pairs; each is skipped with the backend report's reason where it cannot run.
BACKEND_CASES = [
    ("torch", "cpu"),
    ("cpu", "cpu"),
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
    return f"{case[0]}-{case[1]}"


@pytest.fixture
def use_backend(monkeypatch):
    """Force a backend for the rest of the test; skip when it cannot run here."""

    def force(backend: str, device: str) -> torch.device:
        why = _backend._unavailable(backend, device)
        if why:
            pytest.skip(f"{backend} backend on {device}: {why}")
        monkeypatch.setenv(_backend.ENV_BACKEND, backend)
        return torch.device(device)

    return force
