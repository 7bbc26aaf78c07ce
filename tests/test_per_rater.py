"""The per-rater baseline of Table 2 ([science] #35 item 6): its split is the trainer's, it learns, and what
it saves is what it predicts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from harmonizer_fast import data as hd
from harmonizer_fast.metrics.overlap import DICE_SMOOTH
from harmonizer_fast.model import HarmonizerConfig
from harmonizer_fast.per_rater import PerRaterRecipe, data_split, held_out, load_per_rater, score_heads, train_per_rater
from harmonizer_fast.rundir import prepare
from harmonizer_fast.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def data():
    d = hd.make_synthetic(40, size=32, raters=3, seed=5)
    d.masks[::4, 2] = 0  # some slices where rater 3 drew nothing
    return d


@pytest.mark.parametrize("fold, min_raters", [(0, 0), (2, 3)])
def test_the_split_is_the_trainers(data, tmp_path, fold, min_raters):
    cfg = HarmonizerConfig.small(num_raters=3)
    trainer = Trainer(data, cfg, TrainConfig(fold=fold, min_raters=min_raters), tmp_path, progress=False,
                      log=lambda _m: None)  # fmt: skip
    split = data_split(prepare(data, cfg, "stored"), PerRaterRecipe(fold=fold, min_raters=min_raters))
    for part in ("train", "val", "test"):
        assert np.array_equal(getattr(split, part), getattr(trainer.split, part)), part


def test_it_learns_and_reloads_what_it_selected(data, tmp_path):
    cfg = HarmonizerConfig.small(num_raters=3)
    manifest = train_per_rater(data, cfg, PerRaterRecipe(epochs=6, lr=1e-2, batch_size=8), tmp_path,
                               log=lambda _m: None)  # fmt: skip
    hist = manifest["history"]
    assert hist[-1]["train_seg"] < 0.8 * hist[0]["train_seg"]
    best = max(range(len(hist)), key=lambda i: hist[i]["val_dice_mean"])
    assert manifest["selected_epoch"] == best + 1
    model, m = load_per_rater(tmp_path)
    prepared = prepare(data, cfg, "stored")
    val = np.asarray(m["data"]["split"]["val"])
    # the reloaded weights give the selected epoch's validation Dice_mean, recomputed here from binary maps
    a = model.predict(torch.from_numpy(prepared.images[val])).numpy() > 0.5
    b = prepared.masks[val] > 0
    inter, areas = (a & b).sum((2, 3)), a.sum((2, 3)) + b.sum((2, 3))
    per_head = (2 * inter + DICE_SMOOTH) / (areas + DICE_SMOOTH)  # an empty head on an empty rater scores 1
    assert per_head.mean() == pytest.approx(hist[best]["val_dice_mean"], abs=1e-5)
    assert score_heads(model, prepared, val).summary()["mean"]["dice_each_mean"] == pytest.approx(np.mean(per_head))
    assert np.array_equal(held_out(m, data), m["data"]["split"]["test"])
    assert held_out(m, hd.make_synthetic(40, size=32, raters=3, seed=6)) is None  # another dataset


def test_a_changed_weights_file_is_refused(data, tmp_path):
    train_per_rater(data, HarmonizerConfig.small(num_raters=3), PerRaterRecipe(epochs=1, batch_size=8), tmp_path,
                    log=lambda _m: None)  # fmt: skip
    name = json.loads((tmp_path / "per-rater.json").read_text())["files"]["weights"]
    blob = bytearray((tmp_path / name).read_bytes())
    blob[-1] ^= 1
    (tmp_path / name).write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="SHA-256"):
        load_per_rater(tmp_path)
