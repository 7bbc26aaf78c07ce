"""``benchmarks/lidc_head_identity.py`` ([science] #35): its rows agree with the package's own scoring of the
same heads (``evaluate_model``) and with the label-only oracle (``label_only_references``), and its markdown is
redrawn from its JSON byte for byte."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harmonizer_fast import data as hd
from harmonizer_fast.checkpoint import load_model, read_manifest
from harmonizer_fast.cli import main as cli
from harmonizer_fast.evaluate import evaluate_model
from harmonizer_fast.references import label_only_references
from harmonizer_fast.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("head-identity")
    data = tmp / "data.npz"
    hd.write_npz(hd.make_synthetic(32, size=32, raters=4, seed=4), data)
    run = tmp / "run"
    assert cli(["train", "--data", str(data), "--config", "small", "--out", str(run), "--epochs", "1", "--epochs2",
                "1", "--batch-size", "8", "--rater-order", "area-asc", "--no-progress"]) == 0  # fmt: skip
    out = tmp / "report"
    script = [sys.executable, str(ROOT / "benchmarks" / "lidc_head_identity.py"), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*script, "--data", str(data), "--runs", str(run), "--samples", "3"], capture_output=True,
                          text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, run, out, script, env


def test_rows_agree_with_evaluate_and_the_label_only_oracle(scored):
    data_path, run, out, _, _ = scored
    result = json.loads(out.with_suffix(".json").read_text())
    row = result["runs"][0]
    manifest_path, _ = read_manifest(run / "best.json")
    model, _ = load_model(manifest_path)
    data = hd.load_dataset(str(data_path))
    scoring = RunDir(manifest_path.parent).scoring_set(data, model.config, "test")
    heads = evaluate_model(model, scoring.data, scoring.indices, num_samples=3, seed=0, heads="personalized").heads
    np.testing.assert_array_equal(row["identity"]["model: personalized heads"], heads.per_image("head_identity"))
    oracle = label_only_references(scoring.data, scoring.indices, 3)["area-matched consensus (oracle)"]["table2"]
    assert np.mean(row["identity"]["area-matched consensus (oracle)"]) == pytest.approx(oracle["head_identity"][0])
    assert row["patient_id"] == scoring.data.patient_id[scoring.indices].tolist()
    assert sum(row["rank_shares"]) == pytest.approx(4.0)  # shares of the mean area, one per rater
    assert row["rank_shares"] == sorted(row["rank_shares"])  # trained with the raters in area order, as on LIDC


def test_render_redraws_the_markdown_byte_for_byte(scored):
    _, _, out, script, env = scored
    md = out.with_suffix(".md")
    measured = md.read_bytes()
    md.unlink()
    proc = subprocess.run([*script, "--render"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert md.read_bytes() == measured
