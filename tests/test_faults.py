"""A training run killed at any file operation of any save resumes to exactly the uninterrupted result.

tests/fault_driver.py trains once uninterrupted, counting every write, fsync, rename and delete that
checkpoints and the log make, then for each of them trains again with the process killed at that very
operation (a write torn in half first) and resumes with ``--resume``. Every resume must succeed and end
with the uninterrupted run's weights (``last``, ``best`` and ``best_phase1``, bit for bit), history and log,
and leave no temporary or orphaned file behind.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from harmonizer_fast import data as hd

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["train", "--config", "small", "--epochs", "2", "--epochs2", "1", "--batch-size", "8", "--lr", "1e-3",
         "--no-progress"]  # fmt: skip


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "minutes"} for r in records]


def manifest(run: Path, stem: str) -> dict:
    return json.loads((run / f"{stem}.json").read_text())


def tensors(run: Path, stem: str) -> dict:
    return load_file(str(run / manifest(run, stem)["files"]["weights"]))


def state(run: Path, stem: str) -> dict:
    st = dict(manifest(run, stem)["state"])
    st["history"] = without_timing(st["history"])
    return st


@pytest.mark.slow
def test_kill_at_every_file_operation_then_resume(tmp_path):
    data = tmp_path / "data.npz"
    hd.write_npz(hd.make_synthetic(24, size=32, raters=2, seed=2), data)
    spec = {"args": [*TRAIN, "--data", str(data)], "ref": str(tmp_path / "ref"), "runs": str(tmp_path / "runs")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fault_driver.py"), str(tmp_path / "spec.json")],
                          capture_output=True, text=True, env=env, timeout=1500)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" not in summary, summary
    ops = summary["ops"]
    kinds = {op.split()[0] for op in ops}
    assert kinds == {"write", "fsync", "replace", "unlink"}, kinds
    assert sum(op.startswith("replace last.json") for op in ops) == 3  # one commit per epoch
    failed = [(i, ops[i], rc) for i, rc in enumerate(summary["results"]) if rc != 0]
    assert not failed, f"kill or resume failed at (op, what, status): {failed[:5]} (logs in {spec['runs']})"

    ref = Path(spec["ref"])
    stems = sorted(f.stem for f in ref.glob("*.json"))
    assert stems == ["best", "best_phase1", "last"], stems
    expected_files = {
        ".lock",  # the run's owner lock (RunDir.owned): kept, so no second trainer can race a stale inode
        "log.jsonl",
        *(f"{s}.json" for s in stems),
        *(n for s in stems for n in manifest(ref, s)["files"].values()),
    }
    assert {f.name for f in ref.iterdir()} == expected_files
    ref_tensors = {stem: tensors(ref, stem) for stem in stems}
    ref_log = without_timing([json.loads(line) for line in (ref / "log.jsonl").read_text().splitlines()])
    for i, op in enumerate(ops):
        run = Path(spec["runs"]) / str(i)
        where = f"killed at op {i} ({op})"
        for stem, want in ref_tensors.items():
            got = tensors(run, stem)
            assert got.keys() == want.keys(), where
            assert all(got[k].equal(want[k]) for k in want), f"{where}: {stem} weights differ"
            assert state(run, stem) == state(ref, stem), f"{where}: {stem} state differs"
        log = without_timing([json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()])
        assert log == ref_log, where
        assert {f.name for f in run.iterdir()} == expected_files, f"{where}: leftover files"
