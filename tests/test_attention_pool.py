"""Token-attention pooling (paper Eq. 2): every backend against an independent float64 formulation,
gradients, large logits, broadcasting forms, multi-chunk inputs, torch.library contracts, bad inputs."""

import math

import pytest
import torch
from conftest import CPU_CASES, GPU_CASES, case_id, rand

import harmonizer_fast as hf


def expected(x, queries, w_k, w_v, scale=None):
    """Independent float64 formulation, one batch item at a time, as the paper writes it."""
    x, queries, w_k, w_v = (t.double().cpu() for t in (x, queries, w_k, w_v))  # keeps the autograd graph
    dh = w_k.shape[0]
    scale = 1.0 / math.sqrt(dh) if scale is None else scale
    out = []
    for b in range(x.shape[0]):
        feats = x[b].reshape(x.shape[1], -1).t()  # (N, C): positions as the sequence
        k, v = feats @ w_k.t(), feats @ w_v.t()  # (N, Dh)
        q = queries[b] if queries.dim() == 3 else queries
        attn = torch.softmax(q @ k.t() * scale, dim=-1)  # (M, N)
        out.append(attn @ v)
    return torch.stack(out)


def make_inputs(b, c, h, w, m, dh, device, dtype, batch_queries=False, seed=0, x_scale=1.0):
    x = rand((b, c, h, w), device, dtype, seed, x_scale)
    q = rand((b, m, dh) if batch_queries else (m, dh), device, dtype, seed + 1)
    w_k = rand((dh, c), device, dtype, seed + 2, 1 / math.sqrt(c))
    w_v = rand((dh, c), device, dtype, seed + 3, 1 / math.sqrt(c))
    return x, q, w_k, w_v


# (B, C, H, W, M, Dh): odd sizes, single query/channel/position, and N > 4096 (several position chunks)
SHAPES = [(2, 6, 9, 7, 5, 8), (1, 1, 1, 1, 1, 1), (3, 17, 5, 4, 8, 32), (1, 3, 70, 61, 2, 4)]


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("batch_queries", [False, True], ids=["shared-queries", "batch-queries"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_forward_matches_independent_formulation(case, shape, batch_queries, dtype, use_backend):
    device = use_backend(*case)
    b, c, h, w, m, dh = shape
    x, q, w_k, w_v = make_inputs(b, c, h, w, m, dh, device, dtype, batch_queries)
    out = hf.token_attention_pool(x, q, w_k, w_v)
    assert out.shape == (b, m, dh) and out.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double().cpu(), expected(x, q, w_k, w_v), rtol=tol, atol=tol)


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
@pytest.mark.parametrize("shape", [(2, 6, 9, 7, 5, 8), (1, 3, 70, 61, 2, 4)], ids=str)
def test_gradients_match_independent_formulation(case, shape, use_backend):
    device = use_backend(*case)
    b, c, h, w, m, dh = shape
    inputs = [t.requires_grad_() for t in make_inputs(b, c, h, w, m, dh, device, torch.float64, True, seed=5)]
    out = hf.token_attention_pool(*inputs)
    dy = rand(out.shape, device, seed=9)
    grads = torch.autograd.grad(out, inputs, dy)
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    ref_grads = torch.autograd.grad(expected(*ref_inputs), ref_inputs, dy.cpu())
    for got, ref, name in zip(grads, ref_grads, ("x", "queries", "w_k", "w_v")):
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-10, atol=1e-11, msg=name)


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_gradcheck(case, use_backend):
    device = use_backend(*case)
    x, q, w_k, w_v = (t.requires_grad_() for t in make_inputs(2, 3, 3, 2, 2, 4, device, torch.float64, seed=11))

    def f(x, q, w_k, w_v):
        return hf.token_attention_pool(x, q, w_k, w_v, scale=0.7)

    assert torch.autograd.gradcheck(f, (x, q, w_k, w_v))


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_large_logits_do_not_overflow(case, use_backend):
    # Logits of order 1e4 overflow exp() in float32 (and make a naive softmax return NaN); the online
    # softmax subtracts the running max first.
    device = use_backend(*case)
    x, q, w_k, w_v = make_inputs(2, 4, 6, 5, 3, 8, device, torch.float32, seed=13, x_scale=30.0)
    scale = 300.0
    logits = (q @ w_k) @ x.flatten(2) * scale
    assert logits.abs().max() > 1e3
    assert torch.isnan(torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)).any()  # naive fails
    out = hf.token_attention_pool(x, q, w_k, w_v, scale=scale)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double().cpu(), expected(x, q, w_k, w_v, scale), rtol=1e-4, atol=1e-3)
    x = x.requires_grad_()
    (gx,) = torch.autograd.grad(hf.token_attention_pool(x, q, w_k, w_v, scale=scale).sum(), x)
    assert torch.isfinite(gx).all()


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_non_contiguous_feature_maps(case, use_backend):
    device = use_backend(*case)
    x, q, w_k, w_v = make_inputs(2, 5, 7, 6, 3, 4, device, torch.float32, seed=17)
    ref = expected(x, q, w_k, w_v)
    for view in (x.contiguous(memory_format=torch.channels_last), x.transpose(-1, -2).contiguous().transpose(-1, -2)):
        torch.testing.assert_close(hf.token_attention_pool(view, q, w_k, w_v).double().cpu(), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 6, 9, 7, 5, 8), (4, 64, 64, 64, 8, 32), (1, 256, 70, 61, 8, 32)], ids=str)
def test_gpu_backends_forward_backward(case, dtype, shape, use_backend):
    device = use_backend(*case)
    b, c, h, w, m, dh = shape
    inputs = [t.requires_grad_() for t in make_inputs(b, c, h, w, m, dh, device, dtype, seed=19)]
    out = hf.token_attention_pool(*inputs)
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(out.double().cpu(), expected(*inputs), rtol=tol, atol=tol)
    dy = rand(out.shape, device, dtype, seed=23)
    grads = torch.autograd.grad(out, inputs, dy)
    ref_inputs = [t.detach().double().cpu().requires_grad_() for t in inputs]
    ref_grads = torch.autograd.grad(expected(*ref_inputs), ref_inputs, dy.double().cpu())
    for got, ref in zip(grads, ref_grads):
        scale = max(1.0, ref.abs().max().item())
        torch.testing.assert_close(got.double().cpu(), ref, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_opcheck(case, use_backend):
    device = use_backend(*case)
    x = rand((2, 3, 4, 5), device, seed=29).requires_grad_()
    a = rand((2, 4, 3), device, seed=31).requires_grad_()
    torch.library.opcheck(torch.ops.harmonizer_fast.attention_pool.default, (x, a))
    z, lse = torch.ops.harmonizer_fast.attention_pool(x.detach(), a.detach())
    dz = rand((2, 4, 3), device, seed=37)
    backward = torch.ops.harmonizer_fast.attention_pool_backward.default
    torch.library.opcheck(backward, (dz, x.detach(), a.detach(), z, lse))


def test_torch_compile_fullgraph_cpu():
    torch._dynamo.reset()
    x, q, w_k, w_v = make_inputs(2, 4, 6, 5, 3, 8, "cpu", torch.float32, seed=41)

    def f(x, q, w_k, w_v):
        return hf.token_attention_pool(x, q, w_k, w_v).mean(dim=1)  # GAP over the attended tokens

    x = x.requires_grad_()
    out = torch.compile(f, fullgraph=True)(x, q, w_k, w_v)
    torch.testing.assert_close(out, f(x, q, w_k, w_v))
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_eager,) = torch.autograd.grad(f(x, q, w_k, w_v).sum(), x)
    torch.testing.assert_close(g, g_eager)


def _good():
    return make_inputs(2, 4, 3, 3, 2, 8, "cpu", torch.float32)


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: (a[0][0], *a[1:]), ValueError, r"x must be a 4-D tensor \(B, C, H, W\)"),
        (lambda a: (a[0].int(), *a[1:]), TypeError, "floating"),
        (lambda a: (a[0][:0], *a[1:]), ValueError, "x is empty"),
        (lambda a: (a[0], a[1][:, :5], *a[2:]), ValueError, r"queries must have shape \(M, Dh\)"),
        (lambda a: (a[0], a[1].expand(3, 2, 8), *a[2:]), ValueError, "queries has batch 3"),
        (lambda a: (a[0], a[1], a[2][:, :3], a[3]), ValueError, r"w_k must have shape \(Dh, C\)"),
        (lambda a: (a[0], a[1], a[2], a[3][:4]), ValueError, "w_v must have shape"),
        (lambda a: (a[0], a[1].double(), *a[2:]), ValueError, "dtype"),
        (lambda a: (a[0], a[1].tolist(), *a[2:]), TypeError, "queries must be a torch.Tensor"),
    ],
)
def test_bad_inputs(mutate, exc, match):
    with pytest.raises(exc, match=match):
        hf.token_attention_pool(*mutate(_good()))
    with pytest.raises(ValueError, match="scale must be finite"):
        hf.token_attention_pool(*_good(), scale=float("nan"))
