"""Readers for the multi-rater formats users hold (docs/architecture.md, "Data"), auto-detected from the path.

``lidc-folder``  the public "LIDC-IDRI slices" export: ``<patient>/nodule-<k>/images/slice-<j>.png`` and
                 ``<patient>/nodule-<k>/mask-<r>/slice-<j>.png`` (8-bit; masks {0, 255}); patient = folder name.
                 Decoded PNGs are cached (see :func:`cache_dir`), so the second read is a single file load.
``lidc-pickle``  the pickled dict of earlier Probabilistic U-Net / D-Persona code,
                 ``{key: {"image", "masks", "series_uid"}}``, patient = ``series_uid.split("_")[0]``, read through
                 an unpickler that admits numpy arrays and nothing else.

Both LIDC readers order each slice's four masks by area, smallest first (``rater_order="area-asc"``, as
D-Persona does): the export's mask-0..3 are anonymous slots, not the same radiologist across nodules, so
"rater i" is a style (tightest to loosest outline) rather than a person. ``rater_order="stored"`` keeps
the slots. The other readers keep the stored order.
``npc-h5``       NPC-170 / MMIS-2024 style folders of HDF5 files with ``t1, t1c, t2`` (channels) and
                 ``label_a1..label_aN`` (raters), 2D slices or 3D volumes (``(D, H, W)``); patient = the file
                 name up to its first underscore. Needs h5py (``pip install harmonizer-fast[h5]``).
``npz``          ``images (N, H, W)`` or ``(N, C, H, W)`` uint8/float, ``masks (N, R, H, W)`` in {0, 1},
                 optional ``patient_id (N,)`` (absent: each item is its own patient).

Every reader returns a :class:`MultiRaterData` (normalization in :mod:`.dataset`) and raises
:class:`DataError` with the offending file for anything it cannot use.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .._alloc import check_fits
from .._extras import require
from .._io import write_atomic
from .dataset import DataError, MultiRaterData, check_not_all_empty, decode_masks, normalize_images

FORMATS = ("lidc-folder", "lidc-pickle", "npc-h5", "npz")
PathLike = Union[str, os.PathLike]
_SLICE = re.compile(r"slice-(\d+)\.png$")
# What a truncated, CRC-damaged or otherwise broken .npz raises, at np.load or when an array is read.
_NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def _check_declared_sizes(path: PathLike, z: Any, names: list[str]) -> None:
    """Before numpy allocates an array by its header: the size the header declares must fit in the zip member
    that holds it and in the memory available ([reliability] #36: an npz header declaring a 4 TiB array was
    allocated before anyone looked)."""
    total = 0
    for name in names:
        info = z.zip.getinfo(f"{name}.npy" if f"{name}.npy" in z.zip.namelist() else name)
        with z.zip.open(info) as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                raise DataError(f"{path}: array {name!r} has .npy format version {version}")
            shape, _, dtype = read_header[version](f)
        declared = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
        if declared > info.file_size:
            raise DataError(f"{path}: array {name!r} declares shape {shape} ({declared / 2**30:.3g} GiB) in a "
                            f"member of {info.file_size} bytes")  # fmt: skip
        total += declared
    try:
        check_fits(total, f"{path}: its arrays")
    except ValueError as exc:
        raise DataError(str(exc)) from None


def _load_npz_arrays(path: PathLike, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Read the named arrays of an .npz completely (so damage anywhere shows here); DataError otherwise."""
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: not a .npz archive of named arrays")
        with z:
            missing = [n for n in names if n not in z.files]
            if missing:
                raise DataError(f"{path}: needs arrays {list(names)}, found {sorted(z.files)}")
            wanted = [n for n in (*names, *optional) if n in z.files]
            _check_declared_sizes(path, z, wanted)
            return {n: z[n] for n in wanted}
    except DataError:
        raise
    except _NPZ_ERRORS as exc:
        raise DataError(f"{path}: not a readable .npz ({type(exc).__name__}: {exc})") from None


def cache_dir() -> Path:
    """``$HARMONIZER_FAST_CACHE``, else ``$XDG_CACHE_HOME/harmonizer_fast``, else ``~/.cache/harmonizer_fast``."""
    env = os.environ.get("HARMONIZER_FAST_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "harmonizer_fast"


def write_npz(data: MultiRaterData, path: PathLike) -> None:
    """Save in the ``npz`` format above (images as float32 in [0, 1]), atomically."""
    buf = io.BytesIO()
    np.savez(buf, images=data.images, masks=data.masks, patient_id=data.patient_id.astype(str))
    write_atomic(Path(path), buf.getvalue())


# ---------------------------------------------------------------------------------------------------------
# Detection.


def _lidc_root(path: Path) -> Optional[Path]:
    """The folder whose children are patient folders, if ``path`` is (or holds) an LIDC slices export."""
    for root in (path, path / "LIDC-IDRI-slices"):
        if root.is_dir():
            for patient in sorted(root.iterdir())[:3]:
                if patient.is_dir() and any(patient.glob("nodule-*/images")):
                    return root
    return None


def detect_format(path: PathLike) -> str:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".npz":
            return "npz"
        if suffix in (".pkl", ".pickle"):
            return "lidc-pickle"
        if suffix in (".h5", ".hdf5"):
            return "npc-h5"
        raise DataError(f"{p}: unknown data format (expected a folder, .npz, .pkl/.pickle or .h5)")
    if _lidc_root(p) is not None:
        return "lidc-folder"
    if any(p.glob("*.h5")) or any(p.glob("*.hdf5")):
        return "npc-h5"
    raise DataError(f"{p}: not a known dataset folder (LIDC slices export or a folder of .h5 files)")


def load_dataset(path: PathLike, format: Optional[str] = None, **kwargs: Any) -> MultiRaterData:
    """Read any supported dataset; ``format`` forces a reader (one of :data:`FORMATS`)."""
    fmt = format or detect_format(path)
    readers = {"lidc-folder": read_lidc_folder, "lidc-pickle": read_lidc_pickle, "npc-h5": read_npc_h5,
               "npz": read_npz}  # fmt: skip
    if fmt not in readers:
        raise DataError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    data = readers[fmt](path, **kwargs)
    for d in data if isinstance(data, list) else [data]:  # npc-h5 volumes: (name, data) pairs
        d = d[1] if isinstance(d, tuple) else d
        check_not_all_empty(d.masks, str(path))
    return data


# ---------------------------------------------------------------------------------------------------------
# LIDC slices folder.


def _rater_number(d: Path) -> int:
    tail = d.name.split("-", 1)[1]
    return int(tail) if tail.isdigit() else -1


def _scan_lidc(root: Path) -> list[tuple[str, Path, list[Path]]]:
    """(patient, image file, [mask files by rater]) for every slice, in a fixed order."""
    items = []
    for patient in sorted(d for d in root.iterdir() if d.is_dir()):
        for nodule in sorted(d for d in patient.iterdir() if d.is_dir() and d.name.startswith("nodule-")):
            img_dir = nodule / "images"
            raters = sorted(
                (d for d in nodule.iterdir() if d.is_dir() and d.name.startswith("mask-")), key=_rater_number
            )
            if not img_dir.is_dir() or not raters:
                raise DataError(f"{nodule}: expected images/ and mask-<r>/ folders")
            slices = sorted((f for f in img_dir.iterdir() if _SLICE.search(f.name)),
                            key=lambda f: int(_SLICE.search(f.name).group(1)))  # fmt: skip
            for f in slices:
                masks = [r / f.name for r in raters]
                missing = [m for m in masks if not m.is_file()]
                if missing:
                    raise DataError(f"{missing[0]}: missing rater mask for {f}")
                items.append((patient.name, f, masks))
    if not items:
        raise DataError(f"{root}: no slices found")
    return items


def _cache_key(root: Path, items: list[tuple[str, Path, list[Path]]]) -> str:
    # the decoder's version first: a cache written by an older decoding (masks thresholded, 16-bit saturated)
    # must not be read as this one's
    h = hashlib.sha256(f"decoder 2;{root.resolve()}".encode())
    for _, img, masks in items:
        for f in (img, *masks):
            st = f.stat()
            h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:24]


def _read_png(path: Path) -> np.ndarray:
    """One grey PNG at its own bit depth: 8-bit as uint8, 16-bit as uint16 (scaled by the preprocessing, where
    converting to 8-bit used to saturate it); colour is converted to grey."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im)
                if arr.dtype != np.uint16 and (arr.min() < 0 or arr.max() > 65535):
                    raise DataError(f"{path}: 32-bit PNG values outside [0, 65535]")
                arr = arr.astype(np.uint16)
            else:
                arr = np.asarray(im.convert("L"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode PNG ({exc})") from None
    return arr


def read_lidc_folder(path: PathLike, *, cache: bool = True, rater_order: str = "area-asc") -> MultiRaterData:
    root = _lidc_root(Path(path))
    if root is None:
        raise DataError(f"{path}: not an LIDC slices export (<patient>/nodule-<k>/images/slice-<j>.png)")
    items = _scan_lidc(root)
    n_raters = {len(m) for _, _, m in items}
    if len(n_raters) != 1:
        raise DataError(f"{root}: nodules have different rater counts {sorted(n_raters)}")
    cache_file = cache_dir() / f"lidc-{_cache_key(root, items)}.npz" if cache else None
    if cache_file is not None and cache_file.is_file():
        try:
            a = _load_npz_arrays(cache_file, ("images", "masks", "patient_id"))
            return MultiRaterData(a["images"], a["masks"], a["patient_id"], str(root)).with_rater_order(rater_order)
        except DataError:
            pass  # a damaged cache (a killed writer of an older version, a full disk) is rebuilt below
    files = [f for _, img, masks in items for f in (img, *masks)]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PNG decoding releases the GIL
        arrays = list(pool.map(_read_png, files))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        bad = next(f for f, a in zip(files, arrays) if a.shape != arrays[0].shape)
        raise DataError(f"{bad}: size {arrays[files.index(bad)].shape} differs from {arrays[0].shape}")
    r = n_raters.pop()
    per_item = [arrays[i * (1 + r) : (i + 1) * (1 + r)] for i in range(len(items))]
    depths = {a[0].dtype for a in per_item}
    if len(depths) != 1:  # one recipe for the dataset: 8- and 16-bit images must not be scaled differently
        raise DataError(f"{root}: images mix bit depths {sorted(str(d) for d in depths)}")
    images = normalize_images(np.stack([a[0] for a in per_item])[:, None])
    masks = np.stack([np.stack([decode_masks(m, str(f)) for m, f in zip(a[1:], item[2])])
                      for a, item in zip(per_item, items)])  # fmt: skip
    data = MultiRaterData(images, masks, np.array([p for p, _, _ in items]), str(root))
    if cache_file is not None:
        buf = io.BytesIO()
        np.savez(buf, images=data.images, masks=data.masks, patient_id=data.patient_id.astype(str))
        try:
            write_atomic(cache_file, buf.getvalue())
        except OSError:
            pass  # a read-only cache location only costs speed
    return data.with_rater_order(rater_order)


# ---------------------------------------------------------------------------------------------------------
# Pickled LIDC dict, through an unpickler that admits numpy arrays only.

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles carry the bytes of an array
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits plain containers, strings, numbers and numpy arrays; any other global (a function or class that
    could run code) is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: only numpy arrays are allowed")


def safe_load_pickle(path: PathLike) -> Any:
    try:
        with open(path, "rb") as f:
            return NumpyOnlyUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path}: {exc}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise DataError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None


def read_lidc_pickle(path: PathLike, *, rater_order: str = "area-asc") -> MultiRaterData:
    obj = safe_load_pickle(path)
    if not isinstance(obj, dict) or not obj:
        raise DataError(f"{path}: expected a non-empty dict {{key: {{'image', 'masks', 'series_uid'}}}}")
    images, masks, patients = [], [], []
    for key in sorted(obj, key=str):
        item = obj[key]
        if not isinstance(item, dict) or not {"image", "masks"} <= set(item):
            raise DataError(f"{path}: item {key!r} lacks 'image' or 'masks'")
        img = np.asarray(item["image"])
        m = np.stack([np.asarray(a) for a in item["masks"]]) if isinstance(item["masks"], (list, tuple)) else (
            np.asarray(item["masks"]))  # fmt: skip
        if img.ndim != 2 or m.ndim != 3 or m.shape[1:] != img.shape:
            raise DataError(f"{path}: item {key!r}: image {img.shape} and masks {m.shape} do not match")
        images.append(img)
        masks.append(m)
        uid = str(item.get("series_uid", key))
        patients.append(uid.split("_")[0])
    if len({m.shape for m in masks}) != 1:
        raise DataError(f"{path}: items differ in size or rater count")
    mask_arr = decode_masks(np.stack(masks), str(path))
    data = MultiRaterData(normalize_images(np.stack(images)[:, None]), mask_arr, np.array(patients),
                          str(path))  # fmt: skip
    return data.with_rater_order(rater_order)


# ---------------------------------------------------------------------------------------------------------
# NPC-170 / MMIS HDF5.

NPC_MODALITIES = ("t1", "t1c", "t2")


def _h5py():
    return require("h5py", "reading HDF5")


def _read_h5_file(f: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (C, [D,] H, W), masks (R, [D,] H, W)) of one file."""
    h5py = _h5py()
    try:
        with h5py.File(f, "r") as h:
            mods = [k for k in NPC_MODALITIES if k in h]
            labels = sorted((k for k in h if re.fullmatch(r"label_a\d+", k)), key=lambda k: int(k[7:]))
            if not mods or not labels:
                raise DataError(f"{f}: expected keys {NPC_MODALITIES} (any) and label_a1..label_aN")
            img = np.stack([np.asarray(h[k]) for k in mods])
            lab = np.stack([np.asarray(h[k]) for k in labels])
    except OSError as exc:
        raise DataError(f"{f}: cannot read HDF5 ({exc})") from None
    if img.shape[1:] != lab.shape[1:]:
        raise DataError(f"{f}: images {img.shape[1:]} and labels {lab.shape[1:]} differ in size")
    return img, lab


def read_npc_h5(path: PathLike, *, volumes: bool = False) -> Union[MultiRaterData, list[tuple[str, MultiRaterData]]]:
    """2D slices as one dataset (default), or with ``volumes=True`` one dataset per 3D case (its slices in
    order) for :func:`harmonizer_fast.metrics.evaluate_volume`."""
    p = Path(path)
    files = [p] if p.is_file() else sorted([*p.glob("*.h5"), *p.glob("*.hdf5")])
    if not files:
        raise DataError(f"{p}: no .h5 files")
    per_file = []
    for f in files:
        img, lab = _read_h5_file(f)
        if img.ndim == 3:  # a 2D slice: add the depth axis
            img, lab = img[:, None], lab[:, None]
        per_file.append((f.stem.split("_")[0], f, img, lab))
    if len({(i.shape[0], lab.shape[0], *i.shape[2:]) for _, _, i, lab in per_file}) != 1:
        raise DataError(f"{p}: files differ in modalities, rater count or slice size")

    def dataset(items: list) -> MultiRaterData:
        imgs = np.concatenate([i.transpose(1, 0, 2, 3) for _, _, i, _ in items])  # (slices, C, H, W)
        labs = np.concatenate([lab.transpose(1, 0, 2, 3) for _, _, _, lab in items])
        pids = np.concatenate([[pid] * i.shape[1] for pid, _, i, _ in items])
        return MultiRaterData(normalize_images(imgs), (labs > 0).astype(np.uint8), pids, str(p))

    if volumes:
        return [(f.stem, dataset([item])) for item in per_file for f in [item[1]]]
    return dataset(per_file)


# ---------------------------------------------------------------------------------------------------------
# npz.


def read_npz(path: PathLike) -> MultiRaterData:
    a = _load_npz_arrays(path, ("images", "masks"), optional=("patient_id",))
    images, masks, pid = a["images"], a["masks"], a.get("patient_id")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or masks.ndim != 4:
        raise DataError(f"{path}: images must be (N, H, W) or (N, C, H, W) and masks (N, R, H, W); got "
                        f"{images.shape} and {masks.shape}")  # fmt: skip
    masks = decode_masks(masks, str(path))
    if pid is None:
        pid = np.arange(len(images)).astype(str)
    if images.shape[0] != masks.shape[0] or images.shape[2:] != masks.shape[2:]:
        raise DataError(f"{path}: images {images.shape} and masks {masks.shape} must agree in N, H and W")
    if np.asarray(pid).shape != (images.shape[0],):
        raise DataError(f"{path}: patient_id must hold one entry per image ({images.shape[0]}), got shape "
                        f"{np.asarray(pid).shape}")  # fmt: skip
    return MultiRaterData(normalize_images(images), masks.astype(np.uint8), np.asarray(pid).astype(str), str(path))
