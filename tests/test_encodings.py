"""[reliability] #36 item 4: readers recognise how masks and images are encoded. Masks stored {0, 1} or {0, 255}
read alike; 16-bit images are scaled, not saturated; any other mask value set, NaN, or a dataset in which no
rater drew anything is an error naming the file. The expected arrays are written by numpy/PIL here, not read
back through the package."""

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data import write_lidc

from harmonizer_fast import data as hd
from harmonizer_fast.data import DataError


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HARMONIZER_FAST_CACHE", str(tmp_path / "cache"))


def _rewrite(root: Path, pattern: str, change) -> None:
    for f in sorted(root.rglob(pattern)):
        Image.fromarray(change(np.asarray(Image.open(f)))).save(f)


def test_lidc_masks_stored_0_1_read_as_the_0_255_export(tmp_path):
    root = tmp_path / "a" / "LIDC-IDRI-slices"
    write_lidc(root, raters=3)
    want = hd.load_dataset(tmp_path / "a", rater_order="stored")
    assert want.masks.any()
    _rewrite(root, "mask-*/*.png", lambda m: (m // 255).astype(np.uint8))  # the same masks, stored 0/1
    got = hd.load_dataset(tmp_path / "a", rater_order="stored")
    np.testing.assert_array_equal(got.masks, want.masks)


def test_lidc_16_bit_images_are_scaled_not_saturated(tmp_path):
    root = tmp_path / "b" / "LIDC-IDRI-slices"
    write_lidc(root, raters=2)
    rng = np.random.default_rng(0)
    written = {}
    for f in sorted(root.rglob("images/*.png")):
        img = rng.integers(0, 65536, (16, 16), dtype=np.uint16)
        Image.fromarray(img).save(f)  # PIL writes mode I;16
        written[f] = img
    data = hd.load_dataset(tmp_path / "b", rater_order="stored")
    expected = np.stack([written[f] for f in sorted(written, key=lambda p: (p.parts[-4], p.parts[-3], p.name))])
    np.testing.assert_allclose(data.images[:, 0], expected / 65535.0, rtol=0, atol=1e-6)
    assert data.images.max() > 0.9  # 8-bit conversion clipped everything above 255 to 1/1 of the range


@pytest.mark.parametrize("values, fragment", [((0, 2), "{0, 2}"), ((0, 1, 7), "{0, 1, 7}"), ((0.0, np.nan), "NaN")])
def test_pickle_masks_of_another_encoding_are_an_error_naming_the_file(tmp_path, values, fragment):
    rng = np.random.default_rng(1)
    masks = rng.choice(np.asarray(values, dtype=np.float64), size=(4, 16, 16))
    path = tmp_path / "lidc.pkl"
    path.write_bytes(pickle.dumps({"LIDC-0001_s0": {"image": rng.random((16, 16)), "masks": list(masks)}}))
    with pytest.raises(DataError, match="masks") as info:
        hd.load_dataset(path)
    assert str(path) in str(info.value) and fragment in str(info.value)


def test_npz_masks_0_255_read_as_0_1_and_an_all_empty_dataset_is_an_error(tmp_path):
    rng = np.random.default_rng(2)
    masks = (rng.random((6, 2, 16, 16)) < 0.3).astype(np.uint8)
    np.savez(tmp_path / "a.npz", images=rng.random((6, 16, 16)).astype(np.float32), masks=masks * 255)
    np.testing.assert_array_equal(hd.load_dataset(tmp_path / "a.npz").masks, masks)
    np.savez(tmp_path / "e.npz", images=rng.random((6, 16, 16)).astype(np.float32), masks=masks * 0)
    with pytest.raises(DataError, match="every mask of every rater is empty") as info:
        hd.load_dataset(tmp_path / "e.npz")
    assert str(tmp_path / "e.npz") in str(info.value)
