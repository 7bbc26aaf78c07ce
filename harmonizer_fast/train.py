"""The two-phase trainer (paper section 4.2, appendix A; DESIGN.md section 5).

Phase 1 trains backbone, prior, posterior, fcomb and harmonizer on Eq. 8 (Adam, lr 1e-4, weight decay 1e-5;
the paper runs 100 epochs); phase 2 freezes them and trains the personalizer on Eq. 6 (lr 5e-5, 150 epochs).
Around that:

- **Reproducible and exactly resumable.** The data order of each epoch and every random draw of each step
  (augmentation, the rater the posterior sees, the latent noise) come from generators seeded by
  ``(seed, epoch, step)``, not from global state. A checkpoint records the epoch *and step* it was taken at,
  so ``resume`` continues at the same step and a run killed at any moment, resumed, ends with exactly the
  weights of an uninterrupted run (CPU, fp32).
- **Checkpoints** after every epoch (and when a time budget stops the run): ``last`` with the optimizer
  moments (:mod:`harmonizer_fast.checkpoint`: one commit point per save, so a kill at any instant leaves a
  resumable run); ``best`` when the validation score improves (phase 1: GED at ``val_samples`` prior samples, lower is
  better; phase 2: the mean per-rater Dice of the personalized heads, higher is better). Validation uses a
  patient-level split of the training patients; the test fold is never looked at.
- **Guards**: gradient clipping; a NaN/Inf loss or gradient stops the run with :class:`TrainingError`.
- **Scale out** with ``torchrun``: each process takes an equal slice of every global batch, DDP averages the
  gradients (gloo on CPU, NCCL on GPU) and batch norm is synchronized, so two processes compute what one
  does on the same global batch. Mixed precision (bfloat16 autocast) on GPU.
- ``log.jsonl`` holds one line per epoch, rewritten atomically from the checkpoint's history (so after a
  resume it never holds an epoch twice or half a line); tqdm shows progress on the first process.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from . import losses
from ._io import write_atomic
from .checkpoint import CheckpointError, collect_garbage, load_training_state, save_checkpoint, verify_checkpoint
from .data import MultiRaterData, augment, patient_split
from .evaluate import evaluate_model
from .model import HarmonizerConfig, HarmonizerNet


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN/Inf loss, an inconsistent resume, ...); the message says why."""


@dataclass
class TrainConfig:
    phase: str = "both"  # "1", "2" or "both"
    epochs_phase1: int = 100
    epochs_phase2: int = 150
    lr_phase1: float = 1e-4
    lr_phase2: float = 5e-5
    weight_decay: float = 1e-5
    batch_size: int = 16  # global: split over the processes
    grad_clip: float = 1.0
    max_minutes: Optional[float] = None
    seed: int = 0
    folds: int = 4
    fold: int = 0
    val_fraction: float = 0.15
    rater_order: str = "stored"  # or "area"
    augment: bool = True
    amp: bool = True  # bfloat16 autocast on GPU (ignored on CPU)
    val_samples: int = 16
    val_batch: int = 32

    def __post_init__(self) -> None:
        """Refuse values that would train nothing or garbage (a negative batch, zero epochs, a NaN rate)."""

        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("epochs_phase1", "epochs_phase2", "batch_size", "val_samples", "val_batch", "folds"):
            need(is_int(getattr(self, name)) and getattr(self, name) >= (2 if name == "folds" else 1), name,
                 "an integer >= 2" if name == "folds" else "an integer >= 1")  # fmt: skip
        need(is_int(self.seed) and 0 <= self.seed < 2**63, "seed", "an integer in [0, 2**63)")
        need(is_int(self.fold) and 0 <= self.fold < self.folds, "fold", f"an integer in [0, {self.folds})")
        for name in ("lr_phase1", "lr_phase2", "grad_clip"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, name, "a finite number > 0")
        need(isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
             and self.weight_decay >= 0, "weight_decay", "a finite number >= 0")  # fmt: skip
        need(isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1, "val_fraction",
             "a number in (0, 1)")  # fmt: skip
        mm = self.max_minutes
        need(mm is None or (isinstance(mm, (int, float)) and math.isfinite(mm) and mm > 0), "max_minutes",
             "None or a finite number > 0")  # fmt: skip
        need(self.phase in ("1", "2", "both"), "phase", "'1', '2' or 'both'")
        need(self.rater_order in ("stored", "area"), "rater_order", "'stored' or 'area'")

    def stages(self) -> list[tuple[int, int]]:
        """(phase, epochs) in training order."""
        out = []
        if self.phase in ("1", "both"):
            out.append((1, self.epochs_phase1))
        if self.phase in ("2", "both"):
            out.append((2, self.epochs_phase2))
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------------------------------------
# Distributed helpers.


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); returns (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return _dist_info()


class SyncBatchNorm2d(torch.nn.BatchNorm2d):
    """Batch norm whose training statistics cover the global batch of all processes, on any device.

    torch's SyncBatchNorm runs on GPUs only; this one all-reduces the per-channel count, sum and sum of
    squares (through the autograd-aware all_reduce, so the backward sums the gradients of the statistics
    too). Used for CPU (gloo) runs, so two processes compute what one does on the same global batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        # Statistics in float64, as ATen's CPU batch norm accumulates (acc_type<float> is double there): the
        # one-pass E[x^2] - E[x]^2 would otherwise lose digits to cancellation in float32.
        c = x.shape[1]
        xd = x.double()
        count = torch.full((1,), x.numel() / c, dtype=torch.float64, device=x.device)
        stats = all_reduce(torch.cat([xd.sum((0, 2, 3)), (xd * xd).sum((0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c : 2 * c] / n - mean * mean
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean.detach().to(x.dtype))
            self.running_var.mul_(1 - m).add_((m * var.detach() * n / (n - 1)).to(x.dtype))
        invstd = torch.rsqrt(var + self.eps)
        y = ((xd - mean[None, :, None, None]) * invstd[None, :, None, None]).to(x.dtype)
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def convert_sync_batchnorm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """torch's SyncBatchNorm on CUDA, :class:`SyncBatchNorm2d` elsewhere (same parameters and buffers)."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is torch.nn.BatchNorm2d:
            new = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats)  # fmt: skip
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            new.requires_grad_(child.weight.requires_grad)
            setattr(module, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return module


def _seed(*keys: int) -> int:
    """One seed from a tuple of ints (stable across runs, processes and resumes)."""
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k) + 1) % (2**63 - 1)
    return seed


def _generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*keys))


# ---------------------------------------------------------------------------------------------------------
# The trainer.


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    stopped: str  # "completed" or "time budget"
    best_score: Optional[float]
    history: list[dict[str, Any]]


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
        self.rank, self.world = _dist_info()
        self.tc = train_config
        self.run_dir = Path(run_dir)
        self.log = log if self.rank == 0 else (lambda _msg: None)
        self.progress = progress and self.rank == 0
        if device is None:
            device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        self.device = device
        if self.tc.batch_size % self.world:
            raise TrainingError(f"batch size {self.tc.batch_size} must be divisible by the {self.world} processes")
        if data.num_raters != model_config.num_raters:
            raise TrainingError(f"the data has {data.num_raters} raters, the model config {model_config.num_raters}")
        if data.in_channels != model_config.in_channels:
            raise TrainingError(f"the data has {data.in_channels} channels, the model config "
                                f"{model_config.in_channels}")  # fmt: skip
        data = data.padded(2**model_config.downsamplings)
        if self.tc.rater_order == "area":
            data = data.ordered_by_area()
        self.split = patient_split(data.patient_id, folds=self.tc.folds, fold=self.tc.fold,
                                   val_fraction=self.tc.val_fraction, seed=self.tc.seed)  # fmt: skip
        self.data = data  # prepared: padded and in the training rater order
        self.images = torch.from_numpy(data.images)
        self.masks = torch.from_numpy(data.masks)
        torch.manual_seed(self.tc.seed)
        self.model = HarmonizerNet(model_config).to(device)
        self.net = self.model
        if self.world > 1:
            self.model = convert_sync_batchnorm(self.model, device)
            self.net = self.model
        self.history: list[dict[str, Any]] = []
        self.best_score: Optional[float] = None
        self.best_phase = 0

    # -----------------------------------------------------------------------------------------------------

    def _optimizer(self, phase: int) -> torch.optim.Optimizer:
        params = [p for p in self.net.parameters() if p.requires_grad]
        lr = self.tc.lr_phase1 if phase == 1 else self.tc.lr_phase2
        return torch.optim.Adam(params, lr=lr, weight_decay=self.tc.weight_decay)

    def _wrap(self) -> torch.nn.Module:
        if self.world == 1:
            return self.net
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        # frozen parameters (requires_grad False) are not tracked, so every tracked one is used in each phase
        return DDP(self.net, device_ids=ids)

    def _batches(self, epoch: int) -> list[np.ndarray]:
        train = self.split.train
        order = train[torch.randperm(len(train), generator=_generator(self.tc.seed, 1, epoch)).numpy()]
        b = self.tc.batch_size
        n = len(order) // b if len(order) >= b else 1
        return [order[i * b : (i + 1) * b] for i in range(n)]

    def _step(self, ddp: torch.nn.Module, opt, idx: np.ndarray, epoch: int, step: int) -> dict[str, float]:
        g = _generator(self.tc.seed, 2, epoch, step)
        images, masks = self.images[idx], self.masks[idx].float()
        if self.tc.augment:
            images, masks = augment(images, masks, g)
        noise = self.net.draw_noise(len(idx), g)
        part = slice(self.rank * len(idx) // self.world, (self.rank + 1) * len(idx) // self.world)
        images, masks = images[part].to(self.device), masks[part].to(self.device)
        noise = {k: v[part] for k, v in noise.items()}
        use_amp = self.tc.amp and self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            out = ddp(images, masks, noise=noise)
            loss, parts = losses.total_loss(out, masks, self.net.config)
        if not math.isfinite(parts["total"]):
            raise TrainingError(f"the loss is {parts['total']} at epoch {epoch + 1}, step {step + 1} "
                                f"(parts: {parts}); lower the learning rate or check the data")  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.net.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.tc.grad_clip)
        if not torch.isfinite(norm):
            raise TrainingError(f"a gradient is NaN or Inf at epoch {epoch + 1}, step {step + 1}")
        opt.step()
        if self.net.phase == 2:
            self.net.personalizer.trained_steps += 1
        if self.world > 1:  # report the global batch's loss, not this process's slice of it
            vals = torch.tensor(list(parts.values()), dtype=torch.float64)
            dist.all_reduce(vals)
            parts = dict(zip(parts, (vals / self.world).tolist()))
        return parts

    @torch.no_grad()
    def validate(self, phase: int) -> dict[str, float]:
        """Validation metrics; ``score`` (lower is better) picks the best checkpoint."""
        tc = self.tc
        acc, _ = evaluate_model(self.net, self.data, self.split.val, samples=tc.val_samples, seed=_seed(tc.seed, 3),
                                batch=tc.val_batch, personalized=phase == 2)  # fmt: skip
        summary = acc.summary()
        out = {f"val_{k}": v for k, v in summary["mean"].items()}
        out["score"] = out["val_ged"] if phase == 1 else -out["val_dice_each_mean"]
        return out

    # -----------------------------------------------------------------------------------------------------

    def _state(self, epoch: int, step: int, phase: int, stage: int, scheduler, stopped: str = "") -> dict[str, Any]:
        return {
            "epoch": epoch,
            "step": step,
            "phase": phase,
            "stage": stage,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "train_config": asdict(self.tc),
            "split": {k: getattr(self.split, k).tolist() for k in ("train", "val", "test")},
            "history": self.history,
            "best_score": self.best_score,
            "best_phase": self.best_phase,
            "stopped": stopped,
            "world_size": self.world,
            "n_items": int(self.images.shape[0]),
        }

    def _write_log(self) -> None:
        """``log.jsonl`` from the history, atomically (a few hundred short lines at most)."""
        if self.rank == 0:
            write_atomic(self.run_dir / "log.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))

    def _save(self, stem: str, opt, state: dict[str, Any]) -> None:
        if self.rank == 0:
            save_checkpoint(self.run_dir, stem, self.net, optimizer=opt, state=state)
        if self.world > 1:
            dist.barrier()

    def fit(self, *, resume: bool = False, init_from: Optional[os.PathLike] = None) -> TrainResult:
        """Train the configured stages. ``resume``: continue from ``last`` of the run directory, exactly where
        it stopped (from the beginning when nothing was committed yet). ``init_from``: start from the weights
        of another checkpoint of the same model config (phase 2 needs a trained phase-1 model)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        stages = self.tc.stages()
        start_stage, start_epoch, start_step = 0, 0, 0
        manifest = None
        last = self.run_dir / "last.json"
        if resume and not last.is_file():
            self.log(f"{self.run_dir}: no checkpoint committed yet; starting the run from the beginning")
            resume = False
        if resume:
            manifest = verify_checkpoint(last)  # every file against its SHA-256, also for a completed run
            st = manifest["state"]
            if st.get("train_config", {}).get("seed") != self.tc.seed:
                raise TrainingError("--resume: the checkpoint was trained with another seed")
            try:
                start_stage, start_epoch, start_step = st["stage"], st["epoch"], st["step"]
                self.history, self.best_score, self.best_phase = st["history"], st["best_score"], st["best_phase"]
            except KeyError as exc:
                raise CheckpointError(f"{last}: damaged manifest: the training state lacks {exc}") from None
        elif init_from is not None:
            load_training_state(init_from, self.net, None)  # refuses another model config
        elif stages[0][0] == 2:
            raise TrainingError("phase 2 trains the personalizer of a trained phase-1 model: pass init_from "
                                "(--init) a phase-1 checkpoint of the same config")  # fmt: skip
        if self.rank == 0:  # what a killed save left: files no manifest names, temporaries
            collect_garbage(self.run_dir)
        self._write_log()  # the history so far: empty for a new run, the checkpoint's for a resumed one
        if manifest is not None and manifest["state"].get("stopped") == "completed":
            self.log(f"{self.run_dir}: the run is already complete")
            return TrainResult(self.run_dir, manifest["state"]["epoch"], "completed", self.best_score, self.history)
        t0 = time.monotonic()
        budget = None if self.tc.max_minutes is None else self.tc.max_minutes * 60.0
        epochs_before = sum(e for _, e in stages[:start_stage])
        for si in range(start_stage, len(stages)):
            phase, n_epochs = stages[si]
            self.net.set_phase(phase)
            self.net.train()
            opt = self._optimizer(phase)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                opt, T_max=max(1, n_epochs), eta_min=0.1 * opt.defaults["lr"]
            )
            first_epoch = 0
            if manifest is not None and si == start_stage:
                if manifest["state"]["phase"] == phase:  # mid-stage: weights, optimizer, schedule, position
                    load_training_state(self.run_dir / "last.json", self.net, opt)
                    if manifest["state"]["scheduler"] is not None:
                        scheduler.load_state_dict(manifest["state"]["scheduler"])
                    first_epoch = start_epoch - epochs_before
                else:  # saved at the end of the previous phase: its weights, a fresh optimizer
                    load_training_state(self.run_dir / "last.json", self.net, None)
            ddp = self._wrap()
            for e in range(first_epoch, n_epochs):
                epoch = epochs_before + e
                batches = self._batches(epoch)
                skip = start_step if (manifest is not None and si == start_stage and e == first_epoch) else 0
                iterator = range(skip, len(batches))
                bar = None
                if self.progress:
                    from tqdm import tqdm

                    bar = tqdm(iterator, desc=f"phase {phase} epoch {e + 1}/{n_epochs}", leave=False)
                    iterator = bar
                sums: dict[str, float] = {}
                done = 0
                for step in iterator:
                    parts = self._step(ddp, opt, batches[step], epoch, step)
                    for k, v in parts.items():
                        sums[k] = sums.get(k, 0.0) + v
                    done += 1
                    if bar is not None:
                        bar.set_postfix(loss=f"{parts['total']:.4f}")
                    if budget is not None and time.monotonic() - t0 > budget and step + 1 < len(batches):
                        if bar is not None:
                            bar.close()
                        record = {"epoch": epoch + 1, "phase": phase, "partial_steps": step + 1,
                                  **{f"train_{k}": v / max(done, 1) for k, v in sums.items()}}  # fmt: skip
                        self.history.append(record)
                        self._save("last", opt, self._state(epoch, step + 1, phase, si, scheduler, "time budget"))
                        self._write_log()
                        self.log(f"stopped by the time budget ({self.tc.max_minutes} min) in epoch {epoch + 1}")
                        return TrainResult(self.run_dir, epoch, "time budget", self.best_score, self.history)
                if bar is not None:
                    bar.close()
                scheduler.step()
                record = {
                    "epoch": epoch + 1,
                    "phase": phase,
                    **{f"train_{k}": v / max(done, 1) for k, v in sums.items()},
                }
                record.update(self.validate(phase))
                record["minutes"] = (time.monotonic() - t0) / 60
                # scores of the two phases are different metrics: the best restarts with phase 2
                improved = self.best_score is None or self.best_phase != phase or record["score"] < self.best_score
                self.history.append(record)
                # best before last: last's state carries best_score, so it must never be committed ahead of
                # the best checkpoint that score describes (a kill between the two would lose that best).
                if improved:
                    self.best_score, self.best_phase = record["score"], phase
                    self._save("best", None, self._state(epoch + 1, 0, phase, si, None, "best"))
                last_epoch = e + 1 == n_epochs and si + 1 == len(stages)
                next_stage, next_epoch = (si + 1, epoch + 1) if e + 1 == n_epochs else (si, epoch + 1)
                self._save("last", opt, self._state(next_epoch, 0, phase, next_stage, scheduler,
                                                    "completed" if last_epoch else ""))  # fmt: skip
                self._write_log()
                self.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
                if budget is not None and time.monotonic() - t0 > budget and not last_epoch:
                    self.log(f"stopped by the time budget ({self.tc.max_minutes} min) after epoch {epoch + 1}")
                    return TrainResult(self.run_dir, epoch + 1, "time budget", self.best_score, self.history)
            epochs_before += n_epochs
            manifest = None
        return TrainResult(self.run_dir, epochs_before, "completed", self.best_score, self.history)
