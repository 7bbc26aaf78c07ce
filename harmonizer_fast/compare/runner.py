"""Running a comparison: variants x patient folds x seeds, each training for the same epochs (or, with
``minutes1``/``minutes2``, at a fixed CPU budget), resumable.

    OUT/plan.json                       what is compared (a resumed run must ask for the same)
    OUT/reused.json                     trainings done outside the comparison and checked into it (:mod:`.reuse`)
    OUT/runs/p1-<training>-f<F>-s<S>/   phase-1 run directories (:class:`~harmonizer_fast.rundir.RunDir`)
    OUT/runs/p2-<variant>-f<F>-s<S>/    phase-2 runs (variants with trained heads)
    OUT/runs/per-rater-f<F>-s<S>/       the per-rater baseline (:mod:`harmonizer_fast.per_rater`)
    OUT/evals/<variant>-f<F>-s<S>.json  per-image scores on the fold's held-out test patients
    OUT/evals/references-f<F>.json      the label-only references on the same images
    OUT/evals/robust-<variant>-f<F>-s<S>.json  Table 1 on degraded test images (``robustness``)

A unit of work is done when its file is committed (an evaluation's JSON, written atomically; a training
whose ``last`` checkpoint says it stopped on its epochs or its budget; the per-rater manifest). A killed
comparison started again skips what is done, and a training whose every score is written is not needed.
``scores`` moves the evaluations (and a copy of plan.json) out of OUT into a directory of their own, small
enough to commit: a comparison longer than one machine's life continues on another from the committed
scores, training only the units whose scores are missing (the weights stay behind). A training cut mid-way
*resumes* from its last epoch when the comparison runs on epochs (the same epochs either way), and *restarts*
from its beginning when it runs on a budget: resuming would give it a second budget, and its variant more CPU
than the others.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from .. import per_rater
from .._io import write_atomic
from ..data import MultiRaterData
from ..data.dataset import RATER_ORDERS
from ..evaluate import K_VALUES, evaluate_model, perturbation, summarize
from ..latent_stats import collapse_flags, latent_statistics
from ..model import HarmonizerConfig
from ..model.config import PRESETS
from ..per_rater import PerRaterRecipe
from ..references import label_only_references
from ..rundir import RunDir, prepare
from ..train import TrainConfig, Trainer
from .variants import PHASE1, VARIANTS, Variant, resolve, table1_rows

SPLIT_SEED = 0  # one patient partition for every seed, so each fold's test images are the same across seeds
T1_KEYS = ("ged", "ged_unbiased", "dice_soft", "dice_max", "dice_match", "ncc", "empty_fraction")
T2_KEYS = (*T1_KEYS, "dice_each_mean", "head_identity")
DPERSONA_LR2 = 3e-3  # D-Persona's heads: chosen on fold 0's validation patients of LIDC over 1e-2 (README)
# --robustness: Table 1 again on the test images degraded as acquisitions degrade them, the harmonizer's stated
# purpose (paper section 3.1, appendix on real acquisition shifts): the strongest level of each degradation of
# evaluate's Table 5 (harmonizer_fast.evaluate.ROBUSTNESS) and its mildest noise, noise seeded per image so
# every model sees the same
ROBUST_CONDITIONS = (("noise", 0.10), ("noise", 0.25), ("blur", 1.75), ("gamma", 1.75))
ROBUST_KEYS = ("ged", "dice_match")
# the options that choose which units run, never what a unit computes: a comparison may be continued with
# variants, folds, seeds or the robustness units added (or left out) without its results mixing two plans (a
# fold's test patients depend on num_folds and SPLIT_SEED alone)
SELECTION = ("variants", "folds", "seeds", "robustness")


def condition_name(kind: str, level: float) -> str:
    return f"{kind} {level:g}"


def _positive(name: str, v: Any, integer: bool = False, optional: bool = False) -> None:
    if optional and v is None:
        return
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not v > 0 or v != v or v == float("inf"):
        what = f"a finite {'integer' if integer else 'number'} > 0" + (" or None" if optional else "")
        raise ValueError(f"CompareConfig.{name}: expected {what}, got {v!r}")


@dataclass
class CompareConfig:
    """What one comparison runs: every training for ``epochs1`` (phase 1, and the per-rater baseline) and
    ``epochs2`` (phase 2) epochs, each run's minutes reported. ``minutes1``/``minutes2`` turn a phase into a
    budget of compute minutes instead (the process's CPU time over its threads,
    ``TrainConfig.budget_clock="cpu"``, so a comparison that shares the machine stays equal), the epochs then
    being caps over which the cosine schedule runs. ``min_raters``: train and score only the images where at
    least that many raters drew (4 on LIDC: the all-raters protocol, README "Protocols")."""

    variants: Optional[list[str]] = None  # None: every variant the protocol runs (on a budget, all but per-rater)
    folds: list[int] = field(default_factory=lambda: [0])
    seeds: list[int] = field(default_factory=lambda: [0])
    minutes1: Optional[float] = None
    minutes2: Optional[float] = None
    epochs1: int = 30
    epochs2: int = 20
    preset: str = "small"
    samples: int = 16
    batch_size: int = 16
    rater_order: str = "stored"
    num_folds: int = 4
    min_raters: int = 0
    dpersona_lr2: float = DPERSONA_LR2
    robustness: bool = False  # Table 1 on degraded test images too (ROBUST_CONDITIONS)

    def __post_init__(self) -> None:
        if self.variants is None:
            self.variants = [n for n in VARIANTS if not (self.budgeted and VARIANTS[n].heads == "per-rater")]
        resolve(list(self.variants))
        for name in ("minutes1", "minutes2"):
            _positive(name, getattr(self, name), optional=True)
        for name in ("epochs1", "epochs2", "samples", "batch_size"):
            _positive(name, getattr(self, name), integer=True)
        _positive("dpersona_lr2", self.dpersona_lr2)
        if self.preset not in PRESETS:
            raise ValueError(f"CompareConfig.preset: expected one of {PRESETS}, got {self.preset!r}")
        if self.rater_order not in RATER_ORDERS:
            raise ValueError(f"CompareConfig.rater_order: expected one of {RATER_ORDERS}, got {self.rater_order!r}")
        mr = self.min_raters
        if isinstance(mr, bool) or not isinstance(mr, int) or mr < 0:
            raise ValueError(f"CompareConfig.min_raters: expected an integer >= 0, got {mr!r}")
        bad = [f for f in self.folds if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f < self.num_folds]
        if not self.folds or bad or len(set(self.folds)) != len(self.folds):
            raise ValueError(f"CompareConfig.folds: expected distinct fold indices in [0, {self.num_folds}), "
                             f"got {self.folds}")  # fmt: skip
        bad = [s for s in self.seeds if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63]
        if not self.seeds or bad or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"CompareConfig.seeds: expected distinct integers in [0, 2**63), got {self.seeds}")
        if self.budgeted and "per-rater" in self.variants:
            raise ValueError("CompareConfig.variants: the per-rater baseline trains for epochs, not minutes; leave "
                             "minutes1 and minutes2 unset (equal epochs) or drop the variant")  # fmt: skip

    @property
    def budgeted(self) -> bool:
        """Whether a phase runs on a budget of minutes rather than on its epochs."""
        return self.minutes1 is not None or self.minutes2 is not None

    def variant_list(self) -> list[Variant]:
        return resolve(list(self.variants))

    def phase1_trainings(self) -> list[str]:
        return list(dict.fromkeys(v.phase1 for v in self.variant_list() if v.has_prior))

    def table1_variants(self) -> list[str]:
        """The variant that carries each phase-1 training's Table 1 row (:func:`~.variants.table1_rows`)."""
        rows = table1_rows([v.name for v in self.variant_list()])
        return [n for n, row in rows.items() if n == row and VARIANTS[n].has_prior]

    def base_config(self, data: MultiRaterData, **switches: Any) -> HarmonizerConfig:
        """The preset's config for ``data`` (the per-rater baseline's backbone), with ``switches``."""
        preset = HarmonizerConfig.paper if self.preset == "paper" else HarmonizerConfig.small
        return preset(in_channels=data.in_channels, num_raters=data.num_raters, **switches)

    def model_config(self, training: str, data: MultiRaterData) -> HarmonizerConfig:
        return self.base_config(data, **PHASE1[training])

    def train_config(self, model_config: HarmonizerConfig, phase: str, fold: int, seed: int,
                     variant: str = "") -> TrainConfig:  # fmt: skip
        """A training's recipe: the preset's learning rates, D-Persona's heads their own (validated)."""
        minutes = self.minutes1 if phase == "1" else self.minutes2
        own = {"lr_phase2": self.dpersona_lr2} if variant == "dpersona" else {}
        return TrainConfig.for_model(
            model_config, phase=phase, epochs_phase1=self.epochs1, epochs_phase2=self.epochs2, fold=fold, seed=seed,
            split_seed=SPLIT_SEED, folds=self.num_folds, batch_size=self.batch_size, rater_order=self.rater_order,
            min_raters=self.min_raters, max_minutes=minutes, budget_clock="cpu", **own,
        )  # fmt: skip

    def per_rater_recipe(self, fold: int, seed: int) -> PerRaterRecipe:
        """The per-rater baseline's recipe: phase 1's learning rate, batch, split and epochs."""
        tc = TrainConfig.for_model(HarmonizerConfig.paper() if self.preset == "paper" else HarmonizerConfig.small())
        return PerRaterRecipe(epochs=self.epochs1, lr=tc.lr_phase1, weight_decay=tc.weight_decay,
                              batch_size=self.batch_size, seed=seed, split_seed=SPLIT_SEED, folds=self.num_folds,
                              fold=fold, val_fraction=tc.val_fraction, rater_order=self.rater_order,
                              min_raters=self.min_raters, grad_clip=tc.grad_clip)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _robust_complete(record: Optional[dict[str, Any]]) -> bool:
    """Whether a robustness record holds every condition of :data:`ROBUST_CONDITIONS`, in order."""
    return record is not None and list(record.get("conditions", {})) == [condition_name(*c) for c in ROBUST_CONDITIONS]


def _cell(fold: int, seed: int) -> str:
    return f"f{fold}-s{seed}"


class Comparison:
    """The directory of one comparison and the work it does; ``run()`` does what is not yet done."""

    def __init__(self, out: Path, cc: CompareConfig, data: MultiRaterData, *, log: Callable[[str], None] = print,
                 device: Optional[torch.device] = None, scores: Optional[os.PathLike] = None) -> None:  # fmt: skip
        self.out, self.cc, self.data, self.log = Path(out), cc, data, log
        self.device = device or torch.device("cpu")
        self.scores = Path(scores) if scores is not None else self.out / "evals"
        # the plan is kept beside the runs and beside the scores: neither may mix two comparisons
        self.plan_paths = [self.out / "plan.json"] + ([self.scores / "plan.json"] if scores is not None else [])

    # ---- paths

    def p1(self, training: str, fold: int, seed: int) -> RunDir:
        return RunDir(self.out / "runs" / f"p1-{training}-{_cell(fold, seed)}")

    def p2(self, variant: str, fold: int, seed: int) -> RunDir:
        return RunDir(self.out / "runs" / f"p2-{variant}-{_cell(fold, seed)}")

    def per_rater_dir(self, fold: int, seed: int) -> Path:
        return self.out / "runs" / f"per-rater-{_cell(fold, seed)}"

    def eval_path(self, variant: str, fold: int, seed: int) -> Path:
        return self.scores / f"{variant}-{_cell(fold, seed)}.json"

    def references_path(self, fold: int) -> Path:
        return self.scores / f"references-f{fold}.json"

    def robust_path(self, variant: str, fold: int, seed: int) -> Path:
        return self.scores / f"robust-{variant}-{_cell(fold, seed)}.json"

    def reused(self) -> dict[str, Any]:
        """Unit directory name -> where the training came from and what was checked (:mod:`.reuse`)."""
        path = self.out / "reused.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    # ---- the plan

    def check_plan(self) -> None:
        """Write plan.json (beside the runs and beside the scores), or refuse to continue a directory that
        holds another comparison."""
        plan = {"compare": self.cc.to_dict(), "data_fingerprint": self.data.fingerprint()}
        for path in self.plan_paths:
            if path.is_file():
                old = json.loads(path.read_text())
                before = {k: v for k, v in old.get("compare", {}).items() if k not in SELECTION}
                diff = [k for k in plan["compare"] if k not in SELECTION and before.get(k) != plan["compare"][k]]
                if old.get("data_fingerprint") != plan["data_fingerprint"]:
                    diff.append("data")
                if diff:
                    raise ValueError(f"{path.parent}: holds a comparison with another plan (differs in {diff}); "
                                     "pass the same options to continue it, or another directory")  # fmt: skip
        for path in self.plan_paths:
            if not path.is_file() or json.loads(path.read_text()) != plan:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, json.dumps(plan, indent=1) + "\n")  # the selection of the latest run

    def reuse(self, runs: dict[str, os.PathLike]) -> None:
        """Take trainings done outside the comparison in place of its units (``UNIT -> run directory``),
        each checked to be the training the unit would run (:mod:`.reuse`); one taken before is kept."""
        from .reuse import reuse

        self.check_plan()
        for unit, source in runs.items():
            before = self.reused().get(unit)
            if before is not None and before.get("resolved") == str(Path(source).resolve()):
                continue
            checks = reuse(self, unit, source)
            self.log(f"reused {unit} from {source}: {len(checks)} checks passed")

    def units(self) -> list[tuple[str, str, int, int]]:
        """Every unit of work in order: (kind, name, fold, seed), kind "train1", "train2", "trainpr" (the
        per-rater baseline), "eval", "robust" (Table 1 on degraded images, with ``robustness``) or "refs" (the
        fold's label-only references, once per fold)."""
        out = []
        per_rater = any(v.heads == "per-rater" for v in self.cc.variant_list())
        for fold in self.cc.folds:
            for seed in self.cc.seeds:
                out += [("train1", t, fold, seed) for t in self.cc.phase1_trainings()]
                out += [("train2", v.name, fold, seed) for v in self.cc.variant_list() if v.trains_phase2]
                out += [("trainpr", "per-rater", fold, seed)] if per_rater else []
                out += [("eval", v.name, fold, seed) for v in self.cc.variant_list()]
                if self.cc.robustness:
                    out += [("robust", name, fold, seed) for name in self.cc.table1_variants()]
            out.append(("refs", "label-only", fold, self.cc.seeds[0]))
        return out

    def run(self) -> list[Path]:
        """Do every unit not yet done, one progress line each; returns the evaluation files."""
        self.check_plan()
        units = self.units()
        for i, (kind, name, fold, seed) in enumerate(units, 1):
            t0 = time.perf_counter()
            if kind.startswith("train") and not self._needed(kind, name, fold, seed):
                done_before, what = True, f"not needed, its scores are in {self.scores}"
            else:
                done_before, what = getattr(self, f"_{kind}")(name, fold, seed)
            status = "done before" if done_before else f"{time.perf_counter() - t0:.0f} s"
            self.log(f"[{i}/{len(units)}] {kind} {name} fold {fold} seed {seed}: {what} ({status})")
        cells = [(f, s) for f in self.cc.folds for s in self.cc.seeds]
        return [self.eval_path(v.name, f, s) for f, s in cells for v in self.cc.variant_list()]

    def _robust_record(self, variant: str, fold: int, seed: int) -> Optional[dict[str, Any]]:
        path = self.robust_path(variant, fold, seed)
        return json.loads(path.read_text()) if path.is_file() else None

    def _scored(self, kind: str, name: str, fold: int, seed: int) -> bool:
        if kind == "robust":
            return _robust_complete(self._robust_record(name, fold, seed))
        return self.eval_path(name, fold, seed).is_file()

    def _needed(self, kind: str, name: str, fold: int, seed: int) -> bool:
        """Whether a training still has a score to give: an evaluation of a variant that uses it (for phase 1,
        every variant on it and their robustness units) that is not yet written."""
        if kind == "train1":
            deps = [("eval", v.name) for v in self.cc.variant_list() if v.phase1 == name]
            if self.cc.robustness:
                deps += [("robust", n) for n in self.cc.table1_variants() if VARIANTS[n].phase1 == name]
        else:  # train2 and trainpr: the variant's own evaluation
            deps = [("eval", name)]
        return not all(self._scored(k, n, fold, seed) for k, n in deps)

    # ---- units

    @staticmethod
    def _finished(run: RunDir) -> bool:
        return run.has("last") and run.state().get("stopped") in ("completed", "time budget")

    def _fit(self, run: RunDir, model_config: HarmonizerConfig, tc: TrainConfig, init: Optional[Path]) -> str:
        if self._finished(run):
            return ""
        resume = run.path.exists() and not self.cc.budgeted  # the same epochs either way: continue it
        if run.path.exists() and self.cc.budgeted:  # cut mid-way: start again, with the whole budget and no more
            shutil.rmtree(run.path)
        Trainer(self.data, model_config, tc, run.path, device=self.device, progress=False,
                log=lambda _msg: None).fit(resume=resume, init_from=init)  # fmt: skip
        return "trained"

    def _train_facts(self, run: RunDir, phase: int) -> str:
        log = [r for r in run.read_log() if "partial_steps" not in r]
        epochs = sum(r["phase"] == phase for r in log)
        return f"{epochs} epochs, {_phase_minutes(log, phase, 'minutes'):.1f} min" if epochs else "no complete epoch"

    def _train1(self, training: str, fold: int, seed: int) -> tuple[bool, str]:
        run = self.p1(training, fold, seed)
        cfg = self.cc.model_config(training, self.data)
        fresh = self._fit(run, cfg, self.cc.train_config(cfg, "1", fold, seed), None)
        return not fresh, self._train_facts(run, 1)

    def _train2(self, variant: str, fold: int, seed: int) -> tuple[bool, str]:
        v = resolve([variant])[-1]
        base = self.p1(v.phase1, fold, seed)
        cfg = self.cc.model_config(v.phase1, self.data)
        run = self.p2(variant, fold, seed)
        if not base.has("best_phase1"):
            return False, "skipped: its phase 1 completed no epoch in the budget"
        tc = self.cc.train_config(cfg, "2", fold, seed, variant)
        fresh = self._fit(run, cfg, tc, base.manifest_path("best_phase1"))
        return not fresh, self._train_facts(run, 2)

    def _trainpr(self, _name: str, fold: int, seed: int) -> tuple[bool, str]:
        path = self.per_rater_dir(fold, seed)
        done = (path / per_rater.MANIFEST).is_file()
        if not done:  # not resumable: a cut training starts again (its manifest is its last write)
            if path.exists():
                shutil.rmtree(path)
            per_rater.train_per_rater(self.data, self.cc.base_config(self.data), self.cc.per_rater_recipe(fold, seed),
                                      path, log=lambda _msg: None)  # fmt: skip
        m = json.loads((path / per_rater.MANIFEST).read_text())
        return done, f"{len(m['history'])} epochs, {m['history'][-1]['minutes']:.1f} min"

    def _eval(self, variant: str, fold: int, seed: int) -> tuple[bool, str]:
        path = self.eval_path(variant, fold, seed)
        if path.is_file():
            return True, "evaluated"
        v = resolve([variant])[-1]
        if v.heads == "per-rater":
            record = evaluate_per_rater(self, fold, seed)
        else:
            record = evaluate_variant(self, v, fold, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(record, default=float) + "\n")
        if record.get("unscored"):
            return False, f"not scored: {record['unscored']}"
        t1 = f"GED {record['table1']['mean']['ged']:.4f}, " if record["table1"] else ""
        return False, t1 + (f"Dice_mean {record['table2']['mean']['dice_each_mean']:.4f}" if record["table2"] else
                            f"Dice_match {record['table1']['mean']['dice_match']:.4f}")  # fmt: skip

    def _robust(self, variant: str, fold: int, seed: int) -> tuple[bool, str]:
        path = self.robust_path(variant, fold, seed)
        before = self._robust_record(variant, fold, seed)
        if _robust_complete(before):
            return True, "evaluated"
        # a record of other conditions (ROBUST_CONDITIONS changed): the missing ones scored, the rest kept
        record = evaluate_robustness(self, resolve([variant])[-1], fold, seed, before)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(record, default=float) + "\n")
        if record.get("unscored"):
            return False, f"not scored: {record['unscored']}"
        return False, ", ".join(f"{c} GED {np.mean(r['t1_ged']):.4f}" for c, r in record["conditions"].items())

    def _refs(self, _name: str, fold: int, seed: int) -> tuple[bool, str]:
        path = self.references_path(fold)
        if path.is_file():
            return True, "computed"
        images = self._fold_images(fold, seed)
        if images is None:
            return False, "skipped: no scored run of this fold"
        prepared = prepare(self.data, self.cc.base_config(self.data), self.cc.rater_order)
        refs = label_only_references(prepared, images, self.cc.samples)
        record = {"fold": fold, "images": images.tolist(), "references": {
            name: {"table1": r["table1"]["mean"], "table2": {**r["table2"]["mean"],
                                                             "head_identity": r["table2"]["head_identity"][0]},
                   "dice_each": [d["dice"][0] for d in r["table2"]["per_rater"].values()]}
            for name, r in refs.items()}}  # fmt: skip
        write_atomic(path, json.dumps(record, default=float) + "\n")
        return False, f"{len(images)} images"

    def _fold_images(self, fold: int, seed: int) -> Optional[np.ndarray]:
        """The fold's test images, as its first scored evaluation recorded them."""
        for v in self.cc.variant_list():
            path = self.eval_path(v.name, fold, seed)
            if path.is_file():
                rec = json.loads(path.read_text())
                if not rec.get("unscored"):
                    return np.asarray(rec["images"], dtype=np.int64)
        return None


def _run_record(run: RunDir, stem: str, reused: dict[str, Any]) -> dict[str, Any]:
    """Epochs, minutes, the selected epoch, why it stopped, whether the selected model's validation
    predictions were all empty (the collapse the report flags), and where a reused training came from."""
    log = run.read_log()
    done = [r for r in log if "partial_steps" not in r]
    best = run.state(stem)
    best_epoch = best["position"]["epoch"]
    phase = best["phase"]
    key = "val_empty_fraction" if phase == 1 else "val_heads_empty_fraction"
    chosen = next((r for r in done if r["epoch"] == best_epoch and r["phase"] == phase), None)
    phase_done = [r for r in done if r["phase"] == phase]
    earlier = sum(r["phase"] < phase for r in done)  # a run of both phases counts its epochs from phase 1's first
    return {"run": run.path.name, "phase": phase, "epochs": len(phase_done),
            "minutes": _phase_minutes(done, phase, "minutes"),
            "wall_minutes": _phase_minutes(done, phase, "wall_minutes"), "best_epoch": best_epoch - earlier,
            "stopped": run.state()["stopped"], "reused_from": reused.get(run.path.name, {}).get("source"),
            "val_empty_fraction": None if chosen is None else chosen.get(key),
            "collapsed_on_validation": chosen is not None and chosen.get(key) == 1.0}  # fmt: skip


def _phase_minutes(done: list[dict[str, Any]], phase: int, key: str) -> float:
    """The minutes a phase's epochs took. Each ``fit`` process logs minutes from its own start (a run of both
    phases through phase 1 into phase 2; a resumed run from 0 again), so each epoch adds its increase over
    the record before it, or its whole value where a new process began."""
    total, before = 0.0, 0.0
    for r in done:
        m = r.get(key, r.get("minutes", 0.0))
        if m < before:  # a resumed process
            before = 0.0
        if r["phase"] == phase:
            total += m - before
        before = m
    return total


def _unfinished(run: RunDir) -> dict[str, Any]:
    log = run.read_log()
    return {"run": run.path.name, "phase": log[-1]["phase"] if log else 0, "epochs": 0, "minutes": 0.0,
            "wall_minutes": 0.0, "best_epoch": 0, "stopped": run.state()["stopped"] if run.has("last") else "",
            "reused_from": None, "val_empty_fraction": None, "collapsed_on_validation": False}  # fmt: skip


def _tables(summary: dict[str, Any]) -> dict[str, Any]:
    """The report's part of an accumulator summary (the reliability bins are the evaluate command's)."""
    return {k: summary[k] for k in ("n_images", "mean", "std", "per_rater")}


@torch.no_grad()
def evaluate_variant(cmp: Comparison, v: Variant, fold: int, seed: int) -> dict[str, Any]:
    """Tables 1 and 2 of one variant on its fold's held-out test patients, kept per image (with each image's
    patient) for the paired tests and the fold statistics; GED per image for each K of appendix B."""
    base = cmp.p1(v.phase1, fold, seed)
    needed = [(base, "best_phase1")] + ([(cmp.p2(v.name, fold, seed), "best")] if v.trains_phase2 else [])
    missing = [run.path.name for run, stem in needed if not run.has(stem)]
    if missing:  # a training that validated no epoch within its budget has no model to score
        return {"variant": v.name, "fold": fold, "seed": seed, "heads": v.heads, "table1": None, "table2": None,
                "unscored": f"{', '.join(missing)} completed no epoch in the budget",
                "runs": [_unfinished(run) for run, _ in needed]}  # fmt: skip
    reused = cmp.reused()
    runs = [_run_record(base, "best_phase1", reused)]
    if v.trains_phase2:
        run2 = cmp.p2(v.name, fold, seed)
        model, _ = run2.load_model("best")
        runs.append(_run_record(run2, "best", reused))
    else:
        model, _ = base.load_model("best_phase1")
    scoring = base.scoring_set(cmp.data, model.config, "test")
    scores = evaluate_model(model.to(cmp.device), scoring.data, scoring.indices, num_samples=cmp.cc.samples, seed=seed,
                            heads=v.heads, k_values=K_VALUES)  # fmt: skip
    tables = summarize(scores)
    latent = latent_statistics(model, scoring.data, scoring.indices) if len(scoring.indices) >= 2 else None
    uncertainty = tables["table1"]["uncertainty_vs_raters"]
    for t in ("table1", "table2"):
        if tables[t] is not None:
            tables[t] = _tables(tables[t])
    per_image = {f"t1_{k}": scores.prior.per_image(k).tolist() for k in T1_KEYS}
    if scores.heads is not None:
        per_image.update({f"t2_{k}": scores.heads.per_image(k).tolist() for k in T2_KEYS})
        per_image["t2_dice_each"] = scores.heads.per_image("dice_each").tolist()
    return {
        "variant": v.name, "fold": fold, "seed": seed, "heads": v.heads, "scored": scoring.description,
        "images": np.asarray(scoring.indices).tolist(), "patients": _patients(cmp.data, scoring.indices),
        "samples": cmp.cc.samples, "runs": runs, **tables,
        "per_image": per_image, "ged_vs_k": {str(k): scores.per_k[k]["ged"] for k in scores.per_k},
        "latent": latent, "prior_flags": collapse_flags(latent) if latent else [], "uncertainty_vs_raters": uncertainty,
    }  # fmt: skip


@torch.no_grad()
def evaluate_robustness(cmp: Comparison, v: Variant, fold: int, seed: int,
                        before: Optional[dict[str, Any]] = None) -> dict[str, Any]:  # fmt: skip
    """Table 1's GED and Dice_match per test image of a variant's phase-1 model under each of
    :data:`ROBUST_CONDITIONS` (the same images, samples drawn as for the clean Table 1); the conditions of
    ``before``, an earlier record of the same unit, are kept."""
    base = cmp.p1(v.phase1, fold, seed)
    record: dict[str, Any] = {"variant": v.name, "fold": fold, "seed": seed}
    if not base.has("best_phase1"):
        return {**record, "unscored": f"{base.path.name} completed no epoch in the budget"}
    model, _ = base.load_model("best_phase1")
    scoring = base.scoring_set(cmp.data, model.config, "test")
    kept = (before or {}).get("conditions", {})
    conditions = {}
    for kind, level in ROBUST_CONDITIONS:
        if condition_name(kind, level) in kept:
            conditions[condition_name(kind, level)] = kept[condition_name(kind, level)]
            continue
        scores = evaluate_model(model.to(cmp.device), scoring.data, scoring.indices, num_samples=cmp.cc.samples,
                                seed=seed, heads="none", transform=perturbation(kind, level, seed))  # fmt: skip
        conditions[condition_name(kind, level)] = {f"t1_{k}": scores.prior.per_image(k).tolist() for k in ROBUST_KEYS}
    return {**record, "images": np.asarray(scoring.indices).tolist(),
            "patients": _patients(cmp.data, scoring.indices), "conditions": conditions}  # fmt: skip


def _patients(data: MultiRaterData, indices: np.ndarray) -> list[str]:
    return [str(p) for p in np.asarray(data.patient_id)[np.asarray(indices)]]


@torch.no_grad()
def evaluate_per_rater(cmp: Comparison, fold: int, seed: int) -> dict[str, Any]:
    """Table 2 of the per-rater baseline on the fold's held-out test patients (its heads are its only maps:
    they are both the set GED scores and the per-rater maps), per image."""
    path = cmp.per_rater_dir(fold, seed)
    model, manifest = per_rater.load_per_rater(path)
    idx = per_rater.held_out(manifest, cmp.data)
    prepared = prepare(cmp.data, model.config, manifest["recipe"]["rater_order"])
    acc = per_rater.score_heads(model.to(cmp.device), prepared, idx)
    h = manifest["history"]
    run = {"run": path.name, "phase": 1, "epochs": len(h), "minutes": h[-1]["minutes"],
           "wall_minutes": h[-1]["minutes"], "best_epoch": manifest["selected_epoch"], "stopped": "completed",
           "reused_from": cmp.reused().get(path.name, {}).get("source"),
           "val_empty_fraction": None, "collapsed_on_validation": False}  # fmt: skip
    per_image = {f"t2_{k}": acc.per_image(k).tolist() for k in T2_KEYS}
    per_image["t2_dice_each"] = acc.per_image("dice_each").tolist()
    return {"variant": "per-rater", "fold": fold, "seed": seed, "heads": "per-rater",
            "scored": f"the {len(idx)} images of the run's held-out test patients", "images": idx.tolist(),
            "patients": _patients(cmp.data, idx), "samples": 0, "runs": [run], "table1": None,
            "table2": _tables(acc.summary()), "per_image": per_image, "ged_vs_k": {}, "latent": None,
            "prior_flags": [], "uncertainty_vs_raters": None}  # fmt: skip
