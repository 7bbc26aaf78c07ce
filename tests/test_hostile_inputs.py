"""Hostile inputs across the API and every CLI command, one table row each.

A row is the input and what must happen: an error of the given class whose message holds the given fragment
(for the CLI: exit status 2 and exactly one line on stderr, never a traceback), or a correct result. Rows
that name output paths also check that nothing was written there (no half-written file). The damaged
inputs are made once per module from a small trained run: truncated, CRC-damaged and disguised npz files,
manifests without their keys, truncated, swapped and missing weights, a malicious pickle, a truncated
dataset cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
import torch
from test_data import write_lidc

import harmonizer_fast as hf
from harmonizer_fast import _backend
from harmonizer_fast import data as hd
from harmonizer_fast.checkpoint import CheckpointError, load_model, read_manifest, save_checkpoint, verify_checkpoint
from harmonizer_fast.cli import main as cli
from harmonizer_fast.compare import CompareConfig, Comparison
from harmonizer_fast.evaluate import evaluate_model, run_evaluation
from harmonizer_fast.metrics import evaluate_batch
from harmonizer_fast.model import HarmonizerConfig, HarmonizerNet
from harmonizer_fast.ops.fcomb import fcomb_head
from harmonizer_fast.sampling import stream_samples
from harmonizer_fast.train import TrainConfig, Trainer, TrainingError


class World:
    """Every input the rows use, under one module-scoped folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = hd.make_synthetic(24, size=32, raters=2, seed=3)
        self.npz = root / "data.npz"
        hd.write_npz(self.data, self.npz)
        self.run = root / "run"  # a completed two-phase run (1 + 1 epochs)
        tc = TrainConfig(epochs_phase1=1, epochs_phase2=1, batch_size=8, lr_phase1=1e-3, lr_phase2=1e-3,
                         val_samples=2)  # fmt: skip
        self.config = HarmonizerConfig.small(num_raters=2)
        Trainer(self.data, self.config, tc, self.run, progress=False, log=lambda _m: None).fit()
        Comparison(root / "cmp-plan", CompareConfig(minutes1=1.0), hd.read_npz(self.npz)).check_plan()
        self.a_file = root / "a-file.txt"
        self.a_file.write_text("not a folder")
        self.empty_dir = root / "empty"
        self.empty_dir.mkdir()
        # inputs a row names as its own output too (made here, before the rows snapshot their outputs)
        for name in ("sd.npz", "hd.npz", "cs.npz"):
            shutil.copy(self.npz, root / name)
        os.link(root / "hd.npz", root / "hl.npz")
        self.run_copy("xr")
        self.other_config = root / "other"  # a checkpoint of another model config
        torch.manual_seed(0)
        save_checkpoint(self.other_config, "last", HarmonizerNet(HarmonizerConfig.small(num_raters=2, latent_dim=3)))

    def path(self, name: str) -> Path:
        return self.root / name

    def npz_with(self, name: str, **arrays: np.ndarray) -> Path:
        p = self.root / name
        np.savez(p, **arrays)
        return p

    def truncated(self, src: Path, name: str) -> Path:
        p = self.root / name
        blob = src.read_bytes()
        p.write_bytes(blob[: len(blob) // 2])
        return p

    def crc_damaged_npz(self) -> Path:
        """A stored (uncompressed) npz with one byte of the masks' data flipped: its CRC no longer matches."""
        p = self.root / "crc.npz"
        shutil.copy(self.npz, p)
        with zipfile.ZipFile(p) as z:
            info = z.getinfo("masks.npy")
        blob = bytearray(p.read_bytes())
        data_start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        blob[data_start + info.compress_size - 1] ^= 0xFF
        p.write_bytes(bytes(blob))
        return p

    def npz_declaring(self, name: str, shape: tuple) -> Path:
        """An npz whose images.npy header declares ``shape`` (float32) over a few bytes of data."""
        p = self.root / name
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
        masks = io.BytesIO()
        np.save(masks, self.data.masks)
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("images.npy", header.getvalue() + b"\0" * 64)
            z.writestr("masks.npy", masks.getvalue())
        return p

    def run_copy(self, name: str) -> Path:
        dst = self.root / name
        shutil.copytree(self.run, dst)
        return dst

    def manifest_edit(self, name: str, edit: Callable[[dict], None], stem: str = "best") -> Path:
        run = self.run_copy(name)
        for s in ("best", "last"):  # the same damage to both, so no fallback hides it
            m = json.loads((run / f"{s}.json").read_text())
            edit(m)
            (run / f"{s}.json").write_text(json.dumps(m))
        return run

    def damaged_weights(self, name: str, how: str) -> Path:
        run = self.run_copy(name)
        for s in ("best", "last"):
            f = run / json.loads((run / f"{s}.json").read_text())["files"]["weights"]
            if how == "truncate":
                f.write_bytes(f.read_bytes()[:1000])
            elif how == "delete":
                f.unlink(missing_ok=True)  # best and last may share one weights file
            elif how == "swap":  # another checkpoint's (valid) weights under this name
                other = (
                    self.other_config / json.loads((self.other_config / "last.json").read_text())["files"]["weights"]
                )
                f.write_bytes(other.read_bytes())
        return run

    def evil_pickle(self) -> Path:
        class Evil:
            def __reduce__(self):
                import os

                return (os.system, ("echo owned",))

        p = self.root / "evil.pkl"
        p.write_bytes(pickle.dumps({"a": Evil()}))
        return p


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("hostile"))


@dataclass
class Row:
    id: str
    run: Callable[[World], Any]
    error: Optional[type] = None  # expected exception class (API rows)
    fragment: str = ""  # expected in the message
    check: Optional[Callable[[Any, World], None]] = None  # a correct result (API rows without an error)
    cli: bool = False


def C(id: str, argv: Callable[[World], list], fragment: str) -> Row:  # noqa: N802
    return Row(id, lambda w: [str(a) for a in argv(w)], fragment=fragment, cli=True)


def E(id: str, run: Callable[[World], Any], error: type, fragment: str) -> Row:  # noqa: N802
    return Row(id, run, error=error, fragment=fragment)


def OK(id: str, run: Callable[[World], Any], check: Callable[[Any, World], None]) -> Row:  # noqa: N802
    return Row(id, run, check=check)


def _other_plan(w: World) -> list:
    """A comparison directory whose plan (made by the World) has other options than the command line's."""
    return ["compare", "--out", w.path("cmp-plan"), "--data", w.npz]


def TRAIN(w: World, *extra) -> list:  # noqa: N802
    return ["train", "--data", w.npz, "--out", w.path("t-out"), "--epochs", "1", "--batch-size", "8",
            "--no-progress", *extra]  # fmt: skip


def EVAL(w: World, *extra, checkpoint=None, data=None) -> list:  # noqa: N802
    return ["evaluate", "--checkpoint", checkpoint or w.run, "--data", data or w.npz, "--out", w.path("e-out"), *extra]


def SAMPLE(w: World, *extra, checkpoint=None, out=None) -> list:  # noqa: N802
    return ["sample", "--checkpoint", checkpoint or w.run, "--data", w.npz, "--out", out or w.path("s.npz"),
            "--no-progress", *extra]  # fmt: skip


def EXPORT(w: World, *extra, checkpoint=None, out=None, fmt="pt2") -> list:  # noqa: N802
    return ["export", "--checkpoint", checkpoint or w.run, "--format", fmt, "--out", out or w.path("m.pt2"), *extra]


def _raters() -> torch.Tensor:
    return (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) > 0.5).float()


def _phase1_forward(w: World, rater_index: torch.Tensor):
    net = HarmonizerNet(w.config)
    net.set_phase(1)
    x = torch.from_numpy(w.data.images[:2])
    return net(x, torch.from_numpy(w.data.masks[:2]).float(), rater_index=rater_index)


def _drop(key: str) -> Callable[[dict], None]:
    return lambda m: m.pop(key)


def _set(key: str, value: Any) -> Callable[[dict], None]:
    return lambda m: m.__setitem__(key, value)


def _in(part: str, key: str, value: Any) -> Callable[[dict], None]:
    """Set one field of a manifest's ``model_config`` or ``state``."""
    return lambda m: m[part].__setitem__(key, value)


def _finite_probs(x):
    return torch.rand(1, 2, 8, 8) if x is None else x


def _samples(fill=None, k=3):
    g = torch.Generator().manual_seed(0)
    s = torch.rand(2, k, 8, 8, generator=g)
    return s if fill is None else s.masked_fill(s > 0.7, fill)


def _raters(value=1.0):
    g = torch.Generator().manual_seed(1)
    return (torch.rand(2, 2, 8, 8, generator=g) > 0.5).float() * value


def _binary_iou_has_no_grad(out, w):
    assert not out.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        out.sum().backward()


def _cache_is_rebuilt(result, w):
    data, fresh = result
    np.testing.assert_array_equal(data.masks, fresh.masks)
    np.testing.assert_array_equal(data.images, fresh.images)


def _truncated_cache_then_read(w: World):
    root = w.path("lidc")
    if not root.exists():
        write_lidc(root, patients=2, nodules=1, slices=2, raters=2)
    cache = w.path("cache")
    import os

    os.environ["HARMONIZER_FAST_CACHE"] = str(cache)
    try:
        fresh = hd.load_dataset(root)  # builds the cache
        (f,) = cache.glob("lidc-*.npz")
        f.write_bytes(f.read_bytes()[:100])  # a writer killed by an older version, a full disk
        again = hd.load_dataset(root)
        assert f.stat().st_size > 100  # rebuilt, so later reads are fast again
        return again, fresh
    finally:
        del os.environ["HARMONIZER_FAST_CACHE"]


def _nan_head_pixels(out, w):
    assert torch.isnan(out[0, :, 1, 2]).all() and not torch.isnan(out[1]).any()


def _fcomb_nan():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 16, 4, 4, generator=g)
    base[0, 3, 1, 2] = float("nan")
    args = [torch.randn(s, generator=g) for s in ((2, 3, 16), (2, 16, 16), (2, 16), (16,), (1,))]
    return fcomb_head(base, *args)


def _untrained(w: World) -> HarmonizerNet:
    torch.manual_seed(0)
    return HarmonizerNet(w.config).eval()


def _trained(w: World) -> HarmonizerNet:
    return load_model(w.run)[0]


TC = dict(epochs_phase1=1, batch_size=8)

ROWS = [
    # ---- train: numeric flags, checked when the command line is parsed
    C(
        "train-batch-negative",
        lambda w: TRAIN(w, "--batch-size", "-4"),
        "--batch-size: expected an integer >= 1, got -4",
    ),
    C("train-batch-zero", lambda w: TRAIN(w, "--batch-size", "0"), "expected an integer >= 1, got 0"),
    C("train-batch-text", lambda w: TRAIN(w, "--batch-size", "many"), "expected an integer >= 1, got 'many'"),
    C("train-epochs-zero", lambda w: TRAIN(w, "--epochs", "0"), "--epochs: expected an integer >= 1"),
    C("train-epochs-negative", lambda w: TRAIN(w, "--epochs", "-1"), "--epochs: expected an integer >= 1"),
    C("train-epochs2-zero", lambda w: TRAIN(w, "--epochs2", "0"), "--epochs2: expected an integer >= 1"),
    C("train-lr-nan", lambda w: TRAIN(w, "--lr", "nan"), "--lr: expected a finite number > 0, got 'nan'"),
    C("train-lr-inf", lambda w: TRAIN(w, "--lr", "inf"), "--lr: expected a finite number > 0"),
    C("train-lr-negative", lambda w: TRAIN(w, "--lr", "-1"), "--lr: expected a finite number > 0"),
    C("train-lr-zero", lambda w: TRAIN(w, "--lr", "0"), "--lr: expected a finite number > 0"),
    C("train-lr-text", lambda w: TRAIN(w, "--lr", "fast"), "--lr: expected a number > 0, got 'fast'"),
    C("train-max-minutes-zero", lambda w: TRAIN(w, "--max-minutes", "0"), "--max-minutes: expected a finite number"),
    C("train-max-minutes-negative", lambda w: TRAIN(w, "--max-minutes", "-5"), "--max-minutes"),
    C("train-seed-negative", lambda w: TRAIN(w, "--seed", "-1"), "--seed: expected an integer >= 0"),
    C("train-seed-huge", lambda w: TRAIN(w, "--seed", str(2**63)), "--seed: expected an integer in [0, 2**63)"),
    C("train-fold-out-of-range", lambda w: TRAIN(w, "--fold", "4"), "--fold: invalid choice"),
    C("train-phase-unknown", lambda w: TRAIN(w, "--phase", "3"), "--phase: invalid choice"),
    C("train-config-unknown", lambda w: TRAIN(w, "--config", "huge"), "--config: invalid choice"),
    C("train-rater-order-unknown", lambda w: TRAIN(w, "--rater-order", "random"), "--rater-order: invalid choice"),
    C(
        "train-synthetic-items-zero",
        lambda w: ["train", "--out", w.path("t-out"), "--synthetic-items", "0"],
        "--synthetic-items: expected an integer >= 5",
    ),
    C(
        "train-synthetic-raters-zero",
        lambda w: ["train", "--out", w.path("t-out"), "--synthetic-raters", "0"],
        "--synthetic-raters: expected an integer >= 1",
    ),
    C(
        "train-synthetic-too-few-patients",
        lambda w: ["train", "--out", w.path("t-out"), "--synthetic-items", "5"],
        "cannot be split into 4 folds",
    ),
    C("train-unknown-flag", lambda w: TRAIN(w, "--bogus"), "unrecognized arguments: --bogus"),
    # ---- train: data that cannot be used
    C("train-data-missing", lambda w: TRAIN(w, "--data", w.path("nope.npz")), "no such file or directory"),
    C("train-data-unknown-suffix", lambda w: TRAIN(w, "--data", w.a_file), "unknown data format"),
    C("train-data-truncated-npz", lambda w: TRAIN(w, "--data", w.truncated(w.npz, "trunc.npz")), "not a readable .npz"),
    C("train-data-crc-damaged-npz", lambda w: TRAIN(w, "--data", w.crc_damaged_npz()), "not a readable .npz"),
    C(
        "train-data-npz-without-masks",
        lambda w: TRAIN(w, "--data", w.npz_with("nomask.npz", images=w.data.images)),
        "needs arrays ['images', 'masks']",
    ),
    C(
        "train-data-masks-not-binary",
        lambda w: TRAIN(w, "--data", w.npz_with("m2.npz", images=w.data.images, masks=w.data.masks * 2)),
        "masks hold the values {0, 2}; expected {0, 1} or {0, 255}",
    ),
    C("train-data-npy-named-npz", lambda w: TRAIN(w, "--data", _npy_as_npz(w)), "not a .npz archive"),
    C(
        "train-data-nan-images",
        lambda w: TRAIN(
            w, "--data", w.npz_with("nan.npz", images=np.full((4, 32, 32), np.nan), masks=np.zeros((4, 1, 32, 32)))
        ),
        "images contain NaN or Inf",
    ),
    C(
        "train-data-object-array",
        lambda w: TRAIN(w, "--data", w.npz_with("obj.npz", images=np.array([None, 1]), masks=np.zeros((2, 1, 4, 4)))),
        "not a readable .npz",
    ),
    C("train-data-empty-folder", lambda w: TRAIN(w, "--data", w.empty_dir), "not a known dataset folder"),
    C("train-data-evil-pickle", lambda w: TRAIN(w, "--data", w.evil_pickle()), "refused to load posix.system"),
    C(
        "train-data-truncated-pickle",
        lambda w: TRAIN(w, "--data", w.truncated(w.evil_pickle(), "half.pkl")),
        "pickle data was truncated",
    ),
    # ---- train: output folder and checkpoints
    C("train-out-is-a-file", lambda w: TRAIN(w, "--out", w.a_file), "--out: "),
    C("train-out-under-a-file", lambda w: TRAIN(w, "--out", w.a_file / "run"), "is a file, not a directory"),
    C(
        "train-resume-foreign-manifest",
        lambda w: TRAIN(w, "--resume", "--out", _foreign_run(w)),
        "not a harmonizer-fast checkpoint",
    ),
    C(
        "train-resume-manifest-without-files",
        lambda w: TRAIN(w, "--resume", "--out", w.manifest_edit("nofiles", _drop("files"))),
        "damaged manifest: 'files'",
    ),
    C(
        "train-resume-manifest-without-sha256",
        lambda w: TRAIN(w, "--resume", "--out", w.manifest_edit("nosha", _drop("sha256"))),
        "damaged manifest: 'sha256'",
    ),
    C(
        "train-resume-manifest-path-escape",
        lambda w: TRAIN(
            w,
            "--resume",
            "--out",
            w.manifest_edit("escape", lambda m: m["files"].__setitem__("weights", "../data.npz")),
        ),
        "must be a .safetensors file name",
    ),
    C(
        "train-resume-truncated-weights",
        lambda w: TRAIN(w, "--resume", "--out", w.damaged_weights("tr", "truncate")),
        "does not match its manifest",
    ),
    C(
        "train-resume-completed-run-corrupted",
        lambda w: [
            "train",
            "--data",
            w.npz,
            "--resume",
            "--no-progress",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
            "--out",
            w.damaged_weights("done", "truncate"),
        ],
        "does not match its manifest",
    ),
    C(
        "train-resume-missing-weights",
        lambda w: TRAIN(w, "--resume", "--out", w.damaged_weights("mw", "delete")),
        "missing (listed in last.json)",
    ),
    C(
        "train-resume-other-seed",
        lambda w: TRAIN(w, "--resume", "--seed", "5", "--out", w.run_copy("seed")),
        "seed: recorded 0, asked 5",
    ),
    C("train-phase2-without-init", lambda w: TRAIN(w, "--phase", "2"), "--phase 2 trains the personalizer"),
    C("train-phase2-no-personalizer", lambda w: TRAIN(w, "--phase", "2", "--no-personalizer"), "removes"),
    C(
        "train-init-other-config",
        lambda w: TRAIN(w, "--phase", "2", "--init", w.other_config),
        "its model config differs from this run's (latent_dim: 3 != 6)",
    ),
    C("train-init-missing", lambda w: TRAIN(w, "--init", w.path("no-such-run")), "checkpoint manifest not found"),
    # ---- evaluate
    C("evaluate-samples-negative", lambda w: EVAL(w, "--samples", "-1"), "--samples: expected an integer >= 1"),
    C("evaluate-samples-zero", lambda w: EVAL(w, "--num-samples", "0"), "--samples: expected an integer >= 1"),
    C("evaluate-seed-negative", lambda w: EVAL(w, "--seed", "-1"), "--seed: expected an integer >= 0"),
    C("evaluate-checkpoint-missing", lambda w: EVAL(w, checkpoint=w.path("gone")), "checkpoint manifest not found"),
    C("evaluate-checkpoint-empty-folder", lambda w: EVAL(w, checkpoint=w.empty_dir), "no checkpoint in this directory"),
    C(
        "evaluate-manifest-without-sha256",
        lambda w: EVAL(w, checkpoint=w.manifest_edit("nosha-e", _drop("sha256"))),
        "damaged manifest",
    ),
    C(
        "evaluate-manifest-wrong-version",
        lambda w: EVAL(w, checkpoint=w.manifest_edit("v9", _set("version", 9))),
        "checkpoint version 9 is not supported",
    ),
    C("evaluate-manifest-garbage", lambda w: EVAL(w, checkpoint=_garbage_manifest(w)), "not a harmonizer-fast"),
    C(
        "evaluate-manifest-not-an-object",
        lambda w: EVAL(w, checkpoint=_json_manifest(w, "list.json", [1, 2])),
        "not a harmonizer-fast checkpoint",
    ),
    C(
        "evaluate-truncated-weights",
        lambda w: EVAL(w, checkpoint=w.damaged_weights("tr-e", "truncate")),
        "does not match its manifest",
    ),
    C(
        "evaluate-swapped-weights",
        lambda w: EVAL(w, checkpoint=w.damaged_weights("sw-e", "swap")),
        "does not match its manifest",
    ),
    C("evaluate-out-is-a-file", lambda w: EVAL(w, "--out", w.a_file), "exists and is not a directory"),
    C("evaluate-data-other-raters", lambda w: EVAL(w, data=_three_rater_npz(w)), "the checkpoint expects 2"),
    C("evaluate-data-truncated", lambda w: EVAL(w, data=w.truncated(w.npz, "trunc-e.npz")), "not a readable .npz"),
    # ---- sample
    C("sample-batch-negative", lambda w: SAMPLE(w, "--batch", "-1"), "--batch: expected an integer >= 1, got -1"),
    C("sample-batch-zero", lambda w: SAMPLE(w, "--batch", "0"), "--batch: expected an integer >= 1"),
    C("sample-samples-zero", lambda w: SAMPLE(w, "--samples", "0"), "--samples: expected an integer >= 1"),
    C("sample-out-is-a-directory", lambda w: SAMPLE(w, out=w.empty_dir), "is a directory; expected a file name"),
    C("sample-out-under-a-file", lambda w: SAMPLE(w, out=w.a_file / "s.npz"), "is a file, not a directory"),
    C("sample-checkpoint-foreign", lambda w: SAMPLE(w, checkpoint=_foreign_run(w)), "not a harmonizer-fast"),
    C("sample-split-unknown", lambda w: SAMPLE(w, "--split", "train"), "--split: invalid choice"),
    C("export-format-unknown", lambda w: EXPORT(w, fmt="tflite"), "--format: invalid choice: 'tflite'"),
    C("export-size-not-a-multiple", lambda w: EXPORT(w, "--size", "100", "128"), "--size: expected a multiple of 32"),
    C("export-size-too-small", lambda w: EXPORT(w, "--size", "32", "64"),
      "size must be multiples of 32 of at least 64, got (32, 64)"),
    C("export-size-one-value", lambda w: EXPORT(w, "--size", "64"), "--size: expected 2 arguments"),
    C("export-samples-zero", lambda w: EXPORT(w, "--samples", "0"), "--samples: expected an integer >= 1"),
    C("export-heads-unknown", lambda w: EXPORT(w, "--heads", "all"), "--heads: invalid choice"),
    C("export-heads-never-trained", lambda w: EXPORT(w, "--heads", "personalized", checkpoint=w.other_config),
      "personalizer was never trained"),
    C("export-out-is-a-directory", lambda w: EXPORT(w, out=w.empty_dir), "is a directory; expected a file name"),
    C("export-out-under-a-file", lambda w: EXPORT(w, out=w.a_file / "m.pt2"), "is a file, not a directory"),
    C("export-checkpoint-foreign", lambda w: EXPORT(w, checkpoint=_foreign_run(w)), "not a harmonizer-fast"),
    C("export-checkpoint-missing-weights", lambda w: EXPORT(w, checkpoint=w.damaged_weights("ex-del", "delete")),
      "weights"),
    C(
        "sample-missing-weights",
        lambda w: SAMPLE(w, checkpoint=w.damaged_weights("mw-s", "delete")),
        "missing (listed in best.json)",
    ),
    # ---- sizes from files and flags are bounded before anything is allocated for them
    C("train-npz-header-declares-4-tib", lambda w: TRAIN(w, "--data", w.npz_declaring("huge.npz", (2**20, 2**20))),
      "declares shape (1048576, 1048576) (4.1e+03 GiB) in a member of"),
    C("sample-samples-a-hundred-million", lambda w: SAMPLE(w, "-k", "100000000"),
      "--num-samples 100000000 at 32 x 32 needs"),
    # ---- outputs never replace inputs ([reliability] #36 item 2): by path, by hard link, inside an input folder
    C("sample-out-is-the-data", lambda w: ["sample", "--checkpoint", w.run, "--data", w.path("sd.npz"),
                                           "--out", w.path("sd.npz"), "--no-progress"], "outputs never replace inputs"),
    C("sample-out-is-a-hard-link-of-the-data",
      lambda w: ["sample", "--checkpoint", w.run, "--data", w.path("hd.npz"),
                 "--out", w.path("hl.npz"), "--no-progress"], "outputs never replace inputs"),  # fmt: skip
    C("convert-onto-its-source", lambda w: ["convert", w.path("cs.npz"), w.path("cs.npz")],
      "outputs never replace inputs"),
    C("export-onto-the-checkpoint-manifest",
      lambda w: EXPORT(w, checkpoint=w.path("xr"), out=w.path("xr/best.json")), "outputs never replace inputs"),
    C("evaluate-out-inside-the-data-folder",
      lambda w: ["evaluate", "--checkpoint", w.run, "--data", w.empty_dir, "--out", w.empty_dir / "eval"],
      "is inside the input"),
    # ---- convert
    C("convert-src-missing", lambda w: ["convert", w.path("none.npz"), w.path("c.npz")], "no such file or directory"),
    C("convert-out-is-a-directory", lambda w: ["convert", w.npz, w.empty_dir], "is a directory"),
    C("convert-out-under-a-file", lambda w: ["convert", w.npz, w.a_file / "c.npz"], "is a file, not a directory"),
    C("convert-src-crc-damaged", lambda w: ["convert", w.crc_damaged_npz(), w.path("c.npz")], "not a readable .npz"),
    C("convert-format-unknown", lambda w: ["convert", w.npz, w.path("c.npz"), "--format", "dicom"], "unknown format"),
    # ---- profile
    C("profile-samples-zero", lambda w: ["profile", "--samples", "0"], "--samples: expected an integer >= 1"),
    C("profile-batch-zero", lambda w: ["profile", "--batch", "0"], "--batch: expected an integer >= 1"),
    C("profile-size-not-multiple", lambda w: ["profile", "--size", "100"], "--size: expected a multiple of 32"),
    C("profile-size-small", lambda w: ["profile", "--size", "16"], "--size: expected an integer >= 32"),
    C(
        "profile-json-is-a-directory",
        lambda w: ["profile", "--config", "small", "--json", w.empty_dir],
        "is a directory",
    ),
    C("profile-config-unknown", lambda w: ["profile", "--config", "tiny"], "--config: invalid choice"),
    # ---- demo, bench and the command itself
    # ---- compare
    C("compare-folds-out-of-range", lambda w: ["compare", "--out", w.path("cmp"), "--folds", "4"],
      "--folds: expected distinct comma-separated integers in [0, 4)"),  # fmt: skip
    C("compare-folds-repeated", lambda w: ["compare", "--out", w.path("cmp"), "--folds", "0,0"],
      "--folds: expected distinct"),  # fmt: skip
    C("compare-seeds-text", lambda w: ["compare", "--out", w.path("cmp"), "--seeds", "a"],
      "--seeds: expected comma-separated integers"),  # fmt: skip
    C("compare-variants-unknown", lambda w: ["compare", "--out", w.path("cmp"), "--variants", "full,unet"],
      "--variants: expected distinct comma-separated names from full,"),  # fmt: skip
    C("compare-minutes-zero", lambda w: ["compare", "--out", w.path("cmp"), "--minutes1", "0"],
      "--minutes1: expected a finite number > 0"),  # fmt: skip
    C("compare-stem-path", lambda w: ["compare", "--out", w.path("cmp"), "--stem", "../x"],
      "--stem: expected a file name stem without path separators"),  # fmt: skip
    C("compare-no-out", lambda w: ["compare"], "--out DIR is required"),
    C("compare-out-is-a-file", lambda w: ["compare", "--out", w.a_file], "exists and is not a directory"),
    C("compare-render-not-json", lambda w: ["compare", "--render", w.a_file], "not a comparison result JSON"),
    C("compare-render-other-json", lambda w: ["compare", "--render", w.run / "best.json"],
      "not a comparison result JSON (KeyError"),  # fmt: skip
    C("compare-render-missing", lambda w: ["compare", "--render", w.path("absent.json")], "absent.json"),
    C("compare-other-plan", lambda w: _other_plan(w),
      "holds a comparison with another plan (differs in ['minutes1'"),  # fmt: skip
    C("train-personalizer-unknown", lambda w: TRAIN(w, "--personalizer", "unet"), "--personalizer: invalid choice"),
    E("config-personalizer-unknown", lambda w: HarmonizerConfig.small(personalizer="unet"), ValueError,
      "HarmonizerConfig: personalizer must be one of ('frequency', 'dpersona')"),  # fmt: skip
    E("trainconfig-budget-clock", lambda w: TrainConfig(budget_clock="gpu"), ValueError, "TrainConfig.budget_clock"),
    E("trainconfig-split-seed", lambda w: TrainConfig(split_seed=-1), ValueError, "TrainConfig.split_seed"),
    E("compareconfig-minutes-nan", lambda w: CompareConfig(minutes2=float("nan")), ValueError,
      "CompareConfig.minutes2"),  # fmt: skip
    E("compareconfig-fold", lambda w: CompareConfig(folds=[0, 7]), ValueError, "CompareConfig.folds"),
    C("demo-epochs-zero", lambda w: ["demo", "--epochs", "0"], "--epochs: expected an integer >= 1"),
    C("demo-items-few", lambda w: ["demo", "--items", "3"], "--items: expected an integer >= 16"),
    C("demo-out-is-a-file", lambda w: ["demo", "--out", w.a_file], "exists and is not a directory"),
    C("bench-only-unknown", lambda w: ["bench", "--only", "nope"], "--only: expected names from"),
    C("bench-out-is-a-file", lambda w: ["bench", "--out", w.a_file], "--out: "),
    C("bench-numpy-images-zero", lambda w: ["bench", "--numpy-images", "0"], "expected an integer >= 1"),
    C("no-command", lambda w: [], "the following arguments are required: command"),
    C("unknown-command", lambda w: ["fit"], "invalid choice: 'fit'"),
    C(
        "env-cpu-isa-unknown",
        lambda w: _with_env(w, "HARMONIZER_FAST_CPU_ISA", "sse9", ["profile", "--config", "small", "--size", "32"]),
        "HARMONIZER_FAST_CPU_ISA='sse9' is not a CPU build",
    ),
    C(
        "env-backend-unknown",
        lambda w: _with_env(w, "HARMONIZER_FAST_BACKEND", "gpu9", ["profile", "--config", "small", "--size", "32"]),
        "HARMONIZER_FAST_BACKEND='gpu9' is not a backend",
    ),
    # ---- the ops: values outside their domain
    E(
        "ged_loss-probs-above-one",
        lambda w: hf.ged_loss(_samples() * 2, _raters()),
        ValueError,
        "probs must hold probabilities, finite and within [0, 1]",
    ),
    E("ged_loss-probs-negative", lambda w: hf.ged_loss(_samples() - 1, _raters()), ValueError, "probabilities"),
    E("ged_loss-probs-nan", lambda w: hf.ged_loss(_samples(float("nan")), _raters()), ValueError, "probabilities"),
    E("ged_loss-raters-two", lambda w: hf.ged_loss(_samples(), _raters(2.0)), ValueError, "raters must hold"),
    E(
        "soft-iou-negative",
        lambda w: hf.pairwise_iou(_samples() - 0.5, _samples(), soft=True),
        ValueError,
        "a must hold probabilities",
    ),
    E(
        "soft-iou-inf",
        lambda w: hf.pairwise_iou(_samples(), _samples(float("inf")), soft=True),
        ValueError,
        "b must hold probabilities",
    ),
    OK(
        "binary-iou-of-grad-input",
        lambda w: hf.pairwise_iou(_samples().requires_grad_(), _raters()),
        _binary_iou_has_no_grad,
    ),
    OK("ged-of-grad-input", lambda w: hf.ged(_samples().requires_grad_(), _raters()), _binary_iou_has_no_grad),
    OK(
        "intersection-of-grad-input",
        lambda w: hf.ops.pairwise_intersection(_samples().requires_grad_(), _raters()),
        _binary_iou_has_no_grad,
    ),
    E("ged-nan-samples", lambda w: hf.ged(_samples(float("nan")), _raters()), ValueError, "samples must hold"),
    E("ged-samples-above-one", lambda w: hf.ged(_samples() * 2, _raters()), ValueError, "samples must hold"),
    E("ged-logits", lambda w: hf.ged(_samples() - 0.5, _raters()), ValueError, "samples must hold probabilities"),
    E("iou-inf", lambda w: hf.pairwise_iou(_samples(float("inf")), _raters()), ValueError, "a must hold"),
    E("ged-threshold-nan", lambda w: hf.ged(_samples(), _raters(), threshold=float("nan")), ValueError, "[0, 1)"),
    E("ged-threshold-one", lambda w: hf.ged(_samples(), _raters(), threshold=1.0), ValueError, "threshold must"),
    E("iou-threshold-str", lambda w: hf.pairwise_iou(_samples(), _raters(), threshold="0.5"), ValueError, "[0, 1)"),
    E("dice-soft-thresholds-nan", lambda w: hf.metrics.dice_soft(_samples(), _raters(), [0.5, float("nan")]),
      ValueError, "thresholds[1] must be a number in [0, 1)"),  # fmt: skip
    E("ged-raters-not-binary", lambda w: hf.ged(_samples(), _raters() * 0.5), ValueError, "binary masks"),
    E("ged-convention-unknown", lambda w: hf.ged(_samples(), _raters(), convention="mine"), ValueError, "convention"),
    OK("fcomb-nan-feature", lambda w: _fcomb_nan(), _nan_head_pixels),
    E("cpu-isa-unknown", lambda w: hf.set_cpu_isa("sse9"), ValueError, "expected one of"),
    # ---- the model
    E(
        "sample-nan-images",
        lambda w: _trained(w).sample(torch.full((1, 1, 32, 32), float("nan")), 2),
        ValueError,
        "images contain NaN or Inf",
    ),
    E(
        "sample-inf-images",
        lambda w: _trained(w).sample(torch.full((1, 1, 32, 32), float("inf")), 2),
        ValueError,
        "NaN or Inf",
    ),
    E("sample-zero-samples", lambda w: _trained(w).sample(torch.zeros(1, 1, 32, 32), 0), ValueError, "num_samples"),
    E(
        "personalize-untrained",
        lambda w: _untrained(w).personalize(torch.zeros(1, 1, 32, 32)),
        ValueError,
        "personalizer was never trained",
    ),
    OK(
        "personalize-untrained-allowed",
        lambda w: _untrained(w).personalize(torch.zeros(1, 1, 32, 32), allow_untrained=True),
        lambda out, w: out.shape == (1, 2, 32, 32) and bool(torch.isfinite(out).all()),
    ),
    OK(
        "personalize-trained",
        lambda w: _trained(w).personalize(torch.zeros(1, 1, 32, 32)),
        lambda out, w: out.shape == (1, 2, 32, 32),
    ),
    # ---- the trainer's configuration
    E("trainconfig-batch-negative", lambda w: TrainConfig(batch_size=-4), ValueError, "TrainConfig.batch_size"),
    E("trainconfig-epochs-zero", lambda w: TrainConfig(epochs_phase1=0), ValueError, "TrainConfig.epochs_phase1"),
    E("trainconfig-lr-nan", lambda w: TrainConfig(lr_phase1=float("nan")), ValueError, "TrainConfig.lr_phase1"),
    E("trainconfig-lr-negative", lambda w: TrainConfig(lr_phase2=-1.0), ValueError, "finite number > 0"),
    E("trainconfig-seed-negative", lambda w: TrainConfig(seed=-1), ValueError, "TrainConfig.seed"),
    E("trainconfig-phase2-z", lambda w: TrainConfig(phase2_z="noise"), ValueError, "TrainConfig.phase2_z"),
    E("trainconfig-fold", lambda w: TrainConfig(fold=4), ValueError, "an integer in [0, 4)"),
    E("trainconfig-max-minutes", lambda w: TrainConfig(max_minutes=0.0), ValueError, "TrainConfig.max_minutes"),
    E("trainconfig-phase", lambda w: TrainConfig(phase="3"), ValueError, "TrainConfig.phase"),
    E("trainconfig-rater-order", lambda w: TrainConfig(rater_order="random"), ValueError, "TrainConfig.rater_order"),
    E("trainconfig-batch-float", lambda w: TrainConfig(batch_size=8.5), ValueError,
      "TrainConfig.batch_size: expected an integer, got 8.5"),
    E("config-latent-dim-float", lambda w: HarmonizerConfig.small(latent_dim=2.5), ValueError,
      "HarmonizerConfig.latent_dim: expected an integer, got 2.5"),
    E("config-lambda-kl-nan", lambda w: HarmonizerConfig.small(lambda_kl=float("nan")), ValueError,
      "HarmonizerConfig.lambda_kl: expected a finite number, got nan"),
    E("model-rater-index-out-of-range", lambda w: _phase1_forward(w, torch.tensor([0, 5])), ValueError,
      "rater_index must lie in [0, 2), got values 0..5"),
    E("model-rater-index-float", lambda w: _phase1_forward(w, torch.tensor([0.0, 1.0])), TypeError,
      "rater_index must be an integer tensor"),
    E("model-forward-float64-images", lambda w: HarmonizerNet(w.config)(
        torch.from_numpy(w.data.images[:2]).double(), torch.from_numpy(w.data.masks[:2]).float()), TypeError,
      "images are torch.float64, the model's weights torch.float32"),
    OK("model-predict-bfloat16-images-as-float32",
      lambda w: HarmonizerNet(w.config).eval().predict(torch.from_numpy(w.data.images[:2]).to(torch.bfloat16), 2,
                                                       heads=False, generator=torch.Generator().manual_seed(0)),
      lambda out, w: out[0].dtype == torch.float32 and bool(torch.isfinite(out[0]).all())),
    E("evaluate-batch-probs-above-one", lambda w: evaluate_batch(torch.rand(2, 4, 32, 32) * 2, _raters()),
      ValueError, "evaluate_batch: probs must hold probabilities, finite and within [0, 1]"),
    E("evaluate-batch-probs-inf", lambda w: evaluate_batch(torch.rand(2, 4, 32, 32).index_fill(1, torch.tensor([0]),
      float("inf")), _raters()), ValueError, "got values from"),
    E("evaluate-batch-logits", lambda w: evaluate_batch(torch.randn(2, 4, 32, 32), _raters()), ValueError,
      "must hold probabilities"),
    E("config-flag-not-bool", lambda w: HarmonizerConfig.small(use_ged_loss="no"), ValueError,
      "HarmonizerConfig.use_ged_loss: expected True or False"),
    E(
        "trainer-phase2-without-init",
        lambda w: Trainer(
            w.data, w.config, TrainConfig(phase="2", **TC), w.path("p2"), progress=False, log=lambda _m: None
        ).fit(),
        TrainingError,
        "phase 2 trains the personalizer",
    ),
    # ---- the workflows' Python API
    E(
        "stream-samples-batch-negative",
        lambda w: stream_samples(_trained(w), w.data, [0, 1], w.path("st.npz"), batch=-1, progress=False),
        ValueError,
        "batch must be an integer >= 1",
    ),
    E(
        "stream-samples-zero",
        lambda w: stream_samples(_trained(w), w.data, [0], w.path("st.npz"), num_samples=0, progress=False),
        ValueError,
        "samples must be",
    ),
    E(
        "stream-samples-bad-index",
        lambda w: stream_samples(_trained(w), w.data, [99], w.path("st.npz"), progress=False),
        ValueError,
        "indices must lie",
    ),
    E(
        "evaluate-model-samples-negative",
        lambda w: evaluate_model(_trained(w), w.data, [0], num_samples=-1),
        ValueError,
        "samples must be an integer >= 1",
    ),
    E(
        "run-evaluation-samples-negative",
        lambda w: run_evaluation(_trained(w), w.data, np.arange(2), w.path("re"), num_samples=-1, figures=False),
        ValueError,
        "samples must be",
    ),
    E(
        "read-manifest-without-files",
        lambda w: read_manifest(w.manifest_edit("nofiles-api", _drop("files"))),
        CheckpointError,
        "damaged manifest",
    ),
    E(
        "verify-missing-weights",
        lambda w: verify_checkpoint(w.damaged_weights("mw-api", "delete") / "last.json"),
        CheckpointError,
        "missing",
    ),
    E(
        "load-model-other-config-weights",
        lambda w: load_model(_config_swapped(w)),
        CheckpointError,
        "weights do not fit the model",
    ),
    # [reliability] #36: a hand-edited count in a manifest is bounded by the weights file before any build
    # (model/budget.py); one that only sizes the forward (prior_bank) by the memory available before drawing
    E(
        "load-model-config-huge-token-count",
        lambda w: load_model(w.manifest_edit("bigtok", _in("model_config", "harmonizer_tokens", 10**12))),
        CheckpointError,
        "weights do not fit the model config: it describes a network larger than its weights file",
    ),
    E(
        "load-model-config-billion-blocks",
        lambda w: load_model(w.manifest_edit("bigblk", _in("model_config", "encoder_blocks", [10**9, 1, 1, 1]))),
        CheckpointError,
        "weights do not fit the model config",
    ),
    C(
        "sample-config-huge-prior-bank",
        lambda w: SAMPLE(w, checkpoint=w.manifest_edit("bigbank", _in("model_config", "prior_bank", 10**12))),
        "prior_bank=1000000000000",
    ),
    C(
        "train-resume-state-best-score-not-a-number",
        lambda w: TRAIN(w, "--resume", "--out", w.manifest_edit("badscore", _in("state", "best_score", "low"))),
        "RecordedState.best_score: expected a finite number or None, got 'low'",
    ),
    C(
        "train-resume-state-phase-out-of-range",
        lambda w: TRAIN(w, "--resume", "--out", w.manifest_edit("badphase", _in("state", "phase", 7))),
        "RecordedState: phase 7",
    ),
    E(
        "model-config-million-blocks",
        lambda w: HarmonizerNet(HarmonizerConfig.small(encoder_blocks=(10**6, 1, 1, 1))),
        ValueError,
        "modules (the paper's has 249)",
    ),
    E(
        "model-config-trillion-tokens",
        lambda w: HarmonizerNet(HarmonizerConfig.small(harmonizer_tokens=10**12)),
        ValueError,
        "GiB available",
    ),
    E("read-npz-crc-damaged", lambda w: hd.read_npz(w.crc_damaged_npz()), hd.DataError, "not a readable .npz"),
    OK("lidc-truncated-cache-is-rebuilt", _truncated_cache_then_read, _cache_is_rebuilt),
]


def _npy_as_npz(w: World) -> Path:
    p = w.path("array.npz")
    with open(p, "wb") as f:
        np.save(f, np.zeros(3))
    return p


def _foreign_run(w: World) -> Path:
    d = w.path("foreign")
    d.mkdir(exist_ok=True)
    (d / "last.json").write_text('{"format": "something-else"}')
    (d / "best.json").write_text('{"format": "something-else"}')
    return d


def _garbage_manifest(w: World) -> Path:
    p = w.path("garbage.json")
    p.write_bytes(b"\x80\x81\x82")
    return p


def _json_manifest(w: World, name: str, obj: Any) -> Path:
    p = w.path(name)
    p.write_text(json.dumps(obj))
    return p


def _three_rater_npz(w: World) -> Path:
    d = hd.make_synthetic(8, size=32, raters=3, seed=0)
    p = w.path("three.npz")
    hd.write_npz(d, p)
    return p


def _config_swapped(w: World) -> Path:
    """A manifest of this run's config naming, with a matching digest, the weights of another config."""
    run = w.run_copy("cfgswap")
    other = w.other_config / json.loads((w.other_config / "last.json").read_text())["files"]["weights"]
    m = json.loads((run / "best.json").read_text())
    shutil.copy(other, run / other.name)
    m["files"]["weights"], m["sha256"]["weights"] = other.name, hashlib.sha256(other.read_bytes()).hexdigest()
    (run / "best.json").write_text(json.dumps(m))
    return run / "best.json"


def _with_env(w: World, name: str, value: str, argv: list) -> list:
    w.env = (name, value)
    return argv


def _snapshot(paths: list[Path]) -> dict[Path, Optional[str]]:
    def digest(p: Path) -> Optional[str]:
        if p.is_file():
            return hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_dir():
            return "dir:" + ",".join(sorted(str(f.relative_to(p)) for f in p.rglob("*")))
        return None

    return {p: digest(p) for p in paths}


def test_the_table_is_large_enough():
    assert len(ROWS) >= 80 and len({r.id for r in ROWS}) == len(ROWS)
    commands = {r.id.split("-")[0] for r in ROWS if r.cli}  # CLI rows are named after their command
    every = {"train", "evaluate", "sample", "convert", "profile", "demo", "bench", "compare", "export"}
    assert commands >= every, every - commands


# Outputs (relative to the world's root) that a row must leave as they were: a refused command writes nothing.
UNTOUCHED = {
    "train-batch-negative": ("t-out",),
    "compare-folds-out-of-range": ("cmp",),
    "compare-other-plan": ("cmp-plan/plan.json",),
    "evaluate-samples-negative": ("e-out",),
    "sample-batch-negative": ("s.npz",),
    "sample-missing-weights": ("s.npz",),
    "export-heads-never-trained": ("m.pt2", "m.pt2.json"),
    "export-size-too-small": ("m.pt2", "m.pt2.json"),
    "convert-src-missing": ("c.npz",),
    "sample-out-is-the-data": ("sd.npz",),
    "sample-out-is-a-hard-link-of-the-data": ("hd.npz",),
    "convert-onto-its-source": ("cs.npz",),
    "export-onto-the-checkpoint-manifest": ("xr/best.json", "xr/last.json"),
    "convert-src-crc-damaged": ("c.npz",),
    "stream-samples-batch-negative": ("st.npz",),
    "run-evaluation-samples-negative": ("re/metrics.json",),
}


def test_untouched_outputs_name_rows():
    assert set(UNTOUCHED) <= {r.id for r in ROWS}, set(UNTOUCHED) - {r.id for r in ROWS}


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_hostile_input(row: Row, world: World, capsys, monkeypatch):
    world.env = None
    targets = [world.path(name) for name in UNTOUCHED.get(row.id, ())]
    before = _snapshot(targets)
    if row.cli:
        argv = row.run(world)
        if world.env is not None:
            monkeypatch.setenv(*world.env)
            _backend._cpu_isa_error.cache_clear()
        try:
            capsys.readouterr()
            rc = cli(argv)
            out, err = capsys.readouterr()
        finally:
            monkeypatch.undo()
            _backend._cpu_isa_error.cache_clear()
        assert rc == 2, (rc, out[-500:], err)
        assert "Traceback" not in err and err.strip().count("\n") == 0, err
        assert row.fragment in err, err
    elif row.error is not None:
        with pytest.raises(row.error) as info:
            row.run(world)
        assert row.fragment in str(info.value), str(info.value)
    else:
        result = row.run(world)
        assert row.check(result, world) is not False
    assert _snapshot(targets) == before, "an output was written"
