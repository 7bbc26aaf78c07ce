"""3-D Haar DWT/IDWT: every backend against float64 PyWavelets (pywt.dwtn / idwtn over the last three axes),
gradients (twice), torch.library contracts, torch.compile and bad inputs."""

import numpy as np
import pytest
import pywt
import torch
from conftest import CPU_CASES, GPU_CASES, case_id, rand
from hypothesis import given, settings
from hypothesis import strategies as st

import harmonizer_fast as hf
from harmonizer_fast import _backend
from harmonizer_fast.ops.haar3d import IMPLS, KEYS, SUPPORT, haar_dwt3d_reference, haar_idwt3d_reference

AXES = (-3, -2, -1)
# Odd, even and tiny volumes; small enough for the Triton interpreter.
SHAPES = [(1, 1, 1, 1, 1), (1, 1, 2, 2, 2), (2, 3, 3, 5, 7), (1, 2, 4, 6, 8), (1, 1, 5, 2, 33), (2, 1, 2, 17, 3)]


def pywt_dwt3(x: torch.Tensor) -> np.ndarray:
    """(N, C, 8, d, h, w) from pywt in float64, bands in pywt's key order: the independent reference."""
    coeffs = pywt.dwtn(x.detach().cpu().double().numpy(), "haar", mode="zero", axes=AXES)
    assert tuple(coeffs) == KEYS  # pywt's own order is the documented one
    return np.stack([coeffs[k] for k in KEYS], axis=2)


def pywt_idwt3(y: torch.Tensor) -> np.ndarray:
    y64 = y.detach().cpu().double().numpy()
    return pywt.idwtn({k: y64[:, :, i] for i, k in enumerate(KEYS)}, "haar", mode="zero", axes=AXES)


def views(x: torch.Tensor):
    """The input itself and non-contiguous views with the same values."""
    yield "contiguous", x
    yield "transposed", x.transpose(-1, -3).contiguous().transpose(-1, -3)
    yield "channels_last_3d", x.contiguous(memory_format=torch.channels_last_3d)
    n, c, d, h, w = x.shape
    big = torch.zeros(n, c + 1, d + 1, h + 2, 2 * w + 1, dtype=x.dtype, device=x.device)
    big[:, 1:, 1:, 2:, 1::2] = x
    yield "strided", big[:, 1:, 1:, 2:, 1::2]


# ---------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dwt3d_matches_pywt_float64(case, shape, use_backend):
    device = use_backend(*case)
    x = rand(shape, device)
    y = hf.haar_dwt3d(x)
    n, c, d, h, w = shape
    assert y.shape == (n, c, 8, (d + 1) // 2, (h + 1) // 2, (w + 1) // 2)
    assert y.dtype == torch.float64
    np.testing.assert_allclose(y.cpu().numpy(), pywt_dwt3(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_idwt3d_matches_pywt_float64(case, shape, use_backend):
    device = use_backend(*case)
    n, c, d, h, w = shape
    y = rand((n, c, 8, d, h, w), device, seed=1)
    x = hf.haar_idwt3d(y)
    assert x.shape == (n, c, 2 * d, 2 * h, 2 * w)
    np.testing.assert_allclose(x.cpu().numpy(), pywt_idwt3(y), rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_restores_odd_sizes(case, shape, use_backend):
    device = use_backend(*case)
    x = rand(shape, device, seed=2)
    back = hf.haar_idwt3d(hf.haar_dwt3d(x), size=x.shape[-3:])
    assert back.shape == x.shape
    torch.testing.assert_close(back, x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
@pytest.mark.parametrize("shape", [(2, 3, 3, 5, 7), (1, 2, 4, 6, 10)], ids=str)
def test_float32_strided_views(case, shape, use_backend):
    device = use_backend(*case)
    x = rand(shape, device, torch.float32, seed=3)
    expected = pywt_dwt3(x)
    for name, view in views(x):
        y = hf.haar_dwt3d(view)
        assert y.dtype == torch.float32 and y.is_contiguous(), name
        np.testing.assert_allclose(y.cpu().double().numpy(), expected, rtol=0, atol=3e-6, err_msg=name)
    # the inverse reads strided sub-bands too: transposed and band-sliced views
    y = hf.haar_dwt3d(x)
    yt = y.transpose(-1, -2).contiguous().transpose(-1, -2)
    torch.testing.assert_close(hf.haar_idwt3d(yt, x.shape[-3:]), x, rtol=0, atol=3e-6)
    wide = torch.zeros(*y.shape[:2], 9, *y.shape[3:], device=device)
    wide[:, :, 1:] = y
    torch.testing.assert_close(hf.haar_idwt3d(wide[:, :, 1:], x.shape[-3:]), x, rtol=0, atol=3e-6)


def test_reference_in_half_precision_and_auto_backend():
    # float16 on CPU has no C++ kernel: the automatic choice falls back to the reference (computed in fp32).
    x = rand((1, 2, 3, 4, 5), dtype=torch.float16)
    assert _backend.selected_backend("haar_dwt3d", x, IMPLS["haar_dwt3d"], SUPPORT) == "torch"
    y = hf.haar_dwt3d(x)
    assert y.dtype == torch.float16
    np.testing.assert_allclose(y.double().numpy(), pywt_dwt3(x), rtol=1e-3, atol=3e-3)
    x32 = rand((1, 1, 4, 4, 4), dtype=torch.float32)
    expected = "cpu" if _backend.extension() is not None else "torch"
    assert _backend.selected_backend("haar_dwt3d", x32, IMPLS["haar_dwt3d"], SUPPORT) == expected


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 2),
    c=st.integers(1, 3),
    d=st.integers(1, 9),
    h=st.integers(1, 9),
    w=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes_auto_backend(n, c, d, h, w, seed):
    x = rand((n, c, d, h, w), seed=seed)
    y = hf.haar_dwt3d(x)
    np.testing.assert_allclose(y.numpy(), pywt_dwt3(x), rtol=0, atol=1e-12)
    np.testing.assert_allclose(hf.haar_idwt3d(y).numpy(), pywt_idwt3(y), rtol=0, atol=1e-12)
    torch.testing.assert_close(hf.haar_idwt3d(y, (d, h, w)), x, rtol=0, atol=1e-12)
    # Parseval: each 2x2x2 block's transform is orthonormal, and zero padding adds no energy.
    torch.testing.assert_close(y.square().sum(), x.square().sum(), rtol=1e-12, atol=1e-12)


def test_reference_equals_the_2d_transform_on_a_constant_depth_pair():
    """Two equal slices: the depth-detail bands vanish and each depth-approximation band is the 2-D band times
    sqrt 2, in the 2-D API's (cA, cH, cV, cD) = (aa, da, ad, dd) order: a check independent of pywt."""
    plane = rand((1, 2, 6, 5), seed=4)
    y = haar_dwt3d_reference(torch.stack([plane, plane], dim=2))
    y2 = hf.haar_dwt2d(plane) * 2**0.5  # (cA, cH, cV, cD)
    torch.testing.assert_close(y[:, :, 4:], torch.zeros_like(y[:, :, 4:]), rtol=0, atol=1e-15)
    for band3, band2 in ((0, 0), (1, 2), (2, 1), (3, 3)):  # aaa, aad, ada, add <- cA, cV, cH, cD
        torch.testing.assert_close(y[:, :, band3, 0], y2[:, :, band2], rtol=0, atol=1e-14)


# -------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_gradcheck_and_double_backward(case, use_backend):
    device = use_backend(*case)
    shape = (1, 1, 3, 2, 3)
    x = rand(shape, device, seed=5).requires_grad_()
    assert torch.autograd.gradcheck(hf.haar_dwt3d, (x,))
    y = rand((1, 1, 8, 2, 1, 2), device, seed=6).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: hf.haar_idwt3d(t, (3, 2, 3)), (y,))
    assert torch.autograd.gradgradcheck(hf.haar_dwt3d, (x,))
    assert torch.autograd.gradgradcheck(lambda t: hf.haar_idwt3d(t, (3, 2, 3)), (y,))


# ---------------------------------------------------------------------------------------- GPU backends


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 3, 5, 7), (2, 4, 16, 32, 32), (1, 2, 9, 33, 65)], ids=str)
def test_gpu_backends_forward_backward(case, dtype, shape, use_backend):
    device = use_backend(*case)
    tol = {torch.float16: 3e-3, torch.bfloat16: 2.4e-2, torch.float32: 2e-6, torch.float64: 1e-12}[dtype]
    x64 = rand(shape, seed=7)
    for name, view in views(x64.to(device=device, dtype=dtype)):
        view = view.detach().requires_grad_()  # detach keeps the strides
        y = hf.haar_dwt3d(view)
        assert y.dtype == dtype, name
        torch.testing.assert_close(y.detach().cpu().double(), torch.from_numpy(pywt_dwt3(view.detach().double())),
                                   rtol=tol, atol=tol, msg=name)  # fmt: skip
        g = rand(y.shape, seed=8).to(device=device, dtype=dtype)
        (gx,) = torch.autograd.grad(y, view, g)
        torch.testing.assert_close(gx.cpu().double(), haar_idwt3d_reference(g.double().cpu(), shape[-3:]),
                                   rtol=tol, atol=tol, msg=name)  # fmt: skip


# ----------------------------------------------------------------------------- torch.library contracts


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_opcheck(case, use_backend):
    device = use_backend(*case)
    x = rand((2, 2, 3, 4, 5), device, seed=9).requires_grad_()
    y = rand((2, 2, 8, 2, 2, 3), device, seed=10).requires_grad_()
    ops = torch.ops.harmonizer_fast
    torch.library.opcheck(ops.haar_dwt3d.default, (x,))
    torch.library.opcheck(ops.haar_idwt3d.default, (y, 3, 4, 5))


def test_torch_compile_fullgraph_cpu():
    torch._dynamo.reset()

    def f(x, scale):
        y = hf.haar_dwt3d(x) * scale[:, None, None, None]  # shrink each sub-band
        return hf.haar_idwt3d(y, x.shape[-3:])

    compiled = torch.compile(f, fullgraph=True)
    x = rand((1, 2, 5, 6, 7), dtype=torch.float32, seed=11).requires_grad_()
    scale = torch.linspace(1.0, 0.0, 8)
    out = compiled(x, scale)
    torch.testing.assert_close(out, f(x, scale), rtol=1e-6, atol=1e-6)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    (g_eager,) = torch.autograd.grad(f(x, scale).square().sum(), x)
    torch.testing.assert_close(g, g_eager, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: hf.haar_dwt3d(torch.zeros(1, 3, 4, 4)), ValueError, r"x must be a 5-D tensor \(N, C, D, H, W\)"),
        (lambda: hf.haar_dwt3d(torch.zeros(1, 1, 2, 4, 4, dtype=torch.int32)), TypeError, "x must be a floating"),
        (lambda: hf.haar_dwt3d(np.zeros((1, 1, 2, 4, 4))), TypeError, "x must be a torch.Tensor"),
        (lambda: hf.haar_dwt3d(torch.zeros(1, 1, 0, 4, 4)), ValueError, "x is empty"),
        (lambda: hf.haar_idwt3d(torch.zeros(1, 1, 8, 4, 4)), ValueError, "y must be a 6-D tensor"),
        (lambda: hf.haar_idwt3d(torch.zeros(1, 1, 4, 2, 2, 2)), ValueError, "8 sub-bands"),
        (lambda: hf.haar_idwt3d(torch.zeros(1, 1, 8, 2, 2, 2), size=(4, 2, 4)), ValueError, r"H in \(3, 4\)"),
        (lambda: hf.haar_idwt3d(torch.zeros(1, 1, 8, 2, 2, 2), size=(4, 4)), ValueError, "triple"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
