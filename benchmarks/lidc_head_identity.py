"""What holds head identity back ([science] #35's proof: head i matches rater i best on at least half of the
head-slice pairs)? The model's outlines or the model's sizes, measured by swapping each with the raters'.

    python benchmarks/lidc_head_identity.py --data ../shared/data/lidc \\
        --runs runs/full-f0-s0 runs/full-f0-s1 ... --out benchmarks/results/lidc-head-identity-small-cpu

Each run (a full model with a trained personalizer) is scored on its held-out test patients with its
personalized heads, drawn as ``evaluate_model`` draws them (so the first row is the head identity the compare
and convergence reports give). On the same slices, head identity (:func:`harmonizer_fast.metrics.batch
._head_identity`: head i's best-matching rater by Dice is rater i, ties counted as a match) of masks built from
a ranking of pixels and a size per head (:func:`harmonizer_fast.references.top_pixels`):

- the heads' outlines at the raters' areas: head i's own probabilities, cut at rater i's pixel count on that
  slice (the labels give the size, the model the outline);
- the raters' consensus at the heads' areas: the raters' consensus ranking (:func:`~harmonizer_fast.references
  .consensus_score`) cut at head i's pixel count (the model gives the size, the labels the outline);
- the raters' consensus at the lesion's size: the consensus cut at the slice's mean rater area times rank i's
  typical share of it (measured on the run's training patients): the labels give one size per slice, not who
  drew larger;
- the area-matched consensus (oracle): the consensus at rater i's own area.

And in boundary pixels (an area difference over the consensus mask's perimeter: how far, on average, one outline
lies outside another): how far apart adjacent raters' outlines lie, and how far each head's size is from its
rater's. Head identity is over head-slice pairs (the proof's unit) and over patients (each patient's slices,
over every run, averaged first). ``--render`` redraws the markdown from the JSON.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import measured_or_rendered, run_machine

from harmonizer_fast._random import generator
from harmonizer_fast.checkpoint import load_model, read_manifest
from harmonizer_fast.data import load_dataset
from harmonizer_fast.metrics.batch import _head_identity
from harmonizer_fast.metrics.overlap import dice_matrix
from harmonizer_fast.references import consensus_score, top_pixels
from harmonizer_fast.rundir import RunDir
from harmonizer_fast.stats import per_patient

PREDICTORS = (  # name, what it takes from the labels
    ("model: personalized heads", "nothing"),
    ("the heads' outlines at the raters' areas", "each rater's pixel count on the slice"),
    ("the raters' consensus at the heads' areas", "the raters' outline"),
    ("the raters' consensus at the lesion's size", "the raters' outline and their mean pixel count"),
    ("area-matched consensus (oracle)", "the raters' outline and each rater's pixel count"),
)


def perimeter(mask: torch.Tensor) -> torch.Tensor:
    """``(B,)``: the pixels of ``mask`` ``(B, 1, H, W)`` with a pixel outside it among their 8 neighbours."""
    eroded = -F.max_pool2d(-mask, 3, 1, 1)
    return (mask - eroded).flatten(1).sum(1)


def rank_shares(masks: np.ndarray) -> torch.Tensor:
    """``(R,)``: rater i's mean share of the slice's mean rater area, over the slices where every rater drew."""
    a = torch.from_numpy(masks).flatten(2).sum(2).double()
    a = a[(a > 0).all(1)]
    return (a / a.mean(1, keepdim=True)).mean(0)


@torch.no_grad()
def score_run(path: str, data, samples: int, seed: int, batch: int = 32) -> dict:
    manifest_path, manifest = read_manifest(Path(path) / "best.json")
    model, _ = load_model(manifest_path)
    model.eval()
    run = RunDir(manifest_path.parent)
    scoring = run.scoring_set(data, model.config, "test")
    shares = rank_shares(scoring.data.masks[run.data_record().split.train])
    idx = scoring.indices
    gens = (torch.Generator().manual_seed(seed), generator(seed, 1))  # evaluate_model's two streams
    identity = {n: [] for n, _ in PREDICTORS}
    gap, error, dice_own = [], [], []
    for s in range(0, len(idx), batch):
        part = idx[s : s + batch]
        x = torch.from_numpy(scoring.data.images[part])
        y = torch.from_numpy(scoring.data.masks[part])
        _, heads = model.predict(x, samples, heads="personalized", generator=gens[0], bank_generator=gens[1])
        heads = heads.float()
        rater_area = y.flatten(2).sum(2).double()
        head_area = (heads > 0.5).flatten(2).sum(2).double()
        consensus = consensus_score(y)
        masks = {
            PREDICTORS[0][0]: heads,
            PREDICTORS[1][0]: top_pixels(heads, rater_area),
            PREDICTORS[2][0]: top_pixels(consensus, head_area),
            PREDICTORS[3][0]: top_pixels(consensus, (rater_area.mean(1, keepdim=True) * shares).round()),
            PREDICTORS[4][0]: top_pixels(consensus, rater_area),
        }
        for n, m in masks.items():
            identity[n].append(_head_identity(m, y))
        per = perimeter((y.double().mean(1, keepdim=True) >= 0.5).double()).clamp(min=1)[:, None]
        gap.append(((rater_area[:, 1:] - rater_area[:, :-1]).abs() / per).numpy())
        error.append(((head_area - rater_area).abs() / per).numpy())
        dice_own.append(torch.diagonal(dice_matrix(y.float(), heads), dim1=1, dim2=2).mean(1).numpy())
    tc = manifest["state"]["train_config"]
    gap, error = np.concatenate(gap), np.concatenate(error)
    return {
        "run": path, "fold": tc["fold"], "seed": tc["seed"], "min_raters": tc.get("min_raters", 0),
        "selected_epoch": manifest["state"]["position"]["epoch"], "scored": scoring.description,
        "rank_shares": shares.tolist(),
        "patient_id": scoring.data.patient_id[idx].tolist(),
        "identity": {n: np.concatenate(v).tolist() for n, v in identity.items()},
        "dice_each_mean": float(np.concatenate(dice_own).mean()),
        "rater_gap_median": np.median(gap, 0).tolist(),  # adjacent raters i, i+1, boundary pixels
        "head_error_median": np.median(error, 0).tolist(),  # |head i - rater i|, boundary pixels
    }  # fmt: skip


def measure(args) -> dict:
    data = load_dataset(args.data)
    t0 = time.time()
    runs = [score_run(p, data, args.samples, args.seed) for p in args.runs]
    if len({r["min_raters"] for r in runs}) > 1:
        raise SystemExit("--runs: the runs were trained on different protocols (--min-raters); score one at a time")
    pooled = {}
    for n, _ in PREDICTORS:
        values = np.concatenate([r["identity"][n] for r in runs])
        pid = np.concatenate([r["patient_id"] for r in runs]).astype(str)
        patients, means = per_patient(values, pid)
        pooled[n] = {"pairs": float(values.mean()), "patients": float(np.nanmean(means)),
                     "n_images": int(values.size), "n_patients": int(patients.size)}  # fmt: skip
    return {
        "command": "python benchmarks/lidc_head_identity.py " + shlex.join(sys.argv[1:]),
        "machine": run_machine(),
        "samples": args.samples, "seed": args.seed, "minutes": (time.time() - t0) / 60,
        "runs": runs, "pooled": pooled,
    }  # fmt: skip


def markdown(r: dict) -> str:
    runs, pooled = r["runs"], r["pooled"]
    first = PREDICTORS[0][0]
    folds = sorted({x["fold"] for x in runs})
    seeds = sorted({x["seed"] for x in runs})
    p = pooled[first]
    lines = [
        f"# What holds head identity back ({r['machine']['cpu']})", "",
        f"`{r['command']}` on {r['machine']['date']}, torch {r['machine']['torch']}; K = {r['samples']}, seed "
        f"{r['seed']}. {len(runs)} full-model runs (folds {', '.join(map(str, folds))}; training seeds "
        f"{', '.join(map(str, seeds))}; --min-raters {runs[0]['min_raters']}), each scored on its held-out test "
        f"patients: {p['n_images']} head-slice rows of {p['n_patients']} patients.", "",
        "Head identity (head i's best-matching rater is rater i; chance 25 %) of the model's heads and of masks "
        "that take their outline or their size from the raters' labels:", "",
        "| predictor | from the labels | head-slice pairs | patients |", "|---|---|---|---|",
        *[f"| {n} | {src} | {pooled[n]['pairs']:.1%} | {pooled[n]['patients']:.1%} |" for n, src in PREDICTORS],
        "", "Per run (head-slice pairs; distances in boundary pixels: an area difference over the perimeter of the "
        "raters' majority mask, medians over the run's test slices):", "",
        "| run | fold | seed | images | Dice_mean (head i vs rater i) | model: personalized heads | the heads' "
        "outlines at the raters' areas | the raters' consensus at the heads' areas | adjacent raters apart | "
        "head i's size from rater i's |", "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for x in runs:
        ident = x["identity"]
        lines.append(
            f"| `{x['run']}` | {x['fold']} | {x['seed']} | {len(ident[first])} | {x['dice_each_mean']:.4f} | "
            + " | ".join(f"{np.mean(ident[PREDICTORS[i][0]]):.1%}" for i in (0, 1, 2)) + " | "
            + " / ".join(f"{g:.2f}" for g in x["rater_gap_median"]) + " | "
            + " / ".join(f"{e:.2f}" for e in x["head_error_median"]) + " |"
        )  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", default=[], help="run folders of full models with a trained personalizer")
    p.add_argument("--data", default="../shared/data/lidc")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/lidc-head-identity-small-cpu")
    p.add_argument("--render", action="store_true", help="redraw the markdown from <out>.json")
    args = p.parse_args(argv)
    if not args.render and not args.runs:
        p.error("--runs: give at least one run folder (or --render)")
    out = Path(args.out)
    result = measured_or_rendered(out, args.render, lambda: measure(args))
    text = markdown(result)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
