"""The in-memory multi-rater dataset every reader produces, patient-level splits, rater ordering, padding
and augmentation (docs/architecture.md, "Data").

Normalization (stated once in :mod:`harmonizer_fast.preprocessing`, applied by every reader): uint8 images are
scaled to [0, 1] by 1/255 and uint16 by 1/65535; floating images already within [0, 1] are kept as they are (so
converted datasets read back unchanged), other images are min-max scaled to [0, 1] per image and channel (a
constant channel becomes 0). Masks are uint8 in
{0, 1}. Images are ``(N, C, H, W)`` float32, masks ``(N, R, H, W)`` uint8, ``patient_id`` one string per item.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch


class DataError(ValueError):
    """A dataset that cannot be read or used as it is (the message names the file and what is wrong)."""


RATER_ORDERS = ("stored", "area-asc", "area-desc")


def decode_masks(masks: np.ndarray, where: str) -> np.ndarray:
    """Rater masks as stored -> uint8 {0, 1}, by recognising the encoding ([reliability] #36 item 4): booleans,
    {0, 1} and {0, 255} (8-bit PNG masks) are read as masks; any other value set, NaN or Inf is a
    :class:`DataError` naming ``where`` (a file), where thresholding used to read masks stored 0/1 in a
    0/255 reader, or {0, 2}, as all empty without a word."""
    m = np.asarray(masks)
    if m.dtype == bool:
        return m.astype(np.uint8)
    if not (np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.floating)):
        raise DataError(f"{where}: masks must hold numbers, got dtype {m.dtype}")
    if np.issubdtype(m.dtype, np.floating) and not np.isfinite(m).all():
        raise DataError(f"{where}: masks contain NaN or Inf")
    values = np.unique(m)
    if np.isin(values, (0, 1)).all():
        return m.astype(np.uint8)
    if np.isin(values, (0, 255)).all():
        return (m == 255).astype(np.uint8)
    shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if values.size > 6 else "")
    raise DataError(f"{where}: masks hold the values {{{shown}}}; expected {{0, 1}} or {{0, 255}}")


def check_not_all_empty(masks: np.ndarray, where: str) -> None:
    """A dataset in which no rater drew anything is a reading error, not data: say so, naming the file."""
    if masks.size and not masks.any():
        raise DataError(f"{where}: every mask of every rater is empty; check how the masks are encoded")


def normalize_images(images: np.ndarray) -> np.ndarray:
    """``(N, C, H, W)`` pixels -> float32 in [0, 1]: the default :class:`~harmonizer_fast.preprocessing.
    Preprocessing` (uint8 / 255, uint16 / 65535, floats in [0, 1] kept, anything else min-max per image and
    channel), the recipe every checkpoint records, so that prediction prepares images as training did."""
    from ..preprocessing import Preprocessing

    try:
        return Preprocessing().normalize(images)
    except ValueError as exc:
        raise DataError(str(exc)) from None


@dataclass
class MultiRaterData:
    """Images ``(N, C, H, W)`` float32 in [0, 1], masks ``(N, R, H, W)`` uint8 {0, 1}, patient ids ``(N,)``."""

    images: np.ndarray
    masks: np.ndarray
    patient_id: np.ndarray
    source: str = ""

    def __post_init__(self) -> None:
        im, mk, pid = self.images, self.masks, self.patient_id
        where = f" ({self.source})" if self.source else ""
        if im.ndim != 4:
            raise DataError(f"images must be (N, C, H, W){where}, got shape {im.shape}")
        if mk.ndim != 4:
            raise DataError(f"masks must be (N, R, H, W){where}, got shape {mk.shape}")
        if im.shape[0] != mk.shape[0] or im.shape[2:] != mk.shape[2:]:
            raise DataError(f"images {im.shape} and masks {mk.shape} must agree in N, H and W{where}")
        if im.shape[0] == 0:
            raise DataError(f"the dataset is empty{where}")
        if mk.shape[1] < 1:
            raise DataError(f"masks need at least one rater{where}")
        if pid.shape != (im.shape[0],):
            raise DataError(f"patient_id must have one entry per item ({im.shape[0]}){where}, got {pid.shape}")
        if mk.dtype != np.uint8:
            raise DataError(f"masks must be uint8{where}, got {mk.dtype}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_raters(self) -> int:
        return self.masks.shape[1]

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]

    def subset(self, idx: np.ndarray) -> MultiRaterData:
        return MultiRaterData(self.images[idx], self.masks[idx], self.patient_id[idx], self.source)

    def patients(self) -> np.ndarray:
        return np.unique(self.patient_id)

    def with_rater_order(self, order: str) -> MultiRaterData:
        """Raters as stored (``"stored"``), or re-ordered per item by mask area, smallest first
        (``"area-asc"``, D-Persona's convention for LIDC, whose mask slots are anonymous: "rater i" is then
        a style, from the tightest outline to the loosest) or largest first (``"area-desc"``). Stable for ties."""
        if order not in RATER_ORDERS:
            raise DataError(f"rater order must be one of {RATER_ORDERS}, got {order!r}")
        if order == "stored":
            return self
        area = self.masks.reshape(len(self), self.num_raters, -1).sum(-1, dtype=np.int64)
        idx = np.argsort(area if order == "area-asc" else -area, axis=1, kind="stable")
        masks = np.take_along_axis(self.masks, idx[:, :, None, None], axis=1)
        return MultiRaterData(self.images, masks, self.patient_id, self.source)

    def raters_drawn(self) -> np.ndarray:
        """Per item, how many raters drew anything (a non-empty mask), ``(N,)`` int64. The paper's LIDC set
        keeps slices every rater marked; ``>= num_raters`` selects those of this data."""
        return self.masks.reshape(len(self), self.num_raters, -1).any(-1).sum(1, dtype=np.int64)

    def fingerprint(self) -> str:
        """SHA-256 of the images, the masks (in their stored order) and the patient ids: the same dataset read
        again gives the same value, any other dataset another."""
        h = hashlib.sha256()
        for a in (self.images, self.masks):
            h.update(f"{a.dtype.str}{a.shape};".encode())
            h.update(np.ascontiguousarray(a).data)
        h.update("\0".join(map(str, self.patient_id)).encode())
        return h.hexdigest()

    def padded(self, multiple: int = 32) -> MultiRaterData:
        """Zero-pad H and W at the end up to multiples of ``multiple`` (what the network takes)."""
        h, w = self.images.shape[2:]
        ph, pw = -h % multiple, -w % multiple
        if ph == 0 and pw == 0:
            return self
        pad = ((0, 0), (0, 0), (0, ph), (0, pw))
        return MultiRaterData(np.pad(self.images, pad), np.pad(self.masks, pad), self.patient_id, self.source)


@dataclass(frozen=True)
class Split:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def keep(self, items: np.ndarray) -> Split:
        """The split restricted to the items where the boolean array ``items`` (over the dataset) is True; each
        patient stays on its side."""
        return Split(*(part[items[part]] for part in (self.train, self.val, self.test)))


def patient_split(
    patient_id: np.ndarray, *, folds: int = 4, fold: int = 0, val_fraction: float = 0.15, seed: int = 0
) -> Split:
    """Patient-level k-fold split: fold ``fold`` of ``folds`` is the test set; ``val_fraction`` of the
    remaining patients is the validation set (model selection), the rest trains. Items of one patient never
    straddle two sets. Deterministic for a seed."""
    if folds < 2 or not 0 <= fold < folds:
        raise DataError(f"need folds >= 2 and 0 <= fold < folds, got folds={folds}, fold={fold}")
    patients = np.unique(patient_id)
    if len(patients) < folds + 1:
        raise DataError(f"{len(patients)} patients cannot be split into {folds} folds plus a validation set")
    rng = np.random.default_rng(seed)
    perm = patients[rng.permutation(len(patients))]
    test_p = np.array_split(perm, folds)[fold]
    rest = np.setdiff1d(perm, test_p)
    rest = rest[rng.permutation(len(rest))]
    n_val = max(1, int(round(val_fraction * len(rest))))
    val_p, train_p = rest[:n_val], rest[n_val:]

    def items(ps: np.ndarray) -> np.ndarray:
        return np.flatnonzero(np.isin(patient_id, ps))

    return Split(items(train_p), items(val_p), items(test_p))


def augment(
    images: torch.Tensor, masks: torch.Tensor, generator: Optional[torch.Generator] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The field's augmentation, per item and identical for image and masks: random horizontal and vertical
    flips and a random multiple of 90 degrees (square images only)."""
    b = images.shape[0]
    draws = torch.randint(0, 2, (b, 2), generator=generator)
    turns = torch.randint(0, 4, (b,), generator=generator) if images.shape[-1] == images.shape[-2] else None
    out_i, out_m = [], []
    for i in range(b):
        x, y = images[i], masks[i]
        if draws[i, 0]:
            x, y = x.flip(-1), y.flip(-1)
        if draws[i, 1]:
            x, y = x.flip(-2), y.flip(-2)
        if turns is not None and turns[i]:
            x, y = torch.rot90(x, int(turns[i]), (-2, -1)), torch.rot90(y, int(turns[i]), (-2, -1))
        out_i.append(x)
        out_m.append(y)
    return torch.stack(out_i), torch.stack(out_m)
