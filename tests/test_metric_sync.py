"""MetricAccumulator under torch.distributed: two gloo processes, each updating with its half of the batches,
then compute(), against one process over all batches; and reset()."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from harmonizer_fast.metrics import MetricAccumulator

ROOT = Path(__file__).resolve().parents[1]

BATCHES = """
def batches():
    g = torch.Generator().manual_seed(11)
    out = []
    for b in (3, 2, 4, 1):  # uneven batch sizes, so the ranks hold different image counts
        probs = torch.rand(b, 5, 16, 16, generator=g)
        raters = (torch.rand(b, 3, 16, 16, generator=g) < torch.rand(b, 3, 1, 1, generator=g) * 0.5).float()
        out.append((probs, raters))
    return out
"""


def _batches():
    scope = {"torch": torch}
    exec(BATCHES, scope)
    return scope["batches"]()


def test_two_processes_equal_one(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(
        textwrap.dedent(
            """
            import json, os, sys, torch, torch.distributed as dist
            from harmonizer_fast.metrics import MetricAccumulator
            """
        )
        + BATCHES
        + textwrap.dedent(
            """
            dist.init_process_group("gloo")
            rank = dist.get_rank()
            acc = MetricAccumulator()
            for probs, raters in batches()[2 * rank : 2 * rank + 2]:  # rank 0: batches 0-1, rank 1: 2-3
                acc.update(probs, raters)
            summary = acc.compute()
            combined = acc.synced()  # a collective too: every rank calls it
            if rank == 0:
                rows = {k: combined.per_image(k).tolist() for k in ("ged", "dice_each")}
                with open(sys.argv[1], "w") as f:
                    json.dump({"summary": summary, "rows": rows}, f)
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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29547",
           str(driver), str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads(out.read_text())

    one = MetricAccumulator()
    for probs, raters in _batches():
        one.update(probs, raters)
    # rank 0's images first, then rank 1's: the same order as one process over batches 0..3
    np.testing.assert_array_equal(two["rows"]["ged"], one.per_image("ged"))
    np.testing.assert_array_equal(two["rows"]["dice_each"], one.per_image("dice_each"))
    want = json.loads(json.dumps(one.summary()))
    # the pooled reliability sums add the two ranks' partial sums: equal to the last ulp or so, not bitwise
    cal_two, cal_one = two["summary"].pop("calibration"), want.pop("calibration")
    for key in ("ece_pooled", "reliability"):
        np.testing.assert_allclose(cal_two[key], cal_one[key], rtol=1e-13, atol=0)
    assert two["summary"] == want

    one.reset()
    assert one.rows == {} and one._calibration is None
    probs, raters = _batches()[0]
    one.update(probs, raters)
    assert one.summary()["n_images"] == 3
