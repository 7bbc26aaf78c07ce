"""Trainings done outside a comparison, checked and taken into it: ``compare --reuse UNIT=DIR``.

A researcher who already trained a comparison's runs by hand (``harmonizer-fast train``, ``python -m
harmonizer_fast.per_rater``) need not train them again. A run directory stands for a unit of the comparison
(``p1-<training>-f<F>-s<S>``, ``p2-<variant>-f<F>-s<S>``, ``per-rater-f<F>-s<S>``) only when it is the
training the comparison would have run, by every fact that decides its result:

- it finished on its epochs (a comparison on a budget of minutes takes none: a budget cannot be checked);
- the same dataset (fingerprint) and the same patient split, image for image (this checks the fold, the
  folds, the split's seed and the rater filter together);
- the same model config; a phase-1 run may differ in the personalizer's fields alone, which phase 1 never
  uses (:data:`~harmonizer_fast.model.config.PERSONALIZER_FIELDS`);
- the same recipe for the phase it stands for (:data:`RECIPE`: epochs, learning rates, batch, seed, ...);
- a phase-2 run started from the phase-1 unit of its cell: its frozen phase-1 weights equal that unit's.

The run is copied into the comparison (its weights are verified against their SHA-256 when loaded), and
``OUT/reused.json`` records where it came from and what was checked, so the report names it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import per_rater
from .._io import write_atomic
from ..checkpoint import config_difference
from ..model import HarmonizerConfig
from ..model.config import PERSONALIZER_FIELDS
from ..rundir import RunDir
from .variants import VARIANTS

if TYPE_CHECKING:
    from .runner import Comparison

# the TrainConfig fields that decide a phase's result (the split is checked image for image instead of its
# seeds; how validation is batched and what clock a budget runs on do not change the model)
COMMON = ("weight_decay", "batch_size", "grad_clip", "seed", "val_fraction", "rater_order", "augment", "amp",
          "val_samples")  # fmt: skip
RECIPE = {1: (*COMMON, "epochs_phase1", "lr_phase1", "lr_prior", "select_phase1"),
          2: (*COMMON, "epochs_phase2", "lr_phase2", "select_phase2", "phase2_z")}  # fmt: skip
PER_RATER_RECIPE = ("epochs", "lr", "weight_decay", "batch_size", "seed", "val_fraction", "rater_order", "grad_clip")
_UNIT = re.compile(r"^(?:(p1|p2)-(.+)|(per-rater))-f(\d+)-s(\d+)$")


class ReuseError(ValueError):
    """A run that is not the training a unit of the comparison would run."""


def reuse(cmp: Comparison, unit: str, source: os.PathLike) -> list[str]:
    """Check ``source`` against ``unit`` of ``cmp`` and copy it in; returns the checks it passed."""
    kind, name, fold, seed = _parse(cmp, unit)
    src = Path(source)
    dest = cmp.out / "runs" / unit
    if cmp.cc.budgeted:
        raise ReuseError(f"--reuse {unit}: a comparison on a budget of minutes trains its own runs (a budget "
                         "cannot be checked); compare on epochs to reuse trainings")  # fmt: skip
    if dest.exists():
        raise ReuseError(f"--reuse {unit}: {dest} already holds that unit's training")
    if not src.is_dir():
        raise ReuseError(f"--reuse {unit}={src}: not a directory")
    if kind == "per-rater":
        checks = _check_per_rater(cmp, src, fold, seed)
    else:
        checks = _check_run(cmp, kind, name, src, fold, seed)
    tmp = dest.with_name(f".{dest.name}.copy")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.tmp", ".lock"))
    os.replace(tmp, dest)
    record = {**cmp.reused(), unit: {"source": str(src), "resolved": str(src.resolve()), "checked": checks}}
    write_atomic(cmp.out / "reused.json", json.dumps(record, indent=1) + "\n")
    return checks


def _parse(cmp: Comparison, unit: str) -> tuple[str, str, int, int]:
    m = _UNIT.match(unit)
    if m is None:
        raise ReuseError(f"--reuse {unit}: expected a unit p1-<training>-f<F>-s<S>, p2-<variant>-f<F>-s<S> or "
                         "per-rater-f<F>-s<S>")  # fmt: skip
    kind = m.group(1) or "per-rater"
    name, fold, seed = m.group(2) or "per-rater", int(m.group(4)), int(m.group(5))
    variants = cmp.cc.variant_list()
    names = {"p1": cmp.cc.phase1_trainings(), "p2": [v.name for v in variants if v.trains_phase2],
             "per-rater": ["per-rater"] if any(v.heads == "per-rater" for v in variants) else []}[kind]  # fmt: skip
    if name not in names or fold not in cmp.cc.folds or seed not in cmp.cc.seeds:
        raise ReuseError(f"--reuse {unit}: not a unit of this comparison ({kind} units: {names or 'none'}; folds "
                         f"{cmp.cc.folds}, seeds {cmp.cc.seeds})")  # fmt: skip
    return kind, name, fold, seed


def _same_split(cmp: Comparison, unit: str, split: Any, fold: int, seed: int) -> str:
    want = per_rater.data_split(cmp.data, cmp.cc.per_rater_recipe(fold, seed))  # the trainer's split rule
    for part in ("train", "val", "test"):
        if not np.array_equal(np.asarray(split[part]), getattr(want, part)):
            raise ReuseError(f"--reuse {unit}: its {part} images are not the comparison's fold {fold} (another "
                             "fold, split seed or --min-raters)")  # fmt: skip
    return f"split: the same {len(want.train)}/{len(want.val)}/{len(want.test)} train/val/test images"


def _same_fields(unit: str, theirs: dict[str, Any], ours: dict[str, Any], names: tuple[str, ...]) -> str:
    diff = [f"{k}: {theirs.get(k)!r} != {ours[k]!r}" for k in names if theirs.get(k) != ours[k]]
    if diff:
        raise ReuseError(f"--reuse {unit}: trained on another recipe ({'; '.join(diff[:3])})")
    return "recipe: " + ", ".join(f"{k}={ours[k]}" for k in names)


def _check_run(cmp: Comparison, kind: str, name: str, src: Path, fold: int, seed: int) -> list[str]:
    unit = f"{kind}-{name}-f{fold}-s{seed}"
    run = RunDir(src)
    phase = 1 if kind == "p1" else 2
    stem = "best_phase1" if phase == 1 else "best"
    if not (run.has("last") and run.has(stem)):
        raise ReuseError(f"--reuse {unit}={src}: no finished run there ({stem}.json and last.json expected)")
    state = run.state()
    if state.get("stopped") != "completed":
        raise ReuseError(f"--reuse {unit}={src}: did not finish its epochs (stopped: {state.get('stopped')!r})")
    tc = state["train_config"]
    if tc["phase"] not in (str(phase), "both"):
        raise ReuseError(f"--reuse {unit}={src}: trained phase {tc['phase']}, not phase {phase}")
    if tc.get("max_minutes") is not None:
        raise ReuseError(f"--reuse {unit}={src}: trained on a budget of {tc['max_minutes']} minutes, not on epochs")
    training = name if kind == "p1" else VARIANTS[name].phase1
    config = cmp.cc.model_config(training, cmp.data)
    ours = cmp.cc.train_config(config, str(phase), fold, seed, name if kind == "p2" else "").to_dict()
    record = run.data_record(stem)
    if record is None or record.fingerprint != cmp.data.fingerprint():
        raise ReuseError(f"--reuse {unit}={src}: trained on another dataset")
    checks = ["finished its epochs", "dataset fingerprint", _same_split(cmp, unit, record.to_dict()["split"], fold,
                                                                       seed)]  # fmt: skip
    diff = config_difference(run.model_config(stem), config)
    if phase == 1:  # phase 1 never builds the heads' training: their fields may differ
        diff = [d for d in diff if d.split(":")[0] not in PERSONALIZER_FIELDS]
    if diff:
        raise ReuseError(f"--reuse {unit}={src}: another model config ({'; '.join(diff[:3])})")
    checks.append("model config" + (" (personalizer fields aside)" if phase == 1 else ""))
    checks.append(_same_fields(unit, tc, ours, RECIPE[phase]))
    if phase == 2:
        checks.append(_same_backbone(cmp, unit, run, cmp.p1(training, fold, seed)))
    return checks


def _same_backbone(cmp: Comparison, unit: str, run: RunDir, base: RunDir) -> str:
    if not base.has("best_phase1"):
        raise ReuseError(f"--reuse {unit}: its phase-1 unit {base.path.name} is not there yet (reuse or train it "
                         "first)")  # fmt: skip
    heads, _ = run.load_model("best")
    backbone, _ = base.load_model("best_phase1")
    a = {k: v for k, v in heads.state_dict().items() if not k.startswith("personalizer.")}
    b = {k: v for k, v in backbone.state_dict().items() if not k.startswith("personalizer.")}
    if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
        raise ReuseError(f"--reuse {unit}: its phase-1 weights are not those of {base.path.name} (it started from "
                         "another phase-1 model)")  # fmt: skip
    return f"started from {base.path.name} ({len(a)} frozen tensors equal)"


def _check_per_rater(cmp: Comparison, src: Path, fold: int, seed: int) -> list[str]:
    unit = f"per-rater-f{fold}-s{seed}"
    try:
        _, manifest = per_rater.load_per_rater(src)
    except KeyError as exc:
        raise ReuseError(f"--reuse {unit}={src}: not a per-rater baseline (its manifest lacks {exc})") from None
    except (OSError, ValueError) as exc:
        raise ReuseError(f"--reuse {unit}={src}: not a per-rater baseline ({exc})") from None
    if manifest["data"]["fingerprint"] != cmp.data.fingerprint():
        raise ReuseError(f"--reuse {unit}={src}: trained on another dataset")
    checks = ["weights against their SHA-256", "dataset fingerprint",
              _same_split(cmp, unit, manifest["data"]["split"], fold, seed)]  # fmt: skip
    diff = config_difference(HarmonizerConfig.from_dict(manifest["model_config"]),
                             cmp.cc.base_config(cmp.data))  # fmt: skip
    if diff:
        raise ReuseError(f"--reuse {unit}={src}: another backbone config ({'; '.join(diff[:3])})")
    checks.append("backbone config")
    ours = asdict(cmp.cc.per_rater_recipe(fold, seed))
    checks.append(_same_fields(unit, manifest["recipe"], ours, PER_RATER_RECIPE))
    return checks
