"""The Personalizer personalizes (paper section 3.2; issue: rater identity must have real capacity and the
refined detail bands must reach z'), phase 2 starts from the selected phase-1 model, and the default
selection scores cannot be won by predicting nothing."""

import numpy as np
import pytest
import torch

import harmonizer_fast as hf
from harmonizer_fast import data as hd
from harmonizer_fast import selection
from harmonizer_fast.demo import run_demo
from harmonizer_fast.evaluate import collapsed, tables_markdown
from harmonizer_fast.metrics import MetricAccumulator, dice_binary
from harmonizer_fast.model import HarmonizerConfig, HarmonizerNet
from harmonizer_fast.rundir import RunDir


def backbone_inputs(seed=0, b=4, raters=4):
    """A small model with its real (random-init) backbone features on synthetic images, a prior z and bank."""
    torch.manual_seed(seed)
    model = HarmonizerNet(HarmonizerConfig.small(num_raters=raters)).eval()
    data = hd.make_synthetic(b, size=32, raters=raters, seed=seed)
    x = torch.from_numpy(data.images)
    with torch.no_grad():
        f, _ = model.features(x)
        prior = model.prior(x)
        bank = prior.mean[:, None] + prior.stddev[:, None] * torch.randn(b, model.config.prior_bank, 6)
    return model, data, x, f, prior.mean, bank


def test_rater_identity_has_real_capacity():
    """At initialization the raters' latents already differ (by far more than float noise: the previous
    design gave max |z'_r - z'_0| <= 6e-7 on real features); one phase-2 step moves each rater's latent
    differently, because each head is supervised by its own rater."""
    model, data, x, f, z, bank = backbone_inputs()
    raters = torch.arange(4)
    p = model.personalizer
    zp = p(f, z, bank, raters)
    spread = (zp - zp[:, :1]).abs().amax()
    assert spread > 1e-2, float(spread)
    model.set_phase(2)
    opt = torch.optim.Adam(p.parameters(), lr=1.5e-3)  # the small preset's phase-2 step
    masks = torch.from_numpy(data.masks).float()
    logits = model.fcomb.logits(f, p(f, z, bank, raters))
    loss = sum(torch.nn.functional.binary_cross_entropy_with_logits(logits[:, i], masks[:, i]) for i in range(4))
    loss.backward()
    assert all(p.rater_tokens.grad[i].abs().max() > 0 for i in range(4))  # each rater's own token learns
    opt.step()
    with torch.no_grad():
        moved = p(f, z, bank, raters) - zp.detach()
    # measured 0.016-0.036 here: three to four orders of magnitude above float noise
    differences = (moved - moved[:, :1]).abs().amax(dim=(0, 2))[1:]
    assert (differences > 1e-3).all(), differences


def test_detail_bands_reach_the_latent():
    """Perturbing the refined detail bands X'_H (and nothing else) changes z' by more than a stated tolerance;
    a plain spatial mean after the orthonormal IDWT would keep only the low band and change it by ~1e-8."""
    model, _, _, f, z, bank = backbone_inputs(seed=1)
    p = model.personalizer
    raters = torch.arange(4)
    with torch.no_grad():
        low, high = p.bands(f)
        refined = p.refine(high, raters)
        base = p.latent(low, refined, z, bank, raters)
        bump = 0.5 * torch.randn(refined.shape, generator=torch.Generator().manual_seed(0))
        bumped = p.latent(low, refined + bump, z, bank, raters)
        # the same perturbation through a plain mean of the IDWT: the low band alone survives
        c4 = low.shape[1]
        low_r = low.repeat_interleave(4, dim=0)

        def mean_pool(r):
            return hf.haar_idwt2d(torch.cat([low_r[:, :, None], r.reshape(-1, c4, 3, *r.shape[-2:])], 2)).mean((2, 3))

        plain = (mean_pool(refined + bump) - mean_pool(refined)).abs().max()
    assert (bumped - base).abs().max() > 1e-3, float((bumped - base).abs().max())
    assert plain < 1e-5  # why the pooling keeps the bands' energy


def test_an_empty_predictor_never_beats_copying_the_raters():
    """Under the default selection scores (phase 1: Table 1's unbiased GED; phase 2: Table 2's Dice_mean),
    predicting all-empty masks never scores better than copying the raters, on slices with any number of
    empty raters (and ties only where every rater is empty)."""
    rng = np.random.default_rng(0)
    for trial in range(40):
        n, k = 4, 16
        raters = np.zeros((3, n, 24, 24), np.float32)
        for b in range(3):
            for i in range(rng.integers(0, n + 1)):  # 0..n non-empty raters, the rest empty
                r0, c0, s = rng.integers(2, 12), rng.integers(2, 12), rng.integers(3, 10)
                raters[b, i, r0 : r0 + s, c0 : c0 + s + rng.integers(-2, 3)] = 1
        y = torch.from_numpy(raters)
        copy = y[:, torch.arange(k) % n]  # K samples cycling through the raters
        empty = torch.zeros_like(copy)
        tables = {}
        for name, samples in (("copy", copy), ("empty", empty)):
            t1, t2 = MetricAccumulator(), MetricAccumulator()
            t1.update(samples, y)
            t2.update(y if name == "copy" else empty[:, :n], y, y if name == "copy" else empty[:, :n])
            tables[name] = {"table1": t1.summary(), "table2": t2.summary()}
        for phase in (1, 2):
            name = selection.DEFAULTS[phase]
            assert selection.score(name, tables["empty"]) >= selection.score(name, tables["copy"]), (trial, phase)


def test_an_all_empty_model_is_reported_as_collapsed():
    y = torch.zeros(2, 4, 16, 16)
    y[:, :, 4:9, 5:10] = 1
    y[1, 0] = 0  # one empty rater: its own copy is empty, the model's other samples are not
    rows = {}
    for name, samples in (
        ("copy", y),
        ("empty", torch.zeros_like(y)),
        ("one non-empty", y * (torch.arange(4) == 2)[:, None, None]),
    ):
        acc = MetricAccumulator()
        acc.update(samples, y)
        rows[name] = {"table1": acc.summary(), "table2": None}
    assert [collapsed(r["table1"]) for r in rows.values()] == [False, True, False]
    np.testing.assert_allclose(rows["copy"]["table1"]["mean"]["empty_fraction"], 1 / 8)
    lines = tables_markdown(rows).splitlines()
    assert ["collapsed" in line for line in lines[2:]] == [False, True, False]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo itself (what `make demo` runs): 256 synthetic images with four raters of consistent styles
    (outlines 2 pixels apart), the small config through both phases, about four minutes of CPU."""
    out = tmp_path_factory.mktemp("demo")
    result = run_demo(out, progress=False, log=lambda _m: None)
    return result, RunDir(out / "run"), hd.make_synthetic(256, size=64, raters=4, seed=0)


@pytest.mark.slow
def test_phase2_starts_from_the_selected_phase1_model(demo):
    _, run, _ = demo
    assert run.has("best_phase1") and run.has("best")
    log = run.read_log()
    phase1 = [r for r in log if r["phase"] == 1]
    best_epoch = min(phase1, key=lambda r: r["score"])["epoch"]
    assert run.state("best_phase1")["position"]["epoch"] == best_epoch
    assert run.state("best_phase1")["train_config"]["select_phase1"] == "ged_unbiased"
    assert all(r["score_name"] == ("ged_unbiased" if r["phase"] == 1 else "dice_mean") for r in log)
    m1, _ = run.load_model("best_phase1")
    m, _ = run.load_model("best")
    shared = [k for k in m1.state_dict() if not k.startswith("personalizer.")]
    assert all(torch.equal(m1.state_dict()[k], m.state_dict()[k]) for k in shared)  # best = phase 1 + personalizer
    assert m.personalizer_trained and not m1.personalizer_trained


def _heads_and_raters(demo):
    result, run, data = demo
    model, _ = run.load_model("best")
    scoring = run.scoring_set(data, model.config, "test")
    x = torch.from_numpy(scoring.data.images[scoring.indices])
    y = torch.from_numpy(scoring.data.masks[scoring.indices]) > 0
    return model.personalize(x, generator=torch.Generator().manual_seed(0)) > 0.5, y


@pytest.mark.slow
def test_each_head_is_closest_to_its_rater(demo):
    """On held-out images, head i is closer to rater i than to any other rater (mean Dice). Measured on an AMD
    EPYC: diagonal 0.803, 0.859, 0.913, 0.917; the nearest other rater 0.728 (head 1 against rater 2). It
    failed while phase 2 trained on a sampled z (head 1 drawn too large: 0.7835 with rater 1, 0.7974 with
    rater 2)."""
    heads, y = _heads_and_raters(demo)
    d = torch.stack([torch.stack([dice_binary(heads[:, i], y[:, j]).mean() for j in range(4)]) for i in range(4)])
    for i in range(4):
        others = torch.cat([d[i, :i], d[i, i + 1 :]])
        assert d[i, i] > others.max(), (i, d)


@pytest.mark.slow
def test_heads_follow_the_raters_areas_and_beat_identity_heads(demo):
    """The heads' mean areas are ordered as the raters' are, and personalization beats the identity heads'
    Dice_mean on the held-out images."""
    heads, y = _heads_and_raters(demo)
    head_area = heads.float().mean((0, 2, 3))
    rater_area = y.float().mean((0, 2, 3))
    assert torch.equal(torch.argsort(head_area), torch.argsort(rater_area)), (head_area, rater_area)
    # measured +0.121 on an AMD EPYC; against the phase-1 Dice_match the heads are below (-0.026), which the
    # demo reports (with the latent ceiling, +0.021 above Dice_match) and this test does not assert
    result = demo[0]
    assert result["personalization_gain"]["minus_identity_dice_mean"] > 0.05, result["personalization_gain"]


@pytest.mark.slow
def test_latent_ceiling_bounds_the_heads_and_dice_match(demo):
    """The demo's latent ceiling (an oracle through the same frozen head) is above what the heads reach and
    above the phase-1 Dice_match, per rater as well as on the mean: a ceiling below the heads would mean the
    oracle search is broken. Measured on an AMD EPYC: ceiling 0.9199, heads 0.8726, Dice_match 0.8987."""
    c = demo[0]["latent_ceiling"]
    assert c["ceiling_minus_heads"] > 0 and c["ceiling_minus_phase1_dice_match"] > 0, c
    assert all(v > h for v, h in zip(c["per_rater"], c["heads_per_rater"])), c
    np.testing.assert_allclose(c["heads_dice_mean"], demo[0]["personalization_gain"]["dice_mean"], rtol=1e-12)


@pytest.mark.parametrize("shape", [(2, 5, 64, 64), (1, 3, 10, 17), (3, 4, 2, 7)], ids=str)
@pytest.mark.parametrize("dilation", [2, 3])
def test_dilated_depthwise_as_polyphase_convs_equals_the_dilated_conv(shape, dilation):
    """The LKA's dilated depthwise conv runs as undilated convs on the polyphase components (oneDNN is
    slow on dilated depthwise convs under AVX2): values and all three gradients equal torch's dilated conv,
    in float64, also where H and W are not multiples of the dilation or smaller than the kernel's reach."""
    from harmonizer_fast.model.personalizer import _dilated_depthwise

    c = shape[1]
    g = torch.Generator().manual_seed(7)
    conv = torch.nn.Conv2d(c, c, 7, padding=3 * dilation, dilation=dilation, groups=c).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
        conv.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
    x = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_()
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    ours = _dilated_depthwise(conv, x)
    ref = conv(x)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(ours, (x, conv.weight, conv.bias), dy)
    want = torch.autograd.grad(ref, (x, conv.weight, conv.bias), dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
