"""The run directory: the data record a run keeps, and which images evaluate/sample score (the run's held-out
patients only on the run's own dataset, never its indices applied to another dataset)."""

import numpy as np
import pytest

from harmonizer_fast import data as hd
from harmonizer_fast.model import HarmonizerConfig
from harmonizer_fast.rundir import RunDir
from harmonizer_fast.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = hd.make_synthetic(40, size=32, raters=2, seed=8)
    cfg = HarmonizerConfig.small(num_raters=2)
    tc = TrainConfig.for_model(cfg, phase="1", epochs_phase1=1, batch_size=8, val_samples=2, rater_order="area-asc")
    trainer = Trainer(data, cfg, tc, tmp_path_factory.mktemp("rundir") / "run", progress=False, log=lambda _m: None)
    trainer.fit()
    return data, cfg, RunDir(trainer.run.path), trainer


def test_the_run_records_its_data(run):
    data, _, rd, trainer = run
    record = rd.data_record()
    assert record.fingerprint == data.fingerprint() and record.n_items == len(data)
    assert record.rater_order == "area-asc"
    np.testing.assert_array_equal(record.split.test, trainer.split.test)
    assert rd.state("best")["data"] == rd.state("last")["data"]


def test_scoring_uses_held_out_patients_only_on_the_runs_data(run):
    data, cfg, rd, trainer = run
    same = rd.scoring_set(data, cfg, "test")
    np.testing.assert_array_equal(same.indices, trainer.split.test)
    assert "held-out test patients" in same.description
    np.testing.assert_array_equal(same.data.masks, trainer.data.masks)  # prepared as in training (area order)
    everything = rd.scoring_set(data, cfg, "all")
    assert (
        len(everything.indices) == len(data) and "training and validation patients included" in everything.description
    )
    # another dataset of the same size: all of its images, and never the run's indices
    other = hd.make_synthetic(40, size=32, raters=2, seed=9)
    s = rd.scoring_set(other, cfg, "test")
    np.testing.assert_array_equal(s.indices, np.arange(40))
    assert "not the dataset the run was trained on" in s.description
    np.testing.assert_array_equal(s.data.masks, other.masks)  # stored order, only padded (32 is a multiple)
    with pytest.raises(ValueError, match="split must be one of"):
        rd.scoring_set(data, cfg, "train")


def test_fingerprint_sees_any_change():
    d = hd.make_synthetic(8, size=32, raters=2, seed=1)
    assert d.fingerprint() == hd.make_synthetic(8, size=32, raters=2, seed=1).fingerprint()
    changed = hd.MultiRaterData(d.images.copy(), d.masks.copy(), d.patient_id.copy())
    changed.masks[3, 1, 5, 5] ^= 1
    assert changed.fingerprint() != d.fingerprint()
    renamed = hd.MultiRaterData(d.images, d.masks, np.array([f"p{i}" for i in range(8)]))
    assert renamed.fingerprint() != d.fingerprint()
