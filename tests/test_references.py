"""Label-only references ([science] #35 item 3): predictors that never see the image, through the metric
pipeline; the area-matched consensus against a numpy transcription."""

import numpy as np
import torch
from scipy.ndimage import convolve

from harmonizer_fast.data import make_synthetic
from harmonizer_fast.references import NAMES, area_matched_consensus, label_only_references, top_pixels


def _numpy_area_matched(masks: np.ndarray) -> np.ndarray:
    out = np.zeros(masks.shape, np.float32)
    k = np.array([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = np.outer(k, k) / 256
    for b in range(masks.shape[0]):
        freq = masks[b].astype(np.float64).mean(0)
        score = (freq + 1e-3 * convolve(freq, kernel, mode="constant")).ravel()
        order = np.lexsort((np.arange(score.size), -score))  # best score first, then the lower pixel index
        for r in range(masks.shape[1]):
            chosen = np.zeros(score.size, bool)
            chosen[order[: int(masks[b, r].sum())]] = True
            out[b, r] = chosen.reshape(masks.shape[2:])
    return out


def test_area_matched_consensus_matches_the_transcription_and_keeps_each_area():
    data = make_synthetic(n=12, size=32, raters=4, seed=5)
    y = torch.from_numpy(data.masks)
    got = area_matched_consensus(y)
    np.testing.assert_array_equal(got.numpy(), _numpy_area_matched(data.masks))
    np.testing.assert_array_equal(got.sum((2, 3)).numpy(), y.sum((2, 3)).float().numpy())
    by_area = torch.argsort(y.sum((2, 3)), dim=1)  # nested: a larger area's mask holds every smaller one
    for b in range(len(y)):
        masks = got[b, by_area[b]]
        assert bool((masks[1:] >= masks[:-1]).all())


def test_top_pixels_per_mask_scores_match_a_numpy_ranking():
    rng = np.random.default_rng(3)
    score = rng.integers(0, 5, size=(3, 4, 6, 7)).astype(np.float64)  # few levels: many ties, broken by index
    areas = rng.integers(0, 43, size=(3, 4))
    got = top_pixels(torch.from_numpy(score), torch.from_numpy(areas)).numpy()
    for b in range(3):
        for r in range(4):
            flat = score[b, r].ravel()
            order = np.lexsort((np.arange(flat.size), -flat))
            want = np.zeros(flat.size, np.float32)
            want[order[: areas[b, r]]] = 1
            np.testing.assert_array_equal(got[b, r].ravel(), want)
    one = top_pixels(torch.from_numpy(score[:, :1]), torch.from_numpy(areas)).numpy()  # one ranking per image
    np.testing.assert_array_equal(one.sum((2, 3)), areas)
    assert (one[:, :, None] >= one[:, None, :]).all(axis=(3, 4))[areas[:, :, None] >= areas[:, None, :]].all()


def test_label_only_rows():
    data = make_synthetic(n=16, size=32, raters=4, seed=6)
    refs = label_only_references(data, np.arange(16), num_samples=6)
    assert tuple(refs) == NAMES
    oracle = refs["raters as samples (oracle)"]["table2"]
    assert oracle["head_identity"][0] == 1.0 and oracle["mean"]["dice_each_mean"] > 0.999
    matched = refs["area-matched consensus (oracle)"]["table2"]
    assert 0.25 < matched["head_identity"][0] <= 1.0  # knows each rater's size: above chance
    assert refs["all-empty"]["table1"]["mean"]["dice_max"] < matched["mean"]["dice_each_mean"]
