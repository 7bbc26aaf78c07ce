"""The convergence run of [science] #35 on its held-out patients: is the prior alive, does the uncertainty
follow the raters, and do the personalized heads beat the identity heads and find their raters?

    python -m harmonizer_fast.cli train --data ../shared/data/lidc --config small --out runs/converge-f0 \\
        --min-raters 4 --epochs 60 --epochs2 40 --fold 0 --seed 0
    python benchmarks/lidc_convergence.py --run runs/converge-f0 --data ../shared/data/lidc

Scores the run's ``best`` on its test patients (the run's own split and protocol) with K samples, the
personalized and the identity heads from the same draws, the label-only references, the prior's statistics
(:mod:`harmonizer_fast.latent_stats`), and paired tests over **patients** (each patient's images averaged
first). Writes ``<out>.json``, ``<out>.md``, ``<out>-curves.png`` (validation scores and losses per epoch)
and ``<out>-uncertainty.png`` (the samples' spread against the raters' per image; the sample mean's
entropy by rater agreement). Every number in the markdown comes from the JSON (``--render`` redraws it).

``--ablation LABEL=RUN`` (repeatable) adds runs of the same protocol that differ in one setting (the prior's
learning rate, [science] #35): their phase-1 latent statistics per epoch go into the curves figure and their
selected phase-1 model's prior statistics on the same test patients into a table.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from common import measured_or_rendered, run_machine

from harmonizer_fast.checkpoint import load_model, read_manifest
from harmonizer_fast.data import load_dataset
from harmonizer_fast.evaluate import evaluate_model, summarize
from harmonizer_fast.figures import _pyplot, _save
from harmonizer_fast.latent_stats import MAX_CLAMPED_SHARE, MIN_SPREAD_RATIO, collapse_flags, latent_statistics
from harmonizer_fast.references import label_only_references
from harmonizer_fast.rundir import RunDir
from harmonizer_fast.stats import paired_test, per_patient

AREA_ORACLE = "area-matched consensus (oracle)"
KEYS = ("ged", "ged_unbiased", "dice_soft", "dice_max", "dice_match", "dice_each_mean", "ncc", "sample_diversity")


def _table(summary: dict) -> dict:
    return {k: [summary["mean"][k], summary["std"][k]] for k in KEYS}


def ablation(label: str, path: str, data, scoring_of) -> dict:
    """A run beside the main one: its recipe, its phase-1 history and its phase-1 model's prior on the test set."""
    manifest_path, manifest = read_manifest(Path(path) / "best_phase1.json")
    model, _ = load_model(manifest_path)
    scoring = scoring_of(RunDir(manifest_path.parent), model)
    history = read_manifest(manifest_path.parent / "last.json")[1]["state"]["history"]
    latent = latent_statistics(model, scoring.data, scoring.indices)
    return {"run": path, "train_config": manifest["state"]["train_config"],
            "selected_epoch": manifest["state"]["position"]["epoch"], "latent": latent,
            "prior_flags": collapse_flags(latent), "history": [h for h in history if h["phase"] == 1]}  # fmt: skip


def measure(args) -> dict:
    manifest_path, manifest = read_manifest(Path(args.run) / "best.json")
    model, _ = load_model(manifest_path)
    run = RunDir(manifest_path.parent)
    data = load_dataset(args.data)
    scoring = run.scoring_set(data, model.config, "test")
    idx = scoring.indices
    pid = scoring.data.patient_id[idx]
    t0 = time.time()
    personal = evaluate_model(model, scoring.data, idx, num_samples=args.samples, seed=args.seed, heads="personalized")
    identity = evaluate_model(model, scoring.data, idx, num_samples=args.samples, seed=args.seed, heads="identity")
    tables = summarize(personal)
    t2_id = identity.heads.summary()
    latent = latent_statistics(model, scoring.data, idx)
    refs = label_only_references(scoring.data, idx, args.samples)
    dm_p, dm_i = personal.heads.per_image("dice_each_mean"), identity.heads.per_image("dice_each_mean")
    patients, p_means = per_patient(dm_p, pid)
    _, i_means = per_patient(dm_i, pid)
    div_s, div_r = personal.prior.per_image("sample_diversity"), personal.prior.per_image("rater_diversity")
    all_drew = personal.prior.per_image("raters_drawn") >= model.config.num_raters
    history = read_manifest(manifest_path.parent / "last.json")[1]["state"]["history"]
    st = manifest["state"]
    ablations = {}
    for item in args.ablation:
        label, _, path = item.rpartition("=")
        ablations[label] = ablation(label, path, data, lambda rd, m: rd.scoring_set(data, m.config, "test"))
        if ablations[label]["latent"]["n_images"] != len(idx):
            raise SystemExit(f"--ablation {item}: scored {ablations[label]['latent']['n_images']} test images, "
                             f"the main run {len(idx)}: not the same split and protocol")  # fmt: skip
    return {
        "command": "python benchmarks/lidc_convergence.py " + shlex.join(sys.argv[1:]),
        "machine": run_machine(),
        "run": str(args.run),
        "train_config": st["train_config"],
        "model_config": model.config.to_dict(),
        "selected_epoch": st["position"]["epoch"],
        "selected_phase1_epoch": read_manifest(manifest_path.parent / "best_phase1.json")[1]["state"]["position"][
            "epoch"],
        "scored": scoring.description,
        "n_images": int(len(idx)),
        "n_patients": int(len(patients)),
        "samples": args.samples,
        "seed": args.seed,
        "eval_minutes": (time.time() - t0) / 60,
        "table1": _table(tables["table1"]),
        "table2_personalized": {**_table(tables["table2"]), "head_identity": tables["table2"]["head_identity"],
                                "per_rater": tables["table2"]["per_rater"]},  # fmt: skip
        "table2_identity": {**_table(t2_id), "head_identity": t2_id["head_identity"]},
        "references": {n: {"table1": _table(r["table1"]),
                           "table2": {**_table(r["table2"]), "head_identity": r["table2"]["head_identity"]}}
                       for n, r in refs.items()},  # fmt: skip
        "uncertainty_vs_raters": tables["table1"]["uncertainty_vs_raters"],
        "entropy_medians": tables["table1"]["entropy_medians"],
        "latent": latent,
        "prior_flags": collapse_flags(latent),
        "heads_vs_identity_over_patients": paired_test(p_means, i_means),
        "scatter": {"sample_diversity": div_s[all_drew].tolist(), "rater_diversity": div_r[all_drew].tolist()},
        "history": history,
        "ablations": ablations,
    }


def proof(r: dict) -> list[tuple[str, bool, str]]:
    """The checks of [science] #35's proof, each with the measured value."""
    lat, t2p, t2i = r["latent"], r["table2_personalized"], r["table2_identity"]
    rho = r["uncertainty_vs_raters"]["spearman"]
    t = r["heads_vs_identity_over_patients"]
    ceiling = r["references"].get(AREA_ORACLE, {}).get("table2", {}).get("head_identity")
    reach = "" if ceiling is None else f"; the {AREA_ORACLE}, which knows each rater's area, {ceiling[0]:.1%}"
    return [
        ("prior mean's std across images >= 10% of its mean sigma", lat["mean_spread_ratio"] >= MIN_SPREAD_RATIO,
         f"{lat['mean_spread_ratio']:.3f}"),
        ("fewer than 5% of sigma values at a clamp", lat["prior_sigma_clamped_share"] < MAX_CLAMPED_SHARE,
         f"{lat['prior_sigma_clamped_share']:.1%}"),
        ("Spearman(samples' spread, raters' spread) >= 0.3", rho >= 0.3, f"{rho:.3f} over "
         f"{r['uncertainty_vs_raters']['n_images']} images"),
        ("heads beat the identity heads in Dice_mean", t2p["dice_each_mean"][0] > t2i["dice_each_mean"][0],
         f"{t2p['dice_each_mean'][0]:.4f} against {t2i['dice_each_mean'][0]:.4f}; over {t['n_images']} patients "
         f"better on {t['images_better']}, worse on {t['images_worse']}, Wilcoxon p = {t['wilcoxon_p']:.2g}"),
        ("head i matches rater i best on at least half of the head-slice pairs", t2p["head_identity"][0] >= 0.5,
         f"{t2p['head_identity'][0]:.1%} (chance {1 / len(t2p['per_rater']):.0%}{reach})"),
    ]  # fmt: skip


def _row(name: str, t1: dict, t2: dict) -> str:
    cells = [f"{t1[k][0]:.4f}" for k in ("ged", "dice_soft", "dice_match")]
    cells += [f"{t2[k][0]:.4f}" for k in ("ged", "dice_match", "dice_each_mean")]
    cells.append(f"{t2['head_identity'][0]:.1%}" if "head_identity" in t2 else "n/a")
    return f"| {name} | " + " | ".join(cells) + " |"


def markdown(r: dict, stem: str) -> str:
    tc, lat = r["train_config"], r["latent"]
    p1 = [h for h in r["history"] if h["phase"] == 1 and "partial_steps" not in h]
    p2 = [h for h in r["history"] if h["phase"] == 2 and "partial_steps" not in h]
    q = lat["prior_sigma_quantiles"]
    lines = [
        f"# LIDC convergence run: the small config, fold {tc['fold']}, min_raters {tc.get('min_raters', 0)} "
        f"({r['machine']['cpu']})", "",
        f"`{r['command']}` on {r['machine']['date']}, torch {r['machine']['torch']}. Run `{r['run']}`: phase 1 "
        f"{len(p1)} of {tc['epochs_phase1']} planned epochs ({p1[-1]['minutes']:.0f} min), phase 2 {len(p2)} of "
        f"{tc['epochs_phase2']}; best selected at epoch {r['selected_epoch']}. Scored on {r['scored']} "
        f"({r['n_patients']} patients), K = {r['samples']}, seed {r['seed']}.", "",
        "## The proof of [science] #35", "",
        *[f"- {'PASS' if ok else 'FAIL'}: {what}: {value}" for what, ok, value in proof(r)], "",
        "## Tables (mean over test images) with the label-only references", "",
        "| predictor | GED (T1) | Dice_soft (T1) | Dice_match (T1) | GED (T2) | Dice_match (T2, heads matched) | "
        "Dice_mean (T2, head i vs rater i) | head i nearest rater i |", "|---|---|---|---|---|---|---|---|",
        _row("model, personalized heads", r["table1"], r["table2_personalized"]),
        _row("model, identity heads (z'_i = prior mean)", r["table1"], r["table2_identity"]),
        *[_row(f"label-only: {n}", v["table1"], v["table2"]) for n, v in r["references"].items()], "",
        "Dice_mean is scored two ways: head i against rater i (the paper's reading, the package's default) and "
        "with heads matched to raters by the Hungarian algorithm (D-Persona's code; Table 2's Dice_match).", "",
        "## The latent space", "",
        f"- prior mean's std across images over its mean sigma: {lat['mean_spread_ratio']:.3f} (mean sigma "
        f"{lat['prior_sigma_mean']:.3f}; quantiles 5/25/50/75/95 %: "
        + " / ".join(f"{q[k]:.3f}" for k in ("0.05", "0.25", "0.5", "0.75", "0.95"))
        + f"; {lat['prior_sigma_clamped_share']:.1%} at a clamp)",
        "- KL(posterior || prior) per latent dimension (nats): " + ", ".join(f"{v:.3f}" for v in lat["kl_per_dim"])
        + f"; total {lat['kl_total']:.3f}",
        f"- the raters' posterior means lie {lat['rater_spread_in_prior_sigmas']:.3f} prior sigmas apart (std "
        "across an image's raters)",
        f"- flags: {'; '.join(r['prior_flags']) or 'none'}", "",
        "## Uncertainty against the raters", "",
        f"- Spearman over the {r['uncertainty_vs_raters']['n_images']} test images where every rater drew: "
        f"{r['uncertainty_vs_raters']['spearman']:.3f} (p = {r['uncertainty_vs_raters']['p']:.2g})",
        f"- PHiSeg's S_NCC: {r['table1']['ncc'][0]:.4f} ± {r['table1']['ncc'][1]:.4f}",
        "- median entropy of the sample mean by rater agreement (pixels where the raters agree / somewhat / "
        "disagree): " + " / ".join(f"{r['entropy_medians']['agreement'][g]:.3f}" for g in ("agree", "somewhat",
                                                                                              "disagree")),
        *_ablation_lines(r),
        "", f"![curves]({stem}-curves.png)", "", f"![uncertainty]({stem}-uncertainty.png)", "",
    ]  # fmt: skip
    return "\n".join(lines)


def _ablation_lines(r: dict) -> list[str]:
    """The runs that differ in one setting: their selected phase-1 model's prior on the same test patients."""
    if not r.get("ablations"):
        return []
    lines = ["", "## The prior's learning rate, at equal epochs", "",
             "Phase-1 models selected by the same rule from runs of the same protocol, split and seed; their "
             "prior on the same test patients.", "",
             "| run | prior lr | phase-1 lr | selected epoch | prior mean spread / sigma | sigma median | at a clamp | "
             "KL total | flags |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    main = {"run": r["run"], "train_config": r["train_config"], "latent": r["latent"], "prior_flags": r["prior_flags"],
            "selected_epoch": r.get("selected_phase1_epoch")}  # fmt: skip
    for label, a in {"this run": main, **r["ablations"]}.items():
        tc, lat = a["train_config"], a["latent"]
        lr_prior = tc.get("lr_prior") or tc["lr_phase1"]
        epoch = "phase 2" if a["selected_epoch"] is None else a["selected_epoch"]
        lines.append(f"| {label} (`{a['run']}`) | {lr_prior:g} | {tc['lr_phase1']:g} | {epoch} | "
                     f"{lat['mean_spread_ratio']:.3g} | {lat['prior_sigma_quantiles']['0.5']:.3g} | "
                     f"{lat['prior_sigma_clamped_share']:.1%} | {lat['kl_total']:.3g} | "
                     f"{'; '.join(a['prior_flags']) or 'none'} |")  # fmt: skip
    return lines


def figures(r: dict, out: Path) -> None:
    plt = _pyplot()
    h = [x for x in r["history"] if "partial_steps" not in x]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    p1, p2 = [x for x in h if x["phase"] == 1], [x for x in h if x["phase"] == 2]
    axes[0].plot([x["epoch"] for x in p1], [x["val_ged_unbiased"] for x in p1], label="unbiased GED (selects)")
    axes[0].plot([x["epoch"] for x in p1], [x["val_ged"] for x in p1], label="GED (dpersona)")
    axes[0].plot([x["epoch"] for x in p1], [x["val_dice_match"] for x in p1], label="Dice_match")
    axes[0].set_title("phase 1, validation")
    axes[1].plot([x["epoch"] for x in p2], [x.get("val_heads_dice_each_mean", np.nan) for x in p2],
                 label="heads Dice_mean (selects)")  # fmt: skip
    axes[1].plot([x["epoch"] for x in p2], [x.get("val_heads_dice_match", np.nan) for x in p2], label="heads matched")
    axes[1].set_title("phase 2, validation")
    for key in ("train_seg", "train_ged", "train_kl"):
        axes[2].plot([x["epoch"] for x in p1], [x.get(key, np.nan) for x in p1], label=key)
    axes[2].set_yscale("log")
    axes[2].set_title("phase 1, training losses")
    runs = {"this run": r["history"], **{k: a["history"] for k, a in r.get("ablations", {}).items()}}
    for label, hist in runs.items():
        hp = [x for x in hist if x["phase"] == 1 and "val_prior_spread" in x and "partial_steps" not in x]
        axes[3].plot([x["epoch"] for x in hp], [x["val_prior_spread"] for x in hp], label=label)
    axes[3].axhline(MIN_SPREAD_RATIO, color="grey", ls=":", lw=1)
    axes[3].set_yscale("log")
    axes[3].set_title("phase 1, prior mean spread / sigma (validation)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    _save(fig, out.parent / f"{out.name}-curves.png")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    sc = r["scatter"]
    axes[0].scatter(sc["rater_diversity"], sc["sample_diversity"], s=6, alpha=0.5)
    axes[0].set_xlabel("raters' mean pairwise 1 - IoU")
    axes[0].set_ylabel("samples' mean pairwise 1 - IoU")
    axes[0].set_title(f"per test image (all raters drew): Spearman {r['uncertainty_vs_raters']['spearman']:.2f}",
                      fontsize=9)  # fmt: skip
    med = r["entropy_medians"]["agreement"]
    axes[1].bar(list(med), list(med.values()))
    axes[1].set_ylabel("median entropy of the sample mean")
    axes[1].set_title("pixels by rater agreement", fontsize=9)
    _save(fig, out.parent / f"{out.name}-uncertainty.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/converge-f0")
    p.add_argument("--data", default="../shared/data/lidc")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/lidc-convergence-small-cpu")
    p.add_argument("--ablation", action="append", default=[], metavar="LABEL=RUN",
                   help="a run of the same protocol differing in one setting (repeatable)")  # fmt: skip
    p.add_argument("--render", action="store_true", help="only redraw the markdown and figures from the JSON")
    args = p.parse_args(argv)
    out = Path(args.out)
    r = measured_or_rendered(out, args.render, lambda: measure(args))
    figures(r, out)
    out.with_suffix(".md").write_text(markdown(r, out.name))
    print(markdown(r, out.name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
