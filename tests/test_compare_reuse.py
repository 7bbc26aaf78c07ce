"""``compare --reuse``: a training done outside the comparison (the trainer or the per-rater module called as a
user would) stands for a unit only when it is that unit's training; otherwise a one-line refusal that names
what differs."""

from __future__ import annotations

import json

import pytest

from harmonizer_fast.cli import main as cli
from harmonizer_fast.compare import CompareConfig, Comparison, run_compare
from harmonizer_fast.compare.reuse import ReuseError
from harmonizer_fast.data import make_synthetic
from harmonizer_fast.model import HarmonizerConfig
from harmonizer_fast.per_rater import PerRaterRecipe, train_per_rater
from harmonizer_fast.train import TrainConfig, Trainer

TINY = dict(epochs1=1, epochs2=1, samples=2, batch_size=8)
VARIANTS = ["full", "probunet", "dpersona", "per-rater"]


def _data():
    return make_synthetic(48, size=32, raters=2, seed=0)


def _train(data, config, path, init=None, **recipe):
    tc = TrainConfig.for_model(config, batch_size=8, **recipe)  # as `harmonizer-fast train` builds it
    Trainer(data, config, tc, path, progress=False, log=lambda _m: None).fit(init_from=init)
    return path


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """Runs trained by hand: the full model in one run of both phases, a Prob. U-Net without heads (its
    personalizer fields differ from the comparison's, which phase 1 never uses), D-Persona's heads on it, the
    per-rater baseline, and runs that differ from the comparison's in one fact each."""
    root, data = tmp_path_factory.mktemp("outside"), _data()
    full = HarmonizerConfig.small(num_raters=2)
    probunet = dict(use_harmonizer=False, use_ged_loss=False)
    pu_config = HarmonizerConfig.small(num_raters=2, use_personalizer=False, **probunet)
    dp_config = HarmonizerConfig.small(num_raters=2, personalizer="dpersona", prior_bank=100, **probunet)
    _train(data, full, root / "full", phase="both", epochs_phase1=1, epochs_phase2=1)
    _train(data, pu_config, root / "pu", phase="1", epochs_phase1=1)
    _train(data, dp_config, root / "dp", init=root / "pu" / "best_phase1.json", phase="2", epochs_phase2=1,
           lr_phase2=3e-3)  # fmt: skip
    train_per_rater(data, full, PerRaterRecipe(epochs=1, batch_size=8), root / "pr", log=lambda _m: None)
    _train(data, full, root / "full-2-epochs", phase="1", epochs_phase1=2)
    _train(data, pu_config, root / "pu-fold-1", phase="1", epochs_phase1=1, fold=1)
    _train(data, pu_config, root / "pu-no-aug", phase="1", epochs_phase1=1, augment=False)
    _train(data, dp_config, root / "dp-other-base", init=root / "pu-no-aug" / "best_phase1.json", phase="2",
           epochs_phase2=1, lr_phase2=3e-3)  # fmt: skip
    return root


def _reuse_map(root):
    return {"p1-full-f0-s0": root / "full", "p2-full-f0-s0": root / "full", "p1-probunet-f0-s0": root / "pu",
            "p2-dpersona-f0-s0": root / "dp", "per-rater-f0-s0": root / "pr"}  # fmt: skip


def test_reused_trainings_are_not_trained_again_and_the_report_names_them(outside, tmp_path):
    lines: list[str] = []
    cc = CompareConfig(variants=VARIANTS, **TINY)
    result = run_compare(_data(), tmp_path / "cmp", cc, reuse=_reuse_map(outside), log=lines.append)
    assert sum(line.startswith("reused ") for line in lines) == 5
    trainings = [line for line in lines if "] train" in line]
    assert len(trainings) == 5 and all("(done before)" in line for line in trainings)
    reused = json.loads((tmp_path / "cmp" / "reused.json").read_text())
    assert reused["p2-dpersona-f0-s0"]["checked"][-1].startswith("started from p1-probunet-f0-s0")
    assert any("personalizer fields aside" in c for c in reused["p1-probunet-f0-s0"]["checked"])
    runs = {t["run"]: t for v in result["variants"].values() for r in v["runs"] for t in r["trainings"]}
    assert runs["p2-dpersona-f0-s0"]["reused_from"] == str(outside / "dp")
    assert runs["p2-full-f0-s0"]["epochs"] == 1 and runs["p1-full-f0-s0"]["epochs"] == 1  # each its own phase
    assert runs["p2-full-f0-s0"]["best_epoch"] == 1  # counted within phase 2, not from phase 1's first epoch
    assert "(reused)" in (tmp_path / "cmp" / "compare.md").read_text()
    again: list[str] = []  # a rerun with the same --reuse keeps what it took
    run_compare(_data(), tmp_path / "cmp", cc, reuse=_reuse_map(outside), log=again.append)
    assert not any(line.startswith("reused ") for line in again)


@pytest.mark.parametrize(
    "unit, run, first, message",
    [
        ("p1-full-f0-s0", "full-2-epochs", {}, r"another recipe \(epochs_phase1: 2 != 1\)"),
        ("p1-probunet-f0-s0", "pu-fold-1", {}, r"its train images are not the comparison's fold 0"),
        ("p2-dpersona-f0-s0", "dp", {}, r"its phase-1 unit p1-probunet-f0-s0 is not there yet"),
        ("p2-dpersona-f0-s0", "dp-other-base", {"p1-probunet-f0-s0": "pu"},
         r"its phase-1 weights are not those of p1-probunet-f0-s0"),
        ("p2-full-f0-s0", "dp", {"p1-full-f0-s0": "full"}, r"another model config"),
        ("p2-probunet-f0-s0", "pu", {}, r"not a unit of this comparison"),
        ("per-rater-f0-s0", "full", {}, r"not a per-rater baseline"),
    ],
)  # fmt: skip
def test_a_run_that_is_not_the_units_training_is_refused(outside, tmp_path, unit, run, first, message):
    cmp = Comparison(tmp_path / "cmp", CompareConfig(variants=VARIANTS, **TINY), _data(), log=lambda _m: None)
    cmp.reuse({u: outside / r for u, r in first.items()})
    with pytest.raises(ReuseError, match=message):
        cmp.reuse({unit: outside / run})
    assert not (tmp_path / "cmp" / "runs" / unit).exists()


def test_a_comparison_on_a_budget_takes_no_outside_run(tmp_path):
    cc = CompareConfig(variants=["full"], minutes1=1.0, minutes2=1.0, **TINY)
    with pytest.raises(ReuseError, match="budget of minutes trains its own runs"):
        Comparison(tmp_path, cc, _data()).reuse({"p1-full-f0-s0": tmp_path})
    with pytest.raises(ValueError, match="per-rater baseline trains for epochs"):
        CompareConfig(variants=["full", "per-rater"], minutes1=1.0)


def test_a_seed_trained_by_hand_on_the_comparisons_split_is_its_unit(tmp_path):
    """``train --seed 1`` draws its patient partition from seed 1 too, so compare (split seed 0 for every seed)
    refuses it; ``train --seed 1 --split-seed 0`` is the comparison's seed-1 unit."""
    from harmonizer_fast.data.readers import write_npz

    data = _data()
    write_npz(data, tmp_path / "data.npz")
    common = ["train", "--data", str(tmp_path / "data.npz"), "--phase", "1", "--epochs", "1", "--batch-size", "8",
              "--no-harmonizer", "--no-personalizer", "--no-ged-loss", "--seed", "1", "--no-progress"]  # fmt: skip
    assert cli([*common, "--out", str(tmp_path / "own-split")]) == 0
    assert cli([*common, "--split-seed", "0", "--out", str(tmp_path / "split-0")]) == 0
    cmp = Comparison(tmp_path / "cmp", CompareConfig(variants=["full", "probunet"], seeds=[1], **TINY), data,
                     log=lambda _m: None)  # fmt: skip
    with pytest.raises(ReuseError, match="its train images are not the comparison's fold 0"):
        cmp.reuse({"p1-probunet-f0-s1": tmp_path / "own-split"})
    cmp.reuse({"p1-probunet-f0-s1": tmp_path / "split-0"})
    assert "p1-probunet-f0-s1" in cmp.reused()


def test_the_cli_refuses_a_malformed_reuse_in_one_line(tmp_path, capsys):
    argv = ["compare", "--out", str(tmp_path / "c"), "--synthetic-items", "24", "--reuse", "p1-full-f0-s0"]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--reuse" in err and "UNIT=RUN_DIR" in err
