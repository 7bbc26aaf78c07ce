"""The two-phase trainer (paper section 4.2, appendix A; docs/architecture.md).

Phase 1 trains backbone, prior, posterior, fcomb and harmonizer on Eq. 8 (Adam, lr 1e-4, weight decay 1e-5;
the paper runs 100 epochs); phase 2 starts from the phase-1 model selected on validation, freezes it and
trains the personalizer on Eq. 6 (lr 5e-5, 150 epochs). Around that:

- **Reproducible and exactly resumable.** The data order of each epoch and every random draw of each step
  (augmentation, the rater the posterior sees, the latent noise) come from generators keyed by
  ``(seed, epoch, step)``, not from global state. ``last`` records the :class:`Position` (stage, epoch,
  step) with the optimizer and schedule, so ``resume`` continues at the same step and a run killed at any
  moment, resumed, ends with exactly the weights of an uninterrupted run (CPU, fp32).
- **Checkpoints** (:class:`~harmonizer_fast.rundir.RunDir`): ``last`` after every epoch and at every stop;
  ``best_phase1`` (and ``best``) when the phase-1 validation score improves; ``best`` when the phase-2 score
  does. Scores (:mod:`harmonizer_fast.selection`) cannot be won by predicting nothing; the names used are
  in the train config of every checkpoint and in each log line. Validation uses a patient-level split of
  the training patients; the test fold is never looked at.
- **Guards**: gradient clipping; a NaN/Inf loss, gradient, weight or validation prediction stops the run with
  :class:`DivergedError` at its last good checkpoint, which ``--resume`` continues at a lower rate.
- **Scale out** with ``torchrun`` (:mod:`harmonizer_fast.distributed`): each process takes an equal slice of
  every global batch, DDP averages the gradients (gloo on CPU, NCCL on GPU) and batch norm is
  synchronized. Mixed precision (bfloat16 autocast) on GPU.
- ``log.jsonl`` holds one line per epoch, rewritten atomically from the checkpoint's history; tqdm shows
  progress on the first process.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext as _nothing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from . import losses, selection
from ._alloc import keep_freed_memory
from ._random import generator, seed_of
from ._schema import check_field_types
from ._schema import is_int as _is_int
from ._schema import is_number as _is_number
from .checkpoint import CheckpointError, load_training_state
from .data import MultiRaterData, augment, patient_split
from .data.dataset import RATER_ORDERS
from .distributed import convert_sync_batchnorm, init_distributed, rank_and_world
from .evaluate import evaluate_model, summarize
from .latent_stats import latent_statistics
from .model import HarmonizerConfig, HarmonizerNet
from .resume import ResumeError, check_position, resume_plan
from .rundir import DataRecord, RunBusy, RunDir, prepare
from .schedule import CosineSchedule

__all__ = ["Position", "StepRunner", "TrainConfig", "TrainResult", "Trainer", "TrainingError", "init_distributed"]

# Learning rates (phase 1, phase 2) per model preset. The paper's suit the paper config over 100 + 150
# epochs on a GPU. The small config on a CPU budget learns far faster at 3e-3 in phase 1 (synthetic, 12
# epochs: validation GED 0.27 and Dice_soft 0.82 at 3e-3, against predictions still empty at 1e-3), and its
# personalizer at 1e-2 in phase 2 (the demo's data, 18 epochs: held-out Dice_mean 0.777 at 5e-3 and 0.780
# at 2e-2, against 0.755 after 6 epochs at 1.5e-3).
LEARNING_RATES = {"paper": (1e-4, 5e-5), "small": (3e-3, 1e-2)}
# The prior net's phase-1 rate per preset (None: lr_phase1). The prior learns from the KL term alone
# (HarmonizerConfig.ged_through_prior), whose target, one random rater's posterior per image and step, is noisy:
# at the small preset's 3e-3 Adam random-walks its weights until most deep ReLUs are dead and the prior's mean
# no longer depends on the image (benchmarks/results/lidc-prior-collapse-small-cpu.md).
PRIOR_LEARNING_RATES: dict[str, Optional[float]] = {"paper": None, "small": 3e-4}
# TrainConfig options that a run recorded before they existed takes from its record when resumed
ADOPTED_ON_RESUME = ("lr_prior",)
PHASE2_Z = ("anneal", "sample", "mean")
BUDGET_CLOCKS = ("wall", "cpu")


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN/Inf loss, an inconsistent resume, ...); the message says why."""


class DivergedError(TrainingError):
    """The one door of a diverged run ([reliability] #36 item 5): a non-finite loss, gradient, weight or
    validation prediction. Nothing of the bad step is saved; ``last`` still holds the last good epoch, and the
    message says how to resume from it with a lower learning rate. The CLI exits 1."""


@dataclass
class TrainConfig:
    """The training recipe. ``TrainConfig.for_model(model_config)`` gives the preset's learning rates."""

    phase: str = "both"  # "1", "2" or "both"
    epochs_phase1: int = 100
    epochs_phase2: int = 150
    lr_phase1: float = 1e-4
    lr_phase2: float = 5e-5
    # The prior net's phase-1 learning rate (None: lr_phase1); see PRIOR_LEARNING_RATES.
    lr_prior: Optional[float] = None
    weight_decay: float = 1e-5
    batch_size: int = 16  # global: split over the processes
    grad_clip: float = 1.0
    max_minutes: Optional[float] = None
    budget_clock: str = "wall"  # what max_minutes counts: "wall" or "cpu" (see _Budget)
    seed: int = 0
    # The seed of the patient split (folds and validation patients); None: ``seed``. A comparison over seeds
    # fixes it, so every seed of a fold is scored on the same test patients (paired tests per image).
    split_seed: Optional[int] = None
    folds: int = 4
    fold: int = 0
    val_fraction: float = 0.15
    rater_order: str = "stored"  # "stored", "area-asc" or "area-desc" (applied on top of the reader's order)
    # Train, select and test only on items where at least this many raters drew (0: every item). LIDC with
    # min_raters = 4 is the closest this export comes to the paper's 1,609 slices (README, "Protocols"). The
    # patient split is made on the whole dataset first, so a patient's side does not depend on the filter.
    min_raters: int = 0
    augment: bool = True
    amp: bool = True  # bfloat16 autocast on GPU (ignored on CPU)
    val_samples: int = 16
    val_batch: int = 32
    select_phase1: str = selection.DEFAULTS[1]
    select_phase2: str = selection.DEFAULTS[2]
    # The prior noise in phase 2's z (Personalizer step 7, z'_i = z + Delta_i): "sample" keeps the paper's
    # z ~ p(z|x) throughout; "mean" trains on the prior mean, as the heads are evaluated; "anneal" scales the
    # noise from 1 to 0 over the first half of the stage's epochs, then trains on the mean. Delta_i does not
    # see z, so with a sample the noise (sigma up to e^2 on the demo's model) is added to every rater's latent
    # and the heads learn offsets shrunk toward the consensus (demo, held-out Dice_mean: sample 0.856, mean
    # 0.877); on LIDC the prior mean decodes to empty masks, and from it ("mean") two epochs left every head
    # empty, where samples start from non-empty masks. "anneal" starts like the paper and ends like inference.
    phase2_z: str = "anneal"

    @property
    def split_seed_or_seed(self) -> int:
        return self.seed if self.split_seed is None else self.split_seed

    def z_noise_scale(self, progress: float) -> float:
        """The factor on phase 2's prior noise at ``progress`` (the fraction of the stage's epochs done)."""
        return {"sample": 1.0, "mean": 0.0}.get(self.phase2_z, max(0.0, 1.0 - 2.0 * progress))

    def __post_init__(self) -> None:
        """Refuse values that would train nothing or garbage (a negative batch, zero epochs, a NaN rate)."""

        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        check_field_types(self)

        for name in ("epochs_phase1", "epochs_phase2", "batch_size", "val_samples", "val_batch"):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "an integer >= 1")
        need(_is_int(self.folds) and self.folds >= 2, "folds", "an integer >= 2")
        need(_is_int(self.min_raters) and self.min_raters >= 0, "min_raters", "an integer >= 0")
        need(_is_int(self.seed) and 0 <= self.seed < 2**63, "seed", "an integer in [0, 2**63)")
        ss = self.split_seed
        need(ss is None or (_is_int(ss) and 0 <= ss < 2**63), "split_seed", "None or an integer in [0, 2**63)")
        need(_is_int(self.fold) and 0 <= self.fold < self.folds, "fold", f"an integer in [0, {self.folds})")
        for name in ("lr_phase1", "lr_phase2", "grad_clip"):
            need(_is_number(getattr(self, name)) and getattr(self, name) > 0, name, "a finite number > 0")
        need(self.lr_prior is None or (_is_number(self.lr_prior) and self.lr_prior > 0), "lr_prior",
             "None or a finite number > 0")
        need(_is_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a finite number >= 0")
        need(_is_number(self.val_fraction) and 0 < self.val_fraction < 1, "val_fraction", "a number in (0, 1)")
        mm = self.max_minutes
        need(mm is None or (_is_number(mm) and mm > 0), "max_minutes", "None or a finite number > 0")
        need(self.phase in ("1", "2", "both"), "phase", "'1', '2' or 'both'")
        need(self.budget_clock in BUDGET_CLOCKS, "budget_clock", f"one of {BUDGET_CLOCKS}")
        need(self.phase2_z in PHASE2_Z, "phase2_z", f"one of {PHASE2_Z}")
        need(self.rater_order in RATER_ORDERS, "rater_order", f"one of {RATER_ORDERS}")
        for phase, name in ((1, "select_phase1"), (2, "select_phase2")):
            need(getattr(self, name) in selection.PHASE_SCORES[phase], name, f"one of {selection.PHASE_SCORES[phase]}")

    @classmethod
    def for_model(cls, model_config: HarmonizerConfig, **overrides: Any) -> TrainConfig:
        """The recipe for a model config: its preset's learning rates, then ``overrides``."""
        lr1, lr2 = LEARNING_RATES[model_config.preset]
        lr_prior = PRIOR_LEARNING_RATES[model_config.preset]
        return cls(**{"lr_phase1": lr1, "lr_phase2": lr2, "lr_prior": lr_prior, **overrides})

    def stages(self) -> list[tuple[int, int]]:
        """(phase, epochs) in training order."""
        out = []
        if self.phase in ("1", "both"):
            out.append((1, self.epochs_phase1))
        if self.phase in ("2", "both"):
            out.append((2, self.epochs_phase2))
        return out

    def selection_score(self, phase: int) -> str:
        return self.select_phase1 if phase == 1 else self.select_phase2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"TrainConfig: unknown keys {sorted(unknown)}")
        return cls(**d)


@dataclass
class Position:
    """Where training stands: the stage (index into ``TrainConfig.stages()``), the global epoch (0-based,
    counted over both stages) and the next step within it. Saved and restored whole."""

    stage: int = 0
    epoch: int = 0
    step: int = 0


@dataclass
class RecordedState:
    """The training state a checkpoint manifest records (``Trainer._state``), checked field by field when a run
    is resumed: a hand-edited or damaged manifest is refused naming the field, before any of it is used."""

    position: dict[str, Any]
    phase: int
    scheduler: Optional[dict[str, Any]]
    train_config: dict[str, Any]
    data: dict[str, Any]
    history: list[dict[str, Any]]
    best_score: Optional[float]
    best_phase: int
    stopped: str
    world_size: int

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.phase not in (1, 2) or self.best_phase not in (0, 1, 2) or self.world_size < 1:
            raise ValueError(f"RecordedState: phase {self.phase}, best_phase {self.best_phase} or world_size "
                             f"{self.world_size} out of range")  # fmt: skip


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    stopped: str  # "completed" or "time budget"
    best_score: Optional[float]
    history: list[dict[str, Any]]


def _log_line(record: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())


class _Budget:
    """The ``max_minutes`` clock of one ``fit`` call: wall-clock time, or ("cpu") this process's CPU time
    divided by torch's thread count, which on an idle machine runs at most as fast as the wall clock and
    under load from other processes counts only the time this one computed, so runs that share a machine
    with other work still get equal compute (what an equal-budget comparison needs)."""

    def __init__(self, minutes: Optional[float], clock: str = "wall") -> None:
        self.clock = clock
        self.t0, self.wall0 = self._now(), time.monotonic()
        self.limit = None if minutes is None else minutes * 60.0

    def _now(self) -> float:
        return time.process_time() / max(1, torch.get_num_threads()) if self.clock == "cpu" else time.monotonic()

    def minutes(self) -> float:
        return (self._now() - self.t0) / 60.0

    def wall_minutes(self) -> float:
        return (time.monotonic() - self.wall0) / 60.0

    def progress(self, start_minutes: float) -> float:
        """The share spent of what was left at ``start_minutes`` (a stage's start)."""
        left = self.limit / 60.0 - start_minutes
        return 1.0 if left <= 0 else (self.minutes() - start_minutes) / left

    def spent(self) -> bool:
        return self.limit is not None and self._now() - self.t0 > self.limit


def epoch_batches(train: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """One epoch's batches of the items ``train``, shuffled by (seed, epoch): every image once, the last batch
    filled up from the start of the order (as torch's DistributedSampler pads): dropping the remainder dropped
    a third of the images and half the steps of a small dataset, and a full last batch keeps the processes'
    slices equal (DDP averages them with equal weights) and the batches the same for any process count."""
    order = train[torch.randperm(len(train), generator=generator(seed, 1, epoch)).numpy()]
    b = batch_size
    n = -(-len(order) // b)
    padded = np.concatenate([order, order[: n * b - len(order)]]) if len(order) >= b else order
    return [padded[i * b : (i + 1) * b] for i in range(n)]


class StepRunner:
    """One optimizer step of a global batch: the epoch's batch order, augmentation and noise from generators
    keyed by (seed, epoch, step), this process's slice of the batch, the loss, guards and the update."""

    def __init__(self, net: HarmonizerNet, data: MultiRaterData, train: np.ndarray, tc: TrainConfig,
                 device: torch.device) -> None:  # fmt: skip
        self.net, self.train, self.tc, self.device = net, train, tc, device
        self.images, self.masks = torch.from_numpy(data.images), torch.from_numpy(data.masks)
        self.rank, self.world = rank_and_world()

    def wrap(self) -> torch.nn.Module:
        if self.world == 1:
            return self.net
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        # frozen parameters (requires_grad False) are not tracked, so every tracked one is used in each phase
        return DDP(self.net, device_ids=ids)

    def batches(self, epoch: int) -> list[np.ndarray]:
        return epoch_batches(self.train, self.tc.batch_size, self.tc.seed, epoch)

    def step(self, ddp: torch.nn.Module, opt, idx: np.ndarray, epoch: int, step: int,
             progress: float = 0.0) -> dict[str, float]:  # fmt: skip
        """``progress``: the fraction of the stage's epochs done before this step (phase 2's z noise)."""
        g = generator(self.tc.seed, 2, epoch, step)
        images, masks = self.images[idx], self.masks[idx].float()
        if self.tc.augment:
            images, masks = augment(images, masks, g)
        noise = self.net.draw_noise(len(idx), g)
        part = slice(self.rank * len(idx) // self.world, (self.rank + 1) * len(idx) // self.world)
        images, masks = images[part].to(self.device), masks[part].to(self.device)
        noise = {k: v[part] for k, v in noise.items()}
        if self.net.phase == 2:
            noise["z"] = noise["z"] * self.tc.z_noise_scale(progress)
        use_amp = self.tc.amp and self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            out = ddp(images, masks, noise=noise)
            loss, parts = losses.total_loss(out, masks, self.net.config)
        if not math.isfinite(parts["total"]):
            raise DivergedError(f"the loss is {parts['total']} at epoch {epoch + 1}, step {step + 1} (parts: "
                                + ", ".join(f"{k} {v:.3g}" for k, v in parts.items()) + ")")  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([p for p in self.net.parameters() if p.requires_grad], self.tc.grad_clip)
        if not torch.isfinite(norm):
            raise DivergedError(f"a gradient is NaN or Inf at epoch {epoch + 1}, step {step + 1}")
        opt.step()
        if self.net.phase == 2:
            self.net.personalizer.trained_steps += 1
        if self.world > 1:  # report the global batch's loss, not this process's slice of it
            vals = torch.tensor(list(parts.values()), dtype=torch.float64)
            dist.all_reduce(vals)
            parts = dict(zip(parts, (vals / self.world).tolist()))
        return parts


class Trainer:
    def __init__(
        self,
        data: MultiRaterData,
        model_config: HarmonizerConfig,
        train_config: TrainConfig,
        run_dir: os.PathLike,
        *,
        device: Optional[torch.device] = None,
        progress: bool = True,
        log: Callable[[str], None] = print,
    ) -> None:
        self.rank, self.world = rank_and_world()
        keep_freed_memory()  # a step reuses its large activation blocks instead of page-faulting them (_alloc)
        self.tc = train_config
        self.run = RunDir(run_dir)
        self.log = log if self.rank == 0 else (lambda _msg: None)
        self.progress = progress and self.rank == 0
        if device is None:
            device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        self.device = device
        self._check_fit(data, model_config)
        self.data = prepare(data, model_config, self.tc.rater_order)  # padded, raters in the training order
        self.split = patient_split(self.data.patient_id, folds=self.tc.folds, fold=self.tc.fold,
                                   val_fraction=self.tc.val_fraction, seed=self.tc.split_seed_or_seed)  # fmt: skip
        if self.tc.min_raters:
            self.split = self.split.keep(self.data.raters_drawn() >= self.tc.min_raters)
            if not (len(self.split.train) and len(self.split.val)):
                raise TrainingError(f"min_raters={self.tc.min_raters} leaves {len(self.split.train)} training and "
                                    f"{len(self.split.val)} validation images")  # fmt: skip
        self.record = DataRecord(data.fingerprint(), len(data), self.tc.rater_order, self.split)
        self._build(model_config)
        self.stages = self.tc.stages()
        self.history: list[dict[str, Any]] = []
        self.best_score: Optional[float] = None
        self.best_phase = 0
        self._resume_state: Optional[dict[str, Any]] = None

    def _build(self, model_config: HarmonizerConfig) -> None:
        torch.manual_seed(self.tc.seed)
        self.net = HarmonizerNet(model_config).to(self.device)
        if self.world > 1:
            self.net = convert_sync_batchnorm(self.net, self.device)
        self.steps = StepRunner(self.net, self.data, self.split.train, self.tc, self.device)

    def _check_fit(self, data: MultiRaterData, cfg: HarmonizerConfig) -> None:
        if self.tc.batch_size % self.world:
            raise TrainingError(f"batch size {self.tc.batch_size} must be divisible by the {self.world} processes")
        if data.num_raters != cfg.num_raters:
            raise TrainingError(f"the data has {data.num_raters} raters, the model config {cfg.num_raters}")
        if self.tc.min_raters > data.num_raters:
            raise TrainingError(f"min_raters={self.tc.min_raters}, but the data has {data.num_raters} raters")
        if data.in_channels != cfg.in_channels:
            raise TrainingError(f"the data has {data.in_channels} channels, the model config {cfg.in_channels}")
        if not cfg.use_personalizer and self.tc.phase != "1":
            raise TrainingError("phase 2 trains the personalizer, which this model config does not have")

    # -----------------------------------------------------------------------------------------------------
    # The loop.

    def fit(self, *, resume: bool = False, init_from: Optional[os.PathLike] = None) -> TrainResult:
        """Train the configured stages. ``resume``: continue from ``last`` of the run directory, exactly where
        it stopped (from the beginning when nothing was committed yet). ``init_from``: start from the weights
        of another checkpoint of the same model config (phase 2 needs a trained phase-1 model)."""
        try:
            with self.run.owned() if self.rank == 0 else _nothing():
                return self._fit(resume, init_from)
        except RunBusy as exc:
            raise TrainingError(str(exc)) from None

    def _fit(self, resume: bool, init_from: Optional[os.PathLike]) -> TrainResult:
        try:
            return self._fit_stages(resume, init_from)
        except DivergedError as exc:
            raise DivergedError(f"training diverged: {exc}; {self._how_to_resume()}") from None

    def _how_to_resume(self) -> str:
        if not self.run.has("last"):
            return "no epoch was committed: start again with a lower --lr"
        st = self.run.state("last")
        return (f"the run stops at its last good checkpoint (epoch {st['position']['epoch']}); resume it with a "
                f"lower learning rate: train --resume --lr {self.tc.lr_phase1 / 10:g} (phase 1) or --lr2 "
                f"{self.tc.lr_phase2 / 10:g} (phase 2)")  # fmt: skip

    def _fit_stages(self, resume: bool, init_from: Optional[os.PathLike]) -> TrainResult:
        pos = self._begin(resume, init_from)
        if pos is None:
            return self._result("completed")
        budget = _Budget(self.tc.max_minutes, self.tc.budget_clock)
        while pos.stage < len(self.stages):
            stage = pos.stage
            stopped = self._run_stage(pos, budget)
            if stopped:
                return self._result(stopped)
            if pos.stage <= stage:  # by construction never (resume.resume_plan); a loop must not hang on a bug
                raise TrainingError(f"internal: stage {stage} ended at epoch {pos.epoch} without advancing")
        return self._result("completed")

    def _begin(self, resume: bool, init_from: Optional[os.PathLike]) -> Optional[Position]:
        """The position to start at (None: the resumed run is complete); restores a resumed run's progress."""
        held = [stem for stem in ("last", "best", "best_phase1") if self.run.has(stem)]
        if not resume and held:  # [reliability] #36: a run directory is continued only by --resume
            raise TrainingError(f"{self.run.path} already holds a run ({', '.join(f'{h}.json' for h in held)}); "
                                "continue it with --resume, or train into a new --out")  # fmt: skip
        if resume and not self.run.has("last"):  # killed before its first epoch ended (a best may be there)
            self.log(f"{self.run.path}: no checkpoint committed yet; starting the run from the beginning")
            resume = False
        pos = Position()
        if resume:
            pos = self._restore(self.run.verify("last"))  # every file against its SHA-256, also when complete
        elif init_from is not None:  # a run directory (its best) or a manifest; refuses another model config,
            # except, for a phase 2 alone, in the personalizer's fields: it trains new heads on a phase-1 model
            load_training_state(init_from, self.net, None, fresh_personalizer=self.stages[0][0] == 2)
        elif self.stages[0][0] == 2:
            raise TrainingError("phase 2 trains the personalizer of a trained phase-1 model: pass init_from "
                                "(--init) a phase-1 checkpoint of the same config")  # fmt: skip
        if self.rank == 0:  # what a killed save left: files no manifest names, temporaries
            self.run.collect_garbage()
            self.run.write_log(self.history)  # the history so far: empty for a new run, the checkpoint's
        if resume and pos.stage == len(self.stages):
            self.log(f"{self.run.path}: the run is already complete (add epochs or --phase both to extend it)")
            return None
        return pos

    def _restore(self, manifest: dict[str, Any]) -> Position:
        """The run's progress from ``last``, after checking that this trainer continues the same run: the same
        model, data and recipe, with only what :mod:`harmonizer_fast.resume` lets a resume change."""
        where = self.run.manifest_path("last")
        try:
            st = manifest["state"]
            RecordedState(**{f.name: st[f.name] for f in fields(RecordedState)})
            recorded_tc = TrainConfig.from_dict(st["train_config"])
            recorded_data = st.get("data", {}).get("fingerprint")
            recorded_model = manifest["model_config"]
            raw = dict(st["position"])
            self.history, self.best_score, self.best_phase = st["history"], st["best_score"], st["best_phase"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: damaged manifest: the training state ({type(exc).__name__}: "
                                  f"{exc})") from None  # fmt: skip
        if recorded_data is not None and recorded_data != self.record.fingerprint:
            raise TrainingError(f"--resume: {self.run.path} was trained on other data (fingerprint {recorded_data}, "
                                f"this data {self.record.fingerprint}); train into a new --out")  # fmt: skip
        self._adopt_model_config(recorded_model)
        # an option added after the run was recorded keeps the recorded run's meaning where only the optimizer
        # reads it; any other (the split, the protocol) must match its recorded default, or resume_plan refuses
        asked = replace(self.tc, **{name: getattr(recorded_tc, name) for name in ADOPTED_ON_RESUME
                                    if name not in st["train_config"]})  # fmt: skip
        steps = -(-len(self.split.train) // recorded_tc.batch_size)  # the recorded plan's steps per epoch
        try:
            check_position(recorded_tc.stages(), **raw, steps_per_epoch=steps)
        except (ResumeError, TypeError) as exc:
            raise CheckpointError(f"{where}: damaged manifest: {exc}") from None
        try:
            point = resume_plan(recorded_tc, asked, **raw)
        except ResumeError as exc:
            raise TrainingError(str(exc)) from None
        for note in point.notes:
            self.log(f"--resume: {note}")
        self.tc, self.stages = asked, asked.stages()
        self.steps.tc = asked
        self._resume_state = st
        return Position(point.stage, point.epoch, point.step)

    def _adopt_model_config(self, recorded: dict[str, Any]) -> None:
        """Refuse a model config other than the recorded one; options added since the run was recorded take
        the recorded run's meaning (HarmonizerConfig.from_dict), so the model is rebuilt with them."""
        try:
            config = HarmonizerConfig.from_dict(recorded)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{self.run.manifest_path('last')}: damaged manifest: model config ({exc})") from None
        mine = self.net.config.to_dict()
        differ = [k for k in recorded if mine.get(k) != config.to_dict()[k]]
        if differ:
            raise TrainingError("--resume: the run's model differs in " + ", ".join(
                f"{k} (recorded {config.to_dict()[k]!r}, asked {mine[k]!r})" for k in differ)
                + "; train into a new --out")  # fmt: skip
        if config != self.net.config:
            self._build(config)

    def _run_stage(self, pos: Position, budget: _Budget) -> Optional[str]:
        """Train one stage from ``pos`` to its end; returns why it stopped early, or None."""
        phase, n_epochs = self.stages[pos.stage]
        end = sum(e for _, e in self.stages[: pos.stage + 1])  # global epoch after the stage's last
        opt, scheduler = self._begin_stage(pos, phase, n_epochs, end - n_epochs)
        ddp = self.steps.wrap()
        stage_start = budget.minutes()
        while pos.epoch < end:
            sums, done = self._run_epoch(ddp, opt, pos, phase, end - n_epochs, n_epochs, budget)
            if not done:
                self.history.append(self._record(pos, phase, sums, partial=True))
                self._checkpoint(pos, phase, opt, scheduler, "time budget")
                self.log(f"stopped by the time budget ({self.tc.max_minutes} min) in epoch {pos.epoch + 1}")
                return "time budget"
            if budget.limit is not None:  # decay within the budget when it ends before the planned epochs
                scheduler.spend(self._synced(budget.progress(stage_start)))
            scheduler.step()
            self._end_epoch(pos, phase, sums, budget)
            finished = pos.epoch == end and pos.stage + 1 == len(self.stages)
            if pos.epoch == end:
                pos.stage += 1
            # a budget spent at an epoch's end is a budget stop, and last says so (as after a partial epoch)
            out_of_time = budget.spent() and not finished
            why = "completed" if finished else "time budget" if out_of_time else ""
            self._checkpoint(pos, phase, opt, scheduler, why)
            self.log(_log_line(self.history[-1]))
            if out_of_time:
                self.log(f"stopped by the time budget ({self.tc.max_minutes} min) after epoch {pos.epoch}")
                return "time budget"
        return None

    def _synced(self, value: float) -> float:
        """``value`` as rank 0 has it: every process must set the same learning rate."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)  # NCCL needs it on the GPU
        dist.broadcast(t, 0)
        return float(t)

    def _begin_stage(self, pos: Position, phase: int, n_epochs: int, first: int):
        """The stage's model phase, optimizer and cosine schedule, with the state a resume continues from."""
        self.net.set_phase(phase)
        self.net.train()
        opt = torch.optim.AdamW(self._param_groups(phase), lr=self.tc.lr_phase1 if phase == 1 else self.tc.lr_phase2,
                                weight_decay=self.tc.weight_decay)  # fmt: skip
        scheduler = CosineSchedule(opt, n_epochs)
        st, self._resume_state = self._resume_state, None
        if st is not None and st["phase"] == phase and (pos.epoch > first or pos.step > 0):  # mid-stage
            self.run.load_into("last", self.net, opt)
            if st["scheduler"] is not None:
                scheduler.load_state_dict(st["scheduler"])
            # the plan of this resume: its epochs for the stage and its (possibly lowered) learning rates
            scheduler.replan([g["lr"] for g in self._param_groups(phase, with_rates=True)], n_epochs)
        elif phase == 2 and pos.stage > 0:  # phase 2 of this run starts from the selected phase-1 model
            self.run.load_into("best_phase1", self.net)
        return opt, scheduler

    def _param_groups(self, phase: int, with_rates: bool = False) -> list[dict[str, Any]]:
        """The trainable parameters; in phase 1 the prior net in a group of its own at ``lr_prior``."""
        trainable = [(n, p) for n, p in self.net.named_parameters() if p.requires_grad]
        base = self.tc.lr_phase1 if phase == 1 else self.tc.lr_phase2
        if phase != 1 or self.tc.lr_prior is None:
            groups = [{"params": [p for _, p in trainable]}]
        else:
            prior = [p for n, p in trainable if n.startswith("prior.")]
            rest = [p for n, p in trainable if not n.startswith("prior.")]
            groups = [{"params": rest}, {"params": prior, "lr": self.tc.lr_prior}]
        if with_rates:
            for g in groups:
                g.setdefault("lr", base)
        return groups

    def _run_epoch(self, ddp, opt, pos: Position, phase: int, first: int, n_epochs: int, budget: _Budget):
        """Steps from ``pos.step`` to the end of the epoch; returns (summed step losses, whether it finished)."""
        batches = self.steps.batches(pos.epoch)
        steps = range(pos.step, len(batches))
        bar = None
        if self.progress:
            from tqdm import tqdm

            steps = bar = tqdm(steps, desc=f"phase {phase} epoch {pos.epoch - first + 1}/{n_epochs}", leave=False)
        sums: dict[str, float] = {"steps": 0.0}
        try:
            for step in steps:
                progress = (pos.epoch - first + step / len(batches)) / n_epochs
                parts = self.steps.step(ddp, opt, batches[step], pos.epoch, step, progress)
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                sums["steps"] += 1
                pos.step = step + 1
                if bar is not None:
                    bar.set_postfix(loss=f"{parts['total']:.4f}")
                if budget.spent() and pos.step < len(batches):
                    return sums, False
        finally:
            if bar is not None:
                bar.close()
        return sums, True

    def _end_epoch(self, pos: Position, phase: int, sums: dict[str, float], budget: _Budget) -> None:
        """Validate, record, and commit ``best`` (and ``best_phase1``) when the score improves."""
        record = self._record(pos, phase, sums)
        record.update(self.validate(phase))
        key = "val_empty_fraction" if phase == 1 else "val_heads_empty_fraction"
        if record.get(key) == 1.0:  # [science] #35: a user must not find out from evaluate
            self.log(f"warning: epoch {pos.epoch + 1}: every validation prediction is empty (the model has not "
                     "left its all-empty start; an early epoch may be selected as best)")  # fmt: skip
        record["minutes"] = budget.minutes()
        if budget.clock != "wall":
            record["wall_minutes"] = budget.wall_minutes()
        self.history.append(record)
        pos.epoch, pos.step = pos.epoch + 1, 0
        # scores of the two phases are different metrics: the best restarts with phase 2
        if self.best_score is None or self.best_phase != phase or record["score"] < self.best_score:
            self.best_score, self.best_phase = record["score"], phase
            # before last: last's state carries this score, so it must never be committed ahead of the
            # checkpoint the score describes (a kill between the two would lose that best)
            for stem in ("best_phase1", "best") if phase == 1 else ("best",):
                self._save(stem, None, self._state(pos, phase, None, "best"))

    def _checkpoint(self, pos: Position, phase: int, opt, scheduler, stopped: str) -> None:
        """The one checkpoint every exit commits: ``last`` with the optimizer and schedule, then the log."""
        self._save("last", opt, self._state(pos, phase, scheduler, stopped))
        if self.rank == 0:
            self.run.write_log(self.history)

    def _record(self, pos: Position, phase: int, sums: dict[str, float], partial: bool = False) -> dict[str, Any]:
        n = max(sums.get("steps", 0.0), 1.0)
        record: dict[str, Any] = {"epoch": pos.epoch + 1, "phase": phase}
        if partial:
            record["partial_steps"] = pos.step
        record.update({f"train_{k}": v / n for k, v in sums.items() if k != "steps"})
        return record

    def _result(self, stopped: str) -> TrainResult:
        done = sum(1 for r in self.history if "partial_steps" not in r)
        return TrainResult(self.run.path, done, stopped, self.best_score, self.history)

    # -----------------------------------------------------------------------------------------------------
    # Validation and state.

    @torch.no_grad()
    def validate(self, phase: int) -> dict[str, Any]:
        """Validation metrics (Table 1; in phase 2 also Table 2 as ``val_heads_*``) and the selection
        ``score`` (lower is better) with its name."""
        tc = self.tc
        epoch = len(self.history) + 1
        bad = [n for n, t in (*self.net.named_parameters(), *self.net.named_buffers())
               if t.is_floating_point() and not torch.isfinite(t).all()]  # fmt: skip
        if bad:
            raise DivergedError(f"{len(bad)} weights or statistics are NaN or Inf after epoch {epoch} ({bad[0]}, ...)")
        try:
            scores = evaluate_model(self.net, self.data, self.split.val, num_samples=tc.val_samples,
                                    seed=seed_of(tc.seed, 3), batch=tc.val_batch,
                                    heads="personalized" if phase == 2 else "none")  # fmt: skip
        except ValueError as exc:  # the metrics refuse non-finite predictions
            if "NaN" not in str(exc) and "Inf" not in str(exc):
                raise
            raise DivergedError(f"the validation predictions after epoch {epoch} are not finite ({exc})") from None
        tables = summarize(scores)
        out: dict[str, Any] = {f"val_{k}": v for k, v in tables["table1"]["mean"].items()}
        if tables["table2"] is not None:
            out.update({f"val_heads_{k}": v for k, v in tables["table2"]["mean"].items()})
        if phase == 1 and len(self.split.val) >= 2:  # the latent space's health per epoch ([science] #35)
            lat = latent_statistics(self.net, self.data, self.split.val, batch=tc.val_batch)
            out.update({"val_prior_spread": lat["mean_spread_ratio"], "val_prior_sigma_median":
                        lat["prior_sigma_quantiles"]["0.5"], "val_prior_clamped": lat["prior_sigma_clamped_share"],
                        "val_kl_total": lat["kl_total"]})  # fmt: skip
        name = tc.selection_score(phase)
        out["score"], out["score_name"] = selection.score(name, tables), name
        return out

    def _state(self, pos: Position, phase: int, scheduler, stopped: str) -> dict[str, Any]:
        return {
            "position": asdict(pos),
            "phase": phase,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "train_config": self.tc.to_dict(),
            "data": self.record.to_dict(),
            "history": self.history,
            "best_score": self.best_score,
            "best_phase": self.best_phase,
            "stopped": stopped,
            "world_size": self.world,
        }

    def _save(self, stem: str, opt, state: dict[str, Any]) -> None:
        if self.rank == 0:
            self.run.save(stem, self.net, optimizer=opt, state=state)
        if self.world > 1:
            dist.barrier()
