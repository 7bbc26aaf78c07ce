"""Running a comparison: variants x patient folds x seeds, each training at a fixed CPU budget, resumable.

    OUT/plan.json                       what is compared (a resumed run must ask for the same)
    OUT/runs/p1-<training>-f<F>-s<S>/   phase-1 run directories (:class:`~harmonizer_fast.rundir.RunDir`)
    OUT/runs/p2-<variant>-f<F>-s<S>/    phase-2 runs (variants with trained heads)
    OUT/evals/<variant>-f<F>-s<S>.json  per-image scores on the fold's held-out test patients

A unit of work is done when its file is committed (an evaluation's JSON, written atomically; a training
whose ``last`` checkpoint says it stopped on its epochs or its budget). A killed comparison started again
skips what is done and *restarts* a training that was cut mid-way, from its beginning: resuming it would
give it a second time budget, and its variant more CPU than the others.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from .._io import write_atomic
from ..data import MultiRaterData
from ..data.dataset import RATER_ORDERS
from ..evaluate import K_VALUES, evaluate_model, summarize
from ..latent_stats import collapse_flags, latent_statistics
from ..model import HarmonizerConfig
from ..model.config import PRESETS
from ..rundir import RunDir
from ..train import TrainConfig, Trainer
from .variants import PHASE1, VARIANTS, Variant, resolve

SPLIT_SEED = 0  # one patient partition for every seed, so each fold's test images are the same across seeds
T1_KEYS = ("ged", "ged_unbiased", "dice_soft", "dice_max", "dice_match", "empty_fraction")
T2_KEYS = (*T1_KEYS, "dice_each_mean")


def _positive(name: str, v: Any, integer: bool = False) -> None:
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not v > 0 or v != v or v == float("inf"):
        raise ValueError(f"CompareConfig.{name}: expected a finite {'integer' if integer else 'number'} > 0, got {v!r}")


@dataclass
class CompareConfig:
    """What one comparison runs. Budgets are minutes of compute per training: the process's CPU time over its
    threads (``TrainConfig.budget_clock="cpu"``), so a comparison that shares the machine stays equal."""

    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    folds: list[int] = field(default_factory=lambda: [0])
    seeds: list[int] = field(default_factory=lambda: [0])
    minutes1: float = 5.0
    minutes2: float = 2.0
    epochs1: int = 100  # caps; the budget usually stops a run first (the cosine schedule runs over these)
    epochs2: int = 150
    preset: str = "small"
    samples: int = 16
    batch_size: int = 16
    rater_order: str = "stored"
    num_folds: int = 4

    def __post_init__(self) -> None:
        resolve(list(self.variants))
        for name in ("minutes1", "minutes2"):
            _positive(name, getattr(self, name))
        for name in ("epochs1", "epochs2", "samples", "batch_size"):
            _positive(name, getattr(self, name), integer=True)
        if self.preset not in PRESETS:
            raise ValueError(f"CompareConfig.preset: expected one of {PRESETS}, got {self.preset!r}")
        if self.rater_order not in RATER_ORDERS:
            raise ValueError(f"CompareConfig.rater_order: expected one of {RATER_ORDERS}, got {self.rater_order!r}")
        bad = [f for f in self.folds if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f < self.num_folds]
        if not self.folds or bad or len(set(self.folds)) != len(self.folds):
            raise ValueError(f"CompareConfig.folds: expected distinct fold indices in [0, {self.num_folds}), "
                             f"got {self.folds}")  # fmt: skip
        bad = [s for s in self.seeds if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63]
        if not self.seeds or bad or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"CompareConfig.seeds: expected distinct integers in [0, 2**63), got {self.seeds}")

    def variant_list(self) -> list[Variant]:
        return resolve(list(self.variants))

    def phase1_trainings(self) -> list[str]:
        return list(dict.fromkeys(v.phase1 for v in self.variant_list()))

    def model_config(self, training: str, data: MultiRaterData) -> HarmonizerConfig:
        preset = HarmonizerConfig.paper if self.preset == "paper" else HarmonizerConfig.small
        return preset(in_channels=data.in_channels, num_raters=data.num_raters, **PHASE1[training])

    def train_config(self, model_config: HarmonizerConfig, phase: str, fold: int, seed: int) -> TrainConfig:
        return TrainConfig.for_model(
            model_config, phase=phase, epochs_phase1=self.epochs1, epochs_phase2=self.epochs2, fold=fold, seed=seed,
            split_seed=SPLIT_SEED, folds=self.num_folds, batch_size=self.batch_size, rater_order=self.rater_order,
            max_minutes=self.minutes1 if phase == "1" else self.minutes2, budget_clock="cpu",
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cell(fold: int, seed: int) -> str:
    return f"f{fold}-s{seed}"


class Comparison:
    """The directory of one comparison and the work it does; ``run()`` does what is not yet done."""

    def __init__(self, out: Path, cc: CompareConfig, data: MultiRaterData, *, log: Callable[[str], None] = print,
                 device: Optional[torch.device] = None) -> None:  # fmt: skip
        self.out, self.cc, self.data, self.log = Path(out), cc, data, log
        self.device = device or torch.device("cpu")

    # ---- paths

    def p1(self, training: str, fold: int, seed: int) -> RunDir:
        return RunDir(self.out / "runs" / f"p1-{training}-{_cell(fold, seed)}")

    def p2(self, variant: str, fold: int, seed: int) -> RunDir:
        return RunDir(self.out / "runs" / f"p2-{variant}-{_cell(fold, seed)}")

    def eval_path(self, variant: str, fold: int, seed: int) -> Path:
        return self.out / "evals" / f"{variant}-{_cell(fold, seed)}.json"

    # ---- the plan

    def check_plan(self) -> None:
        """Write plan.json, or refuse to continue a directory that holds another comparison."""
        plan = {"compare": self.cc.to_dict(), "data_fingerprint": self.data.fingerprint()}
        path = self.out / "plan.json"
        if path.is_file():
            old = json.loads(path.read_text())
            if old != plan:
                diff = [k for k in plan["compare"] if old.get("compare", {}).get(k) != plan["compare"][k]]
                if old.get("data_fingerprint") != plan["data_fingerprint"]:
                    diff.append("data")
                raise ValueError(f"{self.out}: holds a comparison with another plan (differs in {diff}); "
                                 "pass the same options to continue it, or another --out")  # fmt: skip
            return
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(plan, indent=1) + "\n")

    def units(self) -> list[tuple[str, str, int, int]]:
        """Every unit of work in order: (kind, name, fold, seed), kind "train1", "train2" or "eval"."""
        out = []
        for fold in self.cc.folds:
            for seed in self.cc.seeds:
                out += [("train1", t, fold, seed) for t in self.cc.phase1_trainings()]
                out += [("train2", v.name, fold, seed) for v in self.cc.variant_list() if v.trains_phase2]
                out += [("eval", v.name, fold, seed) for v in self.cc.variant_list()]
        return out

    def run(self) -> list[Path]:
        """Do every unit not yet done, one progress line each; returns the evaluation files."""
        self.check_plan()
        units = self.units()
        for i, (kind, name, fold, seed) in enumerate(units, 1):
            t0 = time.perf_counter()
            done_before, what = getattr(self, f"_{kind}")(name, fold, seed)
            status = "done before" if done_before else f"{time.perf_counter() - t0:.0f} s"
            self.log(f"[{i}/{len(units)}] {kind} {name} fold {fold} seed {seed}: {what} ({status})")
        cells = [(f, s) for f in self.cc.folds for s in self.cc.seeds]
        return [self.eval_path(v.name, f, s) for f, s in cells for v in self.cc.variant_list()]

    # ---- units

    @staticmethod
    def _finished(run: RunDir) -> bool:
        return run.has("last") and run.state().get("stopped") in ("completed", "time budget")

    def _fit(self, run: RunDir, model_config: HarmonizerConfig, tc: TrainConfig, init: Optional[Path]) -> str:
        if self._finished(run):
            return ""
        if run.path.exists():  # cut mid-way by a kill: start again, with the whole budget and no more
            shutil.rmtree(run.path)
        Trainer(self.data, model_config, tc, run.path, device=self.device, progress=False,
                log=lambda _msg: None).fit(init_from=init)  # fmt: skip
        return "trained"

    def _train_facts(self, run: RunDir) -> str:
        log = [r for r in run.read_log() if "partial_steps" not in r]
        return f"{len(log)} epochs, {log[-1]['minutes']:.1f} min" if log else "no complete epoch"

    def _train1(self, training: str, fold: int, seed: int) -> tuple[bool, str]:
        run = self.p1(training, fold, seed)
        cfg = self.cc.model_config(training, self.data)
        fresh = self._fit(run, cfg, self.cc.train_config(cfg, "1", fold, seed), None)
        return not fresh, self._train_facts(run)

    def _train2(self, variant: str, fold: int, seed: int) -> tuple[bool, str]:
        v = resolve([variant])[-1]
        base = self.p1(v.phase1, fold, seed)
        cfg = self.cc.model_config(v.phase1, self.data)
        run = self.p2(variant, fold, seed)
        if not base.has("best_phase1"):
            return False, "skipped: its phase 1 completed no epoch in the budget"
        fresh = self._fit(run, cfg, self.cc.train_config(cfg, "2", fold, seed), base.manifest_path("best_phase1"))
        return not fresh, self._train_facts(run)

    def _eval(self, variant: str, fold: int, seed: int) -> tuple[bool, str]:
        path = self.eval_path(variant, fold, seed)
        if path.is_file():
            return True, "evaluated"
        v = resolve([variant])[-1]
        record = evaluate_variant(self, v, fold, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(record, default=float) + "\n")
        if record.get("unscored"):
            return False, f"not scored: {record['unscored']}"
        t1 = record["table1"]["mean"]
        return False, f"GED {t1['ged']:.4f}, Dice_match {t1['dice_match']:.4f}" + (
            f", Dice_mean {record['table2']['mean']['dice_each_mean']:.4f}" if record["table2"] else "")


def _run_record(run: RunDir, stem: str) -> dict[str, Any]:
    """Epochs, minutes, the selected epoch, why it stopped, and whether the selected model's validation
    predictions were all empty (the collapse the report flags)."""
    log = run.read_log()
    done = [r for r in log if "partial_steps" not in r]
    best = run.state(stem)
    best_epoch = best["position"]["epoch"]
    phase = best["phase"]
    key = "val_empty_fraction" if phase == 1 else "val_heads_empty_fraction"
    chosen = next((r for r in done if r["epoch"] == best_epoch and r["phase"] == phase), None)
    phase_done = [r for r in done if r["phase"] == phase]
    last = phase_done[-1] if phase_done else {}
    return {"run": run.path.name, "phase": phase, "epochs": len(phase_done), "minutes": last.get("minutes", 0.0),
            "wall_minutes": last.get("wall_minutes", last.get("minutes", 0.0)), "best_epoch": best_epoch,
            "stopped": run.state()["stopped"],
            "val_empty_fraction": None if chosen is None else chosen.get(key),
            "collapsed_on_validation": chosen is not None and chosen.get(key) == 1.0}  # fmt: skip


def _unfinished(run: RunDir) -> dict[str, Any]:
    log = run.read_log()
    return {"run": run.path.name, "phase": log[-1]["phase"] if log else 0, "epochs": 0, "minutes": 0.0,
            "wall_minutes": 0.0, "best_epoch": 0, "stopped": run.state()["stopped"] if run.has("last") else "",
            "val_empty_fraction": None, "collapsed_on_validation": False}  # fmt: skip


@torch.no_grad()
def evaluate_variant(cmp: Comparison, v: Variant, fold: int, seed: int) -> dict[str, Any]:
    """Tables 1 and 2 of one variant on its fold's held-out test patients, kept per image for the paired
    tests and the fold statistics; GED per image for each K of appendix B."""
    base = cmp.p1(v.phase1, fold, seed)
    needed = [(base, "best_phase1")] + ([(cmp.p2(v.name, fold, seed), "best")] if v.trains_phase2 else [])
    missing = [run.path.name for run, stem in needed if not run.has(stem)]
    if missing:  # a training that validated no epoch within its budget has no model to score
        return {"variant": v.name, "fold": fold, "seed": seed, "heads": v.heads, "table1": None, "table2": None,
                "unscored": f"{', '.join(missing)} completed no epoch in the budget",
                "runs": [_unfinished(run) for run, _ in needed]}  # fmt: skip
    runs = [_run_record(base, "best_phase1")]
    if v.trains_phase2:
        run2 = cmp.p2(v.name, fold, seed)
        model, _ = run2.load_model("best")
        runs.append(_run_record(run2, "best"))
    else:
        model, _ = base.load_model("best_phase1")
    scoring = base.scoring_set(cmp.data, model.config, "test")
    scores = evaluate_model(model.to(cmp.device), scoring.data, scoring.indices, num_samples=cmp.cc.samples, seed=seed,
                            heads=v.heads, k_values=K_VALUES)  # fmt: skip
    tables = summarize(scores)
    latent = latent_statistics(model, scoring.data, scoring.indices) if len(scoring.indices) >= 2 else None
    uncertainty = tables["table1"]["uncertainty_vs_raters"]
    for t in ("table1", "table2"):
        if tables[t] is not None:  # the reliability bins are the evaluate command's business, not this report's
            tables[t] = {k: tables[t][k] for k in ("n_images", "mean", "std", "per_rater")}
    per_image = {f"t1_{k}": scores.prior.per_image(k).tolist() for k in T1_KEYS}
    if scores.heads is not None:
        per_image.update({f"t2_{k}": scores.heads.per_image(k).tolist() for k in T2_KEYS})
        per_image["t2_dice_each"] = scores.heads.per_image("dice_each").tolist()
    return {
        "variant": v.name, "fold": fold, "seed": seed, "heads": v.heads, "scored": scoring.description,
        "images": np.asarray(scoring.indices).tolist(), "samples": cmp.cc.samples, "runs": runs, **tables,
        "per_image": per_image, "ged_vs_k": {str(k): scores.per_k[k]["ged"] for k in scores.per_k},
        "latent": latent, "prior_flags": collapse_flags(latent) if latent else [], "uncertainty_vs_raters": uncertainty,
    }  # fmt: skip
