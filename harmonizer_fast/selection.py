"""Model-selection scores: the validation number that picks ``best_phase1`` and ``best`` (lower is better).

A score must not be winnable by predicting nothing. The paper's tables use GED in the ``dpersona``
convention, where two empty masks are at distance 1 and the within-set means include the diagonal, so the
"distance" of an empty mask to itself is 1 while that of any other mask is 0: all-empty samples get the
largest possible within-sample term, which GED subtracts (most LIDC slices have an empty rater, and a
baseline run selected this way kept its first, all-empty epoch). The defaults are therefore GED in the
``unbiased`` convention for phase 1 (every mask at distance 0 from itself, empty against empty included,
within-set means without the diagonal: a proper energy distance), and the personalized Dice_mean for
phase 2 (head i against rater i, two empty masks scoring 1); ``tests/test_personalization.py`` shows that
an all-empty predictor never beats one that copies the raters under either.
"""

from __future__ import annotations

import math
from typing import Any

# name: (table, metric, sign); score = sign * the table's mean of the metric over the validation images
SCORES: dict[str, tuple[str, str, int]] = {
    "ged_unbiased": ("table1", "ged_unbiased", 1),
    "ged": ("table1", "ged", 1),  # dpersona convention: rewards empty predictions, see the module docstring
    "dice_match": ("table1", "dice_match", -1),
    "dice_soft": ("table1", "dice_soft", -1),
    "dice_mean": ("table2", "dice_each_mean", -1),
    "heads_ged_unbiased": ("table2", "ged_unbiased", 1),
}
PHASE_SCORES = {1: ("ged_unbiased", "ged", "dice_match", "dice_soft"), 2: ("dice_mean", "heads_ged_unbiased")}
DEFAULTS = {1: "ged_unbiased", 2: "dice_mean"}


def score(name: str, tables: dict[str, Any]) -> float:
    """The score of validation ``tables`` (``{"table1": summary, "table2": summary or None}``)."""
    table, key, sign = SCORES[name]
    if tables.get(table) is None:
        raise ValueError(f"selection score {name!r} needs {table}, which this evaluation has not got")
    value = tables[table]["mean"][key]
    return math.inf if math.isnan(value) else sign * value
