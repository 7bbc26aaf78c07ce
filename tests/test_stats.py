"""The paired test of harmonizer_fast.stats against an exact enumeration and hand-computed effects."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from harmonizer_fast.stats import holm, paired_test, rank_biserial


def exact_wilcoxon_p(d: np.ndarray) -> float:
    """Two-sided exact p of the signed-rank statistic T+ by enumerating all 2^n sign patterns (distinct
    nonzero |d|, so the ranks are 1..n): 2 min(P(T+ <= t), P(T+ >= t)), capped at 1."""
    ranks = np.argsort(np.argsort(np.abs(d))) + 1
    t = ranks[d > 0].sum()
    totals = np.array([sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product((0, 1), repeat=d.size)])
    return min(1.0, 2 * min((totals <= t).mean(), (totals >= t).mean()))


def test_known_answer_on_hand_made_vectors():
    a = np.array([0.91, 0.85, 0.78, 0.88, 0.95, 0.70, 0.83, 0.90])
    b = np.array([0.89, 0.80, 0.81, 0.81, 0.91, 0.61, 0.84, 0.79])
    d = a - b  # 0.02 0.05 -0.03 0.07 0.04 0.09 -0.01 0.11: no ties, no zeros (scipy's exact path)
    assert len(set(np.round(np.abs(d), 10))) == d.size
    t = paired_test(a, b)
    assert t["wilcoxon_p"] == pytest.approx(exact_wilcoxon_p(d), rel=1e-12)
    assert (t["images_better"], t["images_worse"], t["n_images"]) == (6, 2, 8)
    assert t["mean_difference"] == pytest.approx(d.mean())


def test_rank_biserial_by_hand_and_swapping_flips_the_sign():
    # |d| ranks 1, 2, 3, 4; R+ = 1 + 2 + 4 = 7, R- = 3: r = (7 - 3) / 10
    assert rank_biserial(np.array([0.1, 0.2, -0.3, 0.4])) == pytest.approx(0.4)
    rng = np.random.default_rng(0)
    a, b = rng.random(30), rng.random(30)
    ab, ba = paired_test(a, b), paired_test(b, a)
    assert ab["rank_biserial"] == pytest.approx(-ba["rank_biserial"]) and ab["rank_biserial"] != 0
    assert ab["mean_difference"] == pytest.approx(-ba["mean_difference"])
    assert ab["wilcoxon_p"] == pytest.approx(ba["wilcoxon_p"])
    assert (ab["images_better"], ab["images_worse"]) == (ba["images_worse"], ba["images_better"])


def test_all_better_is_plus_one_and_nan_images_are_dropped():
    a = np.array([0.5, 0.6, np.nan, 0.9])
    b = np.array([0.4, 0.5, 0.1, 0.2])
    t = paired_test(a, b)
    assert t["rank_biserial"] == 1.0 and t["n_images"] == 3 and t["n_nan_dropped"] == 1
    same = paired_test(b, b)
    assert same["wilcoxon_p"] == 1.0 and same["rank_biserial"] == 0.0


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="1-D of one length"):
        paired_test(np.zeros(3), np.zeros(4))


def test_per_patient_means_by_hand():
    from harmonizer_fast.stats import per_patient

    ids = np.array(["b", "a", "b", "c", "a", "c"])
    vals = np.array([1.0, 2.0, 3.0, np.nan, 4.0, np.nan])
    patients, means = per_patient(vals, ids)
    assert patients.tolist() == ["a", "b", "c"]
    assert means[:2].tolist() == [3.0, 2.0] and np.isnan(means[2])
    with pytest.raises(ValueError, match="one length"):
        per_patient(vals[:3], ids)


def test_holm_against_the_textbook_and_its_definition():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04, then non-decreasing: 0.06 last
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    rng = np.random.default_rng(0)
    for m in (1, 2, 5, 9):
        p = rng.random(m) ** 3
        order = sorted(range(m), key=lambda i: p[i])
        rank = {i: k for k, i in enumerate(order)}
        # the definition: the largest (m - k) p over the hypotheses ranked at or before this one, capped at 1
        want = [min(1.0, max((m - rank[j]) * p[j] for j in range(m) if rank[j] <= rank[i])) for i in range(m)]
        assert holm(list(p)) == pytest.approx(want)
    with pytest.raises(ValueError, match="holm: expected p-values"):
        holm([0.5, 1.5])
