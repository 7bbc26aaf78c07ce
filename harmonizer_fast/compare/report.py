"""The comparison's report: aggregate the per-run evaluations into one JSON and a markdown report.

Two kinds of error bar, labelled wherever they appear: **over folds** (D-Persona's convention: the mean of
each fold's test images, seeds averaged, then mean +- std of those fold means) and **over images** (each test
image's score averaged over seeds; every image belongs to one test fold). The paired tests pair those
per-image scores: the reference (the full model) against each other variant, two-sided Wilcoxon signed-rank
with the rank-biserial effect (:mod:`harmonizer_fast.stats`). A run whose selected model predicted nothing
on the validation patients, or whose test predictions are all empty, is **collapsed**: it is counted and
left out of every number of its variant; a variant whose runs all collapsed has no numbers. A run that
completed no epoch within its budget has no model to score and is counted the same way ("not scored").
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .._io import write_atomic
from ..stats import paired_test
from .variants import REFERENCE, VARIANTS

T1_COLUMNS = (("GED", "ged"), ("Dice_soft", "dice_soft"), ("Dice_max", "dice_max"), ("Dice_match", "dice_match"))
LOWER_IS_BETTER = {"ged", "ged_unbiased"}


def _collapsed(rec: dict[str, Any]) -> bool:
    """Collapsed, or not scored at all (no epoch within the budget): either way, not a result."""
    if rec.get("unscored"):
        return True
    tables = [rec["table1"]] + ([rec["table2"]] if rec["table2"] is not None else [])
    return any(r["collapsed_on_validation"] for r in rec["runs"]) or any(
        t["mean"]["empty_fraction"] == 1.0 for t in tables
    )


def _per_image(recs: list[dict[str, Any]], key: str) -> dict[int, float]:
    """Image index -> the score averaged over the seeds that scored it."""
    acc: dict[int, list[float]] = {}
    for r in recs:
        for i, v in zip(r["images"], r["per_image"][key]):
            acc.setdefault(int(i), []).append(float(v))
    return {i: float(np.mean(v)) for i, v in acc.items()}


def _over(recs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """mean +- std of one per-image key over folds and over images."""
    folds: dict[int, list[dict]] = {}
    for r in recs:
        folds.setdefault(r["fold"], []).append(r)
    fold_means = [float(np.nanmean(list(_per_image(rs, key).values()))) for _, rs in sorted(folds.items())]
    images = np.array(list(_per_image(recs, key).values()))
    return {"folds": [float(np.mean(fold_means)), float(np.std(fold_means)), len(fold_means)],
            "images": [float(np.nanmean(images)), float(np.nanstd(images)), int(images.size)]}  # fmt: skip


def _rater_keys(recs: list[dict[str, Any]]) -> list[str]:
    """Expand the per-rater Dice columns into ``t2_dice_a<i>`` keys of every record."""
    n = len(recs[0]["per_image"]["t2_dice_each"][0])
    for r in recs:
        each = np.asarray(r["per_image"]["t2_dice_each"])
        for i in range(n):
            r["per_image"][f"t2_dice_a{i + 1}"] = each[:, i].tolist()
    return [f"t2_dice_a{i + 1}" for i in range(n)]


def _ged_vs_k(recs: list[dict[str, Any]]) -> dict[str, list[float]]:
    out = {}
    for k in recs[0]["ged_vs_k"]:
        for r in recs:
            r["per_image"][f"ged_k{k}"] = r["ged_vs_k"][k]
        out[k] = _over(recs, f"ged_k{k}")["folds"][:2]
    return out


def aggregate(records: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Everything the report shows, from the per-run evaluation records."""
    names = list(dict.fromkeys(r["variant"] for r in records))
    out: dict[str, Any] = {**meta, "variants": {}, "paired_tests": {}}
    # the rater count from any scored record, so Table 2 keeps its Dice_A(i) columns when every run collapsed
    out["num_raters"] = next((len(r["per_image"]["t2_dice_each"][0]) for r in records
                              if r.get("per_image", {}).get("t2_dice_each")), 0)  # fmt: skip
    kept: dict[str, list[dict]] = {}
    for name in names:
        recs = [r for r in records if r["variant"] == name]
        good = [r for r in recs if not _collapsed(r)]
        v: dict[str, Any] = {"label": VARIANTS[name].label, "heads": recs[0]["heads"],
                             "runs": [{"fold": r["fold"], "seed": r["seed"], "collapsed": _collapsed(r),
                                       "unscored": r.get("unscored"), "trainings": r["runs"],
                                       "latent": r.get("latent"), "prior_flags": r.get("prior_flags", []),
                                       "uncertainty_vs_raters": r.get("uncertainty_vs_raters")} for r in recs],
                             "collapsed_runs": len(recs) - len(good), "total_runs": len(recs)}  # fmt: skip
        if good:
            v["table1"] = {k: _over(good, f"t1_{k}") for _, k in T1_COLUMNS}
            v["ged_vs_k"] = _ged_vs_k(good)
            if good[0]["table2"] is not None:
                raters = _rater_keys(good)
                v["table2"] = {k: _over(good, f"t2_{k}") for _, k in T1_COLUMNS}
                v["table2"].update({k[3:]: _over(good, k) for k in raters})
                v["table2"]["dice_mean"] = _over(good, "t2_dice_each_mean")
            kept[name] = good
        out["variants"][name] = v
    ref = kept.get(REFERENCE)
    for name, good in kept.items():
        if name == REFERENCE or ref is None:
            continue
        tests = {"t1_ged": _paired(ref, good, "t1_ged"), "t1_dice_match": _paired(ref, good, "t1_dice_match")}
        if ref[0]["table2"] is not None and good[0]["table2"] is not None:
            tests["t2_dice_mean"] = _paired(ref, good, "t2_dice_each_mean")
        out["paired_tests"][name] = tests
    out["orderings"] = orderings(out)
    return out


def _paired(ref: list[dict], other: list[dict], key: str) -> dict[str, Any]:
    a, b = _per_image(ref, key), _per_image(other, key)
    common = sorted(set(a) & set(b))
    return paired_test(np.array([a[i] for i in common]), np.array([b[i] for i in common]))


def orderings(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The paper's orderings at this budget: each a claim, whether the means agree, and the paired p."""
    v, tests = result["variants"], result["paired_tests"]
    out = []

    def mean(name: str, table: str, key: str) -> float:
        return v[name][table][key]["images"][0] if table in v.get(name, {}) else math.nan

    for other, label in (("dpersona", "D-Persona"), ("probunet", "Prob. U-Net")):
        if other in tests:
            a, b = mean(REFERENCE, "table1", "ged"), mean(other, "table1", "ged")
            out.append({"claim": f"Harmonizer Network < {label} in GED (Table 1)", "holds": bool(a < b),
                        "means": [a, b], "wilcoxon_p": tests[other]["t1_ged"]["wilcoxon_p"]})  # fmt: skip
    if "dpersona" in tests and "t2_dice_mean" in tests["dpersona"]:
        a, b = mean(REFERENCE, "table2", "dice_mean"), mean("dpersona", "table2", "dice_mean")
        out.append({"claim": "personalized Dice_mean above D-Persona's (Table 2)", "holds": bool(a > b),
                    "means": [a, b], "wilcoxon_p": tests["dpersona"]["t2_dice_mean"]["wilcoxon_p"]})  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------
# Markdown.


def _pm(cell: list[float]) -> str:
    return "n/a" if math.isnan(cell[0]) else f"{cell[0]:.4f} ± {cell[1]:.4f}"


def _row_label(name: str, v: dict[str, Any]) -> str:
    unscored = sum(1 for r in v["runs"] if r.get("unscored"))
    note = ""
    if v["collapsed_runs"] - unscored:
        note = f" (collapsed in {v['collapsed_runs'] - unscored} of {v['total_runs']} runs, left out)"
    if unscored:
        note += f" (not scored in {unscored} of {v['total_runs']} runs: no epoch in the budget)"
    return f"{name}{note}"


def _table(result: dict[str, Any], table: str, columns: list[tuple[str, str]], over: str) -> list[str]:
    lines = ["| variant | " + " | ".join(c for c, _ in columns) + " |", "|---|" + "---|" * len(columns)]
    for name, v in result["variants"].items():
        if table not in v:
            if table == "table1" or (v["collapsed_runs"] and v["heads"] != "none"):
                lines.append(f"| {_row_label(name, v)} | " + " | ".join("collapsed" for _ in columns) + " |")
            continue
        lines.append(f"| {_row_label(name, v)} | " + " | ".join(_pm(v[table][k][over]) for _, k in columns) + " |")
    return lines


def _t2_columns(result: dict[str, Any]) -> list[tuple[str, str]]:
    n = max((sum(1 for k in v.get("table2", {}) if k.startswith("dice_a")) for v in result["variants"].values()),
            default=0)  # fmt: skip
    n = max(n, result.get("num_raters", 0))
    return [*T1_COLUMNS, *[(f"Dice_A{i + 1}", f"dice_a{i + 1}") for i in range(n)], ("Dice_mean", "dice_mean")]


def _tests_lines(result: dict[str, Any]) -> list[str]:
    lines = ["| full model vs | score | images | mean difference (full - other) | better / worse | rank-biserial | "
             "Wilcoxon p |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, tests in result["paired_tests"].items():
        for key, t in tests.items():
            what = {"t1_ged": "GED (T1, lower is better)", "t1_dice_match": "Dice_match (T1)",
                    "t2_dice_mean": "Dice_mean (T2)"}[key]  # fmt: skip
            lines.append(f"| {name} | {what} | {t['n_images']} | {t['mean_difference']:+.4f} | "
                         f"{t['images_better']} / {t['images_worse']} | {t['rank_biserial']:+.3f} | "
                         f"{t['wilcoxon_p']:.2g} |")  # fmt: skip
    return lines


def _runs_lines(result: dict[str, Any]) -> list[str]:
    lines = ["| run | phase | fold | seed | epochs in budget | selected epoch | budget minutes (wall) | stopped | "
             "collapsed |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    seen = set()
    for v in result["variants"].values():
        for r in v["runs"]:
            for t in r["trainings"]:
                if t["run"] in seen:
                    continue
                seen.add(t["run"])
                lines.append(f"| {t['run']} | {t['phase']} | {r['fold']} | {r['seed']} | {t['epochs']} | "
                             f"{t['best_epoch']} | {t['minutes']:.1f} ({t['wall_minutes']:.1f}) | {t['stopped']} | "
                             f"{'yes (validation all empty)' if t['collapsed_on_validation'] else 'no'} |")  # fmt: skip
    return lines


def _latent_lines(result: dict[str, Any]) -> list[str]:
    lines = ["| variant | fold | seed | spread | sigma median | sigma at clamp | KL (nats) | Spearman | prior flags |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, v in result["variants"].items():
        for r in v["runs"]:
            lat, uv = r.get("latent"), r.get("uncertainty_vs_raters") or {}
            if lat is None:
                continue
            lines.append(f"| {name} | {r['fold']} | {r['seed']} | {lat['mean_spread_ratio']:.3g} | "
                         f"{lat['prior_sigma_quantiles']['0.5']:.3g} | {lat['prior_sigma_clamped_share']:.0%} | "
                         f"{lat['kl_total']:.3g} | {uv.get('spearman', math.nan):.3f} | "
                         f"{'; '.join(r['prior_flags']) or 'none'} |")  # fmt: skip
    return lines


def markdown(result: dict[str, Any]) -> str:
    m, c = result["machine"], result["compare"]
    lines = [
        f"# Comparison at equal budget: {result['data']}",
        "",
        f"`{result['command']}` on {m['date']}: {m['cpu']} ({m['cpu_cores']} cores), torch {m['torch']}. "
        f"Config {c['preset']}; folds {c['folds']} of {c['num_folds']} (patient-level), seeds {c['seeds']}; "
        f"every phase-1 training {c['minutes1']:g} min, every phase-2 training {c['minutes2']:g} min of compute "
        f"(the process's CPU time over its {m['torch_threads']} threads; epoch caps {c['epochs1']} and "
        f"{c['epochs2']}; the runs table gives each run's minutes at its last complete epoch and its wall clock); "
        f"K = {c['samples']} prior samples; raters in the '{c['rater_order']}' order; GED in the dpersona "
        "convention.",
        "",
        "Variants:",
        *[f"- **{n}**: {v['label']}" for n, v in result["variants"].items()],
        "",
    ]
    for over, what in (("folds", "mean ± std over folds (each fold: the mean of its test images, seeds "
                                  "averaged; D-Persona's convention)"),
                       ("images", "mean ± std over test images (each image averaged over seeds)")):  # fmt: skip
        lines += [f"## Table 1 (K prior samples), {what}", "", *_table(result, "table1", list(T1_COLUMNS), over), ""]
        lines += [f"## Table 2 (the R rater heads; Dice_A(i) head i against rater i), {what}", "",
                  *_table(result, "table2", _t2_columns(result), over), ""]  # fmt: skip
    lines += ["Variants without a row in Table 2 have no heads (Prob. U-Net, the phase-1 ablations).", "",
              "## Paired tests over test images", "", *_tests_lines(result), "",
              "Rank-biserial: +1 when the full model scores higher on every image (for GED, higher is worse).", "",
              "## The paper's orderings at this budget", ""]  # fmt: skip
    for o in result["orderings"]:
        verdict = "holds" if o["holds"] else "does not hold"
        lines.append(f"- {o['claim']}: **{verdict}** ({o['means'][0]:.4f} against {o['means'][1]:.4f}, "
                     f"paired p = {o['wilcoxon_p']:.2g})")  # fmt: skip
    if "dpersona" in result["variants"] and "probunet" in result["variants"]:
        lines.append("- D-Persona < Prob. U-Net in GED: not tested. D-Persona's Table 1 here is its backbone, the "
                     "Prob. U-Net run itself (the comparison's 'same backbone'); D-Persona's own stage 1 adds a "
                     "bound loss that is not reproduced.")  # fmt: skip
    lines += ["", "## Runs (equal budget)", "", *_runs_lines(result), ""]
    lines += ["## The latent space of each scored run (test patients)", "", *_latent_lines(result), "",
              "Spread: the prior mean's std across images over its mean sigma (below 0.1: image-independent). "
              "Spearman: the samples' mean pairwise 1 - IoU against the raters', over images where every rater "
              "drew (does the spread follow the raters?).", ""]  # fmt: skip
    if result.get("figure"):
        lines += [f"![GED against K]({result['figure']})", "",
                  "GED against K (appendix B): mean over test images, bars the std over folds.", ""]  # fmt: skip
    return "\n".join(lines)


def ged_vs_k_figure(path: Path, result: dict[str, Any]) -> str:
    from ..figures import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, v in result["variants"].items():
        if "ged_vs_k" not in v or name == "no-personalizer":  # its samples are the full model's
            continue
        ks = sorted(v["ged_vs_k"], key=int)
        ax.errorbar([int(k) for k in ks], [v["ged_vs_k"][k][0] for k in ks], [v["ged_vs_k"][k][1] for k in ks],
                    marker="o", capsize=2, label=name)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prior samples K")
    ax.set_ylabel("GED (bars: std over folds)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def write_report(records: list[dict[str, Any]], meta: dict[str, Any], out: Path, stem: str = "compare") -> dict:
    """``<stem>.json``, ``<stem>.md`` and ``<stem>-ged-vs-k.png`` in ``out``; returns the result."""
    result = aggregate(records, meta)
    fig = out / f"{stem}-ged-vs-k.png"
    result["figure"] = Path(ged_vs_k_figure(fig, result)).name if any(
        "ged_vs_k" in v for v in result["variants"].values()) else None
    write_atomic(out / f"{stem}.json", json.dumps(result, indent=1, default=float) + "\n")
    write_atomic(out / f"{stem}.md", markdown(result))
    return result
