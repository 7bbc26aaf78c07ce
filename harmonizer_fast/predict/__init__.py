"""Prediction on the images users have (``harmonizer-fast predict``; the layout is in :mod:`.runner`).

    import harmonizer_fast as hf
    predictor = hf.Predictor("lidc-small", num_samples=16)   # or a run directory / checkpoint manifest
    predictor.run("scans/", "predictions/")                  # what `harmonizer-fast predict -i -o` runs
    loaded, pred = predictor.predict_case(case)              # one case in memory: probability, uncertainty, heads
"""

from .inputs import Case, CaseError, find_cases, load_case
from .runner import CasePrediction, Predictor, mean_pairwise_disagreement, resolve_device, slice_seed

__all__ = ["Case", "CaseError", "CasePrediction", "Predictor", "find_cases", "load_case",
           "mean_pairwise_disagreement", "resolve_device", "slice_seed"]  # fmt: skip
