"""FiLM (paper Eq. 3): every backend against an independent eager formulation in float64, gradients,
determinism of the fused backward, broadcasting forms, torch.library contracts and bad inputs."""

import pytest
import torch
from conftest import CPU_CASES, GPU_CASES, case_id, rand

import harmonizer_fast as hf


def expected(x, gamma, beta, dy):
    """Independent float64 formulation: broadcasting arithmetic and autograd of plain torch ops."""
    x64, g64, b64 = (t.detach().double().cpu().requires_grad_() for t in (x, gamma, beta))

    def plane(p):
        return p.reshape(1, -1, 1, 1) if p.dim() == 1 else p.reshape(*p.shape, 1, 1)

    y = x64 * plane(g64) + plane(b64)
    grads = torch.autograd.grad(y, (x64, g64, b64), dy.double().cpu())
    return y.detach(), grads


SHAPES = [(2, 3, 5, 7), (1, 1, 1, 1), (3, 4, 16, 9), (2, 2, 33, 40)]


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("per_channel", [False, True], ids=["BC", "C"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_reference_with_gradients(case, shape, per_channel, dtype, use_backend):
    device = use_backend(*case)
    b, c = shape[:2]
    pshape = (c,) if per_channel else (b, c)
    x = rand(shape, device, dtype, 1).requires_grad_()
    gamma = rand(pshape, device, dtype, 2).requires_grad_()
    beta = rand(pshape, device, dtype, 3).requires_grad_()
    y = hf.film(x, gamma, beta)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    dy = rand(shape, device, dtype, 4)
    grads = torch.autograd.grad(y, (x, gamma, beta), dy)
    y_ref, grads_ref = expected(x, gamma, beta, dy)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=tol, atol=tol)
    for got, ref, name in zip(grads, grads_ref, ("dx", "dgamma", "dbeta")):
        assert got.shape == ref.shape, name
        torch.testing.assert_close(got.double().cpu(), ref, rtol=tol, atol=tol * max(1.0, ref.abs().max().item()))


# float32 outputs of 16 MiB or more are written with streaming stores (csrc/cpu/film.cpp, kStreamBytes):
# 257 columns put every row's start at a different offset in its cache line, so each row has an ordinary
# head, streamed lines and an ordinary tail; (B, C) = (2, 33) gives 66 planes over the threads.
STREAMED_SHAPE = (2, 33, 250, 257)  # 4.24 M floats: 16.2 MiB


@pytest.mark.parametrize("case", [c for c in CPU_CASES if c[0] == "cpu"], ids=case_id)
def test_streamed_outputs_match_reference(case, use_backend):
    device = use_backend(*case)
    x = rand(STREAMED_SHAPE, device, torch.float32, 21).requires_grad_()
    assert x.numel() * 4 >= 16 << 20
    gamma = rand((2, 33), device, torch.float32, 22).requires_grad_()
    beta = rand((33,), device, torch.float32, 23).requires_grad_()
    dy = rand(STREAMED_SHAPE, device, torch.float32, 24)
    y = hf.film(x, gamma, beta)
    grads = torch.autograd.grad(y, (x, gamma, beta), dy)
    y_ref, grads_ref = expected(x, gamma, beta, dy)
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(grads[0].double(), grads_ref[0], rtol=2e-6, atol=2e-6)
    for got, ref in zip(grads[1:], grads_ref[1:]):  # sums of 64 k products, accumulated in double
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_strided_inputs(case, use_backend):
    device = use_backend(*case)
    base = rand((2, 6, 9, 20), device, torch.float32, 5)
    x = base[:, ::2, :, ::2].transpose(-1, -2).requires_grad_()  # (2, 3, 10, 9), no unit stride
    gamma = rand((3, 2), device, torch.float32, 6).t().requires_grad_()  # (2, 3) transposed
    beta = rand((3,), device, torch.float32, 7).requires_grad_()
    dy = rand((2, 3, 10, 9), device, torch.float32, 8).transpose(-1, -2).contiguous().transpose(-1, -2)
    y = hf.film(x, gamma, beta)
    grads = torch.autograd.grad(y, (x, gamma, beta), dy)
    y_ref, grads_ref = expected(x, gamma, beta, dy)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads, grads_ref):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_backward_is_deterministic(case, use_backend):
    device = use_backend(*case)
    x = rand((2, 3, 40, 50), device, torch.float32, 9).requires_grad_()
    gamma = rand((3,), device, torch.float32, 10).requires_grad_()
    beta = rand((2, 3), device, torch.float32, 11).requires_grad_()
    dy = rand((2, 3, 40, 50), device, torch.float32, 12)
    first = torch.autograd.grad(hf.film(x, gamma, beta), (x, gamma, beta), dy)
    for _ in range(3):
        again = torch.autograd.grad(hf.film(x, gamma, beta), (x, gamma, beta), dy)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_gradcheck(case, use_backend):
    device = use_backend(*case)
    x = rand((2, 2, 3, 2), device, seed=13).requires_grad_()  # small: the Triton interpreter is slow
    for pshape in ((2, 2), (2,)):
        gamma = rand(pshape, device, seed=14).requires_grad_()
        beta = rand(pshape, device, seed=15).requires_grad_()
        assert torch.autograd.gradcheck(hf.film, (x, gamma, beta))


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (4, 64, 128, 128), (1, 2, 300, 257)], ids=str)
def test_gpu_backends(case, dtype, shape, use_backend):
    device = use_backend(*case)
    b, c = shape[:2]
    x = rand(shape, device, dtype, 16).requires_grad_()
    gamma = rand((b, c), device, dtype, 17).requires_grad_()
    beta = rand((c,), device, dtype, 18).requires_grad_()
    dy = rand(shape, device, dtype, 19)
    y = hf.film(x, gamma, beta)
    grads = torch.autograd.grad(y, (x, gamma, beta), dy)
    y_ref, grads_ref = expected(x, gamma, beta, dy)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=tol, atol=tol * 4)
    for got, ref in zip(grads, grads_ref):
        scale = max(1.0, ref.abs().max().item())
        torch.testing.assert_close(got.double().cpu(), ref, rtol=tol, atol=tol * scale * 4)
    again = torch.autograd.grad(hf.film(x, gamma, beta), (x, gamma, beta), dy)
    for a, b_ in zip(grads, again):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_opcheck(case, use_backend):
    device = use_backend(*case)
    x = rand((2, 3, 4, 5), device, seed=20).requires_grad_()
    gamma = rand((2, 3), device, seed=21).requires_grad_()
    beta = rand((2, 3), device, seed=22).requires_grad_()
    torch.library.opcheck(torch.ops.harmonizer_fast.film.default, (x, gamma, beta))
    dy = rand((2, 3, 4, 5), device, seed=23)
    torch.library.opcheck(torch.ops.harmonizer_fast.film_backward.default, (dy, x.detach(), gamma.detach()))


def test_torch_compile_fullgraph_cpu():
    torch._dynamo.reset()

    def f(x, gamma, beta):
        return hf.film(x, gamma, beta).relu()

    x = rand((2, 3, 6, 5), dtype=torch.float32, seed=24).requires_grad_()
    gamma, beta = rand((3,), dtype=torch.float32, seed=25), rand((2, 3), dtype=torch.float32, seed=26)
    out = torch.compile(f, fullgraph=True)(x, gamma, beta)
    torch.testing.assert_close(out, f(x, gamma, beta))
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_eager,) = torch.autograd.grad(f(x, gamma, beta).sum(), x)
    torch.testing.assert_close(g, g_eager)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ((torch.zeros(2, 3, 4), torch.ones(3), torch.ones(3)), ValueError, r"x must be a 4-D tensor \(B, C, H, W\)"),
        ((torch.zeros(2, 3, 4, 4, dtype=torch.int32), torch.ones(3), torch.ones(3)), TypeError, "floating"),
        ((torch.zeros(0, 3, 4, 4), torch.ones(3), torch.ones(3)), ValueError, "x is empty"),
        ((torch.zeros(2, 3, 4, 4), torch.ones(4), torch.ones(3)), ValueError, r"gamma must have shape \(B, C\)"),
        ((torch.zeros(2, 3, 4, 4), torch.ones(3), torch.ones(3, 2)), ValueError, "beta must have shape"),
        ((torch.zeros(2, 3, 4, 4), torch.ones(1, 3, 1, 1), torch.ones(3)), ValueError, "gamma must have shape"),
        ((torch.zeros(2, 3, 4, 4), torch.ones(3, dtype=torch.float64), torch.ones(3)), ValueError, "dtype"),
        ((torch.zeros(2, 3, 4, 4), [1.0, 1.0, 1.0], torch.ones(3)), TypeError, "gamma must be a torch.Tensor"),
    ],
)
def test_bad_inputs(args, exc, match):
    with pytest.raises(exc, match=match):
        hf.film(*args)
