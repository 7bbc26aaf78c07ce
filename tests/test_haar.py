"""Haar DWT/IDWT: every backend against float64 PyWavelets and the torch reference, the drop-ins against
pytorch_wavelets, gradients, torch.library contracts and bad inputs."""

import numpy as np
import pytest
import pywt
import torch
from conftest import CPU_CASES, GPU_CASES, case_id, rand
from hypothesis import given, settings
from hypothesis import strategies as st

import harmonizer_fast as hf
from harmonizer_fast import _backend
from harmonizer_fast.ops.haar import (
    IMPLS,
    SUPPORT,
    haar_dwt2d_split,
    haar_idwt2d_reference,
    haar_idwt2d_split,
)

# Odd, even and tiny planes; small enough for the Triton interpreter.
SHAPES = [(1, 1, 1, 1), (1, 1, 1, 6), (2, 3, 2, 2), (2, 3, 7, 9), (1, 2, 16, 10), (3, 1, 33, 1), (1, 2, 5, 70)]


def pywt_dwt(x: torch.Tensor) -> np.ndarray:
    """(N, C, 4, h, w) from pywt in float64: the independent reference."""
    ca, (ch, cv, cd) = pywt.dwt2(x.detach().cpu().double().numpy(), "haar", mode="zero")
    return np.stack([ca, ch, cv, cd], axis=2)


def pywt_idwt(y: torch.Tensor) -> np.ndarray:
    y64 = y.detach().cpu().double().numpy()
    return pywt.idwt2((y64[:, :, 0], (y64[:, :, 1], y64[:, :, 2], y64[:, :, 3])), "haar", mode="zero")


def views(x: torch.Tensor):
    """The input itself and non-contiguous views of the same values' layout family."""
    yield "contiguous", x
    yield "transposed", x.transpose(-1, -2).contiguous().transpose(-1, -2)
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    big = torch.zeros(x.shape[0], x.shape[1] + 1, x.shape[2] + 2, 2 * x.shape[3] + 1, dtype=x.dtype, device=x.device)
    big[:, 1:, 2:, 1::2] = x
    yield "strided", big[:, 1:, 2:, 1::2]


# ---------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dwt_matches_pywt_float64(case, shape, use_backend):
    device = use_backend(*case)
    x = rand(shape, device)
    y = hf.haar_dwt2d(x)
    assert y.shape == (shape[0], shape[1], 4, (shape[2] + 1) // 2, (shape[3] + 1) // 2)
    assert y.dtype == torch.float64
    np.testing.assert_allclose(y.cpu().numpy(), pywt_dwt(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_idwt_matches_pywt_float64(case, shape, use_backend):
    device = use_backend(*case)
    n, c, h, w = shape
    y = rand((n, c, 4, h, w), device, seed=1)
    x = hf.haar_idwt2d(y)
    assert x.shape == (n, c, 2 * h, 2 * w)
    np.testing.assert_allclose(x.cpu().numpy(), pywt_idwt(y), rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_restores_odd_sizes(case, shape, use_backend):
    device = use_backend(*case)
    x = rand(shape, device, seed=2)
    back = hf.haar_idwt2d(hf.haar_dwt2d(x), size=x.shape[-2:])
    assert back.shape == x.shape
    torch.testing.assert_close(back, x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (1, 2, 12, 10)], ids=str)
def test_float32_strided_views_match_reference(case, shape, use_backend):
    device = use_backend(*case)
    x = rand(shape, device, torch.float32, seed=3)
    expected = pywt_dwt(x)
    for name, view in views(x):
        y = hf.haar_dwt2d(view)
        assert y.dtype == torch.float32 and y.is_contiguous(), name
        np.testing.assert_allclose(y.cpu().double().numpy(), expected, rtol=0, atol=2e-6, err_msg=name)
        lo, hi = haar_dwt2d_split(view)
        assert lo.is_contiguous() and hi.is_contiguous(), name
        np.testing.assert_allclose(lo.cpu().double().numpy(), expected[:, :, 0], rtol=0, atol=2e-6, err_msg=name)
        np.testing.assert_allclose(hi.cpu().double().numpy(), expected[:, :, 1:], rtol=0, atol=2e-6, err_msg=name)
    # the inverse reads strided sub-bands too: a transposed copy of y and the split layout's pieces
    y = hf.haar_dwt2d(x)
    yt = y.transpose(-1, -2).contiguous().transpose(-1, -2)
    torch.testing.assert_close(hf.haar_idwt2d(yt, x.shape[-2:]), x, rtol=0, atol=2e-6)
    torch.testing.assert_close(haar_idwt2d_split(y[:, :, 0], y[:, :, 1:], x.shape[-2:]), x, rtol=0, atol=2e-6)


def test_reference_matches_pywt_in_half_precision_input():
    # float16 on CPU has no C++ kernel: the automatic choice falls back to the reference (computed in fp32).
    x = rand((2, 2, 9, 8), dtype=torch.float16)
    assert _backend.selected_backend("haar_dwt2d", x, IMPLS["haar_dwt2d"], SUPPORT) == "torch"
    y = hf.haar_dwt2d(x)
    assert y.dtype == torch.float16
    np.testing.assert_allclose(y.double().numpy(), pywt_dwt(x), rtol=1e-3, atol=2e-3)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 3),
    h=st.integers(1, 24),
    w=st.integers(1, 24),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes_auto_backend(n, c, h, w, seed):
    x = rand((n, c, h, w), seed=seed)
    y = hf.haar_dwt2d(x)
    np.testing.assert_allclose(y.numpy(), pywt_dwt(x), rtol=0, atol=1e-12)
    np.testing.assert_allclose(hf.haar_idwt2d(y).numpy(), pywt_idwt(y), rtol=0, atol=1e-12)
    torch.testing.assert_close(hf.haar_idwt2d(y, (h, w)), x, rtol=0, atol=1e-12)
    # Parseval: the transform of each 2x2 block is orthonormal, and zero padding adds no energy.
    torch.testing.assert_close(y.square().sum(), x.square().sum(), rtol=1e-12, atol=1e-12)


def test_auto_backend_on_cpu_is_the_cpp_kernel_when_built():
    x = rand((1, 1, 4, 4), dtype=torch.float32)
    expected = "cpu" if _backend.extension() is not None else "torch"
    assert _backend.selected_backend("haar_dwt2d", x, IMPLS["haar_dwt2d"], SUPPORT) == expected


# -------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
@pytest.mark.parametrize("shape", [(1, 1, 3, 5), (2, 1, 4, 2)], ids=str)
def test_gradcheck(case, shape, use_backend):
    device = use_backend(*case)
    x = rand(shape, device, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(hf.haar_dwt2d, (x,))
    n, c, h, w = shape
    y = rand((n, c, 4, (h + 1) // 2, (w + 1) // 2), device, seed=5).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: hf.haar_idwt2d(t, (h, w)), (y,))
    lo, hi = y[:, :, 0].detach().requires_grad_(), y[:, :, 1:].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: haar_idwt2d_split(a, b, (h, w)), (lo, hi))
    assert torch.autograd.gradcheck(lambda t: haar_dwt2d_split(t)[1], (x,))  # unused lo gets zero grad
    small = rand((1, 1, 3, 3), device, seed=14).requires_grad_()  # double backward: small, it is slow interpreted
    assert torch.autograd.gradgradcheck(hf.haar_dwt2d, (small,))


# ---------------------------------------------------------------------------------------- GPU backends


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (4, 16, 64, 64), (2, 8, 129, 257)], ids=str)
def test_gpu_backends_forward_backward(case, dtype, shape, use_backend):
    device = use_backend(*case)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-6, torch.float64: 1e-12}[dtype]
    x64 = rand(shape, seed=6)
    for name, view in views(x64.to(device=device, dtype=dtype)):
        view = view.detach().requires_grad_()  # detach keeps the strides
        y = hf.haar_dwt2d(view)
        assert y.dtype == dtype, name
        expected = torch.from_numpy(pywt_dwt(view.detach().double()))
        torch.testing.assert_close(y.detach().cpu().double(), expected, rtol=tol, atol=tol, msg=name)
        g = rand(y.shape, seed=7).to(device=device, dtype=dtype)
        (gx,) = torch.autograd.grad(y, view, g)
        expected_gx = haar_idwt2d_reference(g.double().cpu(), shape[-2:])
        torch.testing.assert_close(gx.cpu().double(), expected_gx, rtol=tol, atol=tol, msg=name)
    y = hf.haar_dwt2d(x64.to(device=device, dtype=dtype))
    back = hf.haar_idwt2d(y, shape[-2:])
    torch.testing.assert_close(
        back.cpu().double(), haar_idwt2d_reference(y.cpu().double(), shape[-2:]), rtol=tol, atol=tol
    )


# ---------------------------------------------------------------------------------------------- drop-ins


@pytest.mark.parametrize("J", [1, 2, 3])
@pytest.mark.parametrize("shape", [(2, 3, 13, 11), (1, 2, 16, 16), (1, 1, 9, 30)], ids=str)
def test_dwt_modules_match_pytorch_wavelets(J, shape):
    ptw = pytest.importorskip("pytorch_wavelets")
    x = rand(shape, dtype=torch.float32, seed=8)
    theirs_fwd, ours_fwd = ptw.DWTForward(J=J, wave="haar", mode="zero"), hf.DWTForward(J=J, wave="haar", mode="zero")
    yl_t, yh_t = theirs_fwd(x)
    yl, yh = ours_fwd(x)
    assert len(yh) == len(yh_t) == J
    torch.testing.assert_close(yl, yl_t, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(yh, yh_t):
        assert ours.shape == theirs.shape
        assert ours.is_contiguous()
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    inv_t, inv = ptw.DWTInverse(wave="haar", mode="zero"), hf.DWTInverse(wave="haar", mode="zero")
    out_t, out = inv_t((yl_t, yh_t)), inv((yl, yh))
    assert out.shape == out_t.shape
    torch.testing.assert_close(out, out_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[..., : shape[-2], : shape[-1]], x, rtol=1e-5, atol=1e-5)
    # a missing level of detail (None) means zeros, as in pytorch_wavelets
    holes = [None, *yh[1:]]
    torch.testing.assert_close(inv((yl, holes)), inv_t((yl_t, [None, *yh_t[1:]])), rtol=1e-5, atol=1e-5)
    # the buffers (filters) match, so state dicts load both ways
    ours_fwd.load_state_dict(theirs_fwd.state_dict())
    theirs_fwd.load_state_dict(ours_fwd.state_dict())
    inv.load_state_dict(inv_t.state_dict())


def test_dwt_module_gradients_match_pytorch_wavelets():
    ptw = pytest.importorskip("pytorch_wavelets")
    x = rand((1, 2, 11, 14), dtype=torch.float32, seed=9)
    grads = []
    for mod in (ptw.DWTForward(J=2, wave="haar"), hf.DWTForward(J=2)):
        xi = x.clone().requires_grad_()
        yl, yh = mod(xi)
        (yl.square().sum() + sum((h * (k + 1)).sum() for k, h in enumerate(yh))).backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 6), (2, 2, 9, 8)], ids=str)
def test_dwt2_idwt2_match_pywt(shape):
    x = rand(shape, seed=10)
    ca, (ch, cv, cd) = hf.dwt2(x, "haar")
    ea, (eh, ev, ed) = pywt.dwt2(x.numpy(), "haar", mode="zero")
    for ours, theirs in ((ca, ea), (ch, eh), (cv, ev), (cd, ed)):
        np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=1e-12)
    rec = hf.idwt2((ca, (ch, cv, cd)), "haar")
    np.testing.assert_allclose(rec.numpy(), pywt.idwt2((ea, (eh, ev, ed)), "haar", mode="zero"), rtol=0, atol=1e-12)
    partial = hf.idwt2((ca, (None, cv, None)), "haar")
    np.testing.assert_allclose(partial.numpy(), pywt.idwt2((ea, (None, ev, None)), "haar", mode="zero"), atol=1e-12)
    wav = pywt.Wavelet("haar")
    torch.testing.assert_close(hf.dwt2(x, wav, mode="zero")[0], ca)


@pytest.mark.parametrize(
    "make",
    [
        lambda: hf.DWTForward(J=1, wave="db2"),
        lambda: hf.DWTForward(J=1, wave="haar", mode="symmetric"),
        lambda: hf.DWTInverse(wave="sym4"),
        lambda: hf.DWTInverse(wave="haar", mode="periodization"),
        lambda: hf.dwt2(torch.zeros(4, 4), "db3"),
        lambda: hf.dwt2(torch.zeros(4, 4), "haar", mode="reflect"),
        lambda: hf.idwt2((torch.zeros(2, 2), (None, None, None)), "coif1"),
    ],
)
def test_unsupported_wavelets_and_modes_raise(make):
    with pytest.raises(NotImplementedError, match="haar"):
        make()


def test_other_axes_raise():
    with pytest.raises(NotImplementedError, match=r"axes=\(-2, -1\)"):
        hf.dwt2(torch.zeros(2, 4, 4), "haar", axes=(0, 1))
    torch.testing.assert_close(hf.dwt2(torch.ones(4, 4), "haar", axes=(0, 1))[0], torch.full((2, 2), 2.0))


# ----------------------------------------------------------------------------- torch.library contracts


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_opcheck(case, use_backend):
    device = use_backend(*case)
    x = rand((2, 3, 5, 6), device, seed=11).requires_grad_()
    y = rand((2, 3, 4, 3, 3), device, seed=12).requires_grad_()
    lo, hi = y[:, :, 0].detach().requires_grad_(), y[:, :, 1:].detach().contiguous().requires_grad_()
    ops = torch.ops.harmonizer_fast
    torch.library.opcheck(ops.haar_dwt2d.default, (x,))
    torch.library.opcheck(ops.haar_dwt2d_split.default, (x,))
    torch.library.opcheck(ops.haar_idwt2d.default, (y, 5, 6))
    torch.library.opcheck(ops.haar_idwt2d_split.default, (lo, hi, 6, 5))


def test_torch_compile_fullgraph_cpu():
    torch._dynamo.reset()

    def f(x, scale):
        y = hf.haar_dwt2d(x) * scale[:, None, None]  # shrink each sub-band
        return hf.haar_idwt2d(y, x.shape[-2:])

    compiled = torch.compile(f, fullgraph=True)
    x = rand((2, 3, 9, 10), dtype=torch.float32, seed=13).requires_grad_()
    scale = torch.tensor([1.0, 0.5, 0.25, 0.0])
    out = compiled(x, scale)
    torch.testing.assert_close(out, f(x, scale), rtol=1e-6, atol=1e-6)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    (g_eager,) = torch.autograd.grad(f(x, scale).square().sum(), x)
    torch.testing.assert_close(g, g_eager, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: hf.haar_dwt2d(torch.zeros(3, 4, 4)), ValueError, r"x must be a 4-D tensor \(N, C, H, W\)"),
        (lambda: hf.haar_dwt2d(torch.zeros(1, 1, 4, 4, dtype=torch.int64)), TypeError, "x must be a floating"),
        (lambda: hf.haar_dwt2d(torch.zeros(1, 1, 4, 4, dtype=torch.bool)), TypeError, "floating"),
        (lambda: hf.haar_dwt2d(np.zeros((1, 1, 4, 4))), TypeError, "x must be a torch.Tensor"),
        (lambda: hf.haar_dwt2d(torch.zeros(0, 1, 4, 4)), ValueError, "x is empty"),
        (lambda: hf.haar_dwt2d(torch.zeros(1, 1, 0, 4)), ValueError, "x is empty"),
        (lambda: hf.haar_idwt2d(torch.zeros(1, 1, 4, 4)), ValueError, "y must be a 5-D tensor"),
        (lambda: hf.haar_idwt2d(torch.zeros(1, 1, 3, 4, 4)), ValueError, "4 sub-bands"),
        (lambda: hf.haar_idwt2d(torch.zeros(1, 1, 4, 4, 4), size=(6, 8)), ValueError, r"H in \(7, 8\)"),
        (lambda: hf.haar_idwt2d(torch.zeros(1, 1, 4, 4, 4), size=(8,)), ValueError, "pair"),
        (lambda: haar_idwt2d_split(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 3, 4, 5)), ValueError, "hi must have"),
        (
            lambda: haar_idwt2d_split(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 3, 4, 4, dtype=torch.float64)),
            ValueError,
            "dtype",
        ),
        (lambda: hf.DWTForward(J=0), ValueError, "J must be"),
        (lambda: hf.dwt2(np.zeros((4, 4)), "haar"), TypeError, "torch.Tensor"),
        (lambda: hf.idwt2((None, (None, None, None)), "haar"), ValueError, "at least one"),
        (
            lambda: hf.idwt2((torch.zeros(2, 2), (torch.zeros(2, 3), None, None)), "haar"),
            ValueError,
            "one shape",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_forced_backend_that_cannot_run_raises_with_reason(monkeypatch):
    x = torch.zeros(1, 1, 4, 4)
    monkeypatch.setenv("HARMONIZER_FAST_BACKEND", "cuda")
    with pytest.raises(hf.BackendUnavailableError, match="HARMONIZER_FAST_BACKEND=cuda cannot run"):
        hf.haar_dwt2d(x)
    monkeypatch.setenv("HARMONIZER_FAST_BACKEND", "cpu")
    if _backend.extension() is not None:
        with pytest.raises(hf.BackendUnavailableError, match="supports float32, float64 on cpu, got float16"):
            hf.haar_dwt2d(x.half())
    monkeypatch.setenv("HARMONIZER_FAST_BACKEND", "fastest")
    with pytest.raises(hf.BackendUnavailableError, match="not a backend"):
        hf.haar_dwt2d(x)
