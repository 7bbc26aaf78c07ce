"""harmonizer-fast predict (harmonizer_fast.predict): real-format files made here (PNG of odd size and 16 bit,
NumPy stacks, a NIfTI volume with a rotated affine and anisotropic spacing, a 2-channel nnU-Net-named case, a
DICOM series written with pydicom) give outputs in the input's geometry whose maps equal ``model.predict`` on
the documented per-slice seeds after the same preprocessing; two gloo processes write what one writes, byte for
byte; a killed run resumes to the same outputs; a corrupt file, a NaN image and a wrong channel count become
failed rows while the other cases finish."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from harmonizer_fast.checkpoint import save_checkpoint
from harmonizer_fast.cli import main as cli
from harmonizer_fast.model import HarmonizerConfig, HarmonizerNet
from harmonizer_fast.predict import Predictor, slice_seed
from harmonizer_fast.predict.runner import mean_pairwise_disagreement
from harmonizer_fast.preprocessing import Preprocessing

ROOT = Path(__file__).resolve().parent.parent
K = 4
MAPS = ("mask", "probability", "uncertainty", "rater-1", "rater-2", "rater-3")


def _model(channels: int = 1) -> HarmonizerNet:
    torch.manual_seed(channels)
    m = HarmonizerNet(HarmonizerConfig.small(in_channels=channels, num_raters=3)).eval()
    m.personalizer.trained_steps += 1  # random weights, heads served as if phase 2 had run
    # A random network's maps are constant to 1e-4 (its decoder features are tiny): scale fcomb's first layer
    # and centre its logits so that masks, samples and heads vary from pixel to pixel and draw to draw.
    latent = m.config.latent_dim
    features = m.fcomb.first.weight.shape[1] - latent
    with torch.no_grad():
        m.fcomb.first.weight[:, :features].mul_(20000)
        m.fcomb.first.weight[:, features:].mul_(300)
        f, _ = m.features(torch.rand(2, channels, 96, 128, generator=torch.Generator().manual_seed(0)))
        m.fcomb.last.bias.sub_(m.fcomb.logits(f, torch.randn(2, 4, latent)).mean())
    return m


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("model")
    save_checkpoint(d, "best", _model(1))
    return d


@pytest.fixture(scope="module")
def run_dir2(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("model2")
    save_checkpoint(d, "best", _model(2))
    return d


def _expected(model: HarmonizerNet, raw: np.ndarray, name: str, seed: int = 0):
    """What predict must write for raw slices (S, C, H, W): model.predict per slice on its documented seed."""
    pre = Preprocessing()
    x = torch.from_numpy(pre.pad(pre.normalize(raw)))
    h, w = raw.shape[2:]
    probs, heads = [], []
    for j in range(raw.shape[0]):
        g = torch.Generator().manual_seed(slice_seed(seed, name, j))
        p, hd = model.predict(x[j : j + 1], K, generator=g)
        probs.append(p[0, :, :h, :w])
        heads.append(hd[0, :, :h, :w])
    probs, heads = torch.stack(probs, 1), torch.stack(heads, 1)  # (K, S, H, W), (R, S, H, W)
    return probs.mean(0).numpy(), heads.numpy(), probs.numpy()


# predict batches slices, the reference runs them one by one: oneDNN's convolutions sum in another order per
# batch size (4e-6 at most measured with He-initialized untrained models, whose logits are larger)
ATOL = 1e-5
# NIfTI maps are uint16 with scl_slope 1/65535 (predict/inputs.NIFTI_SCALE): half a step more
NIFTI_ATOL = ATOL + 0.5 / 65535


def _assert_close_maps(prob_got, prob_want, mask_got, heads_got, heads_want, atol=ATOL):
    np.testing.assert_allclose(prob_got, prob_want, atol=atol)
    decided = np.abs(prob_want - 0.5) > 1e-4  # a pixel at 0.5 to float noise may go either way
    np.testing.assert_array_equal(mask_got[decided], (prob_want >= 0.5)[decided])
    for got, want in zip(heads_got, heads_want):
        sure = np.abs(want - 0.5) > 1e-4
        np.testing.assert_array_equal(got[sure], (want >= 0.5)[sure])


def _predict(*args: str) -> int:
    return cli(["predict", "-k", str(K), "--no-progress", *map(str, args)])


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv") as f:
        return {r["case"]: r for r in csv.DictReader(f)}


def test_png_of_odd_size_16_bit_and_float_tiff(run_dir, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    src = tmp_path / "in"
    src.mkdir()
    grey = rng.integers(0, 256, (77, 101), dtype=np.uint8)
    deep = (rng.integers(0, 65536, (64, 50))).astype(np.uint16)
    hu = rng.normal(-400, 300, (45, 33)).astype(np.float32)  # a float TIFF, min-max scaled
    Image.fromarray(grey).save(src / "odd.png")
    Image.fromarray(deep).save(src / "deep.png")
    Image.fromarray(hu).save(src / "hu.tif")
    assert np.array_equal(np.asarray(Image.open(src / "deep.png")), deep)  # a real 16-bit PNG
    out = tmp_path / "out"
    assert _predict("-i", src, "-o", out, "-m", run_dir) == 0
    model = _model(1)
    for name, raw in (("odd", grey), ("deep", deep), ("hu", hu)):
        for m in MAPS:
            assert Image.open(out / name / f"{m}.png").size == raw.shape[::-1], (name, m)
        prob_want, heads_want, _ = _expected(model, raw[None, None], name)
        prob = np.asarray(Image.open(out / name / "probability.png")).astype(np.float64) / 255
        np.testing.assert_allclose(prob, prob_want[0], atol=0.5 / 255 + 1e-6)  # stored as 0-255
        mask = np.asarray(Image.open(out / name / "mask.png")) > 0
        heads = [np.asarray(Image.open(out / name / f"rater-{i}.png"))[None] > 0 for i in (1, 2, 3)]
        _assert_close_maps(prob_want, prob_want, mask[None], heads, heads_want)
    # 16-bit intensities are scaled by 65535, not clipped to 255: the preprocessing keeps their contrast
    assert np.ptp(Preprocessing().normalize(deep[None, None])) > 0.9
    rows = _rows(out)
    assert {r["status"] for r in rows.values()} == {"ok"} and rows["odd"]["unit"] == "pixels"
    record = json.loads((out / "predict.json").read_text())
    assert record["num_samples"] == K and record["heads"] == "personalized" and len(record["model"]["sha256"]) == 64


def test_nifti_volume_keeps_shape_affine_and_spacing(run_dir, tmp_path):
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(1)
    vol = rng.normal(-500, 300, (40, 5, 36)).astype(np.int16)  # HU-like; axis 1 runs head-foot
    angle = 0.3
    affine = np.array([[0.7 * np.cos(angle), 0, -0.8 * np.sin(angle), 10.0],
                       [0.7 * np.sin(angle), 0, 0.8 * np.cos(angle), -20.0],
                       [0, 2.5, 0, 30.0], [0, 0, 0, 1]])  # fmt: skip
    img = nib.Nifti1Image(vol, affine)
    img.header.set_zooms((0.7, 2.5, 0.8))
    src = tmp_path / "scan.nii.gz"
    nib.save(img, str(src))
    out = tmp_path / "out"
    assert _predict("-i", src, "-o", out, "-m", run_dir, "--batch", "2") == 0
    maps = {m: nib.load(str(out / "scan" / f"{m}.nii.gz")) for m in MAPS}
    for m, im in maps.items():
        assert im.shape == vol.shape, m
        np.testing.assert_allclose(im.affine, affine, atol=1e-6)
        np.testing.assert_allclose(im.header.get_zooms(), (0.7, 2.5, 0.8), atol=1e-6)
    raw = np.moveaxis(vol, 1, 0)[:, None]  # the slice axis found from the affine: axis 1 (S)
    prob_want, heads_want, _ = _expected(_model(1), raw, "scan")
    prob = np.moveaxis(maps["probability"].get_fdata(), 1, 0)
    mask = np.moveaxis(np.asarray(maps["mask"].dataobj), 1, 0) > 0
    heads = [np.moveaxis(np.asarray(maps[f"rater-{i}"].dataobj), 1, 0) > 0 for i in (1, 2, 3)]
    _assert_close_maps(prob, prob_want, mask, heads, heads_want, atol=NIFTI_ATOL)
    assert maps["probability"].get_data_dtype() == np.uint16  # 16 bits with a slope, not 32-bit floats
    np.testing.assert_allclose(maps["probability"].dataobj.slope, 1 / 65535)
    row = _rows(out)["scan"]
    assert row["unit"] == "mm3" and float(row["area"]) == pytest.approx(mask.sum() * 0.7 * 2.5 * 0.8, rel=1e-5)


def test_two_channel_nnunet_named_case(run_dir, run_dir2, tmp_path):
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(2)
    src = tmp_path / "in"
    src.mkdir()
    chans = [rng.random((33, 30, 3)).astype(np.float32) * 5 for _ in range(2)]
    for c, v in enumerate(chans):
        nib.save(nib.Nifti1Image(v, np.diag([1.0, 1.0, 3.0, 1.0])), str(src / f"case_{c:04d}.nii.gz"))
    out = tmp_path / "out"
    assert _predict("-i", src, "-o", out, "-m", run_dir2) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["case"]
    raw = np.stack([np.moveaxis(v, 2, 0) for v in chans], 1)  # (S, 2, H, W)
    prob_want, _, _ = _expected(_model(2), raw, "case")
    got = np.moveaxis(nib.load(str(out / "case" / "probability.nii.gz")).get_fdata(), 2, 0)
    np.testing.assert_allclose(got, prob_want, atol=NIFTI_ATOL)
    # a one-channel model refuses the two-channel case with a row saying so
    assert _predict("-i", src, "-o", tmp_path / "out1", "-m", run_dir) == 3
    assert "2 channel(s), the model takes 1" in _rows(tmp_path / "out1")["case"]["error"]


def test_dicom_series(run_dir, tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(3)
    series = tmp_path / "in" / "ct1"
    series.mkdir(parents=True)
    uid, study, slices = generate_uid(), generate_uid(), []
    for k in range(4):
        pixels = rng.integers(0, 2000, (48, 40)).astype(np.uint16)
        slices.append(pixels.astype(np.float64) - 1024)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(series / f"{k}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = meta.MediaStorageSOPClassUID, \
            meta.MediaStorageSOPInstanceUID, uid  # fmt: skip
        ds.StudyInstanceUID = study
        ds.Modality, ds.Rows, ds.Columns = "CT", 48, 40
        ds.PixelSpacing, ds.SliceThickness = [0.6, 0.9], 2.0
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, 2.0 * (3 - k)]  # written in reverse order: sorting must fix it
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = pixels.tobytes()
        ds.save_as(str(series / f"{k}.dcm"), enforce_file_format=True)
    out = tmp_path / "out"
    assert _predict("-i", tmp_path / "in", "-o", out, "-m", run_dir) == 0
    raw = np.stack(slices[::-1])[:, None]  # ordered by position along the normal
    prob_want, heads_want, _ = _expected(_model(1), raw, "ct1")
    maps = {}
    for m in ("probability", "mask", "rater-1"):
        files = sorted((out / "ct1" / m).glob("*.dcm"))
        assert len(files) == 4, m
        derived = [pydicom.dcmread(f) for f in files]
        assert len({d.SeriesInstanceUID for d in derived}) == 1 and derived[0].SeriesInstanceUID != uid
        assert {d.StudyInstanceUID for d in derived} == {study}  # overlaid on the scan it came from
        assert [float(d.ImagePositionPatient[2]) for d in derived] == [0.0, 2.0, 4.0, 6.0]
        assert all((d.Rows, d.Columns) == (48, 40) and "DERIVED" in d.ImageType for d in derived)
        maps[m] = np.stack([d.pixel_array * float(d.RescaleSlope) for d in derived])
    np.testing.assert_allclose(maps["probability"], prob_want, atol=1e-4)  # stored as integers / 10000
    _assert_close_maps(prob_want, prob_want, maps["mask"] > 0, [maps["rater-1"] > 0], heads_want[:1])
    assert _rows(out)["ct1"]["unit"] == "mm3"


def test_numpy_stacks_and_in_memory_api(run_dir, tmp_path):
    rng = np.random.default_rng(4)
    stack = rng.random((3, 40, 44)).astype(np.float32)
    np.save(tmp_path / "stack.npy", stack)
    np.savez(tmp_path / "set.npz", images=(stack * 255).astype(np.uint8), masks=np.zeros((3, 2, 40, 44), np.uint8))
    src = tmp_path / "in"
    src.mkdir()
    for f in ("stack.npy", "set.npz"):
        os.replace(tmp_path / f, src / f)
    out = tmp_path / "out"
    assert _predict("-i", src, "-o", out, "-m", run_dir, "--save-samples") == 0
    rows = _rows(out)
    assert sorted(rows) == [f"{s}-{i:05d}" for s in ("set", "stack") for i in range(3)]
    model = _model(1)
    predictor = Predictor(model, num_samples=K)
    for i in range(3):
        name = f"stack-{i:05d}"
        want, heads_want, samples_want = _expected(model, stack[i][None, None], name)
        prob = np.load(out / name / "probability.npy")
        np.testing.assert_allclose(prob, want[0], atol=ATOL)
        p = prob.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            bits = np.nan_to_num(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)))
        np.testing.assert_allclose(np.load(out / name / "uncertainty.npy"), bits, atol=1e-5)
        saved = np.load(out / name / "samples.npy")
        assert saved.dtype == np.float16 and saved.shape == samples_want.shape  # (K, S, H, W)
        np.testing.assert_allclose(saved, samples_want, atol=1e-3)
        pred = predictor.predict_images(stack[i][None, None], name)  # the API: the same numbers
        np.testing.assert_allclose(pred.probability, want, atol=ATOL)
        assert rows[name]["uncertainty"] and abs(float(rows[name]["uncertainty"]) - mean_pairwise_disagreement(
            samples_want >= 0.5)) < 0.02  # fmt: skip


def test_large_slices_go_fewer_to_a_batch(monkeypatch):
    """batch_size counts slices of up to 128 x 128 (after padding); larger ones go fewer at a time, so a batch
    never holds more pixels than batch_size slices of 128 x 128, and the maps are those of one-by-one
    model.predict."""
    model = _model(1)
    predictor = Predictor(model, num_samples=K, batch_size=4)
    seen: list[tuple[int, int, int]] = []
    decode = model.decode_draws

    def recording(x, *args, **kwargs):
        seen.append((x.shape[0], *x.shape[2:]))
        return decode(x, *args, **kwargs)

    monkeypatch.setattr(model, "decode_draws", recording)
    rng = np.random.default_rng(5)
    # padded to 128 x 128, 192 x 160 and 320 x 320
    for shape, batches in (((5, 1, 100, 120), [4, 1]), ((5, 1, 170, 150), [2, 2, 1]), ((2, 1, 300, 300), [1, 1])):
        seen.clear()
        raw = rng.random(shape).astype(np.float32)
        pred = predictor.predict_images(raw, "case")
        assert [b for b, *_ in seen] == batches, shape
        assert all(b * h * w <= 4 * 128 * 128 or b == 1 for b, h, w in seen)
        assert pred.probability.shape == (shape[0], *shape[2:])
    raw = raw[:, :, :170, :150]
    want, _, _ = _expected(model, raw, "case")
    np.testing.assert_allclose(predictor.predict_images(raw, "case").probability, want, atol=ATOL)


def test_uncertainty_score_against_a_transcription():
    rng = np.random.default_rng(5)
    masks = rng.random((5, 3, 7, 6)) > 0.6
    masks[3] = False
    masks[4] = False  # two empty masks agree
    pairs = []
    for a in range(5):
        for b in range(5):
            if a != b:
                inter, union = (masks[a] & masks[b]).sum(), (masks[a] | masks[b]).sum()
                pairs.append(1 - (inter / union if union else 1.0))
    assert mean_pairwise_disagreement(masks) == pytest.approx(np.mean(pairs), abs=1e-12)


def _make_pngs(folder: Path, n: int, seed: int = 6) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (36, 40), dtype=np.uint8)).save(folder / f"img{i:02d}.png")


def _outputs(out: Path) -> dict[str, bytes]:
    """Every output file's bytes, but case.json's timing."""
    files = {}
    for f in sorted(out.rglob("*")):
        if f.is_file() and not any(p.startswith(".") for p in f.relative_to(out).parts):
            if f.name == "case.json":
                record = json.loads(f.read_text())
                record["row"].pop("seconds")
                files[str(f.relative_to(out))] = json.dumps(record).encode()
            elif f.suffix in (".png", ".npy", ".gz") or f.name == "summary.csv":
                files[str(f.relative_to(out))] = f.read_bytes() if f.name != "summary.csv" else b""
    return files


def _cli_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_two_gloo_processes_write_what_one_writes(run_dir, tmp_path):
    nib = pytest.importorskip("nibabel")
    src = tmp_path / "in"
    _make_pngs(src, 7)
    rng = np.random.default_rng(3)
    for name, slices in (("vol-a", 7), ("vol-b", 1)):  # under torchrun each volume's batches split over the ranks
        nib.save(nib.Nifti1Image(rng.normal(0, 300, (36, 40, slices)).astype(np.int16), np.eye(4)),
                 str(src / f"{name}.nii.gz"))  # fmt: skip
    (src / "vol-c.nii.gz").write_bytes(b"not a volume")  # fails on every rank alike; none waits for the others
    base = ["-m", "harmonizer_fast.cli", "predict", "-i", str(src), "-m", str(run_dir), "-k", str(K), "--no-progress",
            "--batch", "2", "--save-samples"]  # 4 work units of 2, 2, 2 and 1 images, shared out over the parts
    one = subprocess.run([sys.executable, *base, "-o", str(tmp_path / "one")], env=_cli_env(), capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert one.returncode == 3, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          "29561", *base, "-o", str(tmp_path / "two")], env=_cli_env(), capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert two.returncode != 0 and "1 case(s) failed" in two.stderr, two.stderr[-3000:]  # torchrun exits 1
    a, b = _outputs(tmp_path / "one"), _outputs(tmp_path / "two")
    assert len(a) == 9 * (len(MAPS) + 2) + 1 and a == b  # maps, case.json and samples.npy per case; summary
    assert {k for k in a if k.endswith(".nii.gz")} == {f"{v}/{m}.nii.gz" for v in ("vol-a", "vol-b") for m in MAPS}
    record = json.loads((tmp_path / "two" / "predict.json").read_text())
    assert record["parts"] == 2 and record["volumes_split_over_ranks"] == 3
    # --num-parts/--part-id without torchrun: the same again, part by part into one folder. (Same thread count:
    # oneDNN's convolutions split their float sums by threads, so 1 and 2 threads differ in the last bits.)
    for part in (1, 0):
        r = subprocess.run([sys.executable, *base, "-o", str(tmp_path / "parts"), "--num-parts", "2", "--part-id",
                            str(part)], env=_cli_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
        assert r.returncode in (0, 3), r.stderr
    assert _outputs(tmp_path / "parts") == a
    for out in ("one", "two", "parts"):
        rows = _rows(tmp_path / out)
        assert rows.pop("vol-c")["status"] == "failed" and {r["status"] for r in rows.values()} == {"ok"}, out


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_outputs(run_dir, tmp_path):
    src = tmp_path / "in"
    _make_pngs(src, 10, seed=7)
    cmd = [sys.executable, "-m", "harmonizer_fast.cli", "predict", "-i", str(src), "-m", str(run_dir), "-k", str(K),
           "--no-progress", "--batch", "3"]  # fmt: skip
    full = subprocess.run([*cmd, "-o", str(tmp_path / "full")], env=_cli_env(), capture_output=True, timeout=600)
    assert full.returncode == 0
    out = tmp_path / "cut"
    proc = subprocess.Popen([*cmd, "-o", str(out)], env=_cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and len(list(out.glob("img*/case.json"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(out.glob("img*/case.json")))
    assert 3 <= done_before < 10, done_before  # killed mid-way (a machine too fast for this would need more cases)
    assert all((p / "case.json").is_file() for p in out.glob("img*"))  # no half-written case is visible
    r = subprocess.run([*cmd, "-o", str(out)], env=_cli_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and f"{done_before} already done" in r.stdout, r.stdout
    assert _outputs(out) == _outputs(tmp_path / "full")
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_mixed_folder_with_bad_cases(run_dir, tmp_path, capsys):
    from PIL import Image

    src = tmp_path / "in"
    _make_pngs(src, 2)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    np.save(src / "nan.npy", np.full((20, 20), np.nan, np.float32))
    Image.fromarray(np.stack([np.zeros((20, 20), np.uint8), np.full((20, 20), 9, np.uint8),
                              np.ones((20, 20), np.uint8)], -1)).save(src / "colour.png")  # fmt: skip
    (src / "notes.txt").write_text("ignored")
    nib = pytest.importorskip("nibabel")
    nib.save(nib.Nifti1Image(np.full((20, 20, 3), np.nan, np.float32), np.eye(4)), str(src / "void.nii.gz"))
    out = tmp_path / "out"
    assert _predict("-i", src, "-o", out, "-m", run_dir) == 3  # finished, but some cases failed
    rows = _rows(out)
    status = {"img00": "ok", "img01": "ok", **dict.fromkeys(("broken", "nan", "colour", "void"), "failed")}
    assert {n: r["status"] for n, r in rows.items()} == status
    assert "cannot decode" in rows["broken"]["error"] and "NaN" in rows["nan"]["error"]
    assert "NaN" in rows["void"]["error"]  # a volume alone in its unit fails alone too
    assert "channel" in rows["colour"]["error"]
    assert "4 case(s) failed" in capsys.readouterr().err
    # the failed cases are retried by a rerun, the finished ones skipped
    (src / "broken.png").unlink()
    assert _predict("-i", src, "-o", out, "-m", run_dir) == 3
    assert "broken" not in _rows(out)


def test_array_headers_are_checked_before_anything_is_listed(run_dir, tmp_path):
    """A header declaring 2^42 values or 2^20 images, or an object array, is one failed row, at once."""
    import io
    import zipfile

    src = tmp_path / "in"
    src.mkdir()
    for name, shape in (("huge", (1 << 20, 1 << 12, 1 << 10)), ("many", (1 << 21, 1, 1))):
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
        with zipfile.ZipFile(src / f"{name}.npz", "w") as z:
            z.writestr("images.npy", buf.getvalue())
    np.save(src / "objects.npy", np.array([[1, "a"]], dtype=object), allow_pickle=True)
    assert _predict("-i", src, "-o", tmp_path / "out", "-m", run_dir) == 3  # not 2^21 cases listed, one row
    rows = _rows(tmp_path / "out")
    assert {n: r["status"] for n, r in rows.items()} == dict.fromkeys(("huge", "many", "objects"), "failed")
    assert "at most" in rows["huge"]["error"] and "at most 1000000" in rows["many"]["error"]
    assert "object array" in rows["objects"]["error"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device", "cuda:7"], "--device"),
        (["--device", "tpu"], "--device"),
        (["-k", "0"], "-k/--num-samples"),
        (["--num-parts", "2", "--part-id", "2"], "--part-id"),
        (["--model", "no-such-model"], "--model"),
    ],
)
def test_bad_arguments_are_one_line(run_dir, tmp_path, capsys, args, message):
    src = tmp_path / "in"
    _make_pngs(src, 1)
    if "--device" in args and args[1] == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    argv = ["predict", "-i", str(src), "-o", str(tmp_path / "out"), "-m", str(run_dir), *map(str, args)]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out" / "img00").exists()


def test_output_never_lands_on_the_input(run_dir, tmp_path, capsys):
    src = tmp_path / "in"
    _make_pngs(src, 1)
    before = {p: p.read_bytes() for p in src.iterdir()}
    for target in (src, src / "preds"):
        assert _predict("-i", src, "-o", target, "-m", run_dir) == 2
        assert "-o/--output" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in src.iterdir()} == before


def test_report_lists_the_least_certain_case_first(run_dir, tmp_path):
    src = tmp_path / "in"
    _make_pngs(src, 3)
    out = tmp_path / "out"
    assert _predict("-i", src, "-o", out, "-m", run_dir, "--report") == 0
    page = (out / "report.html").read_text()
    rows = sorted(_rows(out).values(), key=lambda r: -float(r["uncertainty"]))
    positions = [page.index(f"<td>{r['case']}</td>") for r in rows]
    assert positions == sorted(positions) and page.count("data:image/png;base64,") == 3


def test_preprocessing_is_recorded_in_the_checkpoint_and_applied(tmp_path):
    from harmonizer_fast.checkpoint import CheckpointError, read_manifest

    model = _model(1)
    window = Preprocessing.ct_window(-1000.0, 400.0)
    save_checkpoint(tmp_path / "ct", "best", model, preprocessing=window)
    predictor = Predictor(tmp_path / "ct", num_samples=K)
    assert predictor.preprocessing == window
    hu = np.random.default_rng(8).normal(-500, 600, (1, 1, 40, 40)).astype(np.int16)
    pred = predictor.predict_images(hu, "x")
    want = np.clip((hu.astype(np.float64) + 1000) / 1400, 0, 1)
    np.testing.assert_allclose(pred.image, want, atol=1e-6)  # windowed, not min-max scaled
    # a checkpoint from before the field reads as the readers' recipe; a damaged recipe is refused by name
    path, manifest = read_manifest(tmp_path / "ct")
    for value, ok in ((None, True), ({"intensity": "window", "window": [3, 1]}, False), ({"bogus": 1}, False)):
        if value is None:
            manifest.pop("preprocessing")
        else:
            manifest["preprocessing"] = value
        path.write_text(json.dumps(manifest))
        if ok:
            assert Predictor(tmp_path / "ct", num_samples=K).preprocessing == Preprocessing()
        else:
            with pytest.raises(CheckpointError, match="preprocessing"):
                Predictor(tmp_path / "ct", num_samples=K)


def test_normalisation_is_what_training_saw():
    """The default recipe (which the dataset readers now call) against a transcription of the readers' float32
    formula before this module existed: prediction prepares pixels exactly as training did."""
    rng = np.random.default_rng(9)

    def readers_formula(x):
        if x.dtype == np.uint8:
            return x.astype(np.float32) / 255.0
        x = x.astype(np.float32)
        if x.min() >= 0.0 and x.max() <= 1.0:
            return x
        lo = x.min(axis=(2, 3), keepdims=True)
        span = x.max(axis=(2, 3), keepdims=True) - lo
        return np.where(span > 0, (x - lo) / np.where(span > 0, span, 1.0), 0.0).astype(np.float32)

    for raw in (rng.integers(0, 256, (3, 2, 9, 7), dtype=np.uint8), rng.normal(5, 3, (3, 2, 9, 7)),
                rng.random((2, 1, 5, 5)).astype(np.float32), np.full((1, 1, 4, 4), 7.0)):  # fmt: skip
        np.testing.assert_array_equal(Preprocessing().normalize(raw), readers_formula(raw))


def test_a_failing_disk_fails_the_units_cases_and_publishes_none(run_dir, tmp_path, monkeypatch, capsys):
    """A unit's cases are flushed together before any is renamed into place ([predict] #34): a flush that
    fails (a full or failing disk) leaves each of them a failed row, no case folder, no hidden folder; a rerun
    writes what an undisturbed run writes."""
    import errno

    from harmonizer_fast.predict import output

    src, out, ref = tmp_path / "in", tmp_path / "out", tmp_path / "ref"
    _make_pngs(src, 3)
    assert _predict("-i", src, "-o", ref, "-m", run_dir) == 0

    def full(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(output, "sync_filesystem", full)
    assert _predict("-i", src, "-o", out, "-m", run_dir) == 3
    rows = _rows(out)
    assert {r["status"] for r in rows.values()} == {"failed"} and len(rows) == 3
    assert all("No space left on device" in r["error"] for r in rows.values())
    assert not [p for p in out.iterdir() if p.is_dir() and p.name not in (".failed",)]
    monkeypatch.undo()
    assert _predict("-i", src, "-o", out, "-m", run_dir) == 0
    assert _outputs(out) == _outputs(ref)
