"""Evaluation, batch sampling and the demo through the command line: the metrics.json / report contract,
determinism, every figure, the robustness transforms, the streamed sample file and the CLI's clear errors."""

import json

import numpy as np
import pytest
import torch

from harmonizer_fast import data as hd
from harmonizer_fast.cli import main as cli
from harmonizer_fast.evaluate import ROBUSTNESS, gaussian_blur, high_frequency_fraction, perturbation

KEYS = ("ged", "dice_soft", "dice_max", "dice_match", "dice_each_mean")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    npz = root / "d.npz"
    hd.write_npz(hd.make_synthetic(40, size=32, raters=3, seed=2), npz)
    run = root / "run"
    assert cli(["train", "--data", str(npz), "--out", str(run), "--epochs", "1", "--batch-size", "8",
                "--no-progress"]) == 0  # fmt: skip
    return npz, run


def test_evaluate_contract_figures_and_determinism(trained, tmp_path, capsys):
    npz, run = trained
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        args = ["evaluate", "--checkpoint", str(run), "--data", str(npz), "--out", str(out), "--num-samples", "4"]
        assert cli([*args, "--robustness"] if name == "a" else args) == 0
        outs.append(json.loads((out / "metrics.json").read_text()))
    assert "held-out test patients" in capsys.readouterr().out
    m = outs[0]
    assert m["table2_heads"] == "personalized"  # a two-phase run: Table 2 scores the personalized heads
    for table in ("table1", "table2"):
        for key in KEYS:
            assert key in m[table]["mean"] and key in m[table]["std"]
            assert m[table]["mean"][key] == outs[1][table]["mean"][key]  # same seed, same numbers
        assert {"per_rater", "calibration", "entropy_medians", "dice_by_size"} <= set(m[table])
    assert {"ged_vs_k", "spectral"} <= set(m)
    assert list(m["ged_vs_k"]) == ["1", "4", "8", "16", "32"]
    assert set(m["robustness"]["by_kind"]) == set(ROBUSTNESS)
    for fig in ("samples.png", "ged_vs_k.png", "reliability.png", "robustness.png"):
        assert (tmp_path / "a" / fig).stat().st_size > 1000, fig
    assert "robustness.png" not in outs[1]["figures"]
    report = (tmp_path / "a" / "report.md").read_text()
    assert "Dice_match" in report and "Robustness" in report and "GED and Dice_soft against K" in report
    assert "Table 1" in report and "Table 2" in report and "Dice_A(i)" in report
    assert m["robustness"]["metric_label"] == "personalized Dice_mean"


def test_sample_streams_a_readable_npz(trained, tmp_path):
    npz, run = trained
    out = tmp_path / "samples.npz"
    assert cli(["sample", "--checkpoint", str(run), "--data", str(npz), "--out", str(out), "--samples", "3",
                "--batch", "16", "--no-progress", "--split", "all"]) == 0  # fmt: skip
    with np.load(out) as z:
        s, h, idx = z["samples"], z["heads"], z["index"]
    assert s.shape == (40, 3, 32, 32) and s.dtype == np.float16 and h.shape == (40, 3, 32, 32)
    np.testing.assert_array_equal(idx, np.arange(40))
    assert 0.0 <= float(s.min()) and float(s.max()) <= 1.0
    from harmonizer_fast.checkpoint import load_model

    model, _ = load_model(run)
    data = hd.read_npz(npz)
    g = torch.Generator().manual_seed(0)
    first = model.sample(torch.from_numpy(data.images[:16]), 3, generator=g).numpy().astype(np.float16)
    np.testing.assert_array_equal(s[:16], first)


def test_robustness_transforms():
    x = torch.full((2, 1, 32, 32), 0.5)
    idx = np.array([3, 7])
    noisy = perturbation("noise", 0.1, seed=1)(x, idx)
    assert abs(float((noisy - x).std()) - 0.1) < 0.01
    # the noise of an image depends on (seed, level, image) only: not on the batch it comes in
    torch.testing.assert_close(perturbation("noise", 0.1, seed=1)(x[1:], idx[1:]), noisy[1:], rtol=0, atol=0)
    assert not torch.equal(perturbation("noise", 0.1, seed=2)(x, idx), noisy)
    torch.testing.assert_close(gaussian_blur(x, 1.5), x)  # a constant image is a fixed point
    ramp = torch.linspace(0, 1, 32).repeat(1, 1, 32, 1)
    blurred = gaussian_blur(ramp, 1.0)
    assert float((blurred - ramp).abs()[..., 5:-5].max()) < 1e-5  # linear away from the reflected edges
    torch.testing.assert_close(perturbation("gamma", 1.5)(x, idx), x**1.5)
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturbation("rain", 1.0)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    smooth, sharp = torch.cos(2 * torch.pi * xx / 32), torch.cos(2 * torch.pi * 12 * xx / 32)
    assert float(high_frequency_fraction(smooth)) < 0.01 and float(high_frequency_fraction(sharp)) > 0.99


def test_cli_errors(trained, tmp_path, capsys):
    npz, run = trained
    assert cli(["evaluate", "--checkpoint", str(tmp_path / "none"), "--data", str(npz), "--out", str(tmp_path)]) == 2
    assert "checkpoint manifest not found" in capsys.readouterr().err
    (tmp_path / "x.json").write_text("[1, 2]")
    assert cli(["evaluate", "--checkpoint", str(tmp_path / "x.json"), "--data", str(npz), "--out", str(tmp_path)]) == 2
    assert "not a harmonizer-fast checkpoint" in capsys.readouterr().err
    assert (
        cli(["sample", "--checkpoint", str(run), "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    )
    assert "no such file" in capsys.readouterr().err
    other = tmp_path / "other.npz"
    hd.write_npz(hd.make_synthetic(8, size=32, raters=2, seed=3), other)
    assert cli(["evaluate", "--checkpoint", str(run), "--data", str(other), "--out", str(tmp_path / "e")]) == 2
    assert "raters" in capsys.readouterr().err


def test_demo_runs_small(tmp_path, capsys):
    assert cli(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1", "--items", "48", "--no-progress"]) == 0
    out = capsys.readouterr().out
    for row in ("untrained", "phase 1, identity heads (z'_i = z)", "phase 1 + personalizer"):
        assert f"| {row} " in out  # a collapsed row says so after its name
    assert (tmp_path / "demo" / "eval" / "metrics.json").is_file()
    demo = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert demo["rows"]["untrained"]["table2"] is None and demo["rows"]["phase 1 + personalizer"]["table2"]
    # the paired test's images and draws are the tables': its mean difference is the reported gain
    paired, gain = demo["paired_tests"], demo["personalization_gain"]
    assert paired["vs_identity_dice_mean"]["mean_difference"] == pytest.approx(gain["minus_identity_dice_mean"])
    assert paired["vs_phase1_dice_match"]["mean_difference"] == pytest.approx(gain["minus_phase1_dice_match"])
    assert all(0 <= t["wilcoxon_p"] <= 1 for t in paired.values())
