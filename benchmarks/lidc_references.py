"""The label-only references on the LIDC export under both protocols ([science] #35 item 3): what predictors
that never see the image score on all slices and on the slices where every rater drew, with the share of
empty masks per rater. Writes ``benchmarks/results/lidc-references.{json,md}``.

    python benchmarks/lidc_references.py --data ../shared/data/lidc
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from harmonizer_fast.data import load_dataset
from harmonizer_fast.references import label_only_references


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data/lidc")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--out", default="benchmarks/results/lidc-references")
    args = p.parse_args(argv)
    data = load_dataset(args.data)
    drawn = data.raters_drawn()
    empty = (data.masks.reshape(len(data), data.num_raters, -1).max(-1) == 0).mean(0)
    result = {"command": "python benchmarks/lidc_references.py " + " ".join(sys.argv[1:]), "samples": args.samples,
              "n_images": len(data), "n_patients": int(len(data.patients())),
              "empty_share_per_rater": empty.tolist(), "protocols": {}}  # fmt: skip
    for name, n in (("all slices (--min-raters 0)", 0), ("all raters (--min-raters 4)", data.num_raters)):
        idx = np.flatnonzero(drawn >= n)
        refs = label_only_references(data, idx, args.samples)
        result["protocols"][name] = {
            "n_images": int(idx.size), "n_patients": int(len(np.unique(data.patient_id[idx]))),
            "predictors": {k: {"t1_ged": v["table1"]["mean"]["ged"], "t1_dice_match": v["table1"]["mean"]["dice_match"],
                               "t2_dice_mean": v["table2"]["mean"]["dice_each_mean"],
                               "t2_dice_a": [r["dice"][0] for r in v["table2"]["per_rater"].values()]}
                           for k, v in refs.items()},
        }  # fmt: skip
    lines = [f"# Label-only references on the LIDC export ({result['n_images']} slices, {result['n_patients']} "
             "patients)", "", f"`{result['command']}`, K = {args.samples}. Share of slices each rater (area order, "
             "smallest first) left empty: " + ", ".join(f"{e:.0%}" for e in empty) + ".", "",
             "| protocol | images | patients | predictor | GED (T1) | Dice_match (T1) | Dice_A(i) of the heads | "
             "Dice_mean (T2) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, pr in result["protocols"].items():
        for k, v in pr["predictors"].items():
            lines.append(f"| {name} | {pr['n_images']} | {pr['n_patients']} | {k} | {v['t1_ged']:.4f} | "
                         f"{v['t1_dice_match']:.4f} | " + " / ".join(f"{a:.3f}" for a in v["t2_dice_a"])
                         + f" | {v['t2_dice_mean']:.4f} |")  # fmt: skip
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
