"""The torchmetrics and MONAI adapters of the set-level metrics (harmonizer_fast.metrics.torchmetrics / .monai):
over several batches each equals the mean over images of the function it wraps (those are checked against
transcriptions in tests/test_set_metrics.py); undefined images are left out, not scored; unknown options are
refused by name; and two gloo processes, each with half the batches, equal one process. Skipped where the
framework is not installed (the ``adapters`` extra installs both)."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from harmonizer_fast import metrics

ROOT = Path(__file__).resolve().parents[1]

BATCHES = """
def batches():
    g = torch.Generator().manual_seed(5)
    out = []
    for b in (3, 2, 4, 1):  # uneven batch sizes, so the ranks hold different image counts
        samples = torch.rand(b, 6, 14, 14, generator=g)
        raters = (torch.rand(b, 4, 14, 14, generator=g) < torch.rand(b, 4, 1, 1, generator=g) * 0.5).float()
        raters[0, :2] = 0  # empty raters: the kohl GED is undefined where a sample is empty too
        samples[0, 0] *= 0.4
        out.append((samples, raters))
    return out
"""


def _batches():
    scope = {"torch": torch}
    exec(BATCHES, scope)
    return scope["batches"]()


def _want(name, **options):
    fn = getattr(metrics, name)
    v = torch.cat([fn(s, **options) if name == "sample_diversity" else fn(s, r, **options) for s, r in _batches()])
    v = v.double()
    return v[~torch.isnan(v)].mean(), int(torch.isnan(v).sum())


@pytest.fixture(scope="module")
def tm():
    pytest.importorskip("torchmetrics")
    from harmonizer_fast.metrics import torchmetrics

    return torchmetrics


@pytest.fixture(scope="module")
def mn():
    pytest.importorskip("monai")
    from harmonizer_fast.metrics import monai

    return monai


def test_torchmetrics_classes_average_the_functions(tm):
    assert set(tm.CLASSES) == set(metrics.SET_LEVEL_KEYS) | {"ged"}
    for name, cls in tm.CLASSES.items():
        m = cls()
        for s, r in _batches():
            m.update(s, r)
        want, _ = _want(name)
        torch.testing.assert_close(m.compute(), want, rtol=1e-6, atol=1e-9, msg=name)  # GED is float32
        m.reset()
        assert int(m.images) == 0 and float(m.total) == 0.0


def test_torchmetrics_undefined_images_are_left_out(tm):
    m = tm.GeneralizedEnergyDistance(convention="kohl")
    for s, r in _batches():
        m.update(s, r)
    want, undefined = _want("ged", convention="kohl")
    assert undefined > 0 and int(m.undefined) == undefined and int(m.images) == 10 - undefined
    torch.testing.assert_close(m.compute(), want, rtol=1e-6, atol=1e-9)
    with pytest.warns(UserWarning, match="called before the ``update`` method"):
        assert torch.isnan(tm.GeneralizedEnergyDistance().compute())  # nothing seen: undefined, not 0


def test_torchmetrics_collection_keeps_equal_metrics_apart(tm):
    """Metrics that agree on the first batch (all 1 on copies of the raters) must not be merged into one
    compute group: on the next batch they differ."""
    col = tm.collection()
    _, raters = _batches()[0]
    col.update(raters.repeat(1, 2, 1, 1), raters)
    samples, raters = _batches()[1]
    col.update(samples, raters)
    got = col.compute()
    assert got["hm_iou"] != got["d_max"] and got["combined_sensitivity"] != got["d_max"]


def test_adapters_refuse_unknown_options(tm, mn):
    with pytest.raises(TypeError, match=r"HungarianMatchedIoU: unknown option\(s\) \['convention'\]"):
        tm.HungarianMatchedIoU(convention="phiseg")
    with pytest.raises(TypeError, match=r"CombinedSensitivityMetric: unknown option\(s\) \['empty_dice'\]"):
        mn.CombinedSensitivityMetric(empty_dice=0.0)
    with pytest.raises(ValueError, match=r"samples must be a \(B, K or N, H, W\) tensor, got \(6, 14, 14\)"):
        tm.MaxDiceMatching().update(torch.rand(6, 14, 14), torch.rand(1, 4, 14, 14))


def test_monai_classes_average_the_functions(mn):
    for name, cls in mn.CLASSES.items():
        m = cls()
        for s, r in _batches():
            m(y_pred=s, y=r)
        assert m.get_buffer().shape == (10, 1)
        want, _ = _want(name)
        torch.testing.assert_close(m.aggregate()[0].double(), want, rtol=1e-6, atol=1e-9, msg=name)
    kohl = mn.GeneralizedEnergyDistanceMetric(convention="kohl")
    samples, raters = _batches()[0]
    kohl(y_pred=samples[:1] * 0, y=raters[:1] * 0)  # every pair undefined
    assert torch.isnan(kohl.aggregate()).all()  # MONAI's reduction alone would report 0
    with pytest.raises(ValueError, match="y \\(the raters"):
        mn.NormalizedCrossCorrelationMetric()(y_pred=samples)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_adapters_two_processes_equal_one(tm, mn, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(
        textwrap.dedent(
            """
            import json, os, sys, torch, torch.distributed as dist
            from harmonizer_fast.metrics import monai, torchmetrics
            """
        )
        + BATCHES
        + textwrap.dedent(
            """
            dist.init_process_group("gloo")
            rank = dist.get_rank()
            tms = {name: cls() for name, cls in torchmetrics.CLASSES.items()}
            mns = {name: cls() for name, cls in monai.CLASSES.items()}
            for s, r in batches()[2 * rank : 2 * rank + 2]:  # rank 0: batches 0-1, rank 1: 2-3
                for m in tms.values():
                    m.update(s, r)
                for m in mns.values():
                    m(y_pred=s, y=r)
            out = {"tm": {k: m.compute().item() for k, m in tms.items()},
                   "monai": {k: m.aggregate().item() for k, m in mns.items()},
                   "images": {k: m.get_buffer().shape[0] for k, m in mns.items()}}
            if rank == 0:
                with open(sys.argv[1], "w") as f:
                    json.dump(out, f)
            dist.barrier()
            dist.destroy_process_group()
            # gloo's threads abort the interpreter's finalization now and then (SIGABRT after all this): end here,
            # as harmonizer_fast.cli.main ends a rank
            os._exit(0)
            """
        )
    )
    out = tmp_path / "two.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), str(driver), str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads(out.read_text())
    for name in tm.CLASSES:
        want, _ = _want(name)
        assert two["tm"][name] == pytest.approx(want.item(), rel=1e-6, abs=1e-9), name
        assert two["monai"][name] == pytest.approx(want.item(), rel=1e-6, abs=1e-9), name
        assert two["images"][name] == 10
