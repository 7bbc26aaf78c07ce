"""Dataset level: :class:`MetricAccumulator` turns :func:`~harmonizer_fast.metrics.batch.evaluate_batch` rows into
tables (means over images, pooled calibration and entropy), mergeable across torch.distributed processes."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from . import _sync
from .batch import PER_IMAGE_KEYS, evaluate_batch, evaluate_volume
from .calibration import (
    ECE_BINS,
    calibration_edges,
)
from .uncertainty import (
    AGREEMENT,
    CORRECTNESS,
    ENTROPY_BINS,
    histogram_median,
    uncertainty_follows_raters,
)


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    v = values[~np.isnan(values)]
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


_PER_RATER_ROWS = ("dice_each", "ece", "brier")
_ROW_KEYS = (*PER_IMAGE_KEYS, *_PER_RATER_ROWS, "lesion_size", "dice_consensus", "rater_diversity", "raters_drawn",
             "head_identity")  # fmt: skip


@dataclass
class MetricAccumulator:
    """Turns :func:`evaluate_batch` results into dataset-level tables.

    ``update(probs, raters, personalized=None)`` evaluates a batch (or ``add(evaluate_batch(...))`` adds a
    precomputed one); ``summary()`` returns ``{"n_images", "mean", "std", "per_rater", "calibration",
    "entropy_medians", "dice_by_size"}``; ``markdown()`` renders it.

    Under torch.distributed, each process calls ``update()`` on its own images and ``compute()`` (the
    torchmetrics protocol: update / compute / reset) combines them: the state is sufficient statistics
    (per-image rows, pooled histograms), so N processes equal one process over all their batches.
    """

    agreement_tol: float = 0.1
    calibration: int | Sequence[float] = ECE_BINS  # reliability bins: a count, or edges from 0 to 1
    rows: dict[str, list] = field(default_factory=dict)
    _calibration: Optional[np.ndarray] = None
    _entropy: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def update(self, probs: Tensor, raters: Tensor, personalized: Optional[Tensor] = None) -> dict[str, Any]:
        batch = evaluate_batch(
            probs, raters, personalized, agreement_tol=self.agreement_tol, calibration=self.calibration
        )
        self.add(batch)
        return batch

    def update_volume(self, probs: Tensor, raters: Tensor, personalized: Optional[Tensor] = None) -> dict[str, Any]:
        batch = evaluate_volume(
            probs, raters, personalized, agreement_tol=self.agreement_tol, calibration=self.calibration
        )
        self.add(batch)
        return batch

    def add(self, batch: Mapping[str, Any]) -> None:
        n, bins = batch["dice_each"].shape[1], batch["_calibration"].shape[2]
        if self._calibration is not None and self._calibration.shape[:2] != (n, bins):
            raise ValueError(f"MetricAccumulator: batches must have one rater count and one calibration binning, "
                             f"got {n} raters x {bins} bins after {self._calibration.shape[0]} x "
                             f"{self._calibration.shape[1]}")  # fmt: skip
        for key in _ROW_KEYS:
            self.rows.setdefault(key, []).append(np.asarray(batch[key]))
        cal = batch["_calibration"].sum(0)
        self._calibration = cal if self._calibration is None else self._calibration + cal
        for family in ("_entropy_correctness", "_entropy_agreement"):
            acc = self._entropy.setdefault(family, {})
            for g, hist in batch[family].items():
                acc[g] = hist if g not in acc else acc[g] + hist

    def reset(self) -> None:
        """Forget every batch."""
        self.rows, self._calibration, self._entropy = {}, None, {}

    def compute(self, group: Optional[Any] = None, device: Optional[torch.device] = None) -> dict[str, Any]:
        """:meth:`summary` over every process's batches (a collective: every rank must call it)."""
        return self.synced(group, device).summary()

    def synced(self, group: Optional[Any] = None, device: Optional[torch.device] = None) -> MetricAccumulator:
        """This accumulator, or under torch.distributed (world > 1) a new one holding every rank's batches:
        per-image rows gathered in rank order (rank 0's images first), histograms summed. ``device``: where
        the collectives' tensors live (CPU for gloo; the current CUDA device for NCCL)."""
        if not _sync.active(group):
            return self
        device = device or torch.device("cpu")
        n = _sync.max_int(-1 if self._calibration is None else self._calibration.shape[0], group, device)
        if n < 0:
            raise ValueError("MetricAccumulator.compute: no process added a batch")
        if self._calibration is not None and self._calibration.shape[0] != n:
            raise ValueError(f"MetricAccumulator.compute: processes disagree on the rater count "
                             f"({self._calibration.shape[0]} here, {n} elsewhere)")  # fmt: skip
        out = MetricAccumulator(agreement_tol=self.agreement_tol, calibration=self.calibration)
        for key in _ROW_KEYS:
            local = self.per_image(key) if self.rows else np.zeros((0, n) if key in _PER_RATER_ROWS else (0,))
            out.rows[key] = [_sync.gather_rows(local, group, device)]
        bins = calibration_edges(self.calibration).numel() - 1
        cal = self._calibration if self._calibration is not None else np.zeros((n, bins, 3))
        out._calibration = _sync.sum_array(cal, group, device)
        for family, groups in (("_entropy_correctness", CORRECTNESS), ("_entropy_agreement", AGREEMENT)):
            mine = self._entropy.get(family, {})
            out._entropy[family] = {
                g: _sync.sum_array(mine.get(g, np.zeros(ENTROPY_BINS, np.int64)), group, device) for g in groups
            }
        return out

    def per_image(self, key: str) -> np.ndarray:
        """One metric's values per image, in the order the batches were added (for paired tests)."""
        return np.concatenate(self.rows[key], axis=0)

    def summary(self) -> dict[str, Any]:
        if not self.rows:
            raise ValueError("MetricAccumulator: no batches were added")
        mean, std = {}, {}
        for key in PER_IMAGE_KEYS:
            mean[key], std[key] = _mean_std(self.per_image(key))
        each, ece, brier_ = self.per_image("dice_each"), self.per_image("ece"), self.per_image("brier")
        n = each.shape[1]
        per_rater = {
            f"rater_{i + 1}": {
                "dice": _mean_std(each[:, i]),
                "ece": _mean_std(ece[:, i]),
                "brier": _mean_std(brier_[:, i]),
            }
            for i in range(n)
        }
        cal = self._calibration
        pooled_ece = (np.abs(cal[..., 2] - cal[..., 1]).sum(-1) / cal[..., 0].sum(-1)).tolist()
        calibration = {"ece_pooled": pooled_ece, "reliability": cal.tolist(),
                       "edges": calibration_edges(self.calibration).tolist()}  # fmt: skip
        medians = {
            "correctness": {g: histogram_median(self._entropy["_entropy_correctness"][g]) for g in CORRECTNESS},
            "agreement": {g: histogram_median(self._entropy["_entropy_agreement"][g]) for g in AGREEMENT},
            "pixels": {g: int(h.sum()) for fam in self._entropy.values() for g, h in fam.items()},
        }
        return {
            "n_images": int(self.per_image("ged").shape[0]),
            "mean": mean,
            "std": std,
            "per_rater": per_rater,
            "calibration": calibration,
            "entropy_medians": medians,
            "dice_by_size": self._dice_by_size(),
            "uncertainty_vs_raters": self._uncertainty_vs_raters(),
            "head_identity": _mean_std(self.per_image("head_identity")),
        }

    def _uncertainty_vs_raters(self) -> dict[str, Any]:
        drawn = self.per_image("raters_drawn")
        all_drew = drawn >= self._calibration.shape[0]  # every one of the N raters drew
        return uncertainty_follows_raters(self.per_image("sample_diversity")[all_drew],
                                          self.per_image("rater_diversity")[all_drew])  # fmt: skip

    def _dice_by_size(self) -> dict[str, Any]:
        size, dice = self.per_image("lesion_size"), self.per_image("dice_consensus")
        keep = size > 0
        size, dice = size[keep], dice[keep]
        out: dict[str, Any] = {"excluded_without_lesion": int((~keep).sum())}
        if size.size == 0:
            return out
        edges = np.quantile(size, [0.0, 1 / 3, 2 / 3, 1.0])
        # equally populated bins by rank (ties in size would otherwise unbalance quantile edges)
        order = np.argsort(size, kind="stable")
        for name, part in zip(("small", "medium", "large"), np.array_split(order, 3)):
            if part.size == 0:
                out[name] = {"n": 0}
                continue
            m, s = _mean_std(dice[part])
            out[name] = {"n": int(part.size), "size_range": [float(size[part].min()), float(size[part].max())],
                         "dice_mean": m, "dice_std": s}  # fmt: skip
        out["quantile_edges"] = edges.tolist()
        return out

    def markdown(self, title: str = "Evaluation") -> str:
        """The paper's table columns as mean +- std over images, then per-rater and calibration rows."""
        s = self.summary()
        cols = (("GED", "ged", 1.0), ("Dice_soft", "dice_soft", 100.0), ("Dice_max", "dice_max", 100.0),
                ("Dice_max_rev", "dice_max_reverse", 100.0), ("Dice_match", "dice_match", 100.0),
                ("Dice_mean", "dice_each_mean", 100.0))  # fmt: skip
        lines = [f"### {title} ({s['n_images']} images)", "", "| " + " | ".join(c[0] for c in cols) + " |",
                 "|" + "---|" * len(cols)]  # fmt: skip
        lines.append("| " + " | ".join(f"{s['mean'][k] * f:.4g} ± {s['std'][k] * f:.3g}" for _, k, f in cols) + " |")
        sets = (("HM-IoU", "hm_iou"), ("D_max", "d_max"), ("S_c", "combined_sensitivity"),
                ("D_a", "diversity_agreement"), ("CI", "ci_score"), ("diversity", "sample_diversity"),
                ("S_NCC", "ncc"))  # fmt: skip
        lines += ["", "| " + " | ".join(c[0] for c in sets) + " |", "|" + "---|" * len(sets),
                  "| " + " | ".join(f"{s['mean'][k]:.4g} ± {s['std'][k]:.3g}" for _, k in sets) + " |"]  # fmt: skip
        lines += ["", "| rater | Dice | ECE (pooled) | Brier |", "|---|---|---|---|"]
        for i, (name, r) in enumerate(s["per_rater"].items()):
            lines.append(f"| {name} | {r['dice'][0] * 100:.2f} ± {r['dice'][1] * 100:.2f} | "
                         f"{s['calibration']['ece_pooled'][i]:.4f} | {r['brier'][0]:.4f} |")  # fmt: skip
        med = s["entropy_medians"]
        lines += ["", "| entropy median | " + " | ".join(CORRECTNESS + AGREEMENT) + " |", "|---" * 8 + "|",
                  "| | " + " | ".join(f"{med['correctness'][g]:.3f}" for g in CORRECTNESS) + " | "
                  + " | ".join(f"{med['agreement'][g]:.3f}" for g in AGREEMENT) + " |"]  # fmt: skip
        return "\n".join(lines) + "\n"
