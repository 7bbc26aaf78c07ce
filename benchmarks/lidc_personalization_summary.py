"""Summarize benchmarks/lidc_personalization.sh: Table 1 and Table 2 on LIDC's held-out test patients for the
phase-1 model with identity heads (z'_i = z, no personalization) and with the trained personalizer, Dice_A1..A4
and the heads' calibration (Table 4), written as benchmarks/results/lidc-personalization-small-cpu.json and .md.

    python benchmarks/lidc_personalization_summary.py RUNS_DIR --data LIDC_DIR [--minutes M1 M2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_results

from harmonizer_fast.data import load_dataset
from harmonizer_fast.demo import paired_markdown, paired_tests
from harmonizer_fast.evaluate import collapsed, evaluate_model, per_rater_markdown, summarize, tables_markdown
from harmonizer_fast.model.latent import with_masks
from harmonizer_fast.rundir import RunDir

IDENTITY, PERSONAL = "phase 1, identity heads (z'_i = z)", "phase 1 + personalizer"


def _run_facts(run: RunDir) -> dict:
    done = [r for r in run.read_log() if "partial_steps" not in r]  # a budget stop's partial epoch has no time
    return {"epochs": len(done), "minutes": done[-1]["minutes"],
            "best_epoch": run.state("best")["position"]["epoch"], "stopped": run.state()["stopped"]}  # fmt: skip


@torch.no_grad()
def _latent_facts(model, scoring, n: int = 64) -> dict:
    """The prior's and the posterior's Gaussians on the first ``n`` scored images: their mean sigma and how much
    their means vary across images (a prior whose mean does not depend on the image cannot place a lesion)."""
    model.eval()
    idx = scoring.indices[:n]
    x, y = torch.from_numpy(scoring.data.images[idx]), torch.from_numpy(scoring.data.masks[idx]).float()
    out = {}
    for name, dist in (("prior", model.prior(x)), ("posterior_rater_1", model.posterior(with_masks(x, y[:, 0])))):
        out[name] = {"sigma_mean": float(dist.stddev.mean()), "mean_std_over_images": float(dist.mean.std(0).mean())}
    return {"images": len(idx), **out}


def _collapse_lines(rows: dict) -> list[str]:
    lines = []
    for name, r in rows.items():
        for t in ("table1", "table2"):
            if collapsed(r[t]):
                what = "prior sample" if t == "table1" else "head"
                lines.append(f"**Collapsed**: {name}, every {what} of every test image is empty at 0.5; its {t} "
                             "numbers are those of an all-empty predictor, not a result.")  # fmt: skip
    return lines


def _latent_lines(latents: dict) -> list[str]:
    lines = []
    for name, what in (
        ("selected", "the selected model"),
        ("phase1_last", "the last phase-1 checkpoint (the time-budget stop)"),
    ):
        f = latents[name]
        p, q = f["prior"], f["posterior_rater_1"]
        lines.append(f"Latents of {what} on the first {f['images']} test images: prior sigma {p['sigma_mean']:.3f}, "
                     f"std of the prior means across images {p['mean_std_over_images']:.2e}; posterior (rater 1) "
                     f"sigma {q['sigma_mean']:.3f}, std of its means {q['mean_std_over_images']:.3f}.\n")  # fmt: skip
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path)
    p.add_argument("--data", required=True)
    p.add_argument("--minutes", type=float, nargs=2, default=(10.0, 5.0))
    p.add_argument("--reused-phase1", help="the finished phase-1 run the script copied (PHASE1=...)")
    args = p.parse_args()
    phase1, phase2 = RunDir(args.runs / "phase1"), RunDir(args.runs / "phase2")
    evaluated = json.loads((args.runs / "eval" / "metrics.json").read_text())
    model, _ = phase2.load_model("best")
    scoring = phase2.scoring_set(load_dataset(args.data), model.config, "test")
    draws = {"samples": evaluated["samples"], "seed": evaluated["seed"]}
    identity_scores = evaluate_model(model, scoring.data, scoring.indices, heads="identity", **draws)
    personal_scores = evaluate_model(model, scoring.data, scoring.indices, **draws)  # per image, for the tests
    identity = summarize(identity_scores)
    again = personal_scores.heads.summary()["mean"]["dice_each_mean"]
    if abs(again - evaluated["table2"]["mean"]["dice_each_mean"]) > 1e-9:  # same draws, so the same numbers
        raise SystemExit(f"re-evaluation differs from {args.runs / 'eval'}: Dice_mean {again}")
    rows = {IDENTITY: identity, PERSONAL: {k: evaluated[k] for k in ("table1", "table2")}}
    personal, ident = rows[PERSONAL]["table2"]["mean"], identity["table2"]["mean"]
    gain = {"dice_mean": personal["dice_each_mean"],
            "minus_phase1_dice_match": personal["dice_each_mean"] - identity["table1"]["mean"]["dice_match"],
            "minus_identity_dice_mean": personal["dice_each_mean"] - ident["dice_each_mean"]}  # fmt: skip
    payload = {"benchmark": "lidc-personalization-small-cpu", "budget_minutes": list(args.minutes),
               "machine": machine_info(), "scored": scoring.description, "samples": evaluated["samples"],
               "phase1": _run_facts(phase1), "reused_phase1": args.reused_phase1, "phase2": _run_facts(phase2),
               "rows": rows,
               "personalization_gain": gain, "paired_tests": paired_tests(personal_scores, identity_scores),
               "latents": {"selected": _latent_facts(model, scoring),
                           "phase1_last": _latent_facts(phase1.load_model("last")[0], scoring)}}  # fmt: skip
    m, r1, r2 = payload["machine"], payload["phase1"], payload["phase2"]
    lines = [
        "# LIDC-IDRI, small config, both phases at a fixed CPU budget",
        "",
        f"`{'PHASE1=' + args.reused_phase1 + ' ' if args.reused_phase1 else ''}bash benchmarks/lidc_personalization.sh "
        f"{args.minutes[0]:g} {args.minutes[1]:g}` on {m['date']}: {m['cpu']} ({m['cpu_cores']} cores), torch "
        f"{m['torch']}. Phase 1{' (reused: that earlier run of this script)' if args.reused_phase1 else ''}: "
        f"{r1['epochs']} epochs in {r1['minutes']:.1f} min "
        f"(selected epoch {r1['best_epoch']}, unbiased GED on the validation patients); phase 2 from that model: "
        f"{r2['epochs']} epochs in {r2['minutes']:.1f} min (selected epoch {r2['best_epoch']}, validation "
        f"Dice_mean). Scored on {scoring.description}, K = {payload['samples']} prior samples; raters ordered by "
        "area, smallest first; mean ± std over images; GED in the dpersona convention (the paper's tables).",
        "",
        tables_markdown(rows),
        f"Personalized Dice_mean {gain['dice_mean']:.4f}: {gain['minus_phase1_dice_match']:+.4f} against the phase-1 "
        f"Dice_match, {gain['minus_identity_dice_mean']:+.4f} against the identity heads' Dice_mean.",
        paired_markdown(payload["paired_tests"]),
        "The tests are over the images of one training run; slices of one patient are not independent, so read "
        "the p-values as indicative.",
        "",
        *[line + "\n" for line in _collapse_lines(rows)],
        *_latent_lines(payload["latents"]),
        "",
        "Per rater (Table 2's Dice_A(i) and Table 4's calibration of the personalized heads):",
        "",
        per_rater_markdown(rows[PERSONAL]["table2"]),
    ]
    write_results("lidc-personalization-small-cpu", payload, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
