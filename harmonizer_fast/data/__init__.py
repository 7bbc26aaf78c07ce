"""Data (workflows layer): readers for the formats of the field, synthetic multi-rater data, rater
simulation for single-annotator data, patient-level splits and augmentation (docs/architecture.md, "Data")."""

from .dataset import DataError, MultiRaterData, Split, augment, normalize_images, patient_split
from .rater_sim import simulate_dataset, simulate_raters
from .readers import FORMATS, detect_format, load_dataset, read_npz, safe_load_pickle, write_npz
from .synthetic import make_synthetic

__all__ = [
    "FORMATS",
    "DataError",
    "MultiRaterData",
    "Split",
    "augment",
    "detect_format",
    "load_dataset",
    "make_synthetic",
    "normalize_images",
    "patient_split",
    "read_npz",
    "safe_load_pickle",
    "simulate_dataset",
    "simulate_raters",
    "write_npz",
]
