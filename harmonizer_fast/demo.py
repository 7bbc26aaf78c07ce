"""The demo (``harmonizer-fast demo``, what ``make demo`` runs): synthetic data with four raters of consistent
styles, the small config trained through both phases, and the paper's Table 1 and Table 2 on the held-out
patients for three models side by side:

- the untrained network (Table 1 only);
- the selected phase-1 model with *identity* heads, z'_i = z (every rater gets the prior-mean prediction):
  what the model offers without personalization;
- the same phase-1 model with the trained personalizer (``best``).

The personalizer earns its place when the last row's Dice_mean (Table 2: head i against rater i) beats the
second row's and the phase-1 model's Dice_match (Table 1), per image in a paired test. Beside them, the
latent ceiling (:mod:`.latent_ceiling`, an oracle) says how far any personalizer on this phase-1 model could
go, so a short fall is attributed to the Personalizer or to phase 1. Writes
``demo.json`` (every table) and ``demo.md`` next to the run and the evaluation.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ._io import write_atomic
from .data import make_synthetic
from .evaluate import K_VALUES, Scores, evaluate_model, run_evaluation, summarize, tables_markdown
from .latent_ceiling import ceiling_summary, latent_ceiling
from .model import HarmonizerConfig, HarmonizerNet
from .rundir import RunDir
from .stats import paired_test
from .train import TrainConfig, Trainer

SAMPLES = 16
IDENTITY, PERSONAL = "phase 1, identity heads (z'_i = z)", "phase 1 + personalizer"


def run_demo(out: os.PathLike, *, epochs: int = 24, items: int = 256, seed: int = 0, progress: bool = True,
             log: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Train and evaluate as the module docstring says; returns what ``demo.json`` holds."""
    t0 = time.perf_counter()
    out = Path(out)
    data = make_synthetic(items, size=64, raters=4, seed=seed)
    cfg = HarmonizerConfig.small(num_raters=4)
    tc = TrainConfig.for_model(cfg, epochs_phase1=epochs, epochs_phase2=epochs, batch_size=16, val_samples=8,
                               seed=seed)  # fmt: skip
    torch.manual_seed(seed)
    untrained = HarmonizerNet(cfg)
    log(f"demo: {len(data)} synthetic images (64 x 64, 4 raters, {len(data.patients())} patients), small config "
        f"({sum(p.numel() for p in untrained.parameters()) / 1e6:.2f} M parameters), "
        f"{tc.epochs_phase1} + {tc.epochs_phase2} epochs")  # fmt: skip
    run = RunDir(out / "run")
    # a second demo into the same folder continues (or reuses) its run: a run directory is never retrained over
    Trainer(data, cfg, tc, run.path, progress=progress, log=log).fit(resume=run.has("last"))
    trained, _ = run.load_model("best")
    scoring = run.scoring_set(data, cfg, "test")
    args = dict(num_samples=SAMPLES, seed=0)
    same_draws = dict(k_values=K_VALUES, **args)  # the draws run_evaluation makes, so Table 1 rows compare exactly
    identity = evaluate_model(trained, scoring.data, scoring.indices, heads="identity", **same_draws)
    personal = evaluate_model(trained, scoring.data, scoring.indices, heads="personalized", **same_draws)
    rows = {
        "untrained": summarize(evaluate_model(untrained, scoring.data, scoring.indices, heads="none", **same_draws)),
        IDENTITY: summarize(identity),
        PERSONAL: run_evaluation(trained, scoring.data, scoring.indices, out / "eval", label="demo (trained)",
                                 scored=scoring.description, scores=personal, **args),
    }  # fmt: skip
    result = {"scored": scoring.description, "samples": SAMPLES, "epochs": [tc.epochs_phase1, tc.epochs_phase2],
              "seconds": time.perf_counter() - t0, "rows": {k: _tables(v) for k, v in rows.items()}}  # fmt: skip
    result["personalization_gain"] = _gain(result["rows"])
    result["paired_tests"] = paired_tests(personal, identity)
    x, y = (torch.from_numpy(a[scoring.indices]) for a in (scoring.data.images, scoring.data.masks))
    ceiling = latent_ceiling(trained, x, y, num_samples=SAMPLES, generator=torch.Generator().manual_seed(seed))
    result["latent_ceiling"] = ceiling_summary(ceiling, torch.from_numpy(personal.heads.per_image("dice_each")),
                                               torch.from_numpy(identity.prior.per_image("dice_match")))  # fmt: skip
    write_atomic(out / "demo.json", json.dumps(result, indent=1, default=float) + "\n")
    write_atomic(out / "demo.md", markdown(result))
    return result


def _tables(r: dict[str, Any]) -> dict[str, Any]:
    return {"table1": r["table1"], "table2": r["table2"]}


def _gain(rows: dict[str, Any]) -> dict[str, float]:
    """The personalized Dice_mean minus the phase-1 Dice_match and minus the identity heads' Dice_mean."""
    personal = rows[PERSONAL]["table2"]["mean"]["dice_each_mean"]
    identity = rows[IDENTITY]
    return {
        "dice_mean": personal,
        "minus_phase1_dice_match": personal - identity["table1"]["mean"]["dice_match"],
        "minus_identity_dice_mean": personal - identity["table2"]["mean"]["dice_each_mean"],
    }


def _paired(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    t = paired_test(a, b)
    return {k: t[k] for k in ("n_images", "mean_difference", "images_better", "images_worse", "wilcoxon_p")}


def paired_tests(personal: Scores, identity: Scores) -> dict[str, dict[str, Any]]:
    """Per-image paired comparisons of the personalized Dice_mean (two-sided Wilcoxon signed-rank test over
    the test images): against the same model's phase-1 Dice_match and against its identity heads' Dice_mean."""
    mine = personal.heads.per_image("dice_each_mean")
    return {"vs_phase1_dice_match": _paired(mine, identity.prior.per_image("dice_match")),
            "vs_identity_dice_mean": _paired(mine, identity.heads.per_image("dice_each_mean"))}  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    g = result["personalization_gain"]
    return (
        f"Held-out test patients: {result['scored']}; K = {result['samples']} prior samples; Table 2 on the four "
        "rater heads; mean ± std over images.\n\n"
        + tables_markdown(result["rows"])
        + f"\nPersonalized Dice_mean {g['dice_mean']:.4f}: {g['minus_phase1_dice_match']:+.4f} against the phase-1 "
        f"Dice_match, {g['minus_identity_dice_mean']:+.4f} against the identity heads' Dice_mean.\n"
        + paired_markdown(result.get("paired_tests", {}))
        + ceiling_markdown(result.get("latent_ceiling"))
    )


def ceiling_markdown(c: dict[str, Any] | None) -> str:
    """The latent ceiling of :mod:`harmonizer_fast.latent_ceiling` beside the heads and Dice_match."""
    if not c:
        return ""
    pairs = zip(c["per_rater"], c["heads_per_rater"])
    raters = ", ".join(f"A{i + 1} {v:.4f} (heads {h:.4f})" for i, (v, h) in enumerate(pairs))
    return (
        f"\nLatent ceiling (an oracle and a lower bound: one latent per image and rater optimized against that "
        f"rater's own test mask through the frozen head): Dice_mean {c['dice_mean']:.4f}, "
        f"{c['ceiling_minus_heads']:+.4f} above the heads and {c['ceiling_minus_phase1_dice_match']:+.4f} above "
        f"the phase-1 Dice_match; per rater {raters}.\n"
    )


def paired_markdown(tests: dict[str, dict[str, Any]]) -> str:
    """One line per :func:`paired_tests` comparison."""
    return "".join(
        f"\nPaired over the {t['n_images']} test images, {name.replace('_', ' ')}: mean difference "
        f"{t['mean_difference']:+.4f}, better on {t['images_better']}, worse on {t['images_worse']}, "
        f"Wilcoxon signed-rank p = {t['wilcoxon_p']:.2g}.\n"
        for name, t in tests.items()
    )
