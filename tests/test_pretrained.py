"""The bundled model (harmonizer_fast/pretrained/): it loads by name, its weights match the manifest, it runs on
a real LIDC slice through predict, and its card is the rendering of its JSON with the data's attribution."""

import json
from pathlib import Path

import numpy as np
import pytest

import harmonizer_fast as hf
from harmonizer_fast.pretrained import ROOT, available, path
from harmonizer_fast.pretrained.card import render

LIDC = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "lidc" / "LIDC-IDRI-slices"


def test_lidc_small_is_bundled_and_loads():
    assert "lidc-small" in available()
    model = hf.load_pretrained("lidc-small")
    assert model.config.in_channels == 1 and model.config.num_raters == 4 and model.personalizer_trained
    assert not model.training
    with pytest.raises(ValueError, match="no bundled model 'nope'; available: lidc-small"):
        path("nope")


@pytest.mark.parametrize("name", available())
def test_card_is_rendered_from_its_json_and_carries_the_attribution(name):
    folder = ROOT / name
    card = json.loads((folder / "card.json").read_text())
    assert (folder / "MODEL_CARD.md").read_text() == render(card)
    assert "CC BY 3.0" in card["data"]["licence"] and "Armato" in card["data"]["citation"]
    assert "not" in card["intended_use"].lower() and "clinical" in card["intended_use"].lower()
    refs = card["metrics"]["references"]
    assert {"all-empty", "majority mask"} <= set(refs)
    # the held-out patients were never trained on: the card's test ids are disjoint from its training record
    assert card["data"]["test_patients"] == len(card["data"]["test_patient_ids"]) > 0
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size < 8 * 2**20, f"{name} is {size / 2**20:.1f} MiB; the package ships a few MB"


@pytest.mark.skipif(not LIDC.is_dir(), reason="the shared LIDC-IDRI slices are not beside the checkout")
def test_lidc_small_predicts_on_a_real_slice(tmp_path):
    from PIL import Image

    slice_png = sorted(LIDC.glob("*/nodule-*/images/slice-*.png"))[0]
    predictor = hf.Predictor("lidc-small", num_samples=8)
    raw = np.asarray(Image.open(slice_png))[None, None]
    pred = predictor.predict_images(raw, "slice")
    assert pred.probability.shape == (1, 128, 128) and pred.heads.shape == (4, 1, 128, 128)
    assert 0 <= pred.probability.min() and pred.probability.max() <= 1
    assert predictor.model_info["sha256"] == json.loads(path("lidc-small").read_text())["sha256"]["weights"]
