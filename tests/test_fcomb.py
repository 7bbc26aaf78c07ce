"""The fused sampling head (ops/fcomb.py) on every backend against a float64 transcription of fcomb's
per-pixel MLP, including ragged pixel blocks, widths without a vector specialization and no hidden layer."""

import importlib

import pytest
import torch
from conftest import CPU_CASES, GPU_CASES, case_id, rand

from harmonizer_fast.ops.fcomb import fcomb_head

fcomb_mod = importlib.import_module("harmonizer_fast.ops.fcomb")


def expected(base, bias, hw, hb, lw, lb):
    """float64, one sample at a time, written as the unsplit conv stack would compute it."""
    base, bias, hw, hb, lw, lb = (t.double().cpu() for t in (base, bias, hw, hb, lw, lb))
    out = []
    for k in range(bias.shape[1]):
        h = torch.relu(base + bias[:, k, :, None, None])
        for w, b in zip(hw, hb):
            h = torch.relu(torch.nn.functional.conv2d(h, w[:, :, None, None], b))
        out.append(torch.sigmoid(torch.nn.functional.conv2d(h, lw.reshape(1, -1, 1, 1), lb.reshape(1))[:, 0]))
    return torch.stack(out, dim=1)


def inputs(b, k, c, h, w, layers, device, dtype, seed=0):
    return (
        rand((b, c, h, w), device, dtype, seed),
        rand((b, k, c), device, dtype, seed + 1),
        rand((layers, c, c), device, dtype, seed + 2, scale=c**-0.5),
        rand((layers, c), device, dtype, seed + 3, scale=0.1),
        rand((c,), device, dtype, seed + 4, scale=c**-0.5),
        rand((1,), device, dtype, seed + 5),
    )


# (2, 3, 16, 33, 37, 2): 1221 pixels, several CPU tasks of 512 pixels and a ragged last tile in each build
SHAPES = [(2, 3, 16, 9, 13, 2), (1, 5, 8, 16, 16, 1), (2, 2, 12, 7, 5, 0), (1, 1, 32, 4, 20, 3), (2, 3, 16, 33, 37, 2)]


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_nan_propagates_like_the_reference(case, dtype, use_backend):
    """NaN features give NaN probabilities on every backend (a relu that maps NaN to 0 would turn a NaN
    image into plausible output), for vector-path widths (16) and the generic loop (12)."""
    device = use_backend(*case)
    for c in (16, 12):
        args = list(inputs(2, 3, c, 5, 7, 2, device, dtype))
        args[0][0, 1, 2, 3] = float("nan")  # one feature of one pixel of image 0
        args[1][1, 2, 0] = float("nan")  # one sample's latent bias of image 1
        got = fcomb_head(*args)
        want = expected(*args)
        assert torch.isnan(want).sum() == 3 + 5 * 7  # the pixel in every sample of image 0, image 1's sample 2
        torch.testing.assert_close(got.double().cpu(), want, equal_nan=True, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_transcription(case, shape, dtype, use_backend):
    device = use_backend(*case)
    args = inputs(*shape, device, dtype)
    got = fcomb_head(*args)
    assert got.shape == (shape[0], shape[1], shape[3], shape[4]) and got.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got.double().cpu(), expected(*args), rtol=tol, atol=tol)


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_saturating_logits(case, use_backend):
    """Logits around and past the ends of exp's float range (|logit| near or over 88) give 0 and 1 as the
    float64 transcription does, in the builds whose sigmoid runs on whole vectors (csrc/include/cpu_math.h
    exp_vec) as in the others."""
    device = use_backend(*case)
    base, bias, hw, hb, lw, _ = inputs(2, 4, 16, 6, 11, 2, device, torch.float32, seed=3)
    for lb in (-150.0, -89.0, -86.0, -20.0, 20.0, 86.0, 89.0, 150.0):  # the logits spread a few units around lb
        args = (base, bias, hw, hb, lw, torch.tensor([lb], device=device))
        got = fcomb_head(*args).double().cpu()
        want = expected(*args)
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
        if abs(lb) > 100:
            assert torch.equal(got, (want > 0.5).double())


def test_reference_chunks_over_samples(monkeypatch, use_backend):
    use_backend("torch", "cpu")
    args = inputs(2, 7, 16, 6, 6, 2, "cpu", torch.float32)
    whole = fcomb_head(*args)
    monkeypatch.setattr(fcomb_mod, "REFERENCE_CHUNK", 1)  # one sample per chunk
    torch.testing.assert_close(fcomb_head(*args), whole)


def test_bad_inputs():
    base, bias, hw, hb, lw, lb = inputs(1, 2, 16, 4, 4, 1, "cpu", torch.float32)
    with pytest.raises(ValueError, match="bias must be"):
        fcomb_head(base, bias[:, :, :8], hw, hb, lw, lb)
    with pytest.raises(ValueError, match="base must be"):
        fcomb_head(base[0], bias, hw, hb, lw, lb)
    with pytest.raises(ValueError, match="hidden_w"):
        fcomb_head(base, bias, hw[:, :8], hb, lw, lb)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu(case, dtype, use_backend):
    device = use_backend(*case)
    if case[0] == "cuda":
        pytest.skip("fcomb_head has no CUDA C++ variant (Triton or the reference serve GPUs)")
    args = inputs(3, 50, 16, 33, 40, 2, device, dtype)
    tol = 2e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fcomb_head(*args).double().cpu(), expected(*args), rtol=tol, atol=tol)
