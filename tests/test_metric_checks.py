"""Every public metric checks its map arguments at its boundary, by one mechanism (metrics/_checks.py), and a
metric running inside another is not checked again ([reliability] #36 item 3). The metrics are discovered by
the decorator's mark, so a new metric is covered the day it is decorated."""

import inspect

import pytest
import torch

from harmonizer_fast import metrics
from harmonizer_fast.metrics import _checks, set_level

CHECKED = sorted({(name, fn) for mod in (metrics, set_level) for name, fn in vars(mod).items()
                  if callable(fn) and hasattr(fn, "checked_maps")}, key=lambda t: t[0])  # fmt: skip
VALID = {"probabilities": lambda: torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
         "samples": lambda: torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),
         "masks": lambda: (torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)) > 0.5).float()}
BAD = {  # kind -> [(mutation, expected message fragment)]
    "probabilities": [(lambda x: x * 3, "must hold probabilities"), (lambda x: x > 0.5, "floating point")],
    "samples": [(lambda x: x - 0.5, "must hold probabilities"), (lambda x: x.long(), "bool, uint8 or floating")],
    "masks": [(lambda x: x * 0.5, "binary masks"), (lambda x: x.to(torch.complex64), "bool, uint8 or floating")],
}
COMMON = [(lambda x: x[0], "4-D"), (lambda x: x[:0], "B >= 1"), (lambda x: x.numpy(), "torch.Tensor"),
          (lambda x: x.to("meta"), "meta tensor"), (lambda x: torch.cat([x, x]), "must agree in B, H and W")]

# hf.ged checks its maps in the fused kernels' own pass (metrics/energy.py); the ops word three faults their way
KERNEL_WORDING = {"B >= 1": "empty batch (B = 0)", "meta tensor": "must be on one device",
                  "must agree in B, H and W": "must have the same batch size B"}  # fmt: skip


def test_every_public_metric_is_checked():
    names = {n for n, _ in CHECKED}
    assert {"ged", "hm_iou", "ncc", "d_max", "sample_diversity", "dice_soft", "dice_matrix", "entropy_map", "ece",
            "evaluate_batch", "evaluate_volume", "ci_score", "set_level_metrics"} <= names, names


@pytest.mark.parametrize("name,fn", CHECKED, ids=[n for n, _ in CHECKED])
def test_a_bad_map_is_refused_naming_the_metric_and_the_argument(name, fn):
    kinds = fn.checked_maps
    good = {arg: VALID[kind]() for arg, kind in kinds.items()}
    fn(**good)  # the valid call runs
    for arg, kind in kinds.items():
        cases = BAD[kind] + (COMMON if len(kinds) > 1 else COMMON[:-1])
        for mutate, fragment in cases:
            with pytest.raises((ValueError, TypeError)) as info:
                fn(**{**good, arg: mutate(good[arg])})
            text = str(info.value)
            if fn is metrics.ged:  # checked by its kernels (layer 1), in the ops' words for the same faults
                fragment = KERNEL_WORDING.get(fragment, fragment)
            assert text.startswith(f"{name}: ") and arg in text and fragment in text, (arg, text)


def test_a_metric_inside_a_metric_is_not_checked_again(monkeypatch):
    calls = []
    real = _checks.check_map
    monkeypatch.setattr(_checks, "check_map", lambda *a: calls.append(a[1:3]) or real(*a))
    probs, raters = VALID["probabilities"](), VALID["masks"]()
    metrics.evaluate_batch(probs, raters)  # a dozen metrics inside
    assert calls == [("evaluate_batch", "probs"), ("evaluate_batch", "raters")]
    calls.clear()
    metrics.hm_iou(probs, raters)
    assert calls == [("hm_iou", "samples"), ("hm_iou", "raters")]
    assert not _checks._INSIDE.get()  # and the mark is gone after the call


def test_the_decorator_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        _checks.checked(x="logits")
    assert inspect.signature(metrics.ncc) == inspect.signature(metrics.ncc.__wrapped__)
