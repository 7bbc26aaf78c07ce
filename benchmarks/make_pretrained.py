"""Bundle a trained run as a model shipped inside the package (``harmonizer_fast/pretrained/<name>/``).

    python benchmarks/make_pretrained.py --run runs/lidc-small --data ../shared/data/lidc --name lidc-small

Scores the run's best checkpoint on its held-out test patients (the run's own split record) with Tables 1
and 2, and beside it the label-only references that need no model (every sample and head empty; every
sample and head the raters' majority mask, drawn by at least half of them; the raters' own masks as the K
samples, the consensus oracle of Table 1). Then writes, into one folder renamed into place:
``model.json`` + ``weights-<sha>.safetensors`` (a checkpoint of the weights alone, with the recorded
preprocessing), ``card.json`` (data, licence, split, recipe, metrics) and ``MODEL_CARD.md`` rendered from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent

from harmonizer_fast.checkpoint import load_model, preprocessing_of, read_manifest, save_checkpoint
from harmonizer_fast.data import load_dataset
from harmonizer_fast.evaluate import evaluate_model, summarize
from harmonizer_fast.latent_stats import collapse_flags, latent_statistics
from harmonizer_fast.pretrained import ROOT as PRETRAINED
from harmonizer_fast.pretrained.card import render
from harmonizer_fast.profiler import cpu_model
from harmonizer_fast.references import label_only_references
from harmonizer_fast.rundir import RunDir


def _phase1_epoch(run: Path) -> int:
    return int(read_manifest(run / "best_phase1.json")[1]["state"]["position"]["epoch"])


def reading(model: dict, refs: dict, min_raters: int = 0) -> str:
    """What the table says, from its numbers: the model against the majority-mask and all-empty references."""
    m1, m2, maj, empty = model["table1"]["mean"], model["table2"]["mean"], refs["majority mask"], refs["all-empty"]
    maj1, maj2, emp1 = maj["table1"]["mean"], maj["table2"]["mean"], empty["table1"]["mean"]

    def cmp(a: float, b: float, lower_better: bool = False) -> str:
        return "better than" if (a < b) == lower_better and a != b else "worse than"

    return (f"The K samples' GED {m1['ged']:.4f} is {cmp(m1['ged'], maj1['ged'], True)} the majority mask's "
            f"{maj1['ged']:.4f} and {cmp(m1['ged'], emp1['ged'], True)} all-empty's {emp1['ged']:.4f}; their "
            f"Dice_match {m1['dice_match']:.4f} is {cmp(m1['dice_match'], maj1['dice_match'])} the majority mask's "
            f"{maj1['dice_match']:.4f}. The heads' Dice_mean {m2['dice_each_mean']:.4f} is "
            f"{cmp(m2['dice_each_mean'], maj2['dice_each_mean'])} the majority mask given to every head "
            f"({maj2['dice_each_mean']:.4f}). "
            + ("Every rater drew on every scored slice, so an all-empty predictor scores nothing; " if min_raters
               else "An all-empty predictor scores wherever raters left a slice empty (rater 1, the smallest masks, "
               "is empty on most slices of this export); ")
            + "the raters-as-samples row is Table 1's oracle.")  # fmt: skip


def _heads_line(scores: dict, refs: dict) -> str:
    """What the heads are, with the measured head identity and the area-matched oracle's beside it."""
    line = "Heads are ordered by mask area (head 1 the most conservative reading), not by radiologist identity"
    t2 = scores.get("table2") or {}
    if "head_identity" not in t2:
        return line + "."
    oracle = (refs.get("area-matched consensus (oracle)") or {}).get("table2", {}).get("head_identity")
    chance = 1 / len(t2["per_rater"])
    line += (f": head i is nearest rater i on {t2['head_identity'][0]:.0%} of the test head-slice pairs (chance "
             f"{chance:.0%}")
    if oracle:
        line += (f"; a label-only oracle that knows every rater's area on every slice and draws the raters' "
                 f"consensus at it reaches {oracle[0]:.0%}, since adjacent raters' masks differ less than the "
                 "model's from theirs")
    return line + ")."


def limitations(
    tc: dict, history: list, latent: dict, scores: dict, refs: dict, n_test: int, n_data: int
) -> list[str]:
    """The card's limitations, from the run's record and the measured numbers (nothing hand-written that a
    new model could make false)."""
    n1, n2 = (sum(1 for h in history if h["phase"] == p and "partial_steps" not in h) for p in (1, 2))
    flags = collapse_flags(latent)
    unc = scores["table1"].get("uncertainty_vs_raters") or {}
    prior = ("The prior: " + "; ".join(flags) + "." if flags else
             f"The prior depends on the image (its mean varies across the test slices by "
             f"{latent['mean_spread_ratio']:.2f} of its sigma, no sigma at a bound); the samples' spread follows "
             f"the raters' with Spearman {unc.get('spearman', float('nan')):.2f} over the "
             f"{unc.get('n_images', 0)} test slices where all raters drew.")  # fmt: skip
    out = [
        f"The small config trained {n1} + {n2} epochs on 2 CPU cores; the paper trains its full-size model "
        "100 + 150 epochs on a GPU.",
        prior,
        _heads_line(scores, refs),
    ]
    if tc.get("min_raters"):
        out.append(f"Trained and scored only on slices where at least {tc['min_raters']} raters drew ({n_test} "
                   f"test slices; the export has {n_data} slices in all): on slices that one reader marked it was "
                   "never trained, and the paper's 1,609-slice set is a different selection.")  # fmt: skip
    else:
        out.append("The export holds every slice of each nodule, including slices only one reader marked; the "
                   "paper's 1,609-slice protocol differs.")  # fmt: skip
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    manifest_path, manifest = read_manifest(args.run)
    model, _ = load_model(manifest_path)
    data = load_dataset(args.data)
    run = RunDir(manifest_path.parent)
    scoring = run.scoring_set(data, model.config, "test")
    record = run.data_record()
    split = record.split
    pid = scoring.data.patient_id
    t0 = time.time()
    scores = summarize(evaluate_model(model, scoring.data, scoring.indices, num_samples=args.samples, seed=args.seed))
    latent = latent_statistics(model, scoring.data, scoring.indices)
    refs = label_only_references(scoring.data, scoring.indices, args.samples)
    state = manifest["state"]
    tc = state["train_config"]
    # the run's whole history is in its last checkpoint (best stops at the selected epoch); "minutes" is the
    # wall time elapsed in the run at the end of each epoch
    history = read_manifest(manifest_path.parent / "last.json")[1]["state"].get("history", [])
    minutes = max((h.get("minutes", 0.0) for h in history), default=0.0)
    best_epoch = state["position"]["epoch"]
    card = {
        "name": args.name,
        "summary": "the small Harmonizer Network config trained on LIDC-IDRI nodule slices (4 raters, 128 x 128 CT "
        "crops), with its personalized rater heads",
        "command": f"python benchmarks/make_pretrained.py --run {args.run} --data {args.data} --name {args.name}",
        "made_on": f"{time.strftime('%Y-%m-%d')}, {cpu_model()}, torch {torch.__version__}, Python "
        f"{platform.python_version()}",
        "intended_use": "Research and software testing only: trying `harmonizer-fast predict` without training, "
        "examples, and a baseline to compare against. Not a medical device; not validated for any clinical "
        "decision. It was trained on 8-bit CT crops of lung nodules from one public collection and says "
        "nothing reliable about other organs, modalities, intensity windows or scanners.",
        "data": {
            "description": f"The shared LIDC-IDRI slices export: {len(data)} slices of {len(data.patients())} "
            "patients, 128 x 128 8-bit CT crops around nodules, four radiologists' masks per slice (an empty mask "
            "where a reader did not mark the slice); masks ordered per slice by area, smallest first (the LIDC "
            "readers' slot is anonymous).",
            "licence": "CC BY 3.0 (https://creativecommons.org/licenses/by/3.0/); this model is a derived work and "
            "carries the attribution in the package's NOTICE",
            "citation": "Armato SG III et al., The Lung Image Database Consortium (LIDC) and Image Database Resource "
            "Initiative (IDRI): a completed reference database of lung nodules on CT scans, Medical Physics "
            "38(2):915-931, 2011; TCIA doi:10.7937/K9/TCIA.2015.LO9QL9SX.",
            "split": f"fold {tc['fold']} of a {tc['folds']}-fold patient-level split (seed "
            f"{tc['split_seed'] if tc['split_seed'] is not None else tc['seed']}), {tc['val_fraction']:.0%} of the "
            "remaining patients for validation",
            **{f"{k}_patients": int(len(np.unique(pid[getattr(split, k)]))) for k in ("train", "val", "test")},
            **{f"{k}_images": int(len(getattr(split, k))) for k in ("train", "val", "test")},
            "test_patient_ids": sorted(str(x) for x in np.unique(pid[split.test])),
        },
        "recipe": {
            "config": "HarmonizerConfig.small (CPU-sized), in_channels 1, 4 rater heads, frequency personalizer",
            "epochs": f"phase 1: {sum(1 for h in history if h['phase'] == 1)} (planned {tc['epochs_phase1']}), "
            f"phase 2: {sum(1 for h in history if h['phase'] == 2)} (planned {tc['epochs_phase2']}); cosine "
            "schedule over the planned epochs",
            "optimiser": f"AdamW, lr {tc['lr_phase1']} / {tc['lr_phase2']} (the prior net in phase 1: "
            f"{tc.get('lr_prior') or tc['lr_phase1']}), weight decay {tc['weight_decay']}, batch "
            f"{tc['batch_size']}, gradient clip {tc['grad_clip']}",
            "protocol": f"slices where at least {tc.get('min_raters', 0)} of the 4 raters drew (train, validation "
            "and test alike)" if tc.get("min_raters") else "every slice of the export",
            "selection": f"phase 1 on the validation {tc.get('select_phase1')}, phase 2 on the validation "
            f"{tc.get('select_phase2')}; phase 2's z: {tc.get('phase2_z')}",
            "augmentation": "random flips and 90-degree turns",
            "preprocessing": preprocessing_of(manifest).describe(),
            "compute": f"{minutes:.1f} minutes of training (wall time) on 2 CPU cores ({cpu_model()}) shared with "
            f"other work, seed {tc['seed']}",
            "selected": f"the checkpoint of epoch {best_epoch} (phase {state.get('best_phase')}), on its phase-1 "
            f"model of epoch {_phase1_epoch(manifest_path.parent)}",
        },
        "metrics": {
            "protocol": f"The {len(scoring.indices)} slices of the {len(np.unique(pid[scoring.indices]))} held-out "
            f"test patients, K = {args.samples} prior samples (seed {args.seed}), mean ± std over slices. Table 1 "
            "(T1) scores the K samples against the four raters (GED in D-Persona's convention), Table 2 (T2) the "
            "personalized heads: Dice_mean is head i against rater i (the diagonal, stricter than D-Persona's "
            "Hungarian-matched code). The label-only rows need no model: they show what the data alone allows.",
            "model": scores,
            "references": refs,
            "reading": reading(scores, refs, tc.get("min_raters", 0)),
            "seconds": round(time.time() - t0, 1),
        },
        "limitations": limitations(tc, history, latent, scores, refs, len(scoring.indices), len(data)),
    }
    card["metrics"]["latent"] = latent
    card["metrics"]["prior_flags"] = collapse_flags(latent)
    target = PRETRAINED / args.name
    tmp = PRETRAINED / f".{args.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    kept = {"source": card["command"], "train_config": tc, "history": history}
    save_checkpoint(tmp, "model", model, state=kept, preprocessing=preprocessing_of(manifest))
    (tmp / "card.json").write_text(json.dumps(card, indent=1, default=float) + "\n")
    (tmp / "MODEL_CARD.md").write_text(render(card))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    size = sum(f.stat().st_size for f in target.iterdir())
    print(f"wrote {target} ({size / 2**20:.1f} MiB)")
    print(render(card))
    return 0


if __name__ == "__main__":
    sys.exit(main())
