"""Set-level metrics (harmonizer_fast.metrics.set_level, re-exported by harmonizer_fast.metrics) against numpy
transcriptions of their defining papers' formulas, written pair by pair in float64, on random and
adversarial cases: all-empty raters, all-empty samples, K = 1, N = 1, K != N, N = 7."""

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import harmonizer_fast as hf
from harmonizer_fast import metrics

H = W = 12


def _iou(a, b, empty):
    union = np.logical_or(a, b).sum()
    return empty if union == 0 else np.logical_and(a, b).sum() / union


def _dice(a, b, empty=1.0):
    total = a.sum() + b.sum()
    return empty if total == 0 else 2 * np.logical_and(a, b).sum() / total


def _case(name, k, n, seed):
    g = torch.Generator().manual_seed(seed)
    samples = torch.rand(2, k, H, W, generator=g)
    # blobs of varying size, so that masks overlap partly
    raters = (torch.rand(2, n, H, W, generator=g) < torch.rand(2, n, 1, 1, generator=g) * 0.6).float()
    if name == "empty_raters":
        raters.zero_()
    if name == "empty_samples":
        samples *= 0.4
    if name == "one_empty_rater":
        raters[:, 0] = 0
    return samples, raters


CASES = [
    ("random", 6, 4), ("random", 8, 4), ("random", 5, 3), ("empty_raters", 4, 4), ("empty_samples", 4, 2),
    ("one_empty_rater", 4, 4), ("random", 1, 4), ("random", 4, 1), ("random", 3, 7),
]  # fmt: skip


@pytest.fixture(params=CASES, ids=[f"{c}-K{k}-N{n}" for c, k, n in CASES])
def case(request):
    name, k, n = request.param
    samples, raters = _case(name, k, n, seed=k * 10 + n)
    return samples, raters, (samples > 0.5).numpy(), raters.numpy() > 0.5


def test_hm_iou(case):
    samples, raters, s, r = case
    want = []
    for si, ri in zip(s, r):
        k, n = len(si), len(ri)
        targets = np.concatenate([ri] * (k // n)) if k % n == 0 else ri
        m = np.array([[_iou(a, b, 1.0) for b in targets] for a in si])
        rows, cols = linear_sum_assignment(-m)
        want.append(m[rows, cols].mean())
    np.testing.assert_allclose(metrics.hm_iou(samples, raters).numpy(), want, rtol=1e-12)


def test_d_max_and_combined_sensitivity(case):
    samples, raters, s, r = case
    d_max = [np.mean([max(_dice(a, b) for a in si) for b in ri]) for si, ri in zip(s, r)]
    sens = []
    for si, ri in zip(s, r):
        us, ur = si.any(0), ri.any(0)
        sens.append(1.0 if ur.sum() == 0 else np.logical_and(us, ur).sum() / ur.sum())
    np.testing.assert_allclose(metrics.d_max(samples, raters).numpy(), d_max, rtol=1e-12)
    np.testing.assert_allclose(metrics.combined_sensitivity(samples, raters).numpy(), sens, rtol=1e-12)


def test_sample_diversity(case):
    samples, _, s, _ = case
    want = []
    for si in s:
        pairs = list(itertools.permutations(range(len(si)), 2))
        want.append(np.mean([1 - _iou(si[a], si[b], 1.0) for a, b in pairs]) if pairs else 0.0)
    np.testing.assert_allclose(metrics.sample_diversity(samples).numpy(), want, rtol=1e-12, atol=1e-15)


WEIGHTED = sorted(c for c, conv in metrics.CONVENTIONS.items() if not conv.undefined_empty)


@pytest.mark.parametrize("convention", WEIGHTED)
def test_weighted_ged(case, convention):
    """Against the weighted energy distance written out; uniform weights equal the fused plain GED."""
    samples, raters, s, r = case
    conv = metrics.CONVENTIONS[convention]
    k, n = samples.shape[1], raters.shape[1]
    g = np.random.default_rng(k + n)
    w, v = g.random(k) + 0.1, g.random(n) + 0.1

    def d(a, b):
        union = np.logical_or(a, b).sum()
        return 1 - (conv.empty_iou if union == 0 else np.logical_and(a, b).sum() / (union + conv.eps))

    def term(xs, ys, wx, wy, within):
        pairs = [(a, b) for a in range(len(xs)) for b in range(len(ys)) if not (within and conv.offdiag and a == b)]
        total = sum(wx[a] * wy[b] for a, b in pairs)
        return sum(wx[a] * wy[b] * d(xs[a], ys[b]) for a, b in pairs) / total if pairs else 0.0

    want = [2 * term(si, ri, w, v, False) - term(si, si, w, w, True) - term(ri, ri, v, v, True) for si, ri in zip(s, r)]
    got = metrics.ged(
        samples, raters, sample_weights=torch.tensor(w), rater_weights=torch.tensor(v), convention=convention
    )
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)
    uniform = metrics.ged(samples, raters, sample_weights=torch.ones(k), convention=convention)
    torch.testing.assert_close(uniform.float(), hf.ged(samples, raters, convention=convention), atol=2e-6, rtol=0)


def test_ncc(case):
    samples, raters, s, r = case
    eps = 1e-8

    def ce(t, x):  # two classes, one-hot binary sample x under target t
        return -(t * np.log(x + eps) + (1 - t) * np.log(1 - x + eps))

    def ncc(a, b):
        sa, sb = a.std(), b.std()
        return 0.0 if sa == 0 or sb == 0 else np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb)

    want = []
    for si, ri in zip(s.astype(float), r.astype(float)):
        mean = si.mean(0)
        e_ss = np.mean([ce(mean, x) for x in si], axis=0)
        want.append(np.mean([ncc(e_ss, np.mean([ce(y, x) for x in si], axis=0)) for y in ri]))
    np.testing.assert_allclose(metrics.ncc(samples, raters).numpy(), want, rtol=1e-9, atol=1e-12)


def _variance_range(masks, self_pairs):
    """Rahman et al.'s V_max, V_min: numpy's variance over pixels of A_i - A_j, for every pair."""
    m = len(masks)
    v = [np.var(masks[i].astype(int) - masks[j].astype(int)) for i in range(m) for j in range(m)
         if self_pairs or i != j]  # fmt: skip
    return (max(v), min(v)) if v else (0.0, 0.0)


def _d_a(si, ri, self_pairs):
    (ymax, ymin), (smax, smin) = _variance_range(ri, self_pairs), _variance_range(si, self_pairs)
    return 1 - (abs(ymax - smax) + abs(ymin - smin)) / 2


@pytest.mark.parametrize("self_pairs", [False, True])
def test_diversity_agreement_and_ci_score(case, self_pairs):
    samples, raters, s, r = case
    d_a = [_d_a(si, ri, self_pairs) for si, ri in zip(s, r)]
    got = metrics.diversity_agreement(samples, raters, include_self_pairs=self_pairs)
    np.testing.assert_allclose(got.numpy(), d_a, rtol=1e-12, atol=1e-14)
    ci = []
    for si, ri, da in zip(s, r, d_a):
        us, ur = si.any(0), ri.any(0)
        sc = 1.0 if ur.sum() == 0 else np.logical_and(us, ur).sum() / ur.sum()
        dm = np.mean([max(_dice(a, b) for a in si) for b in ri])
        ci.append(0.0 if sc + dm + da == 0 else 3 * sc * dm * da / (sc + dm + da))
    got = metrics.ci_score(samples, raters, include_self_pairs=self_pairs)
    np.testing.assert_allclose(got.numpy(), ci, rtol=1e-12, atol=1e-14)


def test_diversity_agreement_rewards_matching_spread():
    """Samples that are the raters score D_a = 1 (and CI = 1 with S_c = D_max = 1); identical samples against
    diverse raters score lower; one sample or one rater has no pair and counts as no diversity."""
    raters = torch.zeros(1, 3, H, W)
    raters[0, 0, 2:6, 2:6] = 1
    raters[0, 1, 2:9, 2:9] = 1
    raters[0, 2, 5:11, 0:4] = 1
    assert metrics.diversity_agreement(raters, raters).item() == 1.0 and metrics.ci_score(raters, raters).item() == 1.0
    same = raters[:, :1].repeat(1, 3, 1, 1)
    assert metrics.diversity_agreement(same, raters).item() < 1.0
    assert metrics.diversity_agreement(same, raters[:, :1]).item() == 1.0


def test_kohl_convention_has_no_weighted_form():
    samples, raters = _case("random", 4, 3, seed=1)
    with pytest.raises(ValueError, match="convention 'kohl' has no weighted form"):
        metrics.ged(samples, raters, sample_weights=torch.ones(4), convention="kohl")
    plain = hf.ged(samples, raters, convention="kohl")
    torch.testing.assert_close(metrics.ged(samples, raters, convention="kohl"), plain)


def test_known_values():
    """Hand-checkable cases: samples that copy the raters reach hm_iou = D_max = S_c = 1; all-empty samples
    against non-empty raters reach 0; bad weights are refused with the argument's name."""
    raters = torch.zeros(1, 2, H, W)
    raters[0, 0, 2:6, 2:6] = 1
    raters[0, 1, 3:8, 3:8] = 1
    copy = raters.repeat(1, 2, 1, 1)
    assert metrics.hm_iou(copy, raters).item() == 1.0
    assert metrics.d_max(copy, raters).item() == 1.0 and metrics.combined_sensitivity(copy, raters).item() == 1.0
    empty = torch.zeros(1, 4, H, W)
    assert metrics.hm_iou(empty, raters).item() == 0.0 and metrics.combined_sensitivity(empty, raters).item() == 0.0
    with pytest.raises(ValueError, match="sample_weights must be finite and non-negative"):
        metrics.ged(copy, raters, sample_weights=torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"rater_weights must have shape \(2,\)"):
        metrics.ged(copy, raters, rater_weights=torch.ones(3))


def test_dice_soft_curve_sweeps_any_thresholds():
    """Each point of the curve is the Dice of the thresholded means, with the module's documented 1e-8
    smoothing (numpy); the default mean is Dice_soft."""
    samples, raters = _case("random", 5, 4, seed=1)
    ts = np.linspace(0.0, 0.95, 20)
    p, y = samples.double().mean(1).numpy(), raters.double().mean(1).numpy()

    def dice(a, b):
        return (2 * np.logical_and(a, b).sum() + 1e-8) / (a.sum() + b.sum() + 1e-8)

    want = [[dice(pi > t, yi > t) for t in ts] for pi, yi in zip(p, y)]
    np.testing.assert_allclose(metrics.dice_soft_curve(samples, raters, ts).numpy(), want, rtol=1e-7)
    five = metrics.dice_soft_curve(samples, raters).numpy().mean(1)
    np.testing.assert_allclose(metrics.dice_soft(samples, raters).numpy(), five, rtol=1e-12)
    with pytest.raises(ValueError, match=r"dice_soft: thresholds\[1\] must be a number in \[0, 1\), got 1.0"):
        metrics.dice_soft(samples, raters, thresholds=[0.5, 1.0])
    with pytest.raises(ValueError, match=r"thresholds must be a non-empty list of values in \[0, 1\)"):
        metrics.dice_soft(samples, raters, thresholds=[])


def test_set_level_metrics_share_counts_and_equal_each_function(case):
    """The batch entry point (three kernel calls) gives each metric's own value, and evaluate_batch carries it."""
    samples, raters, _, _ = case
    got = metrics.set_level_metrics(samples, raters)
    assert tuple(got) == metrics.SET_LEVEL_KEYS
    for key, value in got.items():
        fn = getattr(metrics, key)
        want = fn(samples) if key == "sample_diversity" else fn(samples, raters)
        torch.testing.assert_close(value, want.double(), rtol=0, atol=1e-12, msg=key)
    batch = metrics.evaluate_batch(samples, raters)
    for key in metrics.SET_LEVEL_KEYS:
        np.testing.assert_array_equal(batch[key], got[key].numpy())
