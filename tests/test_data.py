"""Readers (LIDC folder with its cache, the numpy-only pickle, NPC HDF5, npz), normalization, patient splits,
rater ordering, augmentation, the synthetic generator and the rater simulation."""

import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harmonizer_fast import data as hd
from harmonizer_fast.data.readers import read_lidc_folder, read_lidc_pickle, read_npc_h5

LIDC = Path(__file__).resolve().parents[2] / "shared" / "data" / "lidc"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HARMONIZER_FAST_CACHE", str(tmp_path / "cache"))


def write_lidc(root: Path, patients=3, nodules=2, slices=3, raters=4, size=16, seed=0) -> np.ndarray:
    """A small LIDC slices export; returns the image stack in reading order."""
    rng = np.random.default_rng(seed)
    stack = []
    for p in range(patients):
        for k in range(nodules):
            base = root / f"LIDC-IDRI-{p:04d}" / f"nodule-{k}"
            for j in range(slices):
                img = rng.integers(0, 256, (size, size), dtype=np.uint8)
                (base / "images").mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(base / "images" / f"slice-{j}.png")
                stack.append(img)
                for r in range(raters):
                    (base / f"mask-{r}").mkdir(parents=True, exist_ok=True)
                    m = (rng.random((size, size)) < 0.2 * r).astype(np.uint8) * 255
                    Image.fromarray(m).save(base / f"mask-{r}" / f"slice-{j}.png")
    return np.stack(stack)


def test_lidc_folder_reader_and_cache(tmp_path):
    root = tmp_path / "lidc"
    images = write_lidc(root / "LIDC-IDRI-slices")
    assert hd.detect_format(root) == "lidc-folder"
    data = hd.load_dataset(root)
    assert data.images.shape == (18, 1, 16, 16) and data.masks.shape == (18, 4, 16, 16)
    np.testing.assert_allclose(data.images[:, 0], images / 255.0, atol=1e-7)
    assert set(np.unique(data.masks)) <= {0, 1}
    assert data.patient_id[0] == "LIDC-IDRI-0000" and len(data.patients()) == 3
    cached = list((tmp_path / "cache").glob("lidc-*.npz"))
    assert len(cached) == 1
    again = hd.load_dataset(root)
    np.testing.assert_array_equal(again.masks, data.masks)
    # LIDC mask slots are anonymous: by default each slice's masks come smallest first (D-Persona's order)
    area = data.masks.reshape(18, 4, -1).sum(-1, dtype=np.int64)
    assert (np.diff(area, axis=1) >= 0).all()
    stored = read_lidc_folder(root, rater_order="stored")
    idx = np.argsort(stored.masks.reshape(18, 4, -1).sum(-1), axis=1, kind="stable")
    np.testing.assert_array_equal(np.take_along_axis(stored.masks, idx[:, :, None, None], 1), data.masks)
    # touching a file invalidates the cache
    f = next(root.rglob("slice-0.png"))
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    hd.load_dataset(root)
    assert len(list((tmp_path / "cache").glob("lidc-*.npz"))) == 2


def test_lidc_folder_errors(tmp_path):
    root = tmp_path / "lidc"
    write_lidc(root, patients=1, nodules=1, slices=2)
    bad = next(root.rglob("mask-2/slice-1.png"))
    bad.write_bytes(b"not a png")
    with pytest.raises(hd.DataError, match="cannot decode PNG"):
        read_lidc_folder(root)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(bad)
    with pytest.raises(hd.DataError, match="differs from"):
        read_lidc_folder(root)
    bad.unlink()
    with pytest.raises(hd.DataError, match="missing rater mask"):
        read_lidc_folder(root)
    with pytest.raises(hd.DataError, match="no such file"):
        hd.load_dataset(tmp_path / "nowhere")


@pytest.mark.skipif(not (LIDC / "LIDC-IDRI-slices").is_dir(), reason="../shared/data/lidc is not beside the checkout")
@pytest.mark.slow
def test_real_lidc_folder():
    data = hd.load_dataset(LIDC)
    assert data.images.shape == (3090, 1, 128, 128) and data.masks.shape == (3090, 4, 128, 128)
    assert len(data.patients()) == 200
    assert 0.0 <= data.images.min() and data.images.max() <= 1.0


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/harmonizer_fast_pwned",))


def test_pickle_reader_admits_numpy_only(tmp_path):
    rng = np.random.default_rng(0)
    good = {
        f"k{i}": {
            "image": rng.random((16, 16)).astype(np.float32),
            "masks": [(rng.random((16, 16)) < 0.3).astype(np.uint8) for _ in range(4)],
            "series_uid": f"LIDC-{i // 2}_series",
        }  # fmt: skip
        for i in range(6)
    }
    p = tmp_path / "data.pkl"
    p.write_bytes(pickle.dumps(good, protocol=4))
    data = read_lidc_pickle(p, rater_order="stored")
    assert data.images.shape == (6, 1, 16, 16) and data.masks.shape == (6, 4, 16, 16)
    assert list(data.patient_id) == ["LIDC-0", "LIDC-0", "LIDC-1", "LIDC-1", "LIDC-2", "LIDC-2"]
    np.testing.assert_array_equal(data.masks[0], np.stack(good["k0"]["masks"]))
    by_area = read_lidc_pickle(p)  # the default: smallest mask first
    masks0 = np.stack(good["k0"]["masks"])
    np.testing.assert_array_equal(by_area.masks[0], masks0[np.argsort(masks0.sum((1, 2)), kind="stable")])
    p2 = tmp_path / "evil.pkl"
    p2.write_bytes(pickle.dumps({"k": {"image": Evil(), "masks": []}}))
    marker = Path("/tmp/harmonizer_fast_pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(hd.DataError, match="refused to load posix.system"):
        read_lidc_pickle(p2)
    assert not marker.exists()
    p3 = tmp_path / "trunc.pkl"
    p3.write_bytes(p.read_bytes()[:100])
    with pytest.raises(hd.DataError, match="truncated"):
        read_lidc_pickle(p3)


def test_npc_h5_slices_and_volumes(tmp_path):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(1)
    for case in ("P001", "P002"):
        with h5py.File(tmp_path / f"{case}_vol.h5", "w") as h:
            for k in ("t1", "t1c", "t2"):
                h[k] = rng.random((3, 8, 8)).astype(np.float32) * 100
            for r in range(1, 5):
                h[f"label_a{r}"] = (rng.random((3, 8, 8)) < 0.3).astype(np.uint8)
    data = read_npc_h5(tmp_path)
    assert data.images.shape == (6, 3, 8, 8) and data.masks.shape == (6, 4, 8, 8)
    assert list(data.patient_id) == ["P001"] * 3 + ["P002"] * 3
    assert data.images.min() == 0.0 and data.images.max() == 1.0
    cases = read_npc_h5(tmp_path, volumes=True)
    assert [c for c, _ in cases] == ["P001_vol", "P002_vol"] and cases[0][1].images.shape == (3, 3, 8, 8)
    with h5py.File(tmp_path / "P003_bad.h5", "w") as h:
        h["t1"] = np.zeros((8, 8))
    with pytest.raises(hd.DataError, match="label_a1"):
        read_npc_h5(tmp_path)


def test_npz_round_trip_and_checks(tmp_path):
    synth = hd.make_synthetic(10, size=32, raters=3, seed=2)
    path = tmp_path / "d.npz"
    hd.write_npz(synth, path)
    back = hd.load_dataset(path)
    np.testing.assert_array_equal(back.masks, synth.masks)
    np.testing.assert_allclose(back.images, synth.images)
    np.savez(tmp_path / "u8.npz", images=(synth.images[:, 0] * 255).astype(np.uint8), masks=synth.masks)
    u8 = hd.load_dataset(tmp_path / "u8.npz")
    assert u8.images.shape == (10, 1, 32, 32) and list(u8.patient_id[:2]) == ["0", "1"]
    np.savez(tmp_path / "bad.npz", images=synth.images, masks=synth.masks * 2)
    with pytest.raises(hd.DataError, match=r"masks hold the values \{0, 2\}"):
        hd.load_dataset(tmp_path / "bad.npz")
    np.savez(tmp_path / "bad2.npz", images=synth.images, masks=synth.masks[:, :, :16])
    with pytest.raises(hd.DataError, match="must agree"):
        hd.load_dataset(tmp_path / "bad2.npz")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(hd.DataError, match="unknown data format"):
        hd.load_dataset(tmp_path / "x.txt")


def test_normalization():
    x = np.array([[[[2.0, 4.0], [6.0, 10.0]]], [[[3.0, 3.0], [3.0, 3.0]]]])
    out = hd.normalize_images(x)
    np.testing.assert_allclose(out[0, 0], [[0.0, 0.25], [0.5, 1.0]])
    np.testing.assert_array_equal(out[1], 0.0)
    unit = np.random.default_rng(0).random((2, 1, 3, 3))
    np.testing.assert_allclose(hd.normalize_images(unit), unit.astype(np.float32))  # already in [0, 1]
    with pytest.raises(hd.DataError, match="NaN"):
        hd.normalize_images(np.full((1, 1, 2, 2), np.nan))


def test_patient_split_is_by_patient_and_seeded():
    pid = np.repeat([f"p{i}" for i in range(20)], 3)
    s = hd.patient_split(pid, folds=4, fold=1, seed=3)
    sets = [set(pid[s.train]), set(pid[s.val]), set(pid[s.test])]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert len(s.train) + len(s.val) + len(s.test) == 60 and len(sets[2]) == 5
    again = hd.patient_split(pid, folds=4, fold=1, seed=3)
    np.testing.assert_array_equal(s.test, again.test)
    folds = [set(pid[hd.patient_split(pid, folds=4, fold=f, seed=3).test]) for f in range(4)]
    assert set().union(*folds) == set(pid)


def test_rater_order_by_area_and_padding():
    d = hd.make_synthetic(6, size=48, raters=4, seed=4)
    desc, asc = d.with_rater_order("area-desc"), d.with_rater_order("area-asc")
    assert (np.diff(desc.masks.reshape(6, 4, -1).sum(-1, dtype=np.int64), axis=1) <= 0).all()
    assert (np.diff(asc.masks.reshape(6, 4, -1).sum(-1, dtype=np.int64), axis=1) >= 0).all()
    assert d.with_rater_order("stored") is d
    with pytest.raises(hd.DataError, match="rater order must be one of"):
        d.with_rater_order("area")
    p = d.padded(32)
    assert p.images.shape[2:] == (64, 64)
    np.testing.assert_array_equal(p.masks[:, :, :48, :48], d.masks)


def test_augment_moves_image_and_masks_together():
    img = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4)
    masks = img.expand(-1, 3, -1, -1).clone()
    a, m = hd.augment(img, masks, torch.Generator().manual_seed(0))
    torch.testing.assert_close(m, a.expand(-1, 3, -1, -1))
    b, _ = hd.augment(img, masks, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)


def test_synthetic_generator():
    a = hd.make_synthetic(16, size=64, raters=5, seed=7)
    b = hd.make_synthetic(16, size=64, raters=5, seed=7)
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, hd.make_synthetic(16, size=64, raters=5, seed=8).images)
    area = a.masks.reshape(16, 5, -1).sum(-1).astype(float)
    assert (area[:, 1] >= area[:, 0]).all()  # the loose rater is never tighter than the tight one
    assert 0.0 <= a.images.min() and a.images.max() <= 1.0
    assert len(a.patients()) == 4


def test_rater_simulation():
    yy, xx = np.mgrid[:64, :64]
    mask = ((yy - 32) ** 2 + (xx - 30) ** 2) < 12**2
    sim = hd.simulate_raters(mask, seed=1)
    assert sim.shape == (4, 64, 64) and sim.dtype == np.uint8
    np.testing.assert_array_equal(sim[0], mask)
    np.testing.assert_array_equal(sim, hd.simulate_raters(mask, seed=1))

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    for seed in range(8):
        sim = hd.simulate_raters(mask, seed=seed)
        d = [dice(mask, sim[i].astype(bool)) for i in (1, 2, 3)]
        assert d[1] < d[0]  # sigma 0.8 strays further from the expert than sigma 0.2
        assert 0.6 < d[0] < 1.0 and 0.6 < d[2] < 1.0 and d[1] < 1.0
    assert not hd.simulate_raters(np.zeros((8, 8)), seed=0).any()
