"""Two or more runs of one protocol (same data, split, seed, epochs), scored on the same held-out patients with
the same draws, and compared over **patients** (each patient's slices averaged first; paired Wilcoxon).

    harmonizer-fast train --data ../shared/data/lidc --config small --out runs/conv-pu --min-raters 4 \\
        --epochs 30 --phase 1 --no-harmonizer --no-personalizer --no-ged-loss
    python benchmarks/lidc_paired.py --runs full=runs/conv-a probunet=runs/conv-pu --data ../shared/data/lidc

Table 1 of each run's selected phase-1 model (its K samples; a two-phase run's ``best`` has the same phase-1
weights, its personalizer does not change the samples), the label-only references of the same slices, and
for each run against the first: the per-patient mean difference, patients better / worse and the two-sided
Wilcoxon p-value per metric. Writes ``<out>.json`` and ``<out>.md`` (``--render`` redraws the markdown).
One fold and one seed: an ordering here is one draw of the split, not a result over folds;
``--pool F0 F1 F2 --out OUT`` pools such results of disjoint test folds over all their patients.

``--table 2`` scores heads instead ([science] #35 item 6): ``RUN@personalized`` (a two-phase run's selected
model), ``RUN@identity`` (its phase-1 model, every head the prior mean) or the directory of a per-rater
baseline (``python -m harmonizer_fast.per_rater``), with GED, Dice_mean diagonal (``dice_each_mean``: head i
against rater i) and matched (``dice_match``: Hungarian, D-Persona's code), Dice_A(i) and head identity.

    python benchmarks/lidc_paired.py --table 2 --runs full=runs/conv-a@personalized \
        identity=runs/conv-a@identity dpersona=runs/dp-f0-lr3e-3@personalized per-rater=runs/pr-f0 \
        --out benchmarks/results/lidc-table2-f0-small-cpu
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
from common import measured_or_rendered, run_machine, write_results

from harmonizer_fast import per_rater
from harmonizer_fast.checkpoint import load_model, read_manifest
from harmonizer_fast.data import load_dataset
from harmonizer_fast.evaluate import evaluate_model
from harmonizer_fast.references import label_only_references
from harmonizer_fast.rundir import RunDir, prepare
from harmonizer_fast.stats import paired_test, per_patient

# per table: metric, lower is better. Table 2 scores the R heads: Dice_mean diagonal (head i against rater i,
# dice_each_mean, the paper's text) and matched (Hungarian, dice_match, D-Persona's code)
TABLES = {
    1: (("ged", True), ("ged_unbiased", True), ("dice_soft", False), ("dice_match", False), ("ncc", False)),
    2: (("ged", True), ("ged_unbiased", True), ("dice_each_mean", False), ("dice_match", False)),
}
HEADS = ("personalized", "identity")


def _table_of(acc, metrics) -> tuple[dict, dict]:
    summary = acc.summary()
    return summary, {m: [summary["mean"][m], summary["std"][m]] for m, _ in metrics}


def score_run(spec: str, data, samples: int, seed: int, table: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """One run's table on its held-out test patients. Table 1: the selected phase-1 model's K samples. Table 2:
    ``PATH@personalized`` / ``PATH@identity`` scores a two-phase run's heads, a directory written by
    ``python -m harmonizer_fast.per_rater`` its per-rater heads."""
    path, _, heads = spec.partition("@")
    if table == 2 and (Path(path) / per_rater.MANIFEST).is_file():
        return _score_per_rater(path, data)
    if table == 2 and heads not in HEADS:
        raise SystemExit(f"--runs {spec}: Table 2 scores a run's heads: add @personalized or @identity")
    stem = "best.json" if heads == "personalized" else "best_phase1.json"  # identity heads: the phase-1 model
    manifest_path, manifest = read_manifest(Path(path) / stem)
    model, _ = load_model(manifest_path)
    run = RunDir(manifest_path.parent)
    scoring = run.scoring_set(data, model.config, "test")
    scores = evaluate_model(model, scoring.data, scoring.indices, num_samples=samples, seed=seed,
                            heads="none" if table == 1 else heads)  # fmt: skip
    acc = scores.prior if table == 1 else scores.heads
    phase = 1 if table == 1 or heads == "identity" else 2
    history = [h for h in run.read_log() if h["phase"] <= phase and "partial_steps" not in h]
    st = manifest["state"]
    summary, means = _table_of(acc, TABLES[table])
    row = {"run": spec, "train_config": st["train_config"], "selected_epoch": st["position"]["epoch"],
           "epochs": len(history), "minutes": sum(_stage_minutes(history)) if history else None,
           f"table{table}": means, "per_image": {m: acc.per_image(m).tolist() for m, _ in TABLES[table]}}  # fmt: skip
    if table == 1:
        row["uncertainty_vs_raters"] = summary.get("uncertainty_vs_raters")
    else:
        row.update(_heads_extras(summary))
    return row, scoring.indices, scoring.data.patient_id[scoring.indices]


def _stage_minutes(history: list[dict]) -> list[float]:
    """Each phase's minutes (a log's ``minutes`` restarts with each phase's process)."""
    return [max(h["minutes"] for h in history if h["phase"] == p) for p in sorted({h["phase"] for h in history})]


def _heads_extras(summary: dict) -> dict:
    each = [v["dice"][0] for v in summary["per_rater"].values()]
    return {"head_identity": summary["head_identity"][0], "dice_each": each}


def _score_per_rater(path: str, data) -> tuple[dict, np.ndarray, np.ndarray]:
    model, manifest = per_rater.load_per_rater(path)
    idx = per_rater.held_out(manifest, data)
    if idx is None:
        raise SystemExit(f"--runs {path}: trained on another dataset (fingerprint {manifest['data']['fingerprint']})")
    prepared = prepare(data, model.config, manifest["recipe"]["rater_order"])
    acc = per_rater.score_heads(model, prepared, idx)
    summary, means = _table_of(acc, TABLES[2])
    h = manifest["history"]
    return ({"run": path, "train_config": manifest["recipe"], "selected_epoch": manifest["selected_epoch"],
             "epochs": len(h), "minutes": h[-1]["minutes"], "table2": means,
             "per_image": {m: acc.per_image(m).tolist() for m, _ in TABLES[2]}, **_heads_extras(summary)},
            idx, prepared.patient_id[idx])  # fmt: skip


def measure(args) -> dict:
    data = load_dataset(args.data)
    runs, indices, pids, metrics = {}, None, None, TABLES[args.table]
    for item in args.runs:
        label, _, path = item.partition("=")
        runs[label], idx, pid = score_run(path, data, args.samples, args.seed, args.table)
        if indices is not None and not np.array_equal(idx, indices):
            raise SystemExit(f"--runs {item}: scored other test slices than the first run: not the same protocol")
        indices, pids = idx, pid
    first = next(iter(runs))
    tests = {}
    for label in list(runs)[1:]:
        tests[label] = {}
        for m, lower in metrics:
            patients, a = per_patient(np.asarray(runs[first]["per_image"][m]), pids)
            _, b = per_patient(np.asarray(runs[label]["per_image"][m]), pids)
            t = paired_test(a, b)  # differences first - other, patient by patient
            if lower:  # for a lower-is-better metric the first run is better where the difference is negative
                t["images_better"], t["images_worse"] = t["images_worse"], t["images_better"]
            tests[label][m] = {**t, "n_patients": int(len(patients))}
    first_run = Path(runs[first]["run"].partition("@")[0])
    scoring = RunDir(first_run).scoring_set(data, load_model(first_run)[0].config)
    refs = label_only_references(scoring.data, indices, args.samples)
    return {
        "command": "python benchmarks/lidc_paired.py " + shlex.join(sys.argv[1:]),
        "machine": run_machine(),
        "samples": args.samples, "seed": args.seed, "n_images": int(len(indices)),
        "n_patients": int(len(np.unique(pids))), "patient_id": [str(x) for x in pids], "runs": runs,
        "first": first, "tests": tests, "table": args.table,
        "references": {n: {m: r[f"table{args.table}"]["mean"][m] for m, _ in metrics}
                       | (_heads_extras(r["table2"]) if args.table == 2 else {})
                       for n, r in refs.items()},
    }  # fmt: skip


def _metrics(r: dict) -> tuple:
    return TABLES[r.get("table", 1)]  # results written before Table 2 was scored here are Table 1's


def _extra_header(table: int, n_raters: int) -> str:
    if table == 1:
        return " Spearman (spread vs raters) |"
    return "".join(f" Dice_A{i + 1} |" for i in range(n_raters)) + " head identity |"


def _extra_cells(table: int, row: dict, n_raters: int) -> str:
    if table == 1:
        return f" {(row.get('uncertainty_vs_raters') or {}).get('spearman', float('nan')):.3f} |"
    each = row.get("dice_each", [float("nan")] * n_raters)
    return "".join(f" {d:.4f} |" for d in each) + f" {row.get('head_identity', float('nan')):.1%} |"


def markdown(r: dict) -> str:
    metrics, table = _metrics(r), r.get("table", 1)
    n_raters = max((len(run.get("dice_each", [])) for run in r["runs"].values()), default=0)
    extra = _extra_header(table, n_raters)
    what = ("each run's selected phase-1 model, its K samples" if table == 1 else
            "each run's R heads (a two-phase run's selected model, @personalized or @identity heads)")
    lines = [f"# Table {table}: runs of one protocol over the same held-out patients ({r['machine']['cpu']})", "",
             f"`{r['command']}` on {r['machine']['date']}: {r['n_images']} test slices of {r['n_patients']} "
             f"patients, K = {r['samples']}, seed {r['seed']}; {what}.", "",
             "| run | epochs (selected) | minutes | " + " | ".join(m for m, _ in metrics) + " |" + extra,
             "|---|---|---|" + "---|" * (len(metrics) + extra.count("|"))]  # fmt: skip
    for label, run in r["runs"].items():
        cells = " | ".join(f"{run[f'table{table}'][m][0]:.4f}" for m, _ in metrics)
        minutes = f"{run['minutes']:.0f}" if run["minutes"] is not None else "n/a"
        lines.append(f"| {label} (`{run['run']}`) | {run['epochs']} ({run['selected_epoch']}) | {minutes} | {cells} "
                     f"|" + _extra_cells(table, run, n_raters))  # fmt: skip
    for name, ref in r["references"].items():
        tail = " |" if table == 1 else _extra_cells(2, ref, n_raters)
        lines.append(f"| label-only: {name} | | | " + " | ".join(f"{ref[m]:.4f}" for m, _ in metrics) + " |" + tail)
    lines += ["", f"Over patients, **{r['first']}** against each other run (per-patient means; the difference is "
              f"{r['first']} minus the other; 'better' counts the patients where {r['first']} is better: lower GED, "
              "higher Dice and S_NCC; two-sided Wilcoxon signed-rank):", "",
              "| against | metric | mean difference | patients better / worse | p |", "|---|---|---|---|---|"]
    for label, tests in r["tests"].items():
        for m, t in tests.items():
            lines.append(f"| {label} | {m} | {t['mean_difference']:+.4f} | {t['images_better']} / "
                         f"{t['images_worse']} | {t['wilcoxon_p']:.2g} |")  # fmt: skip
    lines += ["", "One fold and one seed: the orderings above are one draw of the split and of the training noise."]
    return "\n".join(lines) + "\n"


def pool(paths: list[str]) -> dict:
    """Several folds' results (each written by this script, with its per-image patient ids) pooled over their
    patients: the test folds of the patient split are disjoint, so every patient counts once. Per metric: each
    fold's per-patient mean difference and p, and one Wilcoxon test over all patients."""
    folds = [json.loads(Path(f).with_suffix(".json").read_text()) for f in paths]
    for f, r in zip(paths, folds):
        if "patient_id" not in r:
            raise SystemExit(f"--pool {f}: written before the per-image patient ids were recorded; rerun it")
    first, metrics = folds[0]["first"], _metrics(folds[0])
    seen: set[str] = set()
    for f, r in zip(paths, folds):
        if r["first"] != first or set(r["runs"]) != set(folds[0]["runs"]) or _metrics(r) != metrics:
            raise SystemExit(f"--pool {f}: other runs than {paths[0]}'s")
        if seen & set(r["patient_id"]):
            raise SystemExit(f"--pool {f}: shares patients with another fold; folds must be disjoint")
        seen |= set(r["patient_id"])
    tests: dict[str, dict] = {}
    for label in [x for x in folds[0]["runs"] if x != first]:
        tests[label] = {}
        for m, lower in metrics:
            a_all, b_all, per_fold = [], [], []
            for r in folds:
                pids = np.asarray(r["patient_id"])
                _, a = per_patient(np.asarray(r["runs"][first]["per_image"][m], dtype=np.float64), pids)
                _, b = per_patient(np.asarray(r["runs"][label]["per_image"][m], dtype=np.float64), pids)
                a_all.append(a)
                b_all.append(b)
                t = r["tests"][label][m]
                per_fold.append({"mean_difference": t["mean_difference"], "wilcoxon_p": t["wilcoxon_p"]})
            t = paired_test(np.concatenate(a_all), np.concatenate(b_all))
            if lower:
                t["images_better"], t["images_worse"] = t["images_worse"], t["images_better"]
            better = [(f["mean_difference"] < 0) == lower for f in per_fold]
            tests[label][m] = {**t, "folds": per_fold, "folds_better": int(sum(better))}
    weights = np.asarray([r["n_images"] for r in folds], dtype=float)

    def weighted(values: list):  # per-fold means over images (numbers or lists), pooled over all their images
        return np.average(np.asarray(values, dtype=float), weights=weights, axis=0).tolist()

    extras = ("head_identity", "dice_each")
    return {"command": "python benchmarks/lidc_paired.py " + shlex.join(sys.argv[1:]), "pooled": paths,
            "machine": folds[0]["machine"], "first": first, "n_patients": len(seen), "table": folds[0].get("table", 1),
            "n_images": sum(r["n_images"] for r in folds), "tests": tests,
            "references": {n: {k: weighted([r["references"][n][k] for r in folds]) for k in folds[0]["references"][n]}
                           for n in folds[0]["references"]},
            "extras": {label: {k: weighted([r["runs"][label][k] for r in folds]) for k in extras
                               if k in folds[0]["runs"][label]} for label in folds[0]["runs"]},
            "means": {label: {m: float(np.mean(np.concatenate([np.asarray(r["runs"][label]["per_image"][m], dtype=float)
                                                                for r in folds]))) for m, _ in metrics}
                      for label in folds[0]["runs"]}}  # fmt: skip


def pooled_markdown(r: dict) -> str:
    n, metrics, table = len(r["pooled"]), _metrics(r), r.get("table", 1)
    extras = r.get("extras", {})
    n_raters = max((len(e.get("dice_each", [])) for e in extras.values()), default=0)
    extra = "" if table == 1 else _extra_header(2, n_raters)
    lines = [f"# Table {table}: {n} folds pooled over their held-out patients ({r['machine']['cpu']})", "",
             f"`{r['command']}`: {r['n_images']} test slices of {r['n_patients']} patients (each in one fold's "
             "test set), from " + ", ".join(f"`{p}`" for p in r["pooled"]) + ". Means over slices; the label-only "
             "references are the same slices' (each fold's mean weighted by its slices).", "",
             "| run | " + " | ".join(m for m, _ in metrics) + " |" + extra,
             "|---|" + "---|" * (len(metrics) + extra.count("|"))]  # fmt: skip
    for label, v in r["means"].items():
        tail = "" if table == 1 else _extra_cells(2, extras.get(label, {}), n_raters)
        lines.append(f"| {label} | " + " | ".join(f"{v[m]:.4f}" for m, _ in metrics) + " |" + tail)
    for name, ref in r.get("references", {}).items():
        tail = "" if table == 1 else _extra_cells(2, ref, n_raters)
        lines.append(f"| label-only: {name} | " + " | ".join(f"{ref[m]:.4f}" for m, _ in metrics) + " |" + tail)
    lines += ["", f"**{r['first']}** against each other run over all patients (per-patient means; difference "
              f"{r['first']} minus the other; 'better': lower GED, higher Dice and S_NCC; two-sided Wilcoxon "
              "signed-rank), with each fold's mean difference and p:", "",
              "| against | metric | mean difference | patients better / worse | p | folds where better | per fold |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, tests in r["tests"].items():
        for m, t in tests.items():
            folds = "; ".join(f"{f['mean_difference']:+.4f} (p {f['wilcoxon_p']:.2g})" for f in t["folds"])
            lines.append(f"| {label} | {m} | {t['mean_difference']:+.4f} | {t['images_better']} / {t['images_worse']} "
                         f"| {t['wilcoxon_p']:.2g} | {t['folds_better']} of {n} | {folds} |")  # fmt: skip
    lines += ["", f"One seed per fold: the folds vary the split and the training noise together; {n} folds are {n} "
              "draws, not a bound on either."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", default=[], metavar="LABEL=RUN", help="the first is compared to the others")
    p.add_argument("--data", default="../shared/data/lidc")
    p.add_argument("--table", type=int, choices=(1, 2), default=1,
                   help="1: each run's K prior samples; 2: its R heads (RUN@personalized, RUN@identity, or a "
                        "per-rater baseline's directory)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/lidc-paired-f0-small-cpu")
    p.add_argument("--render", action="store_true", help="only redraw the markdown from the JSON")
    p.add_argument("--pool", nargs="+", default=[], metavar="RESULT",
                   help="pool these results of this script (folds with disjoint test patients) into --out")
    args = p.parse_args(argv)
    if args.pool:
        r = pool(args.pool)
        write_results(Path(args.out).name, r, pooled_markdown(r), out_dir=Path(args.out).parent)
        print(pooled_markdown(r))
        return 0
    if not args.render and len(args.runs) < 2:
        p.error("--runs: give at least two LABEL=RUN")
    out = Path(args.out)
    r = measured_or_rendered(out, args.render, lambda: measure(args))
    out.with_suffix(".md").write_text(markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
