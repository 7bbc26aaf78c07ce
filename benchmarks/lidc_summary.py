"""Summarize benchmarks/lidc_budget.sh: one table of the held-out metrics per variant, written as
benchmarks/results/lidc-small-cpu.json and .md (atomically), next to the machine it ran on.

    python benchmarks/lidc_summary.py RUNS_DIR [--minutes M] [--names full=RUN_DIR:EVAL_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_results

VARIANTS = {
    "full": "full model (harmonizer + GED loss)",
    "baseline": "probabilistic U-Net baseline (no harmonizer, no GED loss)",
    "no-ged-loss": "no GED loss",
    "no-harmonizer": "no harmonizer",
}
KEYS = ("ged", "dice_soft", "dice_max", "dice_match")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--names", nargs="*", default=[], help="name=RUN_DIR:EVAL_DIR, overriding RUNS/<name> and "
                   "RUNS/eval-<name>")  # fmt: skip
    args = p.parse_args()
    dirs = {n: (args.runs / n, args.runs / f"eval-{n}") for n in VARIANTS}
    for kv in args.names:
        name, paths = kv.split("=", 1)
        run, ev = paths.split(":", 1)
        dirs[name] = (Path(run), Path(ev))
    rows = {}
    for name, (run, ev) in dirs.items():
        metrics = ev / "metrics.json"
        if not metrics.is_file():
            continue
        m = json.loads(metrics.read_text())["table1"]
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        best = json.loads((run / "best.json").read_text())["state"]
        rows[name] = {"label": VARIANTS[name], "mean": m["mean"], "std": m["std"], "n_images": m["n_images"],
                      "epochs_validated": len(log), "best_epoch": best["position"]["epoch"],
                      "minutes": log[-1]["minutes"]}  # fmt: skip
    payload = {"benchmark": "lidc-small-cpu", "budget_minutes": args.minutes, "machine": machine_info(), "rows": rows}
    lines = [
        "# LIDC-IDRI, small config, equal CPU budget",
        "",
        f"`bash benchmarks/lidc_budget.sh {args.minutes:g}` on {payload['machine']['date']}: "
        f"{payload['machine']['cpu']} ({payload['machine']['cpu_cores']} cores), torch {payload['machine']['torch']}. "
        f"Each variant: phase 1 for {args.minutes:g} minutes (best epoch on validation patients), then K = 16 prior "
        "samples per image on the held-out test patients (fold 0 of 4, 50 patients), dpersona GED; mean ± std over "
        "images.",
        "",
        "| variant | GED | Dice_soft | Dice_max | Dice_match | test images | epochs in budget (best) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        cells = " | ".join(f"{r['mean'][k]:.4f} ± {r['std'][k]:.4f}" for k in KEYS)
        lines.append(f"| {r['label']} | {cells} | {r['n_images']} | {r['epochs_validated']} ({r['best_epoch']}) |")
    write_results("lidc-small-cpu", payload, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
