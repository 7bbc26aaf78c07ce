"""harmonizer_fast.metrics against naive numpy transcriptions of docs/architecture.md, "Conventions" and paper
appendices C-F: one image, one pair, one pixel bin at a time; the Hungarian match against brute force over all
assignments (independent of scipy)."""

import itertools
import math

import numpy as np
import pytest
import torch
from test_ged import make_case, np_ged

from harmonizer_fast import metrics
from harmonizer_fast.metrics.uncertainty import _histogram


def np_dice(a, b):
    a, b = a.astype(bool), b.astype(bool)
    return (2 * np.logical_and(a, b).sum() + 1e-8) / (a.sum() + b.sum() + 1e-8)


def np_image_metrics(p, y, heads=None):
    """One image: p (K, H, W) probabilities, y (N, H, W) binary, heads (N, H, W) or None."""
    k, n = len(p), len(y)
    mp, my = p.mean(0), y.mean(0)
    soft = np.mean([np_dice(mp > t, my > t) for t in (0.1, 0.3, 0.5, 0.7, 0.9)])
    d = np.array([[np_dice(y[i], p[j] > 0.5) for j in range(k)] for i in range(n)])
    best, best_each = -1.0, None
    for cols in itertools.permutations(range(k), min(n, k)):  # brute-force assignment
        for rows in itertools.combinations(range(n), min(n, k)):
            total = sum(d[r, c] for r, c in zip(rows, cols))
            if total > best + 1e-12:
                best = total
                best_each = np.full(n, np.nan)
                for r, c in zip(rows, cols):
                    best_each[r] = d[r, c]
    out = {
        "ged": np_ged(p, y, "dpersona")[0],
        "ged_unbiased": np_ged(p, y, "unbiased")[0],
        "dice_soft": soft,
        "dice_max": d.max(0).mean(),
        "dice_max_reverse": d.max(1).mean(),
        "dice_match": best / min(n, k),
        "empty_fraction": np.mean([not (pk > 0.5).any() for pk in p]),
    }
    out["dice_max_mean"] = (out["dice_max"] + out["dice_max_reverse"]) / 2
    each = best_each if heads is None else np.array([np_dice(heads[i] > 0.5, y[i]) for i in range(n)])
    out["dice_each"] = each
    out["dice_each_mean"] = np.nanmean(each)
    maps = [mp] * n if heads is None else list(heads)
    out["ece"] = np.array([np_reliability(m, lab, np.arange(11) / 10)[3] for m, lab in zip(maps, y)])
    out["brier"] = np.array([np.mean((m - lab) ** 2) for m, lab in zip(maps, y)])
    return out


def np_reliability(p, y, edges):
    """Paper Eq. 9 bin by bin: bin i holds edges[i] <= p < edges[i + 1] (the last bin also p = 1). Returns
    (count, mean confidence, foreground share, ECE) with NaN for an empty bin."""
    flat_p, flat_y = p.ravel(), y.ravel()
    count, conf, freq, ece = [], [], [], 0.0
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        sel = (flat_p >= lo) & ((flat_p < hi) if i < len(edges) - 2 else (flat_p <= hi))
        count.append(sel.sum())
        conf.append(flat_p[sel].mean() if sel.any() else np.nan)
        freq.append(flat_y[sel].mean() if sel.any() else np.nan)
        if sel.any():
            ece += sel.sum() / flat_p.size * abs(freq[-1] - conf[-1])
    return np.array(count), np.array(conf), np.array(freq), ece


def np_entropy(p):
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return np.nan_to_num(h, nan=0.0)


CASES = {
    "basic": dict(b=3, k=5, n=4, h=12, w=10),
    "fewer-samples": dict(b=2, k=2, n=4, h=9, w=9),
    "one-rater": dict(b=2, k=3, n=1, h=8, w=11),
    "empties": dict(b=2, k=4, n=3, h=8, w=8, empty_samples=[(0, 1)], empty_raters=[(1, 2)]),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("personalized", [False, True])
def test_evaluate_batch_matches_transcription(name, personalized):
    probs, raters = make_case(**CASES[name], seed=len(name))
    heads = None
    if personalized:
        heads = torch.sigmoid(
            torch.randn(raters.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        )
    got = metrics.evaluate_batch(probs.float(), raters.bool(), None if heads is None else heads.float())
    for bi in range(probs.shape[0]):
        ref = np_image_metrics(probs[bi].float().double().numpy(), raters[bi].numpy(),
                               None if heads is None else heads[bi].float().double().numpy())  # fmt: skip
        for key, value in ref.items():
            np.testing.assert_allclose(got[key][bi], value, rtol=1e-5, atol=1e-6, err_msg=f"{name} {key}")
    assert set(metrics.PER_IMAGE_KEYS) <= set(got)
    assert got["dice_each"].shape == raters.shape[:2]


def test_unmatched_raters_are_nan_and_ignored_in_the_mean():
    probs, raters = make_case(b=1, k=2, n=4, h=8, w=8, seed=3)
    got = metrics.evaluate_batch(probs.float(), raters)
    assert np.isnan(got["dice_each"][0]).sum() == 2
    np.testing.assert_allclose(got["dice_each_mean"][0], np.nanmean(got["dice_each"][0]))


def test_entropy_map_and_groups():
    probs, raters = make_case(b=2, k=6, n=4, h=10, w=10, seed=4)
    h = metrics.entropy_map(probs)
    ref = np_entropy(probs.numpy().mean(1))
    np.testing.assert_allclose(h.numpy(), ref, atol=1e-12)
    assert float(h.min()) >= 0 and float(h.max()) <= 1
    consensus = raters.numpy().mean(1)
    pred = probs.numpy().mean(1) > 0.5
    groups = metrics.correctness_groups(probs, raters)
    np.testing.assert_array_equal(groups["TP"].numpy(), pred & (consensus == 1))
    np.testing.assert_array_equal(groups["FN"].numpy(), ~pred & (consensus == 1))
    np.testing.assert_array_equal(groups["FP"].numpy(), pred & (consensus == 0))
    np.testing.assert_array_equal(groups["TN"].numpy(), ~pred & (consensus == 0))
    agree = metrics.agreement_groups(raters)
    np.testing.assert_array_equal(agree["disagree"].numpy(), consensus == 0.5)
    np.testing.assert_array_equal(agree["agree"].numpy(), (consensus == 0) | (consensus == 1))
    total = sum(int(m.sum()) for m in agree.values())
    assert total == consensus.size


def test_histogram_median_is_within_a_bin_of_the_exact_median():
    values = torch.rand(10001, generator=torch.Generator().manual_seed(5), dtype=torch.float64) ** 3
    approx = metrics.histogram_median(_histogram(values))
    assert abs(approx - float(np.median(values.numpy()))) <= 1.0 / metrics.ENTROPY_BINS
    assert math.isnan(metrics.histogram_median(np.zeros(8, dtype=np.int64)))


def test_accumulator_pools_the_dataset():
    acc = metrics.MetricAccumulator()
    batches = [make_case(b=3, k=4, n=4, h=12, w=12, seed=s) for s in (6, 7, 8)]
    for probs, raters in batches:
        acc.update(probs.float(), raters)
    s = acc.summary()
    assert s["n_images"] == 9
    per_image = [np_image_metrics(p.float().double().numpy(), y.numpy()) for probs, raters in batches
                 for p, y in zip(probs, raters)]  # fmt: skip
    # the set-level metrics have their transcriptions in tests/test_set_metrics.py
    sets = [metrics.set_level_metrics(probs.float(), raters) for probs, raters in batches]
    for key in metrics.PER_IMAGE_KEYS:
        if key in metrics.SET_LEVEL_KEYS:
            col = torch.cat([m[key] for m in sets]).numpy()
        else:
            col = np.array([r[key] for r in per_image])
        np.testing.assert_allclose(s["mean"][key], col.mean(), rtol=1e-5, atol=1e-7, err_msg=key)
        np.testing.assert_allclose(s["std"][key], col.std(ddof=1), rtol=1e-4, atol=1e-7, err_msg=key)
    # pooled ECE over every pixel of the dataset, rater 1 (the sample mean against rater 1's masks)
    flat_p = np.concatenate([probs.float().double().numpy().mean(1).ravel() for probs, _ in batches])
    flat_y = np.concatenate([raters[:, 0].numpy().ravel() for _, raters in batches])
    ece = 0.0
    for b in range(10):
        sel = (np.minimum(np.floor(flat_p * 10), 9)) == b
        if sel.any():
            ece += sel.sum() / flat_p.size * abs(flat_y[sel].mean() - flat_p[sel].mean())
    np.testing.assert_allclose(s["calibration"]["ece_pooled"][0], ece, rtol=1e-9)
    sizes = s["dice_by_size"]
    assert sum(sizes[g]["n"] for g in ("small", "medium", "large")) + sizes["excluded_without_lesion"] == 9
    assert sizes["small"]["size_range"][1] <= sizes["medium"]["size_range"][0]
    assert sizes["medium"]["size_range"][1] <= sizes["large"]["size_range"][0]
    text = acc.markdown()
    assert "Dice_match" in text and "rater_4" in text
    with pytest.raises(ValueError, match="one rater count"):
        acc.update(*make_case(b=1, k=4, n=3, h=12, w=12, seed=9))


@pytest.mark.parametrize("bins", [4, (0.0, 0.05, 0.1, 0.3, 0.5, 0.9, 1.0), (0.0, 1.0)])
@pytest.mark.parametrize("personalized", [False, True])
def test_calibration_over_any_bins(bins, personalized):
    """ECE and the pooled reliability curve over a bin count or the user's own edges, against the bin-by-bin
    transcription; the accumulator pools with the same bins, and refuses a batch binned otherwise."""
    probs, raters = make_case(b=3, k=4, n=2, h=10, w=9, seed=12)
    probs = probs.float()
    probs[0, :, 0, :3] = torch.tensor([0.0, 1.0, 0.05])  # values on the edges
    heads = torch.rand(raters.shape, generator=torch.Generator().manual_seed(3)) if personalized else None
    edges = np.linspace(0, 1, bins + 1) if isinstance(bins, int) else np.array(bins)
    p64 = probs.double().numpy()
    maps = heads.double().numpy() if personalized else np.repeat(p64.mean(1, keepdims=True), 2, axis=1)
    y = raters.numpy().astype(float)
    want = np.array([[np_reliability(maps[b, i], y[b, i], edges)[3] for i in range(2)] for b in range(3)])
    np.testing.assert_allclose(metrics.ece(probs, raters, heads, bins=bins).numpy(), want, rtol=1e-9, atol=1e-12)
    curve = metrics.reliability_curve(probs, raters, heads, bins=bins)
    np.testing.assert_array_equal(curve["edges"].numpy(), edges)
    for i in range(2):
        count, conf, freq, ece = np_reliability(maps[:, i], y[:, i], edges)
        np.testing.assert_array_equal(curve["count"][i].numpy(), count)
        np.testing.assert_allclose(curve["confidence"][i].numpy(), conf, rtol=1e-12)
        np.testing.assert_allclose(curve["frequency"][i].numpy(), freq, rtol=1e-12)
        np.testing.assert_allclose(curve["ece"][i].item(), ece, rtol=1e-9)
    acc = metrics.MetricAccumulator(calibration=bins)
    acc.update(probs, raters, heads)
    s = acc.summary()["calibration"]
    np.testing.assert_allclose(s["ece_pooled"], curve["ece"].numpy(), rtol=1e-12)
    assert s["edges"] == edges.tolist() and np.asarray(s["reliability"]).shape == (2, len(edges) - 1, 3)
    other = 3 if bins != 3 else 5
    with pytest.raises(ValueError, match="one calibration binning"):
        acc.add(metrics.evaluate_batch(probs, raters, heads, calibration=other))


@pytest.mark.parametrize(
    "bins,exc,msg",
    [(0, ValueError, "at least 1"), (True, TypeError, "bin count or a list of edges"),
     ("10", TypeError, "bin count or a list"), ((0.0, 0.5), ValueError, "increase strictly from 0 to 1"),
     ((0.0, 0.6, 0.5, 1.0), ValueError, "increase strictly"), ((0.0, float("nan"), 1.0), ValueError, "increase")],
)  # fmt: skip
def test_calibration_bins_refused(bins, exc, msg):
    probs, raters = make_case(b=1, k=2, n=2, h=6, w=6, seed=13)
    with pytest.raises(exc, match=msg):
        metrics.ece(probs.float(), raters, bins=bins)


def test_evaluate_volume_stacks_slices():
    probs, raters = make_case(b=3, k=4, n=2, h=8, w=9, seed=10)  # 3 slices of one case
    got = metrics.evaluate_volume(probs.float(), raters)
    vol_p = np.concatenate(list(probs.float().double().numpy()), axis=1)  # (K, 3 H, W)
    vol_y = np.concatenate(list(raters.numpy()), axis=1)
    ref = np_image_metrics(vol_p, vol_y)
    for key in ("ged", "dice_soft", "dice_match", "dice_max"):
        np.testing.assert_allclose(got[key][0], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize(
    "args,exc,msg",
    [
        (lambda p, y: (p[:1], y), ValueError, "agree in B"),
        (lambda p, y: (p, y[..., :4]), ValueError, "agree in B, H and W"),
        (lambda p, y: (p, y, y[:, :1]), ValueError, "one map per rater"),
        (lambda p, y: (p > 0.5, y), TypeError, "probabilities"),
        (lambda p, y: (p[0], y), ValueError, "4-D"),
        (lambda p, y: (p, y * 0.5), ValueError, "binary"),
    ],
)
def test_bad_inputs(args, exc, msg):
    probs, raters = make_case(b=2, k=3, n=2, h=6, w=6, seed=11)
    with pytest.raises(exc, match=msg):
        metrics.evaluate_batch(*args(probs.float(), raters))


def test_head_identity_and_rater_diversity_match_numpy():
    rng = np.random.default_rng(5)
    raters = torch.from_numpy(rng.random((3, 4, 12, 12)) > 0.6).float()
    raters[1, 2] = 0  # a rater who drew nothing
    heads = torch.from_numpy(rng.random((3, 4, 12, 12))).float()
    heads[0] = raters[0] * 0.9  # image 0: every head copies its own rater
    got = metrics.evaluate_batch(heads, raters, heads)
    y, h = raters.numpy(), heads.numpy()
    for b in range(3):
        d = np.array([[np_dice(y[b, j], h[b, i] > 0.5) for j in range(4)] for i in range(4)])  # head i x rater j
        want = np.mean([d[i, i] >= d[i].max() - 1e-12 for i in range(4)])
        assert got["head_identity"][b] == pytest.approx(want)
        pairs = [(i, j) for i in range(4) for j in range(4) if i != j]
        iou = [(np.logical_and(y[b, i], y[b, j]).sum() / max(np.logical_or(y[b, i], y[b, j]).sum(), 1))
               if y[b, i].any() or y[b, j].any() else 1.0 for i, j in pairs]  # fmt: skip
        assert got["rater_diversity"][b] == pytest.approx(1 - np.mean(iou))
        assert got["raters_drawn"][b] == (y[b].reshape(4, -1).any(1)).sum()
    assert got["head_identity"][0] == 1.0
    assert np.isnan(metrics.evaluate_batch(heads, raters)["head_identity"]).all()  # no heads: undefined


def test_uncertainty_follows_raters_is_spearman_over_images_where_all_drew():
    a = np.array([0.1, 0.4, 0.2, 0.9, 0.5, 0.3])
    b = np.array([0.2, 0.3, 0.1, 0.8, 0.7, 0.6])
    ra, rb = a.argsort().argsort(), b.argsort().argsort()  # distinct values: ranks without ties
    want = np.corrcoef(ra, rb)[0, 1]
    got = metrics.uncertainty_follows_raters(a, b)
    assert got["n_images"] == 6 and got["spearman"] == pytest.approx(want)
    assert math.isnan(metrics.uncertainty_follows_raters(a[:2], b[:2])["spearman"])
    assert math.isnan(metrics.uncertainty_follows_raters(a, np.ones(6))["spearman"])
    # the accumulator keeps only the images where every rater drew
    rng = np.random.default_rng(2)
    raters = torch.from_numpy(rng.random((8, 3, 10, 10)) > 0.5).float()
    raters[:3, 0] = 0
    probs = torch.from_numpy(rng.random((8, 5, 10, 10))).float()
    acc = metrics.MetricAccumulator()
    acc.update(probs, raters)
    s = acc.summary()["uncertainty_vs_raters"]
    keep = acc.per_image("raters_drawn") == 3
    ref = metrics.uncertainty_follows_raters(acc.per_image("sample_diversity")[keep],
                                             acc.per_image("rater_diversity")[keep])
    assert s == ref and s["n_images"] == 5
