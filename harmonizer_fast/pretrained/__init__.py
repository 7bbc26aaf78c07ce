"""Models shipped inside the package: ``hf.load_pretrained("lidc-small")``, ``harmonizer-fast predict --model
lidc-small``. Each lives in ``pretrained/<name>/``: a checkpoint manifest ``model.json`` (config, recorded
preprocessing, SHA-256 of the weights) beside its safetensors weights, ``card.json`` (data, licence, recipe,
held-out metrics) and ``MODEL_CARD.md`` generated from it. Nothing is downloaded at run time.
"""

from __future__ import annotations

from pathlib import Path

from ..model import HarmonizerNet

ROOT = Path(__file__).resolve().parent


def available() -> list[str]:
    """Names of the bundled models."""
    return sorted(p.parent.name for p in ROOT.glob("*/model.json"))


def path(name: str) -> Path:
    """The checkpoint manifest of bundled model ``name``."""
    if name not in available():
        raise ValueError(f"no bundled model {name!r}; available: {', '.join(available()) or 'none'}")
    return ROOT / name / "model.json"


def load_pretrained(name: str, *, map_location: str = "cpu") -> HarmonizerNet:
    """The bundled model ``name`` in eval mode (its weights checked against the manifest's SHA-256)."""
    from ..checkpoint import load_model

    return load_model(path(name), map_location=map_location)[0]
