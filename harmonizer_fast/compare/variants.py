"""The variants ``harmonizer-fast compare`` trains: the full model, the paper's baselines and the ablations.

A variant is a phase-1 training (a set of model-config switches) and what Table 2 scores on top of it. Every
phase-1 training gets the same data, split, segmentation loss, output-bias initialization, learning-rate
rule and epochs (or CPU budget); a variant differs from the full model only in the switches named here.
Variants that share a phase-1 training share the run, and the report prints its Table 1 row once
(``no-personalizer`` is the full model's phase 1 with identity heads; ``dpersona`` is D-Persona's stage 2 on
the Prob. U-Net's phase 1, the "same backbone" of the comparison, with its own loss and learning rate).

``per-rater`` is the simple baseline of Table 2 ([science] #35 item 6): the config's backbone with a 1 x 1
head per area-ordered rater, trained on phase 1's recipe and epochs with no latent space
(:mod:`harmonizer_fast.per_rater`); it has heads and no prior samples, so no Table 1 row.

The Prob. U-Net's phase-1 config carries D-Persona's heads (``personalizer="dpersona"``, bank 100): phase 1
never runs the personalizer, so this changes nothing in phase 1 (its parameters are built after every other
module's, so even the initialization is the same) and lets D-Persona's phase 2 start from that checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..model.dpersona import BANK

# phase-1 trainings: name -> model-config overrides of the preset
PHASE1: dict[str, dict[str, Any]] = {
    "full": {},
    "probunet": {"use_harmonizer": False, "use_ged_loss": False, "personalizer": "dpersona", "prior_bank": BANK},
    "no-harmonizer": {"use_harmonizer": False},
    "no-ged-loss": {"use_ged_loss": False},
    "unshared-harmonizer": {"harmonizer_shared": False},
}
HEADS = ("personalized", "identity", "none", "per-rater")


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    phase1: Optional[str]  # key of PHASE1; None: not a Harmonizer Network (the per-rater baseline)
    heads: str  # Table 2: "personalized" (phase 2 trains), "identity" (z'_i = prior mean), "none", "per-rater"

    @property
    def trains_phase2(self) -> bool:
        return self.heads == "personalized"

    @property
    def has_prior(self) -> bool:
        """Whether the variant samples a prior (Table 1)."""
        return self.phase1 is not None


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("full", "Harmonizer Network (harmonizer, GED loss, frequency-prompt Personalizer)", "full",
                "personalized"),  # fmt: skip
        Variant("probunet", "Prob. U-Net (no harmonizer, no GED loss)", "probunet", "none"),
        Variant("dpersona", "D-Persona (its projection heads on the Prob. U-Net)", "probunet", "personalized"),
        Variant("no-personalizer", "no personalizer (full phase 1, identity heads z'_i = z)", "full", "identity"),
        Variant("no-harmonizer", "no harmonizer (GED loss on)", "no-harmonizer", "none"),
        Variant("no-ged-loss", "no GED loss (harmonizer on)", "no-ged-loss", "none"),
        Variant("unshared-harmonizer", "harmonizer without cross-layer sharing", "unshared-harmonizer", "none"),
        Variant("per-rater", "per-rater baseline (the backbone, a 1x1 head per area-ordered rater, no latent space)",
                None, "per-rater"),  # fmt: skip
    )
}
REFERENCE = "full"  # the paired tests compare every other variant against this one


def table1_rows(names: list[str]) -> dict[str, str]:
    """Each variant named -> the variant whose Table 1 row shows its phase-1 training's samples: the first named
    of those sharing that training (itself when it comes first, or has no prior)."""
    first: dict[str, str] = {}
    return {n: n if VARIANTS[n].phase1 is None else first.setdefault(VARIANTS[n].phase1, n) for n in names}


def resolve(names: list[str]) -> list[Variant]:
    """The variants named, in the order given, the reference first (added when missing)."""
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"compare: unknown variants {unknown}; expected names from {list(VARIANTS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"compare: variants listed twice in {names}")
    ordered = [REFERENCE] + [n for n in names if n != REFERENCE]
    return [VARIANTS[n] for n in ordered]
