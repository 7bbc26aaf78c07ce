"""harmonizer-fast compare: every variant trains and is reported, collapse is flagged, the aggregation's fold
and patient statistics match a numpy transcription, rows sharing a phase 1 are printed once, trainings done
outside are taken in only when they are the unit's training, and a killed comparison continues where it
stopped."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from harmonizer_fast import data as hd
from harmonizer_fast.cli import main as cli
from harmonizer_fast.compare import VARIANTS, CompareConfig, Comparison, render, run_compare
from harmonizer_fast.compare.report import aggregate, markdown

TINY = dict(epochs1=1, epochs2=1, samples=2, batch_size=8)


def _data(items: int = 48):
    return hd.make_synthetic(items, size=32, raters=2, seed=0)


@pytest.mark.slow
def test_every_variant_trains_and_the_report_has_every_column(tmp_path):
    cc = CompareConfig(variants=list(VARIANTS), folds=[0, 1], epochs1=2, epochs2=1, samples=4, batch_size=8)
    lines: list[str] = []
    result = run_compare(_data(64), tmp_path / "cmp", cc, log=lines.append)
    assert len(lines) == len(Comparison(tmp_path / "cmp", cc, _data(64)).units())
    assert set(result["variants"]) == set(VARIANTS)
    md = (tmp_path / "cmp" / "compare.md").read_text()
    for column in ("GED", "Dice_soft", "Dice_max", "Dice_match", "S_NCC", "Dice_A1", "Dice_A2", "Dice_mean diagonal",
                   "Dice_mean matched", "head identity", "rank-biserial", "Wilcoxon p", "selected epoch",
                   "minutes (wall)", "label-only: majority mask"):  # fmt: skip
        assert column in md, column
    for what in ("mean ± std over folds", "mean ± std over test patients"):
        assert what in md
    for name, v in result["variants"].items():
        assert f"| {name}" in md
        assert v["total_runs"] == 2
        for run in v["runs"]:
            assert all(t["epochs"] >= 1 and t["minutes"] > 0 for t in run["trainings"])
        if v["collapsed_runs"] < v["total_runs"]:
            own_prior = v["heads"] != "per-rater" and not v["shares_phase1_with"]
            assert ("table1" in v) == own_prior
            if own_prior:
                assert v["table1"]["ged"]["folds"][2] == 2 - v["collapsed_runs"]
            assert ("table2" in v) == (v["heads"] != "none")
    assert (tmp_path / "cmp" / "compare-ged-vs-k.png").is_file() or result["figure"] is None
    # the full model and its identity heads share phase 1, D-Persona and the Prob. U-Net too: one row each
    assert result["variants"]["no-personalizer"]["shares_phase1_with"] == "full"
    assert result["variants"]["dpersona"]["shares_phase1_with"] == "probunet"
    assert set(result["references"]) >= {"all-empty", "majority mask"}


def _record(variant, fold, seed, images, t1, t2=None, empty=0.0, val_collapse=False, patients=None):
    """A hand-made evaluation record with the per-image scores given (each image its own patient unless
    ``patients`` says)."""
    n = len(images)
    per = {f"t1_{k}": list(t1 if t1 is not None else t2) for k in ("ged", "ged_unbiased", "dice_soft", "dice_max",
                                                                     "dice_match", "ncc")}  # fmt: skip
    per["t1_empty_fraction"] = [empty] * n
    table = {"n_images": n, "mean": {"empty_fraction": empty}, "std": {}, "per_rater": {}}
    rec = {"variant": variant, "fold": fold, "seed": seed, "heads": "none" if t2 is None else "personalized",
           "images": list(images), "patients": patients or [f"p{i}" for i in images], "per_image": per,
           "table1": None if t1 is None else table, "table2": None,
           "runs": [{"run": f"p1-{variant}-f{fold}-s{seed}", "phase": 1, "epochs": 2, "minutes": 1.0,
                     "wall_minutes": 1.1, "best_epoch": 2, "stopped": "time budget",
                     "collapsed_on_validation": val_collapse}],
           "ged_vs_k": {} if t1 is None else {"1": list(t1), "4": list(t1)}}  # fmt: skip
    if t2 is not None:
        per.update({f"t2_{k}": list(t2) for k in ("ged", "ged_unbiased", "dice_soft", "dice_max", "dice_match",
                                                   "dice_each_mean", "ncc")})  # fmt: skip
        per["t2_empty_fraction"] = [empty] * n
        per["t2_head_identity"] = [0.5] * n
        per["t2_dice_each"] = [[v, v] for v in t2]
        rec["table2"] = dict(table)
    if t1 is None:
        rec["heads"] = "per-rater"
    return rec


def _meta():
    return {"compare": CompareConfig().to_dict(), "data": "hand-made", "command": "test",
            "machine": {"cpu": "x", "cpu_cores": 2, "torch": "t", "torch_threads": 2, "date": "d"}}  # fmt: skip


def test_statistics_over_folds_and_patients_match_numpy():
    rng = np.random.default_rng(1)
    images = {0: [0, 1, 2, 3, 4], 1: [5, 6, 7, 8, 9, 10]}  # fold -> test images
    patient = {i: f"f{f}-{k // 2}" for f in images for k, i in enumerate(images[f])}  # 2 slices a patient, or 1
    scores = {(f, s): rng.random(len(images[f])) for f in images for s in (0, 1)}
    other = {(f, s): rng.random(len(images[f])) for f in images for s in (0, 1)}

    def recs(name, table):
        return [_record(name, f, s, images[f], table[f, s], t2=table[f, s], patients=[patient[i] for i in images[f]])
                for f, s in table]  # fmt: skip

    out = aggregate(recs("full", scores) + recs("dpersona", other), _meta())
    per_image = {f: (scores[f, 0] + scores[f, 1]) / 2 for f in images}  # seeds averaged per image
    fold_means = [per_image[f].mean() for f in images]
    ged = out["variants"]["full"]["table1"]["ged"]
    assert ged["folds"] == pytest.approx([np.mean(fold_means), np.std(fold_means), 2])

    def by_patient(table):  # a numpy transcription: images averaged over seeds, then over each patient's images
        flat = np.concatenate([(table[f, 0] + table[f, 1]) / 2 for f in images])
        ids = np.array([patient[i] for f in images for i in images[f]])
        return np.array([flat[ids == p].mean() for p in sorted(set(ids))]), sorted(set(ids))

    mine, ids = by_patient(scores)
    assert len(ids) == 6 and ged["patients"] == pytest.approx([mine.mean(), mine.std(), 6])
    theirs, _ = by_patient(other)
    t = out["paired_tests"]["dpersona"]["t2_ged"]
    d = mine - theirs
    assert t["n_patients"] == 6 and t["mean_difference"] == pytest.approx(d.mean())
    assert (t["patients_better"], t["patients_worse"]) == ((d < 0).sum(), (d > 0).sum())  # lower GED is better
    from scipy.stats import wilcoxon

    assert t["wilcoxon_p"] == pytest.approx(wilcoxon(d).pvalue)
    fold0 = [i for i, p in enumerate(ids) if p.startswith("f0-")]
    assert t["folds"][0]["n_patients"] == len(fold0) == 3
    assert t["folds"][0]["mean_difference"] == pytest.approx(d[fold0].mean())
    dice = out["paired_tests"]["dpersona"]["t2_dice_each_mean"]
    assert dice["patients_better"] == (d > 0).sum()  # higher Dice is better
    assert out["variants"]["full"]["table2"]["dice_a2"]["patients"][0] == pytest.approx(mine.mean())
    claim = {o["claim"]: o for o in out["orderings"]}["personalized heads > D-Persona's in Dice_mean (Table 2)"]
    p_value = wilcoxon(d).pvalue  # the Dice records hold the same numbers as the GED ones
    assert claim["verdict"] == ("not shown" if p_value >= 0.05 else "holds" if d.mean() > 0 else "reversed")
    assert claim["holds"] == (claim["verdict"] == "holds")
    assert claim["folds_failing"] == [f["fold"] for f in dice["folds"] if f["mean_difference"] <= 0]
    # each seed's draw on its own, over both folds' patients (the seed's images, then each patient's mean)
    image_patients = np.array([patient[i] for f in images for i in images[f]])
    for s in (0, 1):
        flat = np.concatenate([scores[f, s] - other[f, s] for f in images])
        d_s = np.array([flat[image_patients == p].mean() for p in ids])
        got = t["seeds"][s]
        assert (got["seed"], got["n_patients"]) == (s, 6)
        assert got["mean_difference"] == pytest.approx(d_s.mean())
        assert got["wilcoxon_p"] == pytest.approx(wilcoxon(d_s).pvalue)
    assert claim["seeds_failing"] == [g["seed"] for g in dice["seeds"] if g["mean_difference"] <= 0]
    assert "per seed: difference (p)" in markdown(out) and "s1 " in markdown(out)
    # Table 1 per seed: that seed's images over both folds, each patient's mean, then mean +- std over patients
    seed_means = []
    for s in (0, 1):
        flat = np.concatenate([scores[f, s] for f in images])
        per_p = np.array([flat[image_patients == p].mean() for p in ids])
        got = out["variants"]["full"]["table1_seeds"][str(s)]["ged"]
        assert got == pytest.approx([per_p.mean(), per_p.std(), 6])
        seed_means.append(per_p.mean())
    md = markdown(out)
    assert "## Table 1 per training seed" in md
    spread = f"{np.mean(seed_means):.4f} ± {np.std(seed_means):.4f}"
    assert f"| full | mean ± std of the 2 seeds | {spread} |" in md
    one_seed = aggregate(recs("full", {k: v for k, v in scores.items() if k[1] == 0}), _meta())
    assert "table1_seeds" not in one_seed["variants"]["full"]
    assert "Table 1 per training seed" not in markdown(one_seed)


def test_rows_that_share_a_phase_1_are_printed_once_with_the_sharing_said():
    imgs = [0, 1, 2, 3]
    recs = [_record("full", 0, 0, imgs, [0.2, 0.3, 0.4, 0.1], t2=[0.7, 0.8, 0.6, 0.9]),
            _record("no-personalizer", 0, 0, imgs, [0.2, 0.3, 0.4, 0.1], t2=[0.6, 0.7, 0.6, 0.8]),
            _record("probunet", 0, 0, imgs, [0.3, 0.4, 0.4, 0.3]),
            _record("dpersona", 0, 0, imgs, [0.3, 0.4, 0.4, 0.3], t2=[0.6, 0.6, 0.5, 0.7]),
            _record("per-rater", 0, 0, imgs, None, t2=[0.7, 0.7, 0.6, 0.9])]  # fmt: skip
    refs = [{"fold": 0, "images": imgs, "references": {"all-empty": {
        "table1": {"ged": 0.9, "dice_soft": 0.0, "dice_max": 0.0, "dice_match": 0.1},
        "table2": {"ged": 0.9, "dice_soft": 0.0, "dice_max": 0.0, "dice_match": 0.1, "dice_each_mean": 0.1,
                   "head_identity": 0.25}, "dice_each": [0.1, 0.2]}}}]  # fmt: skip
    out = aggregate(recs, _meta(), refs)
    md = markdown(out)
    t1 = md.split("## Table 1")[1].split("## Table 2")[0]
    assert "| full (its phase 1 is also no-personalizer's: the same samples) |" in t1
    assert "| probunet (its phase 1 is also dpersona's: the same samples) |" in t1
    assert "| dpersona" not in t1 and "| no-personalizer" not in t1 and "| per-rater" not in t1
    assert "| label-only: all-empty | 0.9000 |" in t1
    t2 = md.split("## Table 2")[1].split("## Table 1")[0]
    for name in ("full", "no-personalizer", "dpersona", "per-rater"):
        assert f"| {name} |" in t2
    assert "| probunet" not in t2 and "| label-only: all-empty |" in t2 and "| 0.2000 |" in t2  # its Dice_A2
    tests = out["paired_tests"]
    assert set(tests["probunet"]) == {"t1_ged", "t1_dice_match"}
    assert "t1_ged" not in tests["dpersona"] and "t1_ged" not in tests["no-personalizer"]
    assert "t1_ged" not in tests["per-rater"] and "t2_dice_each_mean" in tests["per-rater"]
    claims = [o["claim"] for o in out["orderings"]]
    assert "personalized heads > the per-rater baseline in Dice_mean (Table 2)" in claims
    assert "Harmonizer Network < Prob. U-Net in GED (Table 1)" in claims


def test_an_ordering_holds_is_reversed_or_is_not_shown_by_its_paired_test():
    """'holds' and 'reversed' need the paired p below 0.05 (8 patients all one way: exact p = 0.0078); a
    difference that changes sign from patient to patient is 'not shown', whichever way its mean goes."""
    imgs = list(range(8))
    base = np.linspace(0.6, 0.8, 8)
    mixed = base + np.array([0.05, -0.04, 0.03, -0.05, 0.04, -0.03, 0.02, -0.01])
    recs = [_record("full", 0, 0, imgs, base, t2=base),
            _record("dpersona", 0, 0, imgs, base, t2=base - 0.05),  # below the full model on every patient
            _record("per-rater", 0, 0, imgs, None, t2=base + 0.05),  # above it on every patient
            _record("no-personalizer", 0, 0, imgs, base, t2=mixed)]  # fmt: skip
    verdicts = {o["claim"]: o["verdict"] for o in aggregate(recs, _meta())["orderings"]}
    assert verdicts["personalized heads > D-Persona's in Dice_mean (Table 2)"] == "holds"
    assert verdicts["personalized heads > the per-rater baseline in Dice_mean (Table 2)"] == "reversed"
    assert verdicts["personalized heads > identity heads in Dice_mean (Table 2)"] == "not shown"


def test_a_collapsed_run_is_flagged_and_left_out():
    good = _record("full", 0, 0, [0, 1], [0.2, 0.3])
    fold1 = _record("full", 1, 0, [2, 3], [0.9, 0.9], empty=1.0)  # every test prediction empty
    val = _record("probunet", 0, 0, [0, 1], [0.5, 0.5], val_collapse=True)  # selected model empty on validation
    out = aggregate([good, fold1, val, _record("probunet", 1, 0, [2, 3], [0.4, 0.6])], _meta())
    full, base = out["variants"]["full"], out["variants"]["probunet"]
    assert (full["collapsed_runs"], base["collapsed_runs"]) == (1, 1)
    assert full["table1"]["ged"]["patients"][:2] == pytest.approx([0.25, 0.05])  # fold 1 left out
    assert [r["collapsed"] for r in full["runs"]] == [False, True]
    md = markdown(out)
    assert "full (collapsed in 1 of 2 runs, left out)" in md and "probunet (collapsed in 1 of 2 runs" in md
    everything = aggregate([fold1], _meta())
    assert "table1" not in everything["variants"]["full"]
    assert "| full (collapsed in 1 of 1 runs, left out) | collapsed |" in markdown(everything)


def test_render_rewrites_the_same_markdown(tmp_path):
    recs = [_record("full", 0, 0, [0, 1, 2], [0.2, 0.3, 0.4], t2=[0.5, 0.6, 0.7]),
            _record("dpersona", 0, 0, [0, 1, 2], [0.3, 0.3, 0.5], t2=[0.4, 0.6, 0.6])]  # fmt: skip
    from harmonizer_fast.compare.report import write_report

    result = write_report(recs, _meta(), tmp_path)
    md = (tmp_path / "compare.md").read_text()
    (tmp_path / "compare.md").unlink()
    render(tmp_path / "compare.json")
    assert (tmp_path / "compare.md").read_text() == md == markdown(json.loads((tmp_path / "compare.json").read_text()))
    assert result["figure"] == "compare-ged-vs-k.png"


@pytest.mark.parametrize("budget", [False, True], ids=["epochs-resumes", "budget-restarts"])
def test_a_killed_comparison_continues_and_a_cut_training_restarts(tmp_path, budget):
    """On epochs a training cut mid-way continues from its last epoch; on a budget it starts again (a second
    budget would give its variant more compute)."""
    data, out = _data(), tmp_path / "cmp"
    minutes = {"minutes1": 60.0, "minutes2": 60.0} if budget else {}
    cc = CompareConfig(variants=["full", "probunet"], **TINY, **minutes)
    cmp = Comparison(out, cc, data, log=lambda _m: None)
    cmp.run()
    first = {v: json.loads(cmp.eval_path(v, 0, 0).read_text()) for v in ("full", "probunet")}
    # the state a kill during the full model's phase 2 leaves: a ``last`` saved at an epoch end of an
    # unfinished run (stopped ""), and none of the evaluations that come after it
    last = cmp.p2("full", 0, 0).manifest_path("last")
    manifest = json.loads(last.read_text())
    manifest["state"]["stopped"] = ""
    last.write_text(json.dumps(manifest))
    for v in ("full", "probunet"):
        cmp.eval_path(v, 0, 0).unlink()
    p1_files = sorted(p.name for p in cmp.p1("full", 0, 0).path.iterdir())
    p2_log = cmp.p2("full", 0, 0).read_log()
    lines: list[str] = []
    Comparison(out, cc, data, log=lines.append).run()
    redone = [ln.split("] ")[1].split(":")[0] for ln in lines if "done before" not in ln]
    assert redone == ["train2 full fold 0 seed 0", "eval full fold 0 seed 0", "eval probunet fold 0 seed 0"]
    assert sorted(p.name for p in cmp.p1("full", 0, 0).path.iterdir()) == p1_files  # phase 1 untouched
    if budget:
        assert json.loads(last.read_text())["state"]["stopped"] == "completed"  # trained again from the start
    else:  # resumed at its last epoch, which was its end: nothing trained again
        assert cmp.p2("full", 0, 0).read_log() == p2_log
    for v in ("full", "probunet"):  # the same models, the same draws: the same scores
        assert json.loads(cmp.eval_path(v, 0, 0).read_text())["per_image"] == first[v]["per_image"]


def test_a_result_of_the_earlier_format_is_not_redrawn(tmp_path, capsys):
    """A result aggregated over images by an earlier compare (the committed budget comparison) keeps the
    markdown it was written with: --render says so in one line instead of failing on a missing key."""
    result = {"variants": {"full": {"table1": {"ged": {"folds": [0.2, 0.0, 1], "images": [0.2, 0.1, 3]}}}}}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(result))
    assert cli(["compare", "--render", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "earlier version of compare" in err
    assert not path.with_suffix(".md").exists()


def test_another_plan_in_the_same_directory_is_refused(tmp_path):
    data = _data()
    Comparison(tmp_path, CompareConfig(**TINY), data).check_plan()
    with pytest.raises(ValueError, match=r"differs in \['samples'\]"):
        Comparison(tmp_path, CompareConfig(**{**TINY, "samples": 3}), data).check_plan()
    with pytest.raises(ValueError, match=r"differs in \['data'\]"):
        Comparison(tmp_path, CompareConfig(**TINY), _data(50)).check_plan()


def test_variants_and_robustness_may_be_added_to_a_comparison(tmp_path):
    """Which units run is not part of a comparison's identity: adding variants or the robustness units
    continues it (plan.json then records the latest selection); what a unit computes still is."""
    data = _data()
    Comparison(tmp_path, CompareConfig(variants=["full"], **TINY), data).check_plan()
    wider = CompareConfig(variants=["full", "no-harmonizer"], robustness=True, **TINY)
    Comparison(tmp_path, wider, data).check_plan()
    assert json.loads((tmp_path / "plan.json").read_text())["compare"]["variants"] == ["full", "no-harmonizer"]
    with pytest.raises(ValueError, match=r"differs in \['epochs1'\]"):
        Comparison(tmp_path, CompareConfig(variants=["full"], **{**TINY, "epochs1": 2}), data).check_plan()


def test_a_comparison_continues_on_another_machine_from_its_scores(tmp_path):
    """With ``scores`` apart from the runs, a new machine holding only the scores (the committed part)
    trains nothing whose scores are written: a seed added trains only its own units, the first seed's scores
    stay as they were, and the report takes both seeds. Another plan is refused by the scores' plan.json
    even in a new runs directory."""
    data, scores = _data(), tmp_path / "scores"
    cc = CompareConfig(variants=["full", "probunet"], robustness=True, **TINY)
    Comparison(tmp_path / "machine-a", cc, data, log=lambda _m: None, scores=scores).run()
    first = {p.name: p.read_bytes() for p in scores.iterdir()}
    assert {"plan.json", "full-f0-s0.json", "probunet-f0-s0.json", "robust-full-f0-s0.json",
            "robust-probunet-f0-s0.json", "references-f0.json"} == set(first)  # fmt: skip
    assert not (tmp_path / "machine-a" / "evals").exists() and (tmp_path / "machine-a" / "plan.json").is_file()

    lines: list[str] = []
    wider = CompareConfig(variants=["full", "probunet"], seeds=[0, 1], robustness=True, **TINY)
    result = run_compare(data, tmp_path / "machine-b", wider, scores=scores, report_dir=tmp_path / "report",
                         log=lines.append)  # fmt: skip
    trained = [ln.split("] ")[1].split(":")[0] for ln in lines if ln.split(" ")[1].startswith("train")
               and "not needed" not in ln]  # fmt: skip
    assert trained == ["train1 full fold 0 seed 1", "train1 probunet fold 0 seed 1", "train2 full fold 0 seed 1"]
    assert sum("not needed" in ln for ln in lines) == 3  # seed 0's trainings
    assert not (tmp_path / "machine-b" / "runs" / "p1-full-f0-s0").exists()
    assert all((scores / name).read_bytes() == b for name, b in first.items() if name != "plan.json")
    assert json.loads((scores / "plan.json").read_text())["compare"]["seeds"] == [0, 1]
    assert [(r["fold"], r["seed"]) for r in result["variants"]["full"]["runs"]] == [(0, 0), (0, 1)]  # both reported

    with pytest.raises(ValueError, match=r"differs in \['epochs1'\]"):
        Comparison(tmp_path / "machine-c", CompareConfig(**{**TINY, "epochs1": 2}), data, scores=scores).check_plan()


def _robust(variant, fold, images, by_condition, patients=None):
    return {"variant": variant, "fold": fold, "seed": 0, "images": list(images),
            "patients": patients or [f"p{i}" for i in images],
            "conditions": {c: {"t1_ged": list(g), "t1_dice_match": [0.5] * len(g)} for c, g in by_condition.items()}}


def test_robustness_tables_and_orderings_over_patients():
    """The degraded scores join their runs' records: means over patients as numpy computes them, the full model
    against each other Table 1 row per degradation, and the harmonizer's orderings judged by their paired
    tests (8 patients all one way: exact p = 0.0078; mixed signs: not shown)."""
    imgs = list(range(8))
    patients = [f"p{i // 2}" for i in imgs] + [f"q{i // 2}" for i in imgs]  # two images per patient, two folds
    clean = np.linspace(0.2, 0.4, 8)
    noisy_full = clean + 0.05
    recs, robust = [], []
    for fold, off in ((0, 0), (1, 8)):
        ids = [i + off for i in imgs]
        pats = patients[off : off + 8]
        recs += [_record("full", fold, 0, ids, clean, patients=pats),
                 _record("no-harmonizer", fold, 0, ids, clean, patients=pats),
                 _record("unshared-harmonizer", fold, 0, ids, clean, patients=pats)]  # fmt: skip
        robust += [_robust("full", fold, ids, {"noise 0.25": noisy_full, "blur 1.75": clean}, pats),
                   _robust("no-harmonizer", fold, ids, {"noise 0.25": noisy_full + 0.1,  # worse on every patient
                                                         "blur 1.75": clean + np.tile([0.01, -0.01], 4)}, pats),
                   _robust("unshared-harmonizer", fold, ids, {"noise 0.25": noisy_full - 0.1,  # better everywhere
                                                               "blur 1.75": clean}, pats)]  # fmt: skip
    out = aggregate(recs, _meta(), robust=robust)
    rob = out["robustness"]
    assert rob["conditions"] == ["noise 0.25", "blur 1.75"]
    per_patient = noisy_full.reshape(4, 2).mean(1)  # each fold's four patients, the same values in both folds
    cell = rob["variants"]["full"]["noise 0.25"]["ged"]["patients"]
    assert cell == pytest.approx([per_patient.mean(), per_patient.std(), 8])
    t = rob["paired_tests"]["no-harmonizer"]["noise 0.25"]["t1_ged"]
    assert t["mean_difference"] == pytest.approx(-0.1) and t["patients_better"] == 8
    verdicts = {o["claim"]: o["verdict"] for o in rob["orderings"]}
    assert verdicts["under noise 0.25, the harmonizer lowers GED (full < no harmonizer)"] == "holds"
    assert verdicts["under blur 1.75, the harmonizer lowers GED (full < no harmonizer)"] == "not shown"
    assert verdicts["under noise 0.25, sharing the harmonizer across layers lowers GED (full < unshared)"] == "reversed"
    clean_claims = {o["claim"]: o["verdict"] for o in out["orderings"]}  # equal clean scores: nothing shown
    assert clean_claims["sharing the harmonizer across layers lowers GED (full < unshared harmonizer, Table 1)"] == \
        "not shown"
    noise = next(o for o in rob["orderings"] if o["claim"].startswith("under noise 0.25, the harmonizer"))
    assert noise["family"] == 2 and noise["holm_p"] == pytest.approx(2 * noise["wilcoxon_p"])  # 0.0078 x 2
    md = markdown(out)
    section = md.split("## Table 1 on degraded test images")[1]
    assert "| variant | GED clean | GED noise 0.25 | GED blur 1.75 |" in section
    row = next(line for line in section.splitlines() if line.startswith("| full |"))  # the GED table's
    assert f"{per_patient.mean():.4f} ± {per_patient.std():.4f}" in row
    robust[0]["images"] = robust[0]["images"][::-1]  # scores of other images than the run's Table 1
    with pytest.raises(ValueError, match="other test images"):
        aggregate(recs, _meta(), robust=robust)


def test_the_cli_runs_a_tiny_comparison(tmp_path, capsys):
    argv = ["compare", "--out", str(tmp_path / "c"), "--synthetic-items", "24", "--variants", "full,dpersona",
            "--epochs1", "1", "--epochs2", "1", "--samples", "2", "--batch-size", "8"]  # fmt: skip
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert out.count("train1 ") == 2 and "train2 dpersona" in out and "wrote" in out  # full, probunet
    assert cli(argv) == 0 and capsys.readouterr().out.count("done before") == 7  # 3 trainings, 3 evals, refs
    # --robustness adds a Table 1 on degraded images per phase-1 training (full's; probunet's, whose row is
    # dpersona's) and trains and evaluates nothing again
    assert cli([*argv, "--robustness"]) == 0
    out = capsys.readouterr().out
    assert out.count("done before") == 7 and "robust full fold 0" in out and "robust dpersona fold 0" in out, out


def test_robustness_scores_the_degraded_test_images(tmp_path):
    """The robustness unit scores the phase-1 model on its Table 1 images degraded by each condition: the
    scores of evaluate_model with that degradation, not the clean ones. (A 1-epoch model predicts nothing, so
    an untrained He-initialized model, whose maps depend on the image, stands in for it.)"""
    from harmonizer_fast.checkpoint import save_checkpoint
    from harmonizer_fast.evaluate import evaluate_model, perturbation
    from harmonizer_fast.model import HarmonizerNet

    data = _data()
    cmp = Comparison(tmp_path, CompareConfig(variants=["full", "no-personalizer"], robustness=True, **TINY), data,
                     log=lambda _m: None)  # fmt: skip
    cmp.run()
    run = cmp.p1("full", 0, 0)
    trained, manifest = run.load_model("best_phase1")
    torch.manual_seed(0)
    stand_in = HarmonizerNet(trained.config)
    with torch.no_grad():  # its maps centred on 0.5 (untrained, they sit near 0.03: every mask empty)
        probs = stand_in.sample(torch.as_tensor(data.images[:8]).float(), 2)
        stand_in.fcomb.last.bias -= torch.logit(probs.median())
    save_checkpoint(run.path, "best_phase1", stand_in, state=manifest["state"])
    for path in (cmp.eval_path("no-personalizer", 0, 0), cmp.robust_path("full", 0, 0)):
        path.unlink()
    cmp.run()
    assert not cmp.robust_path("no-personalizer", 0, 0).exists()  # its Table 1 row is full's
    record = json.loads(cmp.robust_path("full", 0, 0).read_text())
    clean = json.loads(cmp.eval_path("no-personalizer", 0, 0).read_text())
    assert record["images"] == clean["images"] and record["patients"] == clean["patients"]
    assert list(record["conditions"]) == ["noise 0.1", "noise 0.25", "blur 1.75", "gamma 1.75"]
    scoring = run.scoring_set(data, stand_in.config, "test")
    for kind, level in (("noise", 0.25), ("gamma", 1.75)):
        got = record["conditions"][f"{kind} {level:g}"]["t1_ged"]
        want = evaluate_model(stand_in, scoring.data, scoring.indices, num_samples=TINY["samples"], seed=0,
                              heads="none", transform=perturbation(kind, level, 0)).prior.per_image("ged")  # fmt: skip
        assert got == pytest.approx(want.tolist(), abs=1e-12)
        assert not np.allclose(got, clean["per_image"]["t1_ged"], atol=1e-4), kind  # the degradation reached it
    # a record made before a condition was added: the missing condition is scored, the others kept as they are
    older = json.loads(json.dumps(record))
    del older["conditions"]["noise 0.1"]
    older["conditions"]["blur 1.75"]["t1_ged"] = [-1.0] * len(record["images"])
    cmp.robust_path("full", 0, 0).write_text(json.dumps(older))
    cmp.run()
    again = json.loads(cmp.robust_path("full", 0, 0).read_text())
    assert list(again["conditions"]) == list(record["conditions"])
    assert again["conditions"]["noise 0.1"] == record["conditions"]["noise 0.1"]
    assert again["conditions"]["blur 1.75"]["t1_ged"] == [-1.0] * len(record["images"])


def test_a_collapsed_prior_is_flagged_by_the_reports(tmp_path):
    """[science] #35 proof: a model whose prior mean does not depend on the image (collapsed on purpose: the
    prior head's weights zeroed, sigma pushed past its clamp) is flagged in the compare report's latent table
    and at the top of the evaluate report; an intact prior is not."""
    from harmonizer_fast.data import make_synthetic
    from harmonizer_fast.evaluate import report, run_evaluation
    from harmonizer_fast.latent_stats import collapse_flags, latent_statistics
    from harmonizer_fast.model import HarmonizerConfig, HarmonizerNet
    from harmonizer_fast.model.latent import LOG_SIGMA_MAX

    data = make_synthetic(8, size=32, raters=2, seed=2)
    torch.manual_seed(0)
    net = HarmonizerNet(HarmonizerConfig.small(num_raters=2))
    with torch.no_grad():
        net.prior.to_params.weight[: net.config.latent_dim] *= 3000  # an image-dependent mean
    assert collapse_flags(latent_statistics(net, data)) == []
    with torch.no_grad():
        net.prior.to_params.weight.zero_()
        net.prior.to_params.bias[net.config.latent_dim :] = LOG_SIGMA_MAX + 20
    latent = latent_statistics(net, data)
    rec = _record("full", 0, 0, [0, 1], [0.2, 0.3])
    rec.update(latent=latent, prior_flags=collapse_flags(latent), uncertainty_vs_raters={"spearman": 0.1})
    md = markdown(aggregate([rec], _meta()))
    row = next(line for line in md.splitlines() if line.startswith("| full | 0 | 0 |"))
    assert "image-independent prior" in row and "clamped prior" in row
    result = run_evaluation(net, data, np.arange(8), tmp_path, num_samples=2, figures=False)
    head = report(result).split("### Table 1")[0]
    assert "image-independent prior" in head and "clamped prior" in head
