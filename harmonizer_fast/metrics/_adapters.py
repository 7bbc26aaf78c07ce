"""What the framework adapters (:mod:`.torchmetrics`, :mod:`.monai`) share: each set-level metric by name,
its direction and the options it takes, and the per-image evaluation both protocols accumulate."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor

from . import energy, set_level


class Spec(NamedTuple):
    fn: Callable[..., Tensor]
    higher_is_better: Optional[bool]
    options: tuple[str, ...]


def _sample_diversity(samples: Tensor, raters: Tensor, **options: Any) -> Tensor:
    return set_level.sample_diversity(samples, **options)  # the raters take no part


SPECS: dict[str, Spec] = {
    "ged": Spec(energy.ged, False, ("threshold", "convention")),
    "hm_iou": Spec(set_level.hm_iou, True, ("threshold", "empty_iou")),
    "d_max": Spec(set_level.d_max, True, ("threshold", "empty_dice")),
    "combined_sensitivity": Spec(set_level.combined_sensitivity, True, ("threshold",)),
    "diversity_agreement": Spec(set_level.diversity_agreement, True, ("threshold", "include_self_pairs")),
    "ci_score": Spec(set_level.ci_score, True, ("threshold", "empty_dice", "include_self_pairs")),
    "sample_diversity": Spec(_sample_diversity, None, ("threshold", "empty_iou")),
    "ncc": Spec(set_level.ncc, True, ("threshold",)),
}


def split_options(owner: str, spec: Spec, kwargs: dict[str, Any], framework: frozenset[str]) -> dict[str, Any]:
    """Pop the metric's own options from ``kwargs`` (the rest goes to the framework's base class); an option
    neither side knows is refused here with both lists, not deep inside the framework."""
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in spec.options}
    unknown = sorted(set(kwargs) - framework)
    if unknown:
        raise TypeError(f"{owner}: unknown option(s) {unknown}; metric options: {list(spec.options)}")
    return options


def per_image(owner: str, spec: Spec, samples: Tensor, raters: Tensor, options: dict[str, Any]) -> Tensor:
    """The metric per image, ``(B,)`` float64 on the inputs' device; NaN where it is undefined (kohl GED)."""
    for name, x in (("samples", samples), ("raters", raters)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{owner}: {name} must be a (B, K or N, H, W) tensor, got {got}")
    with torch.no_grad():
        return spec.fn(samples.detach(), raters.detach(), **options).to(torch.float64)
