"""HarmonizerNet (paper section 3, docs/architecture.md, "Model"): shapes, the paper config's parameter and MAC budget,
phase freezing, fast sampling against the naive path, determinism, a few training steps, bad inputs."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKEND_CASES, case_id
from torch.utils.flop_counter import FlopCounterMode

from harmonizer_fast import losses
from harmonizer_fast.model import HarmonizerConfig, HarmonizerNet
from harmonizer_fast.model.backbone import ResNetEncoder

SIZE = 32  # the smallest size five halvings take


def synthetic_batch(b=4, raters=4, size=SIZE, channels=1, seed=0):
    """Bright disks on noise; each rater draws the disk with its own radius offset (a consistent style)."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    centre = size / 2 + (torch.rand(b, 2, generator=g) - 0.5) * size / 4
    radius = size / 6 + torch.rand(b, generator=g) * size / 8
    dist = ((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2).sqrt()
    img = (dist < radius[:, None, None]).float() + 0.3 * torch.randn(b, size, size, generator=g)
    offsets = torch.linspace(-1.5, 1.5, raters)
    masks = (dist[:, None] < radius[:, None, None, None] + offsets[None, :, None, None]).float()
    return img[:, None].expand(-1, channels, -1, -1).contiguous(), masks


def small(**kw):
    return HarmonizerConfig.small(**kw)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("raters", [2, 4, 7])
def test_shapes(channels, raters):
    torch.manual_seed(0)
    model = HarmonizerNet(small(in_channels=channels, num_raters=raters))
    images, masks = synthetic_batch(2, raters, channels=channels)
    out = model(images, masks)
    assert out.posterior_logits.shape == (2, SIZE, SIZE)
    assert out.prior_logits.shape == (2, model.config.ged_samples, SIZE, SIZE)
    assert out.features.shape == (2, model.config.decoder_channels[-1], SIZE, SIZE)
    model.eval()
    assert model.sample(images, num_samples=5).shape == (2, 5, SIZE, SIZE)
    assert model.personalize(images, allow_untrained=True).shape == (2, raters, SIZE, SIZE)
    assert model.personalize(images, raters=[raters - 1, 0], allow_untrained=True).shape == (2, 2, SIZE, SIZE)
    model.set_phase(2)
    assert model(images, masks).personalized_logits.shape == (2, raters, SIZE, SIZE)


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_paper_budget():
    """Paper: 30.31 M = 30.11 + 0.14 + 0.07; docs/architecture.md: the backbone family counts about 28.6 M and
    2.4 G MACs."""
    model = HarmonizerNet(HarmonizerConfig.paper()).eval()
    total, harm, pers = count(model), count(model.harmonizer), count(model.personalizer)
    print(f"paper config: total {total / 1e6:.3f} M, harmonizer {harm / 1e6:.4f} M, personalizer {pers / 1e6:.4f} M")
    assert 28e6 <= total <= 31e6
    assert 0.10e6 <= harm <= 0.20e6
    assert 0.04e6 <= pers <= 0.10e6
    x = torch.randn(1, 1, 128, 128)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        f, _ = model.features(x)
        prior = model.prior(x)
        model.fcomb.logits(f, prior.mean[:, None])
    macs = counter.get_total_flops() / 2
    print(f"paper config: {macs / 1e9:.3f} G multiply-accumulates per 128 x 128 image and sample")
    assert abs(macs - 2.4e9) <= 0.1 * 2.4e9


def grads_of(module):
    return [p.grad for p in module.parameters()]


@pytest.mark.parametrize("phase", [1, 2])
def test_phase_freezing(phase):
    torch.manual_seed(1)
    model = HarmonizerNet(small())
    images, masks = synthetic_batch(2)
    if phase == 2:
        model.set_phase(2)
    model.train()
    bn = model.backbone.encoder.bn1
    stats = bn.running_mean.clone()
    out = model(images, masks)
    loss, _ = losses.total_loss(out, masks, model.config)
    loss.backward()
    shared = [model.backbone, model.prior, model.posterior, model.fcomb, model.harmonizer]
    if phase == 1:
        for m in shared:
            assert all(g is not None for g in grads_of(m)), type(m).__name__
        assert all(g is None for g in grads_of(model.personalizer))
        assert any(float(g.abs().sum()) > 0 for g in grads_of(model.harmonizer))
        assert not torch.equal(bn.running_mean, stats)  # batch norm trains in phase 1
    else:
        for m in shared:
            assert all(g is None for g in grads_of(m)), type(m).__name__
            assert not any(p.requires_grad for p in m.parameters())
        assert all(g is not None for g in grads_of(model.personalizer))
        assert torch.equal(bn.running_mean, stats)  # frozen: statistics stay
        assert not model.backbone.training and model.personalizer.training


def test_fast_sampling_equals_naive_path():
    torch.manual_seed(2)
    model = HarmonizerNet(HarmonizerConfig.small(fcomb_layers=3)).eval()
    images, _ = synthetic_batch(3)
    z = torch.randn(3, 6, model.config.latent_dim)
    fast = model.sample(images, z=z)
    with torch.no_grad():
        f, _ = model.features(images)
        naive = torch.sigmoid(model.fcomb.naive(f, z))
        split = torch.sigmoid(model.fcomb.logits(f, z))
    torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split, naive, rtol=1e-5, atol=1e-6)


def test_paper_config_fast_sampling_equals_naive_path():
    torch.manual_seed(3)
    model = HarmonizerNet(HarmonizerConfig.paper()).eval()
    images = torch.randn(1, 1, 64, 64)
    z = torch.randn(1, 4, model.config.latent_dim) * 2
    with torch.no_grad():
        f, _ = model.features(images)
        naive = torch.sigmoid(model.fcomb.naive(f, z))
    torch.testing.assert_close(model.sample(images, z=z), naive, rtol=1e-5, atol=1e-6)


def test_determinism_under_a_seed():
    images, _ = synthetic_batch(2)
    outs = []
    for _ in range(2):
        torch.manual_seed(4)
        model = HarmonizerNet(small()).eval()
        g = torch.Generator().manual_seed(5)
        outs.append(
            (model.sample(images, 4, generator=g), model.personalize(images, generator=g, allow_untrained=True))
        )
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=0)


def train_steps(model, images, masks, steps, lr):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    history = []
    for step in range(steps):
        out = model(images, masks, generator=torch.Generator().manual_seed(step))
        loss, _ = losses.total_loss(out, masks, model.config)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    return history


def test_training_steps_lower_the_loss():
    torch.manual_seed(6)
    model = HarmonizerNet(small()).train()
    images, masks = synthetic_batch(8, seed=1)
    h1 = train_steps(model, images, masks, 30, 3e-3)
    assert sum(h1[-5:]) / 5 < 0.8 * sum(h1[:5]) / 5, h1
    model.set_phase(2)
    h2 = train_steps(model, images, masks, 20, 3e-3)
    assert sum(h2[-5:]) / 5 < sum(h2[:5]) / 5, h2


def test_baseline_switches():
    cfg = small().baseline()
    model = HarmonizerNet(cfg)
    assert model.harmonizer is None and model.personalizer is None
    images, masks = synthetic_batch(2)
    out = model(images, masks)
    assert out.prior_logits is None and not out.harmonizer_params
    _, parts = losses.phase1_loss(out, masks, cfg)
    assert set(parts) == {"seg", "kl", "total"}
    with pytest.raises(ValueError, match="no personalizer"):
        model.set_phase(2)
    with pytest.raises(ValueError, match="no personalizer"):
        model.personalize(images)


def test_losses_match_their_definitions():
    torch.manual_seed(7)
    model = HarmonizerNet(small())
    images, masks = synthetic_batch(2)
    out = model(images, masks, rater_index=torch.tensor([1, 3]))
    total, parts = losses.phase1_loss(out, masks, model.config)
    total = total.detach()
    target = masks[torch.arange(2), torch.tensor([1, 3])]
    p = torch.sigmoid(out.posterior_logits.detach())
    # phase 1: one soft Dice over the whole batch (losses.dice_bce); a per-image Dice differs here by 1e-3
    dice = (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    bce = torch.nn.functional.binary_cross_entropy(p, target)
    assert math.isclose(parts["seg"], float(1 - dice + bce), rel_tol=1e-5)
    mu_q, s_q = out.posterior.mean.detach(), out.posterior.stddev.detach()
    mu_p, s_p = out.prior.mean.detach(), out.prior.stddev.detach()
    kl = (torch.log(s_p / s_q) + (s_q**2 + (mu_q - mu_p) ** 2) / (2 * s_p**2) - 0.5).sum(1).mean()
    # float32 KL near 0 is a difference of terms near 0.5: cancellation leaves ~1e-7 absolute
    assert math.isclose(parts["kl"], float(kl), rel_tol=1e-4, abs_tol=5e-7)
    harm = sum(((g - 1) ** 2).sum(1).mean() + (b**2).sum(1).mean() for g, b in out.harmonizer_params).detach()
    c = model.config
    expect = parts["seg"] + c.lambda_kl * parts["kl"] + c.lambda_harm * float(harm) + c.lambda_ged * parts["ged"]
    assert math.isclose(float(total), expect, rel_tol=1e-5)


def test_config_round_trip():
    cfg = HarmonizerConfig.small(num_raters=7, harmonized_stages=(1, 3))
    assert HarmonizerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        HarmonizerConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_load_resnet_state_dict_averages_rgb_stem():
    torch.manual_seed(8)
    rgb = ResNetEncoder(3, 16, (1, 1, 1, 1), (16, 24, 32, 48))
    state = {**rgb.state_dict(), "fc.weight": torch.zeros(10, 48), "fc.bias": torch.zeros(10)}
    model = HarmonizerNet(small())
    missing = model.backbone.load_resnet_state_dict(state)
    assert missing == []
    torch.testing.assert_close(model.backbone.encoder.conv1.weight, rgb.conv1.weight.mean(1, keepdim=True))
    torch.testing.assert_close(model.backbone.encoder.layer4[0].conv2.weight, rgb.layer4[0].conv2.weight)


@pytest.mark.parametrize(
    "call,exc,msg",
    [
        (lambda m, x, y: m(x[:, :0], y), ValueError, "channels"),
        (lambda m, x, y: m(x.expand(-1, 3, -1, -1), y), ValueError, "in_channels=1"),
        (lambda m, x, y: m.sample(x[..., :30, :30], 2), ValueError, "multiples of 32"),
        (lambda m, x, y: m(x, y[:, :3]), ValueError, "num_raters=4"),
        (lambda m, x, y: m(x, y[:1]), ValueError, "must match images"),
        (lambda m, x, y: m.sample(x, 0), ValueError, "num_samples"),
        (lambda m, x, y: m.personalize(x, raters=[4], allow_untrained=True), ValueError, "raters must be indices"),
        (lambda m, x, y: m.personalize(x), ValueError, "personalizer was never trained"),
        (lambda m, x, y: m.sample(x.masked_fill(x > 0.5, float("nan")), 2), ValueError, "NaN or Inf"),
        (lambda m, x, y: m.set_phase(3), ValueError, "phase must be 1 or 2"),
        (lambda m, x, y: m(x.long(), y), TypeError, "floating point"),
        (lambda m, x, y: HarmonizerNet({"in_channels": 1}), TypeError, "HarmonizerConfig"),
        (lambda m, x, y: HarmonizerConfig.small(decoder_channels=(8, 8, 8, 8, 6)), ValueError,
         r"decoder_channels\[-1\] must be a multiple of 4"),
    ],
)
def test_bad_inputs(call, exc, msg):
    model = HarmonizerNet(small())
    images, masks = synthetic_batch(2)
    with pytest.raises(exc, match=msg):
        call(model, images, masks)


def test_dice_bce_is_batch_dice_plus_bce():
    """L_seg against a float64 numpy transcription: one soft Dice over every pixel of the batch (smooth 1)
    plus the mean BCE with logits, where an empty target does not count as a Dice of its own; and with
    ``per_image=True`` (phase 2) the mean of one Dice per image."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 8, 9, generator=g, dtype=torch.float64) * 3
    target = (torch.rand(3, 8, 9, generator=g) > 0.7).double()
    target[1] = 0  # an empty target
    x, y = logits.numpy(), target.numpy()
    p = 1 / (1 + np.exp(-x))
    bce = np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x))))
    dice = (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
    np.testing.assert_allclose(float(losses.dice_bce(logits, target)), 1 - dice + bce, rtol=1e-12)
    each = (2 * (p * y).sum((1, 2)) + 1) / (p.sum((1, 2)) + y.sum((1, 2)) + 1)  # phase 2: one Dice per image
    got = float(losses.dice_bce(logits, target, per_image=True))
    np.testing.assert_allclose(got, 1 - each.mean() + bce, rtol=1e-12)


@pytest.mark.parametrize("case", BACKEND_CASES, ids=case_id)
def test_predict_is_sample_then_personalize_from_one_backbone_pass(case, use_backend):
    """predict() equals sample() then personalize() bit for bit on the same generator state, on every backend
    (each runs its own fused head), with one backbone pass; its identity heads are the prior mean's maps."""
    device = use_backend(*case)
    torch.manual_seed(0)
    model = HarmonizerNet(HarmonizerConfig.small(num_raters=3)).to(device).eval()
    x = torch.rand(2, 1, 32, 32, device=device)
    probs, heads = model.predict(x, 5, generator=torch.Generator().manual_seed(3), allow_untrained=True)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(probs, model.sample(x, 5, generator=g))
    assert torch.equal(heads, model.personalize(x, generator=g, allow_untrained=True))
    _, some = model.predict(x, 5, raters=[2, 0], generator=torch.Generator().manual_seed(3), allow_untrained=True)
    g = torch.Generator().manual_seed(3)
    model.sample(x, 5, generator=g)
    assert torch.equal(some, model.personalize(x, [2, 0], generator=g, allow_untrained=True))
    same, ident = model.predict(x, 5, heads="identity", generator=torch.Generator().manual_seed(3))
    assert torch.equal(same, probs)  # the heads draw nothing: the samples do not depend on them
    mean = model.prior(x).mean
    assert torch.equal(ident, model.sample(x, z=mean[:, None].expand(-1, 3, -1).contiguous()))
    assert model.predict(x, 5, heads="none")[1] is None and model.predict(x, 5, heads=False)[1] is None
    calls = []
    handle = model.backbone.register_forward_hook(lambda *a: calls.append(1))
    for kind in (True, "identity", False):
        model.predict(x, 5, heads=kind, allow_untrained=True)
    handle.remove()
    assert len(calls) == 3
    with pytest.raises(ValueError, match="heads must be True, False or one of"):
        model.predict(x, 5, heads="all")
    with pytest.raises(ValueError, match=r"raters must be indices in \[0, 3\)"):
        model.predict(x, 5, heads="identity", raters=[3])


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 2, 9, 7), (1, 1, 1, 2), (2, 4, 33, 64)], ids=str)
def test_stem_max_pool_equals_the_pool(shape):
    """The stem's pool without autograd (separable maxima over strided slices) equals F.max_pool2d(3, 2, 1)
    bit for bit, NaN and -inf included, for even and odd sizes; with autograd it is the pool, gradients
    (one argmax per window, ties included) equal."""
    from harmonizer_fast.model.backbone import stem_max_pool

    g = torch.Generator().manual_seed(3)
    x = torch.relu(torch.randn(shape, generator=g))  # many ties at 0, as after the stem's ReLU
    x.view(-1)[:: max(1, x.numel() // 5)] = float("nan")
    x.view(-1)[1 :: max(2, x.numel() // 3)] = float("-inf")
    with torch.no_grad():
        torch.testing.assert_close(stem_max_pool(x), F.max_pool2d(x, 3, 2, 1), rtol=0, atol=0, equal_nan=True)
    xg = torch.relu(torch.randn(shape, generator=g)).requires_grad_()
    dy = torch.randn(F.max_pool2d(xg, 3, 2, 1).shape, generator=g)
    got = torch.autograd.grad(stem_max_pool(xg), xg, dy)[0]
    want = torch.autograd.grad(F.max_pool2d(xg, 3, 2, 1), xg, dy)[0]
    assert torch.equal(got, want)
