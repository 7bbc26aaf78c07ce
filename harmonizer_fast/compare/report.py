"""The comparison's report: aggregate the per-run evaluations into one JSON and a markdown report.

Error bars, labelled wherever they appear: **over folds** (D-Persona's convention: the mean of each fold's
test images, seeds averaged, then mean +- std of those fold means) and **over patients** (each test image's
score averaged over seeds, then each patient's images averaged; every patient belongs to one test fold). The
paired tests pair **patients** (slices of one patient are not independent): the reference (the full model)
against each other variant, two-sided Wilcoxon signed-rank with the rank-biserial effect
(:mod:`harmonizer_fast.stats`), over all folds' patients and per fold. Variants that share a phase-1 training
(``no-personalizer`` the full model's, ``dpersona`` the Prob. U-Net's) draw the same prior samples: their
Table 1 row is printed once, and the sharing said. A run whose selected model predicted nothing on the
validation patients, or whose test predictions are all empty, is **collapsed**: it is counted and left out
of every number of its variant; a variant whose runs all collapsed has no numbers. A run that completed no
epoch within its budget has no model to score and is counted the same way ("not scored"). The label-only
references (:mod:`harmonizer_fast.references`) of the same test images stand beside both tables.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .._io import write_atomic
from ..stats import holm, paired_test, per_patient
from .variants import REFERENCE, VARIANTS, table1_rows

T1_COLUMNS = (("GED", "ged"), ("Dice_soft", "dice_soft"), ("Dice_max", "dice_max"), ("Dice_match", "dice_match"),
              ("S_NCC", "ncc"))  # fmt: skip
# the paired tests: per table, (record key, what the report calls it, lower is better)
T1_TESTS = (("t1_ged", "GED (T1)", True), ("t1_dice_match", "Dice_match (T1)", False))
T2_TESTS = (("t2_dice_each_mean", "Dice_mean diagonal (T2)", False),
            ("t2_dice_match", "Dice_mean matched (T2)", False), ("t2_ged", "GED of the heads (T2)", True),
            ("t2_head_identity", "head identity (T2)", False))  # fmt: skip
LOWER_IS_BETTER = {"ged", "ged_unbiased"}
ALPHA = 0.05  # an ordering holds when the patients' mean difference goes its way with paired p below this


def _collapsed(rec: dict[str, Any]) -> bool:
    """Collapsed, or not scored at all (no epoch within the budget): either way, not a result."""
    if rec.get("unscored"):
        return True
    tables = [t for t in (rec["table1"], rec["table2"]) if t is not None]
    return any(r["collapsed_on_validation"] for r in rec["runs"]) or any(
        t["mean"]["empty_fraction"] == 1.0 for t in tables
    )


def _per_image(recs: list[dict[str, Any]], key: str) -> dict[int, float]:
    """Image index -> the score averaged over the seeds that scored it."""
    acc: dict[int, list[float]] = {}
    for r in recs:
        for i, v in zip(r["images"], r["per_image"][key]):
            acc.setdefault(int(i), []).append(float(v))
    return {i: float(np.nanmean(v)) if not np.all(np.isnan(v)) else math.nan for i, v in acc.items()}


def _patient_of(recs: list[dict[str, Any]]) -> dict[int, str]:
    """Image index -> its patient (records written before patients were kept: each image its own)."""
    out: dict[int, str] = {}
    for r in recs:
        out.update(zip((int(i) for i in r["images"]), r.get("patients") or (f"image {i}" for i in r["images"])))
    return out


def _per_patient(recs: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Patient -> the mean over its images (each averaged over seeds; :func:`~harmonizer_fast.stats.per_patient`),
    a patient whose images are all NaN left out."""
    patient = _patient_of(recs)
    images = _per_image(recs, key)
    ids, means = per_patient(np.array(list(images.values())), np.array([patient[i] for i in images]))
    return {str(p): float(m) for p, m in zip(ids, means) if not math.isnan(m)}


def _grouped(recs: list[dict[str, Any]], key: str) -> dict[int, list[dict[str, Any]]]:
    """The records grouped by ``key`` ("fold" or "seed"), in its order."""
    groups: dict[int, list[dict]] = {}
    for r in recs:
        groups.setdefault(r[key], []).append(r)
    return dict(sorted(groups.items()))


def _over(recs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """mean +- std (and count) of one per-image key over folds, over patients and over images."""
    fold_means = [float(np.nanmean(list(_per_image(rs, key).values()))) for rs in _grouped(recs, "fold").values()]
    patients = np.array(list(_per_patient(recs, key).values()))
    images = np.array(list(_per_image(recs, key).values()))
    return {"folds": [float(np.mean(fold_means)), float(np.std(fold_means)), len(fold_means)],
            "patients": [float(np.mean(patients)), float(np.std(patients)), int(patients.size)],
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


def _kept(recs: list[dict[str, Any]], key: str) -> bool:
    """Whether every record has the per-image ``key`` (records written before a column was added lack it)."""
    return all(key in r["per_image"] for r in recs)


def aggregate(records: list[dict[str, Any]], meta: dict[str, Any], references: Optional[list[dict[str, Any]]] = None,
              robust: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:  # fmt: skip
    """Everything the report shows, from the per-run evaluation records, each fold's label-only references
    and the Table 1 scores on degraded images (``compare/runner`` writes all three)."""
    names = list(dict.fromkeys(r["variant"] for r in records))
    out: dict[str, Any] = {**meta, "variants": {}, "paired_tests": {}}
    # the rater count from any scored record, so Table 2 keeps its Dice_A(i) columns when every run collapsed
    out["num_raters"] = next((len(r["per_image"]["t2_dice_each"][0]) for r in records
                              if r.get("per_image", {}).get("t2_dice_each")), 0)  # fmt: skip
    kept: dict[str, list[dict]] = {}
    rows = table1_rows(names)
    for name in names:
        recs = [r for r in records if r["variant"] == name]
        good = [r for r in recs if not _collapsed(r)]
        shares = rows[name]
        v: dict[str, Any] = {"label": VARIANTS[name].label, "heads": recs[0]["heads"],
                             "shares_phase1_with": None if shares == name else shares,
                             "runs": [{"fold": r["fold"], "seed": r["seed"], "collapsed": _collapsed(r),
                                       "unscored": r.get("unscored"), "trainings": r["runs"],
                                       "latent": r.get("latent"), "prior_flags": r.get("prior_flags", []),
                                       "uncertainty_vs_raters": r.get("uncertainty_vs_raters")} for r in recs],
                             "collapsed_runs": len(recs) - len(good), "total_runs": len(recs)}  # fmt: skip
        if good:
            if good[0]["table1"] is not None and shares == name:  # a shared phase 1 draws the same samples
                v["table1"] = {k: _over(good, f"t1_{k}") for _, k in T1_COLUMNS if _kept(good, f"t1_{k}")}
                v["ged_vs_k"] = _ged_vs_k(good)
                seeds = _grouped(good, "seed")
                if len(seeds) > 1:  # each draw of the training on its own, so the seeds' spread is in view
                    v["table1_seeds"] = {str(s): {k: _over(rs, f"t1_{k}")["patients"] for _, k in T1_COLUMNS
                                                  if _kept(rs, f"t1_{k}")} for s, rs in seeds.items()}  # fmt: skip
            if good[0]["table2"] is not None:
                raters = _rater_keys(good)
                v["table2"] = {k: _over(good, f"t2_{k}") for _, k in T1_COLUMNS if _kept(good, f"t2_{k}")}
                v["table2"].update({k[3:]: _over(good, k) for k in raters})
                v["table2"]["dice_mean"] = _over(good, "t2_dice_each_mean")
                if "t2_head_identity" in good[0]["per_image"]:
                    v["table2"]["head_identity"] = _over(good, "t2_head_identity")
            kept[name] = good
        out["variants"][name] = v
    ref = kept.get(REFERENCE)
    for name, good in kept.items():
        if name == REFERENCE or ref is None:
            continue
        v = out["variants"][name]
        tests = {}
        if "table1" in v:
            tests.update({key: _paired(ref, good, key, lower) for key, _, lower in T1_TESTS})
        if "table2" in v and ref[0]["table2"] is not None:
            tests.update({key: _paired(ref, good, key, lower) for key, _, lower in T2_TESTS
                          if key in good[0]["per_image"] and key in ref[0]["per_image"]})  # fmt: skip
        out["paired_tests"][name] = tests
    out["references"] = pool_references(references or [])
    out["orderings"] = orderings(out)
    if robust:
        out["robustness"] = _robustness(out, kept, robust)
    return out


# the orderings the degraded images test: the harmonizer's stated purpose is to suppress acquisition noise
ROBUST_CLAIMS = (("no-harmonizer", "the harmonizer lowers GED (full < no harmonizer)"),
                 ("unshared-harmonizer", "sharing the harmonizer across layers lowers GED (full < unshared)"))


def _robustness(out: dict[str, Any], kept: dict[str, list[dict]], robust: list[dict[str, Any]]) -> dict[str, Any]:
    """Table 1's GED and Dice_match per degradation for each Table 1 row, the full model against the others
    over patients per degradation, and the harmonizer's orderings under each. The degraded scores join the
    clean records of the same run (collapsed runs stay out)."""
    by_run = {(r["variant"], r["fold"], r["seed"]): r for r in robust if not r.get("unscored")}
    conditions = list(dict.fromkeys(c for r in by_run.values() for c in r["conditions"]))
    res: dict[str, Any] = {"conditions": conditions, "variants": {}, "paired_tests": {}, "orderings": []}
    rows: dict[str, list[dict]] = {}
    for name, good in kept.items():
        if "table1" not in out["variants"][name]:
            continue
        mine = [(rec, by_run.get((name, rec["fold"], rec["seed"]))) for rec in good]
        if not mine or any(r is None for _, r in mine):
            continue  # a run without its degraded scores: the variant has no robustness row
        for rec, r in mine:
            if list(map(int, r["images"])) != list(map(int, rec["images"])):
                raise ValueError(f"robustness of {name} fold {rec['fold']}: other test images than its Table 1's")
            for c, keys in r["conditions"].items():
                rec["per_image"].update({f"{k}@{c}": v for k, v in keys.items()})
        rows[name] = [rec for rec, _ in mine]
        res["variants"][name] = {c: {k: _over(rows[name], f"t1_{k}@{c}") for k in ("ged", "dice_match")}
                                 for c in conditions}  # fmt: skip
    ref = rows.get(REFERENCE)
    for name, recs in rows.items():
        if name == REFERENCE or ref is None:
            continue
        res["paired_tests"][name] = {c: {key: _paired(ref, recs, f"{key}@{c}", lower) for key, _, lower in T1_TESTS}
                                     for c in conditions}  # fmt: skip
    for other, claim in ROBUST_CLAIMS:  # one family per claim: its conditions' p-values adjusted together
        tested = [(c, res["paired_tests"][other][c]["t1_ged"]) for c in conditions if other in res["paired_tests"]]
        adjusted = holm([t["wilcoxon_p"] for _, t in tested]) if tested else []
        res["orderings"] += [_verdict(t, f"under {c}, {claim}", holm_p=a, family=len(tested))
                             for (c, t), a in zip(tested, adjusted)]  # fmt: skip
    return res


def _paired(ref: list[dict], other: list[dict], key: str, lower: bool) -> dict[str, Any]:
    """The full model against another variant over their common patients, and per fold: the mean difference
    is full - other; 'better' counts the patients where the full model is better (for GED: lower)."""

    def test(a_recs: list[dict], b_recs: list[dict]) -> dict[str, Any]:
        a, b = _per_patient(a_recs, key), _per_patient(b_recs, key)
        common = sorted(set(a) & set(b))
        t = paired_test(np.array([a[p] for p in common]), np.array([b[p] for p in common]))
        if lower:
            t["images_better"], t["images_worse"] = t["images_worse"], t["images_better"]
        t["patients_better"], t["patients_worse"] = t.pop("images_better"), t.pop("images_worse")
        t["n_patients"] = t.pop("n_images")
        return t

    def per(key: str) -> list[dict[str, Any]]:  # the test within each fold (key "fold") or seed ("seed")
        theirs = _grouped(other, key)
        return [{key: g, **{k: t[k] for k in ("n_patients", "mean_difference", "wilcoxon_p")}}
                for g, rs in _grouped(ref, key).items() if g in theirs for t in [test(rs, theirs[g])]]  # fmt: skip

    out = test(ref, other)
    out["folds"] = per("fold")
    out["folds_better"] = sum((f["mean_difference"] < 0) == lower for f in out["folds"] if f["mean_difference"] != 0)
    seeds = per("seed")
    if len(seeds) > 1:  # each seed's draw on its own, over every fold's patients: does the ordering repeat?
        out["seeds"] = seeds
    out["lower_is_better"] = lower
    return out


def pool_references(folds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each label-only reference's Tables 1 and 2 over all folds' test images: the mean of the fold means
    (``folds``) and the mean over every image (``images``: fold means weighted by their images)."""
    if not folds:
        return {}
    weights = np.array([len(f["images"]) for f in folds], dtype=float)
    out: dict[str, Any] = {}
    for name in folds[0]["references"]:
        entry: dict[str, Any] = {}
        for table in ("table1", "table2"):
            keys = folds[0]["references"][name][table]
            entry[table] = {k: {"folds": float(np.mean([f["references"][name][table][k] for f in folds])),
                                "images": float(np.average([f["references"][name][table][k] for f in folds],
                                                           weights=weights))} for k in keys}  # fmt: skip
        each = np.array([f["references"][name]["dice_each"] for f in folds], dtype=float)
        entry["dice_each"] = {"folds": each.mean(0).tolist(), "images": np.average(each, 0, weights).tolist()}
        out[name] = entry
    return out


def orderings(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The paper's orderings (and the per-rater baseline's) at this protocol: each a claim, its verdict
    ("holds": the patients' mean difference goes the claimed way with paired p < :data:`ALPHA`; "reversed":
    the other way with p < :data:`ALPHA`; "not shown": p above it, either way), the paired p over patients and
    the folds where it fails."""
    tests = result["paired_tests"]
    claims = (("probunet", "t1_ged", "Harmonizer Network < Prob. U-Net in GED (Table 1)"),
              ("probunet", "t1_dice_match", "Harmonizer Network > Prob. U-Net in Dice_match (Table 1)"),
              ("dpersona", "t2_dice_each_mean", "personalized heads > D-Persona's in Dice_mean (Table 2)"),
              ("dpersona", "t2_dice_match", "personalized heads > D-Persona's in matched Dice_mean (Table 2)"),
              ("no-personalizer", "t2_dice_each_mean", "personalized heads > identity heads in Dice_mean (Table 2)"),
              ("per-rater", "t2_dice_each_mean", "personalized heads > the per-rater baseline in Dice_mean (Table 2)"),
              ("per-rater", "t2_ged", "personalized heads < the per-rater baseline in GED of the heads (Table 2)"),
              ("no-ged-loss", "t1_ged", "the GED loss lowers GED (appendix B: full < no GED loss, Table 1)"),
              ("no-harmonizer", "t1_ged", "the harmonizer lowers GED (full < no harmonizer, Table 1)"),
              ("unshared-harmonizer", "t1_ged",
               "sharing the harmonizer across layers lowers GED (full < unshared harmonizer, Table 1)"))
    return [_verdict(tests[other][key], claim) for other, key, claim in claims if key in tests.get(other, {})]


def _verdict(t: dict[str, Any], claim: str, holm_p: Optional[float] = None, family: int = 1) -> dict[str, Any]:
    """A claim that the full model is better, judged by its paired test ``t`` (:func:`_paired`), or by
    ``holm_p``, its p adjusted over a ``family`` of conditions (:func:`~harmonizer_fast.stats.holm`)."""
    good_way = (t["mean_difference"] < 0) == t["lower_is_better"] and t["mean_difference"] != 0

    def failing(key: str) -> list[int]:  # the folds (key "fold") or seeds ("seed") that go the other way
        return [g[key] for g in t.get(f"{key}s", []) if (g["mean_difference"] < 0) != t["lower_is_better"]
                or g["mean_difference"] == 0]  # fmt: skip

    p = t["wilcoxon_p"] if holm_p is None else holm_p
    verdict = "not shown" if p >= ALPHA else "holds" if good_way else "reversed"
    out = {"claim": claim, "holds": bool(good_way and p < ALPHA), "verdict": verdict,
           "mean_difference": t["mean_difference"], "patients": [t["patients_better"], t["patients_worse"]],
           "wilcoxon_p": t["wilcoxon_p"], "folds_failing": failing("fold")}  # fmt: skip
    if "seeds" in t:
        out["seeds_failing"] = failing("seed")
    if holm_p is not None:
        out.update(holm_p=holm_p, family=family)
    return out


# ---------------------------------------------------------------------------------------------------------
# Markdown.


def _pm(cell: list[float]) -> str:
    return "n/a" if math.isnan(cell[0]) else f"{cell[0]:.4f} ± {cell[1]:.4f}"


def _row_label(name: str, v: dict[str, Any], table: str, sharers: dict[str, list[str]]) -> str:
    unscored = sum(1 for r in v["runs"] if r.get("unscored"))
    note = ""
    if table == "table1" and sharers.get(name):
        note = f" (its phase 1 is also {', '.join(sharers[name])}'s: the same samples)"
    if v["collapsed_runs"] - unscored:
        note += f" (collapsed in {v['collapsed_runs'] - unscored} of {v['total_runs']} runs, left out)"
    if unscored:
        note += f" (not scored in {unscored} of {v['total_runs']} runs: no epoch in the budget)"
    return f"{name}{note}"


def _sharers(result: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, v in result["variants"].items():
        if v.get("shares_phase1_with"):
            out.setdefault(v["shares_phase1_with"], []).append(name)
    return out


def _reference_cell(ref: dict[str, Any], table: str, key: str, over: str) -> Optional[str]:
    """A label-only reference's value in a table column: its mean of fold means in the table over folds, its
    mean over images in the table over patients (it has no per-patient scores)."""
    if key.startswith("dice_a"):
        each = ref["dice_each"]["images" if over != "folds" else "folds"]
        i = int(key[6:]) - 1
        return f"{each[i]:.4f}" if i < len(each) else "n/a"
    name = {"dice_mean": "dice_each_mean"}.get(key, key)
    cell = ref[table].get(name)
    return None if cell is None else f"{cell['images' if over != 'folds' else 'folds']:.4f}"


def _table(result: dict[str, Any], table: str, columns: list[tuple[str, str]], over: str) -> list[str]:
    lines = ["| variant | " + " | ".join(c for c, _ in columns) + " |", "|---|" + "---|" * len(columns)]
    sharers = _sharers(result)
    for name, v in result["variants"].items():
        if table not in v:
            shared = table == "table1" and v.get("shares_phase1_with")
            no_prior = table == "table1" and v["heads"] == "per-rater"
            if not shared and not no_prior and (table == "table1" or (v["collapsed_runs"] and v["heads"] != "none")):
                lines.append(f"| {_row_label(name, v, table, sharers)} | " + " | ".join("collapsed" for _ in columns)
                             + " |")  # fmt: skip
            continue
        cells = [_pm(v[table][k][over]) if k in v[table] else "n/a" for _, k in columns]
        lines.append(f"| {_row_label(name, v, table, sharers)} | " + " | ".join(cells) + " |")
    for name, ref in result.get("references", {}).items():
        cells = [_reference_cell(ref, table, k, over) for _, k in columns]
        lines.append(f"| label-only: {name} | " + " | ".join(c if c is not None else "" for c in cells) + " |")
    return lines


def _seeds_lines(result: dict[str, Any]) -> list[str]:
    """Table 1 per training seed (each seed's images over every fold, then each patient's mean) and, per
    variant, the mean +- std of its seed means: how far one draw of the training moves the scores."""
    lines = ["| variant | seed | " + " | ".join(c for c, _ in T1_COLUMNS) + " |",
             "|---|---|" + "---|" * len(T1_COLUMNS)]  # fmt: skip
    for name, v in result["variants"].items():
        seeds = v.get("table1_seeds")
        if not seeds:
            continue
        for s, cols in seeds.items():
            lines.append(f"| {name} | {s} | " + " | ".join(_pm(cols[k]) if k in cols else "n/a" for _, k in T1_COLUMNS)
                         + " |")  # fmt: skip
        spread = []
        for _, k in T1_COLUMNS:
            means = [cols[k][0] for cols in seeds.values() if k in cols]
            spread.append(_pm([float(np.mean(means)), float(np.std(means))]) if len(means) == len(seeds) else "n/a")
        lines.append(f"| {name} | mean ± std of the {len(seeds)} seeds | " + " | ".join(spread) + " |")
    return lines


def _t2_columns(result: dict[str, Any]) -> list[tuple[str, str]]:
    n = max((sum(1 for k in v.get("table2", {}) if k.startswith("dice_a")) for v in result["variants"].values()),
            default=0)  # fmt: skip
    n = max(n, result.get("num_raters", 0))
    return [("GED", "ged"), ("Dice_soft", "dice_soft"), ("Dice_max", "dice_max"), ("S_NCC", "ncc"),
            ("Dice_mean matched", "dice_match"), *[(f"Dice_A{i + 1}", f"dice_a{i + 1}") for i in range(n)],
            ("Dice_mean diagonal", "dice_mean"), ("head identity", "head_identity")]  # fmt: skip


def _tests_lines(result: dict[str, Any]) -> list[str]:
    what = {key: label for key, label, _ in (*T1_TESTS, *T2_TESTS)}
    seeds = any("seeds" in t for tests in result["paired_tests"].values() for t in tests.values())
    per_seed = " per seed: difference (p) |" if seeds else ""
    lines = ["| full model vs | score | patients | mean difference (full - other) | patients better / worse | "
             "rank-biserial | Wilcoxon p | per fold: difference (p) |" + per_seed, "|---" * (8 + seeds) + "|"]

    def cells(t: dict[str, Any], key: str) -> str:  # "f0 -0.0140 (0.23); ..." for key "fold", "s0 ..." for "seed"
        return "; ".join(f"{key[0]}{g[key]} {g['mean_difference']:+.4f} ({g['wilcoxon_p']:.2g})"
                         for g in t.get(f"{key}s", []))  # fmt: skip

    for name, tests in result["paired_tests"].items():
        for key, t in tests.items():
            lines.append(f"| {name} | {what[key]} | {t['n_patients']} | {t['mean_difference']:+.4f} | "
                         f"{t['patients_better']} / {t['patients_worse']} | {t['rank_biserial']:+.3f} | "
                         f"{t['wilcoxon_p']:.2g} | {cells(t, 'fold')} |"
                         + (f" {cells(t, 'seed')} |" if seeds else ""))  # fmt: skip
    return lines


def _runs_lines(result: dict[str, Any], budgeted: bool) -> list[str]:
    epochs = "epochs in budget" if budgeted else "epochs"
    lines = [f"| run | phase | fold | seed | {epochs} | selected epoch | minutes (wall) | stopped | trained by | "
             "collapsed |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    seen = set()
    for v in result["variants"].values():
        for r in v["runs"]:
            for t in r["trainings"]:
                if t["run"] in seen:
                    continue
                seen.add(t["run"])
                by = f"`{t['reused_from']}` (reused)" if t.get("reused_from") else "compare"
                collapsed = "yes (validation all empty)" if t["collapsed_on_validation"] else "no"
                lines.append(f"| {t['run']} | {t['phase']} | {r['fold']} | {r['seed']} | {t['epochs']} | "
                             f"{t['best_epoch']} | {t['minutes']:.1f} ({t['wall_minutes']:.1f}) | {t['stopped']} | "
                             f"{by} | {collapsed} |")  # fmt: skip
    return lines


def _latent_lines(result: dict[str, Any]) -> list[str]:
    lines = ["| variant | fold | seed | spread | sigma median | sigma at clamp | KL (nats) | Spearman | prior flags |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, v in result["variants"].items():
        if v.get("shares_phase1_with"):  # the same prior as the row it shares with
            continue
        for r in v["runs"]:
            lat, uv = r.get("latent"), r.get("uncertainty_vs_raters") or {}
            if lat is None:
                continue
            lines.append(f"| {name} | {r['fold']} | {r['seed']} | {lat['mean_spread_ratio']:.3g} | "
                         f"{lat['prior_sigma_quantiles']['0.5']:.3g} | {lat['prior_sigma_clamped_share']:.0%} | "
                         f"{lat['kl_total']:.3g} | {uv.get('spearman', math.nan):.3f} | "
                         f"{'; '.join(r['prior_flags']) or 'none'} |")  # fmt: skip
    return lines


def _protocol(result: dict[str, Any]) -> str:
    m, c = result["machine"], result["compare"]
    budgeted = c.get("minutes1") is not None or c.get("minutes2") is not None
    if budgeted:
        training = (f"every phase-1 training {c['minutes1'] or 'its epochs'}, every phase-2 training "
                    f"{c['minutes2'] or 'its epochs'} min of compute (the process's CPU time over its "
                    f"{m['torch_threads']} threads; epoch caps {c['epochs1']} and {c['epochs2']})")  # fmt: skip
    else:
        training = (f"equal epochs: every phase-1 training and the per-rater baseline {c['epochs1']}, every "
                    f"phase-2 training {c['epochs2']} (the cosine schedule over those epochs); the runs table "
                    "gives each run's minutes")  # fmt: skip
    rates = f"; D-Persona's heads at their own learning rate {c['dpersona_lr2']:g}" if "dpersona_lr2" in c else ""
    only = (f"; only the images where at least {c['min_raters']} raters drew (training and test)"
            if c.get("min_raters") else "")  # fmt: skip
    return (f"`{result['command']}` on {m['date']}: {m['cpu']} ({m['cpu_cores']} cores), torch {m['torch']}. "
            f"Config {c['preset']}; folds {c['folds']} of {c['num_folds']} (patient-level), seeds {c['seeds']}; "
            f"{training}{rates}{only}; K = {c['samples']} prior samples; raters in the '{c['rater_order']}' order; "
            "GED in the dpersona convention.")  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    c = result["compare"]
    budgeted = c.get("minutes1") is not None or c.get("minutes2") is not None
    lines = [f"# Comparison at equal {'budget' if budgeted else 'epochs'}: {result['data']}", "", _protocol(result),
             "", "Variants:", *[f"- **{n}**: {v['label']}" for n, v in result["variants"].items()], ""]  # fmt: skip
    if result.get("references"):
        lines += ["Label-only rows: predictors that never look at the image, on the same test images "
                  "(`harmonizer_fast.references`; their means are over images, by fold or pooled).", ""]  # fmt: skip
    for over, what in (("folds", "mean ± std over folds (each fold: the mean of its test images, seeds "
                                  "averaged; D-Persona's convention)"),
                       ("patients", "mean ± std over test patients (each patient: the mean of its images, seeds "
                                    "averaged)")):  # fmt: skip
        lines += [f"## Table 1 (K prior samples), {what}", "", *_table(result, "table1", list(T1_COLUMNS), over), ""]
        lines += [f"## Table 2 (the R rater heads; Dice_A(i) head i against rater i), {what}", "",
                  *_table(result, "table2", _t2_columns(result), over), ""]  # fmt: skip
    lines += ["Variants without a Table 2 row have no heads (Prob. U-Net, the phase-1 ablations); the per-rater "
              "baseline has no prior, so no Table 1 row. Dice_mean diagonal scores head i against rater i (the "
              "paper's text); matched pairs heads and raters by the Hungarian assignment (D-Persona's code). Head "
              "identity: the share of head-image pairs where head i overlaps rater i best.", "",
              *(["## Table 1 per training seed, mean ± std over test patients (each seed's own scores, every "
                 "fold's patients)", "", *_seeds_lines(result), ""]
                if any(v.get("table1_seeds") for v in result["variants"].values()) else []),
              "## Paired tests over patients", "", *_tests_lines(result), "",
              "Each patient's images averaged first; 'better' counts the patients where the full model is better "
              "(lower GED, higher Dice and head identity); rank-biserial +1 when the full model scores higher on "
              "every patient (for GED, higher is worse); two-sided Wilcoxon signed-rank.", "",
              "## The paper's orderings", ""]  # fmt: skip
    lines += [_ordering_line(o) for o in result["orderings"]]
    if "dpersona" in result["variants"] and "probunet" in result["variants"]:
        lines.append("- D-Persona < Prob. U-Net in GED: not tested. D-Persona's Table 1 here is its backbone, the "
                     "Prob. U-Net run itself (the comparison's 'same backbone'); D-Persona's own stage 1 adds a "
                     "bound loss that is not reproduced.")  # fmt: skip
    if result.get("robustness"):
        lines += ["", *_robustness_lines(result)]
    lines += ["", f"## Runs (equal {'budget' if budgeted else 'epochs'})", "", *_runs_lines(result, budgeted), ""]
    lines += ["## The latent space of each scored run (test patients)", "", *_latent_lines(result), "",
              "Spread: the prior mean's std across images over its mean sigma (below 0.1: image-independent). "
              "Spearman: the samples' mean pairwise 1 - IoU against the raters', over images where every rater "
              "drew (does the spread follow the raters?).", ""]  # fmt: skip
    if result.get("figure"):
        lines += [f"![GED against K]({result['figure']})", "",
                  "GED against K (appendix B): mean over test images, bars the std over folds.", ""]  # fmt: skip
    return "\n".join(lines)


def _ordering_line(o: dict[str, Any]) -> str:
    verdict = {"holds": "holds", "not shown": "not shown (p >= 0.05)",
               "reversed": "reversed"}[o.get("verdict", "holds" if o["holds"] else "reversed")]  # fmt: skip
    fails = f"; fails in fold {', '.join(map(str, o['folds_failing']))}" if o["folds_failing"] else "; every fold"
    if "seeds_failing" in o:
        fails += f", fails in seed {', '.join(map(str, o['seeds_failing']))}" if o["seeds_failing"] else ", every seed"
    holm_p = f", Holm over its {o['family']} conditions {o['holm_p']:.2g}" if "holm_p" in o else ""
    return (f"- {o['claim']}: **{verdict}** (difference {o['mean_difference']:+.4f}, patients "
            f"{o['patients'][0]} / {o['patients'][1]}, paired p = {o['wilcoxon_p']:.2g}{holm_p}{fails})")


def _robustness_lines(result: dict[str, Any]) -> list[str]:
    rob = result["robustness"]
    conds = rob["conditions"]
    lines = ["## Table 1 on degraded test images (robustness), mean ± std over test patients", "",
             "The same test images with Gaussian noise (sigma, on intensities in [0, 1], seeded per image), Gaussian "
             "blur (sigma in pixels) or a gamma curve: the strongest level of each of evaluate's Table 5 and its "
             "mildest noise; the same K prior samples per image. Clean: Table 1.", ""]  # fmt: skip
    for key, label in (("ged", "GED"), ("dice_match", "Dice_match")):
        lines += [f"| variant | {label} clean | " + " | ".join(f"{label} {c}" for c in conds) + " |",
                  "|---|---|" + "---|" * len(conds)]  # fmt: skip
        for name, by_cond in rob["variants"].items():
            clean = result["variants"][name]["table1"][key]["patients"]
            lines.append(f"| {name} | {_pm(clean)} | " + " | ".join(_pm(by_cond[c][key]["patients"]) for c in conds)
                         + " |")  # fmt: skip
        lines.append("")
    lines += ["Paired over patients, the full model against each other row (difference full - other; patients where "
              "the full model is better / worse):", ""]  # fmt: skip
    for name, by_cond in rob["paired_tests"].items():
        for c, tests in by_cond.items():
            cells = [f"{label} {t['mean_difference']:+.4f} ({t['patients_better']} / {t['patients_worse']}, "
                     f"p = {t['wilcoxon_p']:.2g})" for key, label, _ in T1_TESTS for t in [tests[key]]]  # fmt: skip
            lines.append(f"- {name}, {c}: " + "; ".join(cells))
    if rob["orderings"]:
        lines += ["", "The harmonizer's purpose, acquisition noise, on these images (each claim's conditions one "
                  "family: its verdict from the Holm-adjusted p):", "",
                  *[_ordering_line(o) for o in rob["orderings"]]]  # fmt: skip
    return lines


def ged_vs_k_figure(path: Path, result: dict[str, Any]) -> str:
    from ..figures import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, v in result["variants"].items():
        if "ged_vs_k" not in v:  # no prior, or the samples of a variant it shares its phase 1 with
            continue
        ks = sorted(v["ged_vs_k"], key=int)
        ax.errorbar([int(k) for k in ks], [v["ged_vs_k"][k][0] for k in ks], [v["ged_vs_k"][k][1] for k in ks],
                    marker="o", capsize=2, label=name)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prior samples K")
    ax.set_ylabel("GED (bars: std over folds)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def write_report(records: list[dict[str, Any]], meta: dict[str, Any], out: Path, stem: str = "compare",
                 references: Optional[list[dict[str, Any]]] = None,
                 robust: Optional[list[dict[str, Any]]] = None) -> dict:  # fmt: skip
    """``<stem>.json``, ``<stem>.md`` and ``<stem>-ged-vs-k.png`` in ``out``; returns the result."""
    result = aggregate(records, meta, references, robust)
    fig = out / f"{stem}-ged-vs-k.png"
    result["figure"] = Path(ged_vs_k_figure(fig, result)).name if any(
        "ged_vs_k" in v for v in result["variants"].values()) else None
    write_atomic(out / f"{stem}.json", json.dumps(result, indent=1, default=float) + "\n")
    write_atomic(out / f"{stem}.md", markdown(result))
    return result
