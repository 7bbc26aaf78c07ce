"""A bundled model's card: ``MODEL_CARD.md`` rendered from ``card.json`` (written by
``benchmarks/make_pretrained.py``), so every number on the card comes from the JSON a command wrote."""

from __future__ import annotations

from typing import Any

# (column, key in a table of harmonizer_fast.evaluate.summarize)
TABLE1 = (("GED", "ged"), ("Dice_soft", "dice_soft"), ("Dice_max", "dice_max"), ("Dice_match", "dice_match"))
TABLE2 = (("Dice_mean (head i vs rater i)", "dice_each_mean"), ("Dice_match", "dice_match"), ("GED", "ged"))


def _cell(table: Any, key: str) -> str:
    if not table:
        return "n/a"
    mean, std = table["mean"].get(key), table["std"].get(key)
    return "n/a" if mean is None else f"{mean:.4f} ± {std:.4f}"


def _rows(card: dict[str, Any]) -> list[tuple[str, dict]]:
    return [(f"**{card['name']}**", card["metrics"]["model"]), *card["metrics"]["references"].items()]


def render(card: dict[str, Any]) -> str:
    d, r, m = card["data"], card["recipe"], card["metrics"]
    lines = [
        f"# {card['name']}: {card['summary']}",
        "",
        f"Generated from `card.json` by `harmonizer_fast.pretrained.card.render`; made by `{card['command']}` "
        f"({card['made_on']}).",
        "",
        "## Intended use",
        "",
        card["intended_use"],
        "",
        "## Data and licence",
        "",
        f"{d['description']} Licence: {d['licence']}. Cite: {d['citation']}",
        "",
        f"Split: {d['split']}. Trained on {d['train_patients']} patients ({d['train_images']} slices), selected on "
        f"{d['val_patients']} ({d['val_images']}), scored on {d['test_patients']} held-out patients "
        f"({d['test_images']} slices) never seen in training or selection.",
        "",
        "## Training recipe",
        "",
        *[f"- {k}: {v}" for k, v in r.items()],
        "",
        "## Held-out results",
        "",
        f"{m['protocol']}",
        "",
        "| predictor | " + " | ".join(f"{c} (T1)" for c, _ in TABLE1) + " | "
        + " | ".join(f"{c} (T2)" for c, _ in TABLE2) + " |",
        "|---|" + "---|" * (len(TABLE1) + len(TABLE2)),
    ]  # fmt: skip
    for name, row in _rows(card):
        cells = [_cell(row.get("table1"), k) for _, k in TABLE1] + [_cell(row.get("table2"), k) for _, k in TABLE2]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", m["reading"], "", "## Limitations", "", *[f"- {x}" for x in card["limitations"]], ""]
    return "\n".join(lines)
