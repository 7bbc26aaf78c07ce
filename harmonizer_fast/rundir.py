"""A training run's directory, the one object that reads and writes its files (docs/architecture.md, "Run
directories").

    run/
      last.json, best.json, best_phase1.json   checkpoint manifests (harmonizer_fast.checkpoint)
      weights-<sha>.safetensors, optim-<sha>.safetensors
      log.jsonl                                one line per epoch, rewritten from the history

``last`` is where training continues (``--resume``); ``best_phase1`` the phase-1 model selected on the
validation patients, which phase 2 starts from; ``best`` the model to use: during phase 1 the same as
``best_phase1``, after phase 2 that model with the validated best personalizer. Every manifest's state
records the run's data: a fingerprint of the dataset it was given (before padding and rater ordering), the
rater order, and the patient split. :meth:`RunDir.scoring_set` uses the held-out patients only when a
dataset has that fingerprint; any other dataset is scored whole, and says so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from ._io import write_atomic
from .checkpoint import (
    CheckpointError,
    collect_garbage,
    config_of,
    load_model,
    load_training_state,
    read_manifest,
    save_checkpoint,
    verify_checkpoint,
)
from .data import MultiRaterData, Split
from .model import HarmonizerConfig, HarmonizerNet

PathLike = Union[str, os.PathLike]
STEMS = ("last", "best", "best_phase1")
SPLITS = ("test", "all")


def prepare(data: MultiRaterData, config: HarmonizerConfig, rater_order: str) -> MultiRaterData:
    """The data as a run of ``config`` trains on it: padded to the network's size multiple, raters ordered."""
    return data.padded(config.size_multiple).with_rater_order(rater_order)


@dataclass(frozen=True)
class DataRecord:
    """What a run knows of its data: the dataset's fingerprint and size, the rater order and the split."""

    fingerprint: str
    n_items: int
    rater_order: str
    split: Split

    def to_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "n_items": self.n_items, "rater_order": self.rater_order,
                "split": {k: getattr(self.split, k).tolist() for k in ("train", "val", "test")}}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataRecord:
        split = Split(*(np.asarray(d["split"][k], dtype=np.int64) for k in ("train", "val", "test")))
        return cls(str(d["fingerprint"]), int(d["n_items"]), str(d["rater_order"]), split)


@dataclass(frozen=True)
class ScoringSet:
    """The images of a dataset a run's model is scored on, prepared as the run prepares them."""

    data: MultiRaterData
    indices: np.ndarray
    description: str  # for reports: which images, and why those

    def restricted(self, min_raters: int) -> ScoringSet:
        """Only the images where at least ``min_raters`` raters drew (0: unchanged)."""
        if not min_raters:
            return self
        keep = self.indices[self.data.raters_drawn()[self.indices] >= min_raters]
        if keep.size == 0:
            raise ValueError(f"min_raters={min_raters}: none of {self.description} has that many raters' masks")
        return ScoringSet(self.data, keep, f"{self.description}, the {keep.size} where at least {min_raters} raters "
                          "drew")  # fmt: skip


class RunBusy(RuntimeError):
    """Another process holds the run directory (it is training it)."""


class RunDir:
    """The files of one run (see the module docstring). Nothing else in the package reads them."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @contextmanager
    def owned(self) -> Iterator[None]:
        """Hold ``.lock`` in the run directory (an exclusive ``flock``) for as long as the block runs: a second
        trainer of the same run gets :class:`RunBusy` at once instead of racing for its files. The kernel
        drops the lock when the process ends, however it ends, so a killed run never leaves it held."""
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            yield
            return
        lock = self.path / ".lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held_by = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
                raise RunBusy(f"{self.path}: another process (pid {held_by}) is training this run; wait for it or "
                              "train into another --out") from None  # fmt: skip
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the flock

    # ---- checkpoints

    def manifest_path(self, stem: str) -> Path:
        return self.path / f"{stem}.json"

    def has(self, stem: str) -> bool:
        return self.manifest_path(stem).is_file()

    def save(self, stem: str, model: torch.nn.Module, *, optimizer=None, state: Optional[dict] = None) -> Path:
        return save_checkpoint(self.path, stem, model, optimizer=optimizer, state=state)

    def verify(self, stem: str) -> dict[str, Any]:
        """The manifest of ``stem`` after checking every file it names against its SHA-256."""
        return verify_checkpoint(self.manifest_path(stem))

    def load_into(self, stem: str, model: torch.nn.Module, optimizer=None) -> dict[str, Any]:
        """Load checkpoint ``stem`` into an existing model (and optimizer); returns its manifest."""
        return load_training_state(self.manifest_path(stem), model, optimizer)

    def load_model(self, stem: Optional[str] = None) -> tuple[HarmonizerNet, dict[str, Any]]:
        """The model of ``stem`` (default: ``best``, else ``last``) in eval mode, and its manifest."""
        return load_model(self.path if stem is None else self.manifest_path(stem))

    def collect_garbage(self) -> None:
        collect_garbage(self.path)

    def write_log(self, history: list[dict[str, Any]]) -> None:
        """``log.jsonl`` from the history, atomically (a few hundred short lines at most)."""
        write_atomic(self.path / "log.jsonl", "".join(json.dumps(r) + "\n" for r in history))

    def read_log(self) -> list[dict[str, Any]]:
        f = self.path / "log.jsonl"
        return [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []

    # ---- the run's record of its data

    def state(self, stem: str = "last") -> dict[str, Any]:
        return read_manifest(self.manifest_path(stem))[1]["state"]

    def model_config(self, stem: str = "last") -> HarmonizerConfig:
        path, manifest = read_manifest(self.manifest_path(stem))
        return config_of(path, manifest)

    def data_record(self, stem: str = "last") -> Optional[DataRecord]:
        """The data record of ``stem``'s state, or None (a run of an older version, a bare model file)."""
        if not self.has(stem):
            return None
        state = self.state(stem)
        if "data" not in state:
            return None
        try:
            return DataRecord.from_dict(state["data"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{self.manifest_path(stem)}: damaged manifest: its data record ({exc})") from None

    def scoring_set(self, data: MultiRaterData, config: HarmonizerConfig, split: str = "test") -> ScoringSet:
        """The images of ``data`` to score this run's model on, prepared as the run prepared them.

        ``split="test"``: the run's held-out test patients when ``data`` is the run's dataset (same
        fingerprint); all images of any other dataset. ``split="all"``: every image, labelled as including
        the run's training patients when the data is the run's.
        """
        if split not in SPLITS:
            raise ValueError(f"scoring_set: split must be one of {SPLITS}, got {split!r}")
        record = self.data_record()
        same = record is not None and record.fingerprint == data.fingerprint()
        order = record.rater_order if same else "stored"
        prepared = prepare(data, config, order)
        if same and split == "test":
            test = record.split.test
            return ScoringSet(prepared, test, f"the {len(test)} images of the run's held-out test patients")
        everything = np.arange(len(data))
        if same:
            return ScoringSet(prepared, everything, f"all {len(data)} images of the run's own dataset, its training "
                              "and validation patients included (--split all)")  # fmt: skip
        why = "the run has no record of its data" if record is None else "not the dataset the run was trained on"
        return ScoringSet(prepared, everything, f"all {len(data)} images ({why})")
