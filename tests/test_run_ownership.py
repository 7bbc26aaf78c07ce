"""[reliability] #36 item 1: a run directory is created by one ``train`` and continued only by ``--resume``; a
lock refuses a second trainer; ``--resume`` checks the recorded model, data and recipe, extends the plan
when asked (and says so) or refuses naming the difference; every trainer loop ends, from any recorded
position under any asked plan."""

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harmonizer_fast import data as hd
from harmonizer_fast.cli import main as cli
from harmonizer_fast.model import HarmonizerConfig
from harmonizer_fast.resume import ResumeError, check_position, resume_plan, stage_ends
from harmonizer_fast.rundir import RunDir
from harmonizer_fast.train import TrainConfig, Trainer

TRAIN = ("train", "--config", "small", "--batch-size", "8", "--no-progress", "--lr", "1e-3")


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "synth.npz"
    hd.write_npz(hd.make_synthetic(24, size=32, raters=2, seed=1), path)
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, npz):
    """A finished phase-1 run of one epoch (copied per test that changes it)."""
    run = tmp_path_factory.mktemp("runs") / "run"
    assert cli([*TRAIN, "--data", str(npz), "--out", str(run), "--phase", "1", "--epochs", "1"]) == 0
    return run


def snapshot(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_train_into_an_existing_run_without_resume_refuses_and_touches_nothing(finished, npz, capsys):
    before = snapshot(finished)
    assert cli([*TRAIN, "--data", str(npz), "--out", str(finished), "--epochs", "1", "--seed", "3"]) == 2
    err = one_line_error(capsys)
    assert "already holds a run" in err and "--resume" in err
    assert snapshot(finished) == before


def test_a_second_trainer_of_a_held_run_is_refused(tmp_path, npz, capsys):
    run = tmp_path / "run"
    with RunDir(run).owned():  # as a first trainer holds it for its whole life
        assert cli([*TRAIN, "--data", str(npz), "--out", str(run), "--epochs", "1"]) == 2
        assert "is training this run" in one_line_error(capsys)
    assert not (run / "last.json").exists()
    # released when the holder ends: the run can be trained now
    assert cli([*TRAIN, "--data", str(npz), "--out", str(run), "--phase", "1", "--epochs", "1"]) == 0


@pytest.mark.parametrize(
    "flags, names",
    [
        (("--batch-size", "4"), ["batch_size: recorded 8, asked 4"]),
        (("--lr", "1e-2"), ["lr_phase1", "may lower a rate, not raise it"]),
        (("--seed", "5"), ["seed: recorded 0, asked 5"]),
        (("--fold", "1"), ["fold: recorded 0, asked 1"]),
        (("--no-ged-loss",), ["the run's model differs in use_ged_loss"]),
        (("--epochs", "1", "--phase", "2"), ["phase: recorded '1', asked '2'"]),
    ],
)
def test_resume_refuses_another_recipe_naming_the_difference(finished, tmp_path, npz, capsys, flags, names):
    run = copy_run(finished, tmp_path / "run")
    before = snapshot(run)
    args = [*TRAIN, "--data", str(npz), "--out", str(run), "--resume", "--phase", "1", "--epochs", "1"]
    assert cli([*args, *flags]) == 2
    err = one_line_error(capsys)
    assert all(n in err for n in names), err
    assert snapshot(run) == before


def test_resume_refuses_another_dataset(finished, tmp_path, capsys):
    other = tmp_path / "other.npz"
    hd.write_npz(hd.make_synthetic(24, size=32, raters=2, seed=9), other)
    run = copy_run(finished, tmp_path / "run")
    assert cli([*TRAIN, "--data", str(other), "--out", str(run), "--resume", "--phase", "1", "--epochs", "1"]) == 2
    assert "trained on other data" in one_line_error(capsys)


def test_resume_extends_a_finished_run_and_says_so(finished, tmp_path, npz, capsys):
    run = copy_run(finished, tmp_path / "run")
    # fewer epochs than the run has done: refused, not "already complete"
    base = [*TRAIN, "--data", str(npz), "--out", str(run), "--resume"]
    assert cli([*base, "--phase", "both", "--epochs", "1", "--epochs2", "1", "--lr", "5e-4"]) == 0
    out = capsys.readouterr().out
    assert "the plan grows by phase 2" in out and "lr_phase1 lowered from 0.001 to 0.0005" in out
    state = json.loads((run / "last.json").read_text())["state"]
    assert [h["phase"] for h in state["history"]] == [1, 2] and state["stopped"] == "completed"
    assert state["train_config"]["phase"] == "both" and state["train_config"]["lr_phase1"] == 5e-4
    # the finished phase 1 cannot change now; the finished last stage can grow
    assert cli([*base, "--phase", "both", "--epochs", "2"]) == 2
    assert "epochs of phase 1: it finished its 1 epochs; asked 2" in one_line_error(capsys)
    assert cli([*base, "--phase", "both", "--epochs", "1", "--epochs2", "2", "--lr", "5e-4"]) == 0
    assert "phase 2 extended from 1 to 2 epochs" in capsys.readouterr().out
    assert len(json.loads((run / "last.json").read_text())["state"]["history"]) == 3
    # nothing more asked: complete, exit 0, nothing trained
    before = snapshot(run)
    assert cli([*base, "--phase", "both", "--epochs", "1", "--epochs2", "2", "--lr", "5e-4"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert snapshot(run) == before


def test_a_position_outside_its_plan_is_a_damaged_manifest_not_a_hang(finished, tmp_path, npz, capsys):
    run = copy_run(finished, tmp_path / "run")
    manifest = json.loads((run / "last.json").read_text())
    manifest["state"]["position"] = {"stage": 0, "epoch": 10**9, "step": 0}
    (run / "last.json").write_text(json.dumps(manifest))
    assert cli([*TRAIN, "--data", str(npz), "--out", str(run), "--resume", "--phase", "1", "--epochs", "1"]) == 2
    assert "lies outside its plan" in one_line_error(capsys)


def test_an_old_run_resumes_with_the_meaning_it_was_recorded_with(tmp_path):
    """A run recorded before an option existed (here lr_prior, ged_through_prior) keeps its recorded meaning
    when resumed with today's defaults, instead of being refused or silently changed."""
    data = hd.make_synthetic(24, size=32, raters=2, seed=3)
    cfg = HarmonizerConfig.small(num_raters=2)
    tc = TrainConfig.for_model(cfg, phase="1", epochs_phase1=2, batch_size=8, val_samples=2, max_minutes=1e-9)
    run = tmp_path / "run"
    Trainer(data, replace(cfg, ged_through_prior="full"), replace(tc, lr_prior=None), run, progress=False,
            log=lambda _m: None).fit()  # fmt: skip
    assert tc.lr_prior == 3e-4  # today's default for the small preset
    manifest = json.loads((run / "last.json").read_text())
    del manifest["state"]["train_config"]["lr_prior"]
    manifest["model_config"].pop("ged_through_prior")
    (run / "last.json").write_text(json.dumps(manifest))
    again = Trainer(data, cfg, replace(tc, max_minutes=None), run, progress=False, log=lambda _m: None)
    assert again.fit(resume=True).stopped == "completed"
    assert again.tc.lr_prior is None and again.net.config.ged_through_prior == "full"


# ---- every loop ends: resume_plan from any recorded position under any asked plan

phases = st.sampled_from(["1", "2", "both"])


@settings(max_examples=300, deadline=None)
@given(phases, phases, st.integers(1, 6), st.integers(1, 6), st.integers(1, 6), st.integers(1, 6),
       st.integers(-2, 14), st.integers(0, 12), st.integers(-1, 3))  # fmt: skip
def test_resume_plan_always_moves_forward_or_refuses(p_old, p_new, e1, e2, f1, f2, epoch, stage_hint, step):
    steps = 3
    old = TrainConfig(phase=p_old, epochs_phase1=e1, epochs_phase2=e2)
    new = TrainConfig(phase=p_new, epochs_phase1=f1, epochs_phase2=f2)
    stages = old.stages()
    stage = min(stage_hint, len(stages))
    try:
        check_position(stages, stage, epoch, step, steps)
    except ResumeError:
        return  # the trainer reports a damaged manifest
    try:
        point = resume_plan(old, new, stage, epoch, step)
    except ResumeError as exc:
        assert str(exc).startswith("--resume: ")
        return
    ends = stage_ends(new.stages())
    if point.stage < len(ends):  # the stage in progress contains the position: the epoch loop runs
        start = ends[point.stage] - new.stages()[point.stage][1]
        assert start <= point.epoch < ends[point.stage]
    else:  # nothing left: the trainer says complete
        assert point.epoch >= (ends[-1] if ends else 0) and point.step == 0


def test_a_diverged_run_stops_through_one_door_and_resumes_at_a_lower_rate(tmp_path, npz, capsys, monkeypatch):
    """[reliability] #36 item 5: --lr 1000 used to die as 'internal error: ValueError: ged: samples contains
    NaN' in validation. Now any non-finite loss, gradient, weight or validation prediction is one line, exit 1,
    the run kept at its last good epoch, and a resume at a lower rate continues it."""
    # a rate that cannot train: the loss is NaN within the first epoch, nothing was committed
    args = [*TRAIN, "--data", str(npz), "--phase", "1", "--epochs", "3"]
    assert cli([*[a if a != "1e-3" else "1000" for a in args], "--out", str(tmp_path / "wild")]) == 1
    err = one_line_error(capsys)
    assert err.startswith("harmonizer-fast train: error: training diverged:") and "no epoch was committed" in err
    # a run that diverges in its second epoch (the loss made NaN from the third step on)
    import harmonizer_fast.train as train_module

    real, calls = train_module.losses.total_loss, []

    def diverging(*a, **kw):
        loss, parts = real(*a, **kw)
        calls.append(1)
        return (loss * float("nan"), {**parts, "total": float("nan")}) if len(calls) > 2 else (loss, parts)

    run = tmp_path / "run"
    monkeypatch.setattr(train_module.losses, "total_loss", diverging)
    assert cli([*args, "--out", str(run)]) == 1
    err = one_line_error(capsys)
    assert "the loss is nan at epoch 2" in err and "last good checkpoint (epoch 1)" in err, err
    assert "train --resume --lr 0.0001" in err, err
    assert json.loads((run / "last.json").read_text())["state"]["position"]["epoch"] == 1
    monkeypatch.undo()
    assert cli([*args, "--out", str(run), "--resume", "--lr", "1e-4"]) == 0
    assert "lr_phase1 lowered from 0.001 to 0.0001" in capsys.readouterr().out
    state = json.loads((run / "last.json").read_text())["state"]
    assert state["position"]["epoch"] == 3
    assert state["scheduler"]["base_lrs"] == [1e-4, 3e-4]  # the lowered rate is the one trained with
