"""The output folder of ``harmonizer-fast predict`` (layout in :mod:`.runner`): each case staged in a hidden
folder, a work unit's files flushed to disk together, each case published by one rename; failure records,
the leftovers of killed runs, and ``summary.csv`` rebuilt from the cases' own records."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .._io import check_not_input, fsync_dir, sync_filesystem, write_atomic
from .inputs import Case, CaseError, LoadedCase, encode_map

STATUS_OK, STATUS_FAILED = "ok", "failed"
SUMMARY_FIELDS = ("case", "status", "error", "kind", "slices", "height", "width", "unit", "area",
                  "uncertainty", "uncertain_area", "heads_disagreement", "seconds")  # fmt: skip


class CaseWriter:
    """Writes predicted cases into ``out``; ``seeds_of(case, slices)`` gives the seeds a case.json records."""

    def __init__(self, out: Path, seeds_of: Callable[[str, int], dict[str, Any]]) -> None:
        self.out, self.seeds_of = out, seeds_of

    def commit_unit(self, ready: list[tuple[LoadedCase, Any, dict]], samples: bool, preview: bool) -> list[str]:
        """Write each case of a unit into a hidden folder of ``out``, flush them all to disk at once, then rename
        each into place (one atomic step per case); returns "done" or "failed" per case. A case that cannot be
        written becomes a failed row and the others are committed."""
        out = self.out
        staged: dict[int, tuple[Path, list[Path]]] = {}
        for i, (lc, pred, row) in enumerate(ready):
            tmp = out / f".tmp-{lc.case.name}-{os.getpid()}"
            try:
                staged[i] = (tmp, self._stage(tmp, lc, pred, row, samples, preview))
            except (CaseError, OSError, MemoryError) as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                record_failure(out, lc.case.name, exc)
        status = ["failed"] * len(ready)
        try:
            # the data before the renames that publish it: after a crash or a power loss a case is complete or
            # absent, never a folder of empty files that a rerun would skip as done
            _flush([f for _, files in staged.values() for f in files], out)
            for i, (tmp, _) in staged.items():
                _publish(out, ready[i][0].case, tmp)
                status[i] = "done"
            if staged:
                fsync_dir(out)
        except OSError as exc:  # a full or failing disk: the cases not yet published fail, none half-written
            for i in staged:
                if status[i] != "done":
                    record_failure(out, ready[i][0].case.name, exc)
        finally:
            for tmp, _ in staged.values():
                shutil.rmtree(tmp, ignore_errors=True)
        return status

    def _stage(self, tmp: Path, loaded: LoadedCase, pred, row: dict, samples: bool, preview: bool) -> list[Path]:
        """Write the case's files into the hidden folder ``tmp`` (not yet flushed); returns their paths."""
        case = loaded.case
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        g = loaded.geometry
        maps = [("mask", pred.mask, "mask"), ("probability", pred.probability, "probability"),
                ("uncertainty", pred.uncertainty, "probability")]  # fmt: skip
        if pred.heads is not None:
            maps += [(f"rater-{i + 1}", head, "mask") for i, head in enumerate(pred.heads >= 0.5)]
        if pred.probability.size >= 1 << 20:  # a volume: its maps are encoded side by side (zlib frees the GIL)
            with ThreadPoolExecutor(max_workers=min(len(maps), os.cpu_count() or 1)) as pool:
                files = [f for fs in pool.map(lambda m: encode_map(m[0], m[1], g, m[2]), maps) for f in fs]
        else:
            files = [f for name, arr, kind in maps for f in encode_map(name, arr, g, kind)]
        if samples:
            buf = io.BytesIO()
            np.save(buf, pred.samples)
            files.append(("samples.npy", buf.getvalue()))
        if preview:
            from .report import render_preview

            heads = None if pred.heads is None else pred.heads >= 0.5
            image = np.moveaxis(pred.image, 1, 0)
            files.append(("preview.png", render_preview(image, pred.mask, pred.uncertainty, heads)))
        seeds = self.seeds_of(case.name, pred.probability.shape[0])
        record = {"row": row, "sources": [str(p) for p in case.sources], "item": case.item, **seeds}
        # last: the case is done. One line: json's C encoder (indent= falls back to the Python one, 0.4 ms a case)
        files.append(("case.json", (json.dumps(record) + "\n").encode()))
        for name, data in files:
            _write_new(tmp / name, data)
        return [tmp / name for name, _ in files]


def check_not_inside(src: Path, out: Path) -> None:
    """Outputs never land on inputs: ``out`` may be neither the input nor inside an input folder."""
    check_not_input(out, [src], "output")  # an OutputPathError, which is a ValueError
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a folder")


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (and its folder) with ``data``; flushed to disk with the rest of its unit."""
    path.parent.mkdir(exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _flush(files: list[Path], out: Path) -> None:
    """Make ``files`` and their folders durable: one ``syncfs`` for all of them where Linux has it, else one
    fsync per file; then each folder's entries."""
    if files and not sync_filesystem(out):
        for f in files:
            fsync_dir(f)  # open, fsync, close: the same call flushes a file's data
    for folder in {f.parent for f in files}:
        fsync_dir(folder)


def _publish(out: Path, case: Case, tmp: Path) -> None:
    """Rename the flushed folder ``tmp`` to ``out/<case>``, replacing an earlier result of the case."""
    target = out / case.name
    old = out / f".old-{case.name}-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    (out / ".failed" / f"{case.name}.json").unlink(missing_ok=True)


def clean_stale(out: Path) -> None:
    """Remove the hidden working folders of killed runs (their process is gone; live ones are left alone)."""
    for d in [*out.glob(".tmp-*"), *out.glob(".old-*")]:
        pid = d.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass  # another user's live process


def record_failure(out: Path, name: str, exc: BaseException) -> None:
    text = " ".join(str(exc).split()) or type(exc).__name__
    record = {"row": {"case": name, "status": STATUS_FAILED, "error": text}}
    write_atomic(out / ".failed" / f"{name}.json", json.dumps(record) + "\n")


def _row_of(out: Path, name: str) -> dict[str, Any]:
    for path in (out / name / "case.json", out / ".failed" / f"{name}.json"):
        if path.is_file():
            try:
                return json.loads(path.read_text())["row"]
            except (OSError, ValueError, KeyError):
                return {"case": name, "status": STATUS_FAILED, "error": f"{path}: unreadable record"}
    return {"case": name, "status": "pending", "error": "not predicted yet (another part, or an interrupted run)"}


def write_summary(out: Path, names: list[str]) -> list[dict[str, Any]]:
    """``out/summary.csv``: one row per case of the input, from each case's own record on disk."""
    rows = [_row_of(out, n) for n in sorted(names)]
    raters = sorted({k for r in rows for k in r if k.startswith("area_rater")}, key=lambda k: int(k[10:]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*SUMMARY_FIELDS, *raters], restval="", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    write_atomic(out / "summary.csv", buf.getvalue())
    return rows
