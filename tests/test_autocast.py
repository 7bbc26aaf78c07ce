"""Autocast rules (harmonizer_fast/ops/_autocast.py) under CPU bfloat16 autocast, and CUDA autocast where a GPU is.

Every custom op computes in float32 from its inputs as they arrive (so the float32 op on the same rounded
inputs is the reference: a "float32" policy must equal it, a "promote" policy may differ by the final
rounding to the input dtype only), returns its policy's dtype, and passes gradients back in the inputs'
dtypes. The float64 references (PyWavelets, the eager composites) bound the total error within the stated
half-precision tolerances. A bfloat16-autocast training run of the small config lowers the loss.
"""

import numpy as np
import pytest
import torch
from conftest import rand
from test_haar import pywt_dwt
from test_haar3d import pywt_dwt3
from test_model import synthetic_batch

import harmonizer_fast as hf
from harmonizer_fast import losses
from harmonizer_fast.model import HarmonizerConfig, HarmonizerNet
from harmonizer_fast.ops import _autocast
from harmonizer_fast.ops.fcomb import fcomb_head, fcomb_head_reference
from harmonizer_fast.ops.haar import haar_dwt2d_split, haar_idwt2d_split

# Relative spacing of each half-precision format (unit roundoff x 2): the stated tolerance of one rounding.
EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
DEVICES = [
    pytest.param(("cpu", torch.bfloat16), id="cpu-bf16"),
    pytest.param(("cuda", torch.bfloat16), id="cuda-bf16", marks=pytest.mark.gpu),
    pytest.param(("cuda", torch.float16), id="cuda-fp16", marks=pytest.mark.gpu),
]


@pytest.fixture(params=DEVICES)
def amp(request):
    device, dtype = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return device, dtype


def _close_to_rounded(got, want32, dtype):
    """``got`` (half precision) is ``want32`` (float32) rounded once: within one spacing of the format."""
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want32, rtol=EPS[dtype], atol=EPS[dtype] * 1e-3)


def test_every_op_has_an_autocast_rule_on_cpu_and_cuda():
    names = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("harmonizer_fast::")}
    assert names and names == set(_autocast.RULES), names ^ set(_autocast.RULES)
    for name in names:
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"harmonizer_fast::{name}", key), (name, key)


@pytest.mark.parametrize("transform", ["2d", "3d"])
def test_haar_promotes_and_matches_float32(amp, transform):
    device, dtype = amp
    shape = (2, 3, 9, 10) if transform == "2d" else (1, 2, 5, 6, 7)
    fwd, inv = (hf.haar_dwt2d, hf.haar_idwt2d) if transform == "2d" else (hf.haar_dwt3d, hf.haar_idwt3d)
    x = rand(shape, device, dtype, seed=1).requires_grad_()
    with torch.autocast(device, dtype=dtype):
        y = fwd(x)
        back = inv(y, x.shape[2:])
    want = fwd(x.detach().float())  # float32 on the same (rounded) inputs
    _close_to_rounded(y, want, dtype)
    _close_to_rounded(back, inv(want.to(dtype).float(), x.shape[2:]), dtype)
    # the float64 transform of the rounded input: one rounding of the output away
    ref = pywt_dwt(x.detach()) if transform == "2d" else pywt_dwt3(x.detach())
    np.testing.assert_allclose(y.detach().double().cpu().numpy(), ref, rtol=EPS[dtype], atol=EPS[dtype] * 1e-3)
    g = rand(y.shape, device, dtype, seed=2)
    (gx,) = torch.autograd.grad(y, x, g)
    _close_to_rounded(gx, inv(g.float(), x.shape[2:]), dtype)  # the adjoint, in float32, rounded once


@pytest.mark.parametrize(
    "dtypes", [(torch.bfloat16,), (torch.float16,), (torch.bfloat16, torch.float16), (torch.bfloat16, torch.float32)]
)
def test_promote_follows_torch_type_promotion(dtypes):
    """The promote rule's output dtype is torch's promotion of the inputs (float16 with bfloat16: float32)."""
    lo, hi = rand((1, 2, 3, 4), dtype=dtypes[0]), rand((1, 2, 3, 3, 4), dtype=dtypes[-1], seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = haar_idwt2d_split(lo, hi)
    assert out.dtype == torch.promote_types(dtypes[0], dtypes[-1])


def test_haar_split_layout_promotes(amp):
    device, dtype = amp
    x = rand((1, 2, 7, 8), device, dtype, seed=3)
    with torch.autocast(device, dtype=dtype):
        lo, hi = haar_dwt2d_split(x)
        back = haar_idwt2d_split(lo, hi, x.shape[2:])
    want_lo, want_hi = haar_dwt2d_split(x.float())
    _close_to_rounded(lo, want_lo, dtype)
    _close_to_rounded(hi, want_hi, dtype)
    _close_to_rounded(back, haar_idwt2d_split(lo.float(), hi.float(), x.shape[2:]), dtype)


def test_film_with_mixed_dtypes(amp):
    """A bfloat16 feature map with float32 gamma and beta (what a conv and a float32 MLP give under autocast)
    meets in float32 and returns float32, the widest input; all-half inputs return half."""
    device, dtype = amp
    x = rand((2, 4, 5, 6), device, dtype, seed=4).requires_grad_()
    gamma = rand((2, 4), device, torch.float32, seed=5).requires_grad_()
    beta = rand((4,), device, torch.float32, seed=6).requires_grad_()
    with torch.autocast(device, dtype=dtype):
        y = hf.film(x, gamma, beta)
    assert y.dtype == torch.float32
    want = hf.ops.film_reference(x.detach().float(), gamma.detach(), beta.detach().expand(2, 4))
    torch.testing.assert_close(y.detach(), want, rtol=1e-6, atol=1e-6)
    g = rand(y.shape, device, torch.float32, seed=7)
    gx, ggamma, gbeta = torch.autograd.grad(y, (x, gamma, beta), g)
    assert (gx.dtype, ggamma.dtype, gbeta.dtype) == (dtype, torch.float32, torch.float32)
    _close_to_rounded(gx, g * gamma.detach()[:, :, None, None], dtype)
    torch.testing.assert_close(ggamma, (g * x.detach().float()).sum((2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gbeta, g.sum((0, 2, 3)), rtol=1e-5, atol=1e-5)
    with torch.autocast(device, dtype=dtype):
        half = hf.film(x.detach(), gamma.detach().to(dtype), beta.detach().to(dtype))
    _close_to_rounded(half, hf.ops.film_reference(x.detach().float(), gamma.detach().to(dtype).float(),
                                                  beta.detach().to(dtype).float()), dtype)  # fmt: skip


def test_attention_pool_computes_in_float32(amp):
    """A softmax over positions: the core op and the whole public function (projections included) compute in
    float32 and return float32, so the result is the float32 function of the rounded inputs; gradients reach
    half-precision inputs in their dtype."""
    device, dtype = amp
    x = rand((2, 6, 5, 7), device, dtype, seed=8).requires_grad_()
    queries = rand((3, 4), device, torch.float32, seed=9).requires_grad_()
    w_k, w_v = rand((4, 6), device, dtype, seed=10), rand((4, 6), device, dtype, seed=11)
    a = (queries.detach() @ w_k.float() * 0.5).expand(2, 3, 6).contiguous()
    with torch.autocast(device, dtype=dtype):
        z, lse = torch.ops.harmonizer_fast.attention_pool(x.detach(), a.to(dtype))
        out = hf.token_attention_pool(x, queries, w_k, w_v)
    z32, lse32 = torch.ops.harmonizer_fast.attention_pool(x.detach().float(), a.to(dtype).float())
    assert z.dtype == lse.dtype == torch.float32
    torch.testing.assert_close((z, lse), (z32, lse32), rtol=0, atol=0)
    assert out.dtype == torch.float32
    x32, q32 = x.detach().float().requires_grad_(), queries.detach().clone().requires_grad_()
    want = hf.token_attention_pool(x32, q32, w_k.float(), w_v.float())
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    ref = hf.ops.token_attention_pool_reference(x32.detach().double(), q32.detach().double(), w_k.double(),
                                                w_v.double())  # fmt: skip
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)  # float32 accuracy, not bfloat16's
    gx, gq = torch.autograd.grad(out.sum(), (x, queries))
    wx, wq = torch.autograd.grad(want.sum(), (x32, q32))
    assert gq.dtype == torch.float32
    _close_to_rounded(gx, wx, dtype)
    torch.testing.assert_close(gq, wq, rtol=0, atol=0)


def test_fcomb_head_returns_float32_probabilities(amp):
    device, dtype = amp
    b, k, c, h, w = 2, 3, 8, 5, 6
    base = rand((b, c, h, w), device, dtype, seed=12)
    bias = rand((b, k, c), device, dtype, seed=13)
    hw, hb = rand((2, c, c), device, torch.float32, seed=14) * 0.3, rand((2, c), device, torch.float32, seed=15)
    lw, lb = rand((c,), device, torch.float32, seed=16), rand((1,), device, torch.float32, seed=17)
    with torch.autocast(device, dtype=dtype):
        p = fcomb_head(base, bias, hw, hb, lw, lb)
    assert p.dtype == torch.float32
    want = fcomb_head_reference(base.float().reshape(b, c, -1), bias.float(), hw, hb, lw, lb).reshape(b, k, h, w)
    torch.testing.assert_close(p, want, rtol=1e-5, atol=1e-6)


def test_ged_family_in_float32(amp):
    device, dtype = amp
    g = torch.Generator().manual_seed(18)
    probs = torch.rand(2, 4, 9, 8, generator=g).to(device=device, dtype=dtype).requires_grad_()
    raters = (torch.rand(2, 3, 9, 8, generator=g) > 0.6).to(device)
    with torch.autocast(device, dtype=dtype):
        loss = hf.ged_loss(probs, raters)
        iou = hf.pairwise_iou(probs, probs, soft=True)
        ged = hf.ged(probs, raters)
    assert loss.dtype == iou.dtype == ged.dtype == torch.float32
    p32 = probs.detach().float().requires_grad_()
    want = hf.ged_loss(p32, raters)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)  # float32 on the same rounded inputs
    torch.testing.assert_close(iou, hf.pairwise_iou(p32.detach(), p32.detach(), soft=True), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ged, hf.ged(p32.detach(), raters), rtol=0, atol=0)
    (gp,) = torch.autograd.grad(loss, probs)
    (gw,) = torch.autograd.grad(want, p32)
    _close_to_rounded(gp, gw, dtype)


def test_small_config_trains_under_bf16_autocast_on_cpu():
    """Forward and loss under CPU bfloat16 autocast, backward outside it (torch's recommended pattern), Adam
    on float32 weights: the loss falls in both phases, and the first step's loss is the float32 model's within
    bfloat16 accuracy."""
    torch.manual_seed(6)
    model = HarmonizerNet(HarmonizerConfig.small()).train()
    images, masks = synthetic_batch(8, seed=1)

    def run(steps: int) -> list[float]:
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        history = []
        for step in range(steps):
            noise = model.draw_noise(images.shape[0], torch.Generator().manual_seed(step))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(images, masks, noise=noise)
                loss, _ = losses.total_loss(out, masks, model.config)
            if step == 0:
                with torch.no_grad():
                    ref, _ = losses.total_loss(model(images, masks, noise=noise), masks, model.config)
                got = float(loss.detach())
                assert abs(got - float(ref)) < 0.05 * abs(float(ref)), (got, float(ref))
            opt.zero_grad()
            loss.backward()
            assert all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())
            opt.step()
            history.append(float(loss.detach()))
        return history

    h1 = run(30)
    assert sum(h1[-5:]) / 5 < 0.8 * sum(h1[:5]) / 5, h1
    model.set_phase(2)
    h2 = run(20)
    assert sum(h2[-5:]) / 5 < sum(h2[:5]) / 5, h2
