"""``harmonizer-fast compare``: the paper's comparisons at equal budget (Tables 1 and 2, appendix B's GED
against K), over patient folds and seeds, with paired tests.

    from harmonizer_fast.compare import CompareConfig, run_compare
    result = run_compare(data, "runs/compare", CompareConfig(variants=["full", "probunet", "dpersona"]))

:mod:`.variants` says what each variant switches, :mod:`.runner` how runs are trained, resumed and scored,
:mod:`.report` how they are aggregated and reported.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..data import MultiRaterData
from .report import markdown, write_report
from .runner import CompareConfig, Comparison
from .variants import PHASE1, REFERENCE, VARIANTS, Variant

__all__ = ["PHASE1", "REFERENCE", "VARIANTS", "CompareConfig", "Comparison", "EarlierResultError", "Variant", "render",
           "run_compare"]


def machine() -> dict[str, Any]:
    from ..profiler import cpu_model

    return {"cpu": cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip


def run_compare(data: MultiRaterData, out: os.PathLike, cc: CompareConfig, *, data_label: str = "",
                report_dir: Optional[os.PathLike] = None, stem: str = "compare", command: str = "",
                reuse: Optional[dict[str, os.PathLike]] = None, scores: Optional[os.PathLike] = None,
                log: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Run (or continue) the comparison in ``out`` and write ``<stem>.json``/``.md``/``-ged-vs-k.png`` to
    ``report_dir`` (default ``out``); returns the aggregated result. ``reuse``: unit -> a run directory
    trained outside the comparison, taken in its place when it is that training (:mod:`.reuse`).
    ``scores``: where each unit's scores are kept (default ``out/evals``), a directory to commit so that the
    comparison continues on another machine (:mod:`.runner`)."""
    cmp = Comparison(Path(out), cc, data, log=log, scores=scores)
    if reuse:
        cmp.reuse(reuse)
    records = [json.loads(p.read_text()) for p in cmp.run()]
    references = [json.loads(cmp.references_path(f).read_text()) for f in cc.folds if cmp.references_path(f).is_file()]
    robust = [json.loads(cmp.robust_path(*u[1:]).read_text()) for u in cmp.units() if u[0] == "robust"]
    meta = {"compare": cc.to_dict(), "data": data_label or f"{len(data)} images", "machine": machine(),
            "command": command or " ".join(["harmonizer-fast", *sys.argv[1:]])}  # fmt: skip
    target = Path(report_dir) if report_dir is not None else Path(out)
    target.mkdir(parents=True, exist_ok=True)
    return write_report(records, meta, target, stem, references, robust)


class EarlierResultError(ValueError):
    """A comparison result of an earlier format, which :func:`render` does not redraw."""


def render(result_json: os.PathLike) -> Path:
    """Rewrite the markdown report next to an aggregated ``<stem>.json`` from that JSON alone."""
    path = Path(result_json)
    result = json.loads(path.read_text())
    tables = [t for v in result["variants"].values() for t in (v.get("table1"), v.get("table2")) if t]
    if any("patients" not in cell for t in tables for cell in t.values()):
        raise EarlierResultError(f"{path}: written by an earlier version of compare (statistics over images, not "
                                 "patients); its markdown is the one it wrote, and running the comparison again gives "
                                 "the current one")  # fmt: skip
    md = path.with_suffix(".md")
    from .._io import write_atomic

    write_atomic(md, markdown(result))
    return md
