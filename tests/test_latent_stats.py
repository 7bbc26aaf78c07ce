"""The prior's statistics (harmonizer_fast.latent_stats) against a numpy transcription, the collapse flags on
a prior collapsed on purpose, and which prior parameters the GED term of Eq. 8 trains
(HarmonizerConfig.ged_through_prior)."""

import numpy as np
import pytest
import torch

from harmonizer_fast.data import make_synthetic
from harmonizer_fast.latent_stats import collapse_flags, latent_statistics
from harmonizer_fast.losses import ged_loss
from harmonizer_fast.model import HarmonizerConfig, HarmonizerNet
from harmonizer_fast.model.latent import LOG_SIGMA_MAX, with_masks


@pytest.fixture(scope="module")
def data():
    return make_synthetic(12, size=32, raters=3, seed=1)


def tiny(**kw):
    return HarmonizerConfig.small(num_raters=3, **kw)


def np_kl(mu_q, ls_q, mu_p, ls_p):
    """KL(N(mu_q, e^ls_q) || N(mu_p, e^ls_p)) per dimension, the textbook closed form."""
    sq, sp = np.exp(ls_q), np.exp(ls_p)
    return np.log(sp / sq) + (sq**2 + (mu_q - mu_p) ** 2) / (2 * sp**2) - 0.5


def test_statistics_match_numpy(data):
    torch.manual_seed(0)
    net = HarmonizerNet(tiny())
    for m in (net.prior, net.posterior):  # spread the heads so every statistic is non-trivial
        torch.nn.init.normal_(m.to_params.weight, std=0.5)
    with torch.no_grad():  # a prior mean that moves with the image by more than 0.1 sigma
        net.prior.to_params.weight[: net.config.latent_dim] *= 20
    stats = latent_statistics(net, data, batch=5)
    x, y = torch.from_numpy(data.images), torch.from_numpy(data.masks)
    with torch.no_grad():
        p = net.prior(x)
        qs = [net.posterior(with_masks(x, y[:, r])) for r in range(3)]
    mu_p, ls_p = p.mean.double().numpy(), p.stddev.log().double().numpy()
    kl = np.stack([np_kl(q.mean.double().numpy(), q.stddev.log().double().numpy(), mu_p, ls_p) for q in qs], 1)
    sigma = np.exp(ls_p)
    np.testing.assert_allclose(stats["prior_mean_spread"], mu_p.std(0), rtol=1e-6)
    np.testing.assert_allclose(stats["mean_spread_ratio"], mu_p.std(0).mean() / sigma.mean(), rtol=1e-6)
    np.testing.assert_allclose(stats["kl_per_dim"], kl.mean((0, 1)), rtol=1e-6)
    np.testing.assert_allclose(stats["kl_total"], kl.sum(2).mean(), rtol=1e-6)
    np.testing.assert_allclose(stats["prior_sigma_quantiles"]["0.5"], np.median(sigma), rtol=1e-6)
    assert stats["prior_sigma_clamped_share"] == 0.0
    assert collapse_flags(stats) == []


def test_a_collapsed_prior_is_flagged(data):
    """An image-independent mean at the sigma clamp (what LIDC training produced) raises both flags."""
    net = HarmonizerNet(tiny())
    with torch.no_grad():
        net.prior.to_params.weight.zero_()  # the mean and sigma no longer see the image
        d = net.config.latent_dim
        net.prior.to_params.bias[:d] = 0.3
        net.prior.to_params.bias[d:] = LOG_SIGMA_MAX + 20.0  # far beyond the bound
    stats = latent_statistics(net, data)
    assert stats["mean_spread_ratio"] == pytest.approx(0.0, abs=1e-9)
    assert stats["prior_sigma_clamped_share"] == 1.0
    flags = collapse_flags(stats)
    assert len(flags) == 2 and "image-independent" in flags[0] and "clamp" in flags[1]


def test_he_init_makes_the_untrained_prior_see_the_image(data):
    """With torch's default conv init the prior net's pooled features vary across images by ~1e-5 of their
    size (the signal shrinks through ~10 conv + ReLU layers while the biases stay); He init keeps it."""
    x = torch.from_numpy(data.images)
    rel = {}
    for init in ("torch", "he"):
        torch.manual_seed(0)
        net = HarmonizerNet(tiny(init=init))
        with torch.no_grad():
            h = net.prior.encoder(x).mean((2, 3))
        rel[init] = float(h.std(0).mean() / h.abs().mean())
    assert rel["torch"] < 1e-3 < 0.05 < rel["he"]


def test_statistics_refuse_a_single_image(data):
    with pytest.raises(ValueError, match="at least 2 images"):
        latent_statistics(HarmonizerNet(tiny()), data, np.array([0]))


@pytest.mark.parametrize("through, mean_grad, sigma_grad", [("none", False, False), ("mean", True, False),
                                                             ("full", True, True)])  # fmt: skip
def test_ged_term_reaches_only_the_chosen_prior_parameters(data, through, mean_grad, sigma_grad):
    torch.manual_seed(0)
    net = HarmonizerNet(tiny(ged_through_prior=through))
    x, y = torch.from_numpy(data.images[:4]), torch.from_numpy(data.masks[:4]).float()
    out = net(x, y, generator=torch.Generator().manual_seed(0))
    ged_loss(torch.sigmoid(out.prior_logits), y).backward()  # the GED term alone
    g = net.prior.to_params.bias.grad
    d = net.config.latent_dim
    assert (g is not None and bool(g[:d].abs().sum() > 0)) == mean_grad
    assert (g is not None and bool(g[d:].abs().sum() > 0)) == sigma_grad
    assert net.fcomb.first.weight.grad.abs().sum() > 0  # the decoder trains through the samples in every case


def test_configs_saved_before_the_option_keep_their_training():
    old = tiny().to_dict()
    del old["ged_through_prior"], old["init"], old["sigma_bound"]
    back = HarmonizerConfig.from_dict(old)
    assert (back.ged_through_prior, back.init) == ("full", "torch")
    assert (tiny().ged_through_prior, tiny().init) == ("none", "he")
    with pytest.raises(ValueError, match="ged_through_prior"):
        tiny(ged_through_prior="sigma")


def test_the_soft_sigma_bound_keeps_a_gradient_past_the_clamp():
    """A raw log-sigma past e^2 (one LIDC latent dimension reached 3.5) has no gradient under the old clamp,
    so nothing brings it back; the soft bound keeps the same range with a gradient everywhere."""
    from harmonizer_fast.model.latent import LOG_SIGMA_MIN, bound_log_sigma

    raw = torch.tensor([-30.0, -1.0, 0.0, 1.0, 3.5, 8.0], dtype=torch.float64, requires_grad=True)
    soft = bound_log_sigma(raw, "soft")
    soft.sum().backward()
    assert soft[2] == 0.0 and bool((soft > LOG_SIGMA_MIN - 1e-9).all() and (soft < LOG_SIGMA_MAX + 1e-9).all())
    assert bool((torch.diff(soft) > 0).all()) and bool((raw.grad > 0).all())
    hard_raw = raw.detach().clone().requires_grad_(True)
    bound_log_sigma(hard_raw, "hard").sum().backward()
    assert hard_raw.grad[4] == 0 and hard_raw.grad[5] == 0  # the trap
    old = tiny().to_dict()
    del old["sigma_bound"]
    assert HarmonizerConfig.from_dict(old).sigma_bound == "hard" and tiny().sigma_bound == "soft"
