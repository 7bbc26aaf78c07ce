"""The per-rater baseline of Table 2: one U-Net with a head per rater, no latent space.

The simplest way to predict each rater's mask ([science] #35, item 6): the Harmonizer Network's backbone
(the same config, so the same encoder, decoder and width) with a 1 x 1 convolution giving R logit maps,
head r trained on rater r's masks in the run's rater order (LIDC: by area, smallest first). It answers the
question a reviewer asks of any personalizer: does a probabilistic model with per-rater heads beat a plain
multi-output network trained on the same images, split, augmentation, optimizer and epochs?

Training follows phase 1's recipe (``train.TrainConfig``'s rates, AdamW, the cosine schedule, the batch Dice
plus BCE of :func:`~harmonizer_fast.losses.dice_bce`, here per head and averaged over the heads; the batch
Dice because the backbone is shared, see that function's docstring) and selects the epoch with the best
validation Dice_mean (head r against rater r, per image), as phase 2 selects its heads. A run writes

    OUT/per-rater.json                 config, data record (fingerprint, split), history, selected epoch
    OUT/per-rater-<sha>.safetensors    the selected weights

both atomically; it is short (minutes on a CPU) and restarts from the beginning when killed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ._io import write_atomic
from ._random import generator
from .data import MultiRaterData, Split
from .data.dataset import augment, patient_split
from .losses import dice_bce
from .metrics import MetricAccumulator
from .model import HarmonizerConfig
from .model.backbone import Backbone
from .model.fcomb import FOREGROUND_PRIOR
from .rundir import prepare
from .schedule import CosineSchedule
from .train import epoch_batches

MANIFEST = "per-rater.json"
FORMAT = "harmonizer-fast-per-rater"


class PerRaterUNet(nn.Module):
    """``config``'s backbone and one 1 x 1 head per rater: ``forward(images)`` gives logits (B, R, H, W)."""

    def __init__(self, config: HarmonizerConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.backbone = Backbone(c.in_channels, c.stem_channels, c.encoder_blocks, c.encoder_channels,
                                 c.decoder_channels)  # fmt: skip
        self.heads = nn.Conv2d(c.decoder_channels[-1], c.num_raters, 1)
        # the model's output-bias rule (fcomb.FOREGROUND_PRIOR): start at the lesions' prior, not at 50 %
        nn.init.constant_(self.heads.bias, math.log(FOREGROUND_PRIOR / (1 - FOREGROUND_PRIOR)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.heads(self.backbone(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Each rater head's probabilities (B, R, H, W)."""
        return torch.sigmoid(self(images))


@dataclass(frozen=True)
class PerRaterRecipe:
    """How a per-rater baseline trains: phase 1's defaults of the ``small`` preset unless given."""

    epochs: int = 30
    lr: float = 3e-3
    weight_decay: float = 1e-5
    batch_size: int = 16
    seed: int = 0
    folds: int = 4
    fold: int = 0
    val_fraction: float = 0.15
    rater_order: str = "stored"
    min_raters: int = 0
    grad_clip: float = 1.0
    split_seed: Optional[int] = None  # the patient partition's seed; None: ``seed`` (``TrainConfig.split_seed``)


def data_split(data: MultiRaterData, r: PerRaterRecipe) -> Split:
    """The patient split a Harmonizer run of the same fold, seed and protocol uses (``train.Trainer``)."""
    seed = r.seed if r.split_seed is None else r.split_seed
    split = patient_split(data.patient_id, folds=r.folds, fold=r.fold, val_fraction=r.val_fraction, seed=seed)
    return split.keep(data.raters_drawn() >= r.min_raters) if r.min_raters else split


def score_heads(model: PerRaterUNet, data: MultiRaterData, indices: np.ndarray, batch: int = 32) -> MetricAccumulator:
    """Table 2 of the heads on ``data[indices]``: the heads are both the set of maps and the per-rater maps."""
    was = model.training
    model.eval()
    acc = MetricAccumulator()
    for s in range(0, len(indices), batch):
        part = indices[s : s + batch]
        probs = model.predict(torch.from_numpy(data.images[part])).float()
        acc.update(probs, torch.from_numpy(data.masks[part]), probs)
    model.train(was)
    return acc


def train_per_rater(data: MultiRaterData, config: HarmonizerConfig, recipe: PerRaterRecipe, out: os.PathLike, *,
                    log: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Train the baseline on ``data`` (the split of ``recipe``) and write ``out``; returns the manifest."""
    fingerprint = data.fingerprint()
    data = prepare(data, config, recipe.rater_order)
    split = data_split(data, recipe)
    torch.manual_seed(recipe.seed)
    model = PerRaterUNet(config)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = CosineSchedule(opt, recipe.epochs)
    images, masks = torch.from_numpy(data.images), torch.from_numpy(data.masks)
    history, best, selected, start = [], -math.inf, 0, time.perf_counter()
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for epoch in range(recipe.epochs):
        model.train()
        losses = []
        for step, idx in enumerate(epoch_batches(split.train, recipe.batch_size, recipe.seed, epoch)):
            x, y = augment(images[idx], masks[idx].float(), generator(recipe.seed, 2, epoch, step))
            logits = model(x)
            loss = torch.stack([dice_bce(logits[:, r], y[:, r]) for r in range(y.shape[1])]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            opt.step()
            losses.append(float(loss.detach()))
        schedule.step()
        val = score_heads(model, data, split.val).summary()["mean"]
        row = {"epoch": epoch + 1, "train_seg": float(np.mean(losses)), "val_dice_mean": val["dice_each_mean"],
               "val_dice_match": val["dice_match"], "val_ged": val["ged"],
               "minutes": (time.perf_counter() - start) / 60}  # fmt: skip
        history.append(row)
        if row["val_dice_mean"] > best:  # NaN never selects
            best, selected = row["val_dice_mean"], epoch + 1
            best_state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    blob = st_save(best_state)
    out = Path(out)
    weights = f"per-rater-{hashlib.sha256(blob).hexdigest()[:16]}.safetensors"
    write_atomic(out / weights, blob)
    manifest = {"format": FORMAT, "version": 1, "model_config": config.to_dict(), "recipe": asdict(recipe),
                "data": {"fingerprint": fingerprint, "n_items": len(data), "split": {k: getattr(split, k).tolist()
                         for k in ("train", "val", "test")}},
                "files": {"weights": weights, "sha256": hashlib.sha256(blob).hexdigest()},
                "history": history, "selected_epoch": selected}  # fmt: skip
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def load_per_rater(path: os.PathLike) -> tuple[PerRaterUNet, dict[str, Any]]:
    """The baseline of a run directory written by :func:`train_per_rater` (weights checked against their
    SHA-256), in eval mode, and its manifest."""
    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path / MANIFEST}: not a per-rater baseline (format {manifest.get('format')!r})")
    blob = (path / manifest["files"]["weights"]).read_bytes()
    if hashlib.sha256(blob).hexdigest() != manifest["files"]["sha256"]:
        raise ValueError(f"{path / manifest['files']['weights']}: does not match its SHA-256 in {MANIFEST}")
    model = PerRaterUNet(HarmonizerConfig.from_dict(manifest["model_config"]))
    model.load_state_dict(st_load(blob))
    return model.eval(), manifest


def held_out(manifest: dict[str, Any], data: MultiRaterData) -> Optional[np.ndarray]:
    """The run's test indices when ``data`` is the dataset it was trained on (same fingerprint), else None."""
    same = data.fingerprint() == manifest["data"]["fingerprint"]
    return np.asarray(manifest["data"]["split"]["test"]) if same else None


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m harmonizer_fast.per_rater --data PATH --out DIR [--fold F] [--min-raters N] [--epochs E]``"""
    import argparse

    from .data import load_dataset
    from .model.config import PRESETS

    p = argparse.ArgumentParser(prog="python -m harmonizer_fast.per_rater", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--config", choices=PRESETS, default="small")
    p.add_argument("--epochs", type=int, default=PerRaterRecipe.epochs)
    p.add_argument("--lr", type=float, default=PerRaterRecipe.lr)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--min-raters", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    data = load_dataset(args.data)
    preset = HarmonizerConfig.paper if args.config == "paper" else HarmonizerConfig.small
    config = preset(in_channels=data.in_channels, num_raters=data.num_raters)
    recipe = PerRaterRecipe(epochs=args.epochs, lr=args.lr, fold=args.fold, min_raters=args.min_raters,
                            seed=args.seed)  # fmt: skip
    m = train_per_rater(data, config, recipe, args.out)
    print(f"{args.out}: selected epoch {m['selected_epoch']} of {recipe.epochs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
