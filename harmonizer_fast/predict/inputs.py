"""The images users have, as cases for ``predict``: discovery, reading, and writing results in the same geometry.

A *case* is what one row of ``summary.csv`` describes: a 2-D image, one item of a NumPy array, a NIfTI file
(2-D or a volume run slice by slice) or a DICOM series. Its pixels are read as ``(S, C, H, W)`` raw values
(S slices, C channels), untouched, so that the model's recorded :class:`~harmonizer_fast.preprocessing.
Preprocessing` decides the intensities, and written back as ``(S, H, W)`` maps in the input's geometry.

Readers are the field's libraries, never hand-written parsers: Pillow for PNG/TIFF/JPEG, numpy for .npy/.npz
(``allow_pickle=False``), nibabel for NIfTI (pure Python, a required dependency: NIfTI is how volumes travel
between tools), pydicom for DICOM (the ``dicom`` extra: only some users have DICOM folders, and pydicom's
series handling needs no compiled code). A channel that nnU-Net names ``case_0000.nii.gz``,
``case_0001.nii.gz``, ... (any of the formats above) joins its case as channel 0, 1, ...
"""

from __future__ import annotations

import copy
import gzip
import io
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .._extras import require

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
NUMPY_SUFFIXES = (".npy", ".npz")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
MAX_PIXELS = 2**31  # per case and per array file: a header declaring more is refused before any allocation
MAX_ITEMS = 1_000_000  # images stacked in one .npy/.npz
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class CaseError(ValueError):
    """A case that cannot be read or written (the message names the file); the other cases go on."""


@dataclass(frozen=True)
class Case:
    """One unit of work. ``sources``: one file per channel, the .npy/.npz file, or the DICOM series folder."""

    name: str
    kind: str  # "image", "numpy", "nifti", "dicom"
    sources: tuple[Path, ...]
    item: Optional[int] = None  # the item of a stacked .npy/.npz


VOLUME_KINDS = ("nifti", "dicom")  # inputs that may hold many slices of one case (split over torchrun's ranks)


@dataclass
class Geometry:
    """What the writer needs to put maps back where the input was, and the pixel size for areas."""

    kind: str
    shape: tuple[int, ...]  # the input's spatial shape, as the outputs will have it
    slice_axis: Optional[int] = None  # NIfTI: the axis the volume was cut along
    spacing: Optional[tuple[float, float, float]] = None  # mm: (slice, row, column); None where unknown
    volume: bool = False  # areas in mm^3 (or voxels) rather than mm^2 (or pixels)
    affine: Optional[np.ndarray] = None
    header: Any = None
    extra: dict = field(default_factory=dict)


@dataclass
class LoadedCase:
    case: Case
    images: np.ndarray  # (S, C, H, W), raw values
    geometry: Geometry


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (*NIFTI_SUFFIXES, *IMAGE_SUFFIXES, *NUMPY_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _kind(path: Path) -> Optional[str]:
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(IMAGE_SUFFIXES):
        return "image"
    if name.endswith(NUMPY_SUFFIXES):
        return "numpy"
    return None


def _is_dicom(path: Path) -> bool:
    """A DICOM Part 10 file (the 'DICM' preamble) or a file named .dcm."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _npy_shape(f) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    return shape, dtype


def array_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """The declared shape and dtype of a .npy, or of the ``images`` array of a .npz, read without the data."""
    try:
        if path.name.lower().endswith(".npy"):
            with open(path, "rb") as f:
                return _npy_shape(f)
        with zipfile.ZipFile(path) as z:
            if "images.npy" not in z.namelist():
                raise CaseError(f"{path}: a .npz for predict needs an 'images' array, found "
                                f"{sorted(n[:-4] for n in z.namelist())}")  # fmt: skip
            with z.open("images.npy") as f:
                return _npy_shape(f)
    except CaseError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise CaseError(f"{path}: not a readable NumPy file ({type(exc).__name__}: {exc})") from None


def _numpy_items(path: Path) -> list[Case]:
    """The cases of a .npy/.npz, from its header alone: refused before anything is listed or allocated when the
    declared array is larger than a case may be, holds objects (a pickle), or stacks more than MAX_ITEMS."""
    shape, dtype = array_header(path)
    if dtype.hasobject:
        raise CaseError(f"{path}: an object array (pickled Python objects) is not an image; expected numbers")
    if int(np.prod(shape, dtype=np.float64)) > MAX_PIXELS:
        raise CaseError(f"{path}: declares {shape}, {np.prod(shape, dtype=np.float64):.3g} values; at most "
                        f"{MAX_PIXELS} per file")  # fmt: skip
    if len(shape) in (3, 4) and shape[0] > MAX_ITEMS:
        raise CaseError(f"{path}: declares {shape[0]} images; at most {MAX_ITEMS} per file (split it)")
    if len(shape) == 2:
        return [Case(_stem(path), "numpy", (path,))]
    if len(shape) not in (3, 4):
        raise CaseError(f"{path}: images must be (H, W), (N, H, W) or (N, C, H, W), got shape {shape}")
    return [Case(f"{_stem(path)}-{i:05d}", "numpy", (path,), i) for i in range(shape[0])]


def find_cases(path: Path) -> tuple[list[Case], list[tuple[str, str]]]:
    """The cases under ``path`` (a file or a folder), sorted by name, and ``(name, error)`` for inputs that could
    not even be listed (an unreadable array header, channels with a gap). Files of other types are ignored."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        files, dicom_dirs = [path], []
    else:
        entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        files = [p for p in entries if p.is_file() and _kind(p)]
        dicom_dirs = [d for d in entries if d.is_dir() and any(_is_dicom(f) for f in d.iterdir() if f.is_file())]
        if not files and not dicom_dirs and any(_is_dicom(f) for f in entries if f.is_file()):
            dicom_dirs = [path]  # the folder is itself one series
    cases: list[Case] = []
    failed: list[tuple[str, str]] = []
    groups: dict[tuple[str, str], dict[int, Path]] = {}
    for f in files:
        kind = _kind(f)
        if kind is None:
            raise CaseError(f"{f}: unknown input type (expected {', '.join(IMAGE_SUFFIXES + NUMPY_SUFFIXES)}, "
                            f"{', '.join(NIFTI_SUFFIXES)} or a DICOM series folder)")  # fmt: skip
        if kind == "numpy":
            try:
                cases += _numpy_items(f)
            except CaseError as exc:
                failed.append((_stem(f), str(exc)))
            continue
        m = _CHANNEL.match(_stem(f))
        name, channel = (m["case"], int(m["channel"])) if m else (_stem(f), 0)
        group = groups.setdefault((name, kind), {})
        if channel in group:
            failed.append((name, f"{f}: channel {channel} of case {name!r} given twice ({group[channel].name})"))
        group[channel] = f
    for (name, kind), channels in groups.items():
        if sorted(channels) != list(range(len(channels))):
            failed.append((name, f"case {name!r}: channels {sorted(channels)} are not 0..{len(channels) - 1} "
                                 "(nnU-Net naming: NAME_0000, NAME_0001, ...)"))  # fmt: skip
            continue
        cases.append(Case(name, kind, tuple(channels[c] for c in sorted(channels))))
    cases += [Case(d.name, "dicom", (d,)) for d in dicom_dirs]
    names = [c.name for c in cases]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise CaseError(f"{path}: several inputs map to the case name(s) {dupes[:5]} (e.g. a.png and a.nii.gz); "
                        "rename them")  # fmt: skip
    return sorted(cases, key=lambda c: c.name), failed


# ---------------------------------------------------------------------------------------------------------
# Reading: (S, C, H, W) raw values and the geometry.


def _check_size(case: Case, shape: tuple[int, ...]) -> None:
    if int(np.prod(shape, dtype=np.float64)) > MAX_PIXELS:
        raise CaseError(f"{case.sources[0]}: {shape} is {np.prod(shape, dtype=np.float64):.3g} values; at most "
                        f"{MAX_PIXELS} per case")  # fmt: skip


def _read_image(path: Path, channels: int) -> np.ndarray:
    """(C, H, W) of a 2-D image: grey, or RGB(A) when the model takes 3 channels (grey RGB reads as grey)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) > 1:
                raise CaseError(f"{path}: a multi-page image ({im.n_frames} pages); write a volume as NIfTI")
            im.load()
            arr = np.asarray(im)
    except CaseError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise CaseError(f"{path}: cannot decode the image ({exc})") from None
    if arr.ndim == 2:
        return arr[None]
    rgb = arr[..., :3]  # alpha is not an image channel
    if channels == 3:
        return np.moveaxis(rgb, -1, 0)
    if (rgb == rgb[..., :1]).all():
        return rgb[None, ..., 0]
    raise CaseError(f"{path}: a colour image; the model takes {channels} channel(s) (save it as greyscale)")


def _read_numpy(case: Case) -> np.ndarray:
    path = case.sources[0]
    shape, dtype = array_header(path)
    _check_size(case, shape)
    try:
        if path.name.lower().endswith(".npy"):
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as z:
                arr = z["images"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise CaseError(f"{path}: not a readable NumPy file ({type(exc).__name__}: {exc})") from None
    if arr.dtype.hasobject:
        raise CaseError(f"{path}: object arrays are not images")
    item = np.asarray(arr if case.item is None else arr[case.item])
    return item[None] if item.ndim == 2 else item  # (C, H, W)


def _axis_of_slices(affine: np.ndarray) -> int:
    """The voxel axis that points most nearly head-foot: the slice axis of an axial acquisition."""
    import nibabel as nib

    codes = nib.orientations.aff2axcodes(affine)
    return next((i for i, c in enumerate(codes) if c in ("S", "I")), 2)


def _read_nifti(case: Case, slice_axis: Optional[int]) -> tuple[np.ndarray, Geometry]:
    import nibabel as nib

    volumes, first = [], None
    for path in case.sources:
        try:
            img = nib.load(str(path))
            _check_size(case, img.shape)
            data = np.asanyarray(img.dataobj)
        except CaseError:
            raise
        except Exception as exc:  # nibabel raises many types for damaged files (ImageFileError, EOFError, ...)
            raise CaseError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim not in (2, 3):
            raise CaseError(f"{path}: expected a 2-D image or a 3-D volume, got shape {data.shape} (one file per "
                            "channel, nnU-Net naming)")  # fmt: skip
        if first is not None and (data.shape != volumes[0].shape or not np.allclose(img.affine, first.affine)):
            raise CaseError(f"{path}: its shape or affine differs from channel 0 ({case.sources[0].name})")
        first = first or img
        volumes.append(data)
    extra = {"image_class": type(first)}
    zooms = tuple(float(z) for z in first.header.get_zooms()[: volumes[0].ndim])
    shape = volumes[0].shape
    if len(shape) == 2:
        images = np.stack(volumes)[None]  # (1, C, X, Y)
        return images, Geometry("nifti", shape, None, (1.0, *zooms), False, first.affine, first.header, extra)
    axis = _axis_of_slices(first.affine) if slice_axis is None else slice_axis
    if not 0 <= axis < 3:
        raise CaseError(f"--slice-axis must be 0, 1 or 2 for a 3-D volume, got {axis}")
    images = np.stack([np.moveaxis(v, axis, 0) for v in volumes], axis=1)  # (S, C, H, W)
    in_plane = tuple(z for i, z in enumerate(zooms) if i != axis)
    return images, Geometry("nifti", shape, axis, (zooms[axis], *in_plane), True, first.affine, first.header, extra)


def _read_dicom(case: Case) -> tuple[np.ndarray, Geometry]:
    """A DICOM series folder: slices ordered along the slice normal, values in modality units (e.g. HU)."""
    pydicom = require("pydicom", "reading DICOM")
    folder = case.sources[0]
    slices = []
    for f in sorted(p for p in folder.iterdir() if p.is_file() and _is_dicom(p)):
        try:
            ds = pydicom.dcmread(f)
            pixels = ds.pixel_array.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1) or 1)
            pixels += float(getattr(ds, "RescaleIntercept", 0) or 0)
        except Exception as exc:  # pydicom raises InvalidDicomError, AttributeError, ValueError, ...
            raise CaseError(f"{f}: not a readable DICOM image ({type(exc).__name__}: {exc})") from None
        slices.append((ds, pixels))
    if not slices:
        raise CaseError(f"{folder}: no DICOM images")
    uids = {str(getattr(ds, "SeriesInstanceUID", "")) for ds, _ in slices}
    if len(uids) > 1:
        raise CaseError(f"{folder}: holds {len(uids)} series; put each series in its own folder")
    shapes = {p.shape for _, p in slices}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise CaseError(f"{folder}: slices of different sizes or not 2-D ({sorted(shapes)})")
    ds0 = slices[0][0]
    iop = np.array(getattr(ds0, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    pos = [np.array(getattr(ds, "ImagePositionPatient", [0, 0, i]), dtype=np.float64) for i, (ds, _) in
           enumerate(slices)]  # fmt: skip
    order = np.argsort([float(p @ normal) for p in pos], kind="stable")
    slices, pos = [slices[i] for i in order], [pos[i] for i in order]
    rows, cols = (float(v) for v in getattr(ds0, "PixelSpacing", [1.0, 1.0]))
    step = float(np.linalg.norm(pos[-1] - pos[0])) / (len(pos) - 1) if len(pos) > 1 else float(
        getattr(ds0, "SliceThickness", 1.0) or 1.0)  # fmt: skip
    images = np.stack([p for _, p in slices])[:, None]  # (S, 1, H, W)
    headers = []
    for ds, _ in slices:  # each slice's header without its pixels: the template of the derived series
        del ds.PixelData
        headers.append(ds)
    return images, Geometry("dicom", images.shape[:1] + images.shape[2:], None, (step, rows, cols), True,
                            extra={"series": sorted(uids)[0], "headers": headers})  # fmt: skip


def load_case(case: Case, channels: int, slice_axis: Optional[int] = None) -> LoadedCase:
    """Read a case as ``(S, C, H, W)`` raw values; :class:`CaseError` for anything unreadable or a channel count
    other than the model's ``channels``."""
    if case.kind == "image":
        parts = [_read_image(p, channels) for p in case.sources]
        shapes = {p.shape[1:] for p in parts}
        if len(shapes) != 1:
            raise CaseError(f"case {case.name!r}: its channel images differ in size {sorted(shapes)}")
        images = np.concatenate(parts)[None]
        geometry = Geometry("image", images.shape[2:], extra={"suffix": case.sources[0].suffix.lower()})
    elif case.kind == "numpy":
        images = _read_numpy(case)[None]
        geometry = Geometry("numpy", images.shape[2:])
    elif case.kind == "nifti":
        images, geometry = _read_nifti(case, slice_axis)
    elif case.kind == "dicom":
        images, geometry = _read_dicom(case)
    else:
        raise CaseError(f"case {case.name!r}: unknown kind {case.kind!r}")
    if images.shape[1] != channels:
        raise CaseError(f"case {case.name!r}: {images.shape[1]} channel(s), the model takes {channels}")
    if min(images.shape[2:]) < 1:
        raise CaseError(f"case {case.name!r}: empty image {images.shape[2:]}")
    return LoadedCase(case, images, geometry)


# ---------------------------------------------------------------------------------------------------------
# Writing: (S, H, W) maps in the input's format and geometry.

OUTPUT_SUFFIX = {"image": ".png", "numpy": ".npy", "nifti": ".nii.gz", "dicom": ""}
# A derived DICOM series stores probabilities as integers: value / DICOM_SCALE (RescaleSlope) in [0, 1].
DICOM_SCALE = 10000
# A NIfTI map in [0, 1] (probability, uncertainty in bits) is stored as uint16 with scl_slope 1 / NIFTI_SCALE
# (nibabel's get_fdata() returns the scaled values, within 0.5 / NIFTI_SCALE = 7.6e-6 of the float): float32
# maps of a 256 x 256 x 64 volume gzip to 15 MB each in 0.65 s, these to 0.5-1.7 MB in 0.05 s
NIFTI_SCALE = 65535


def _to_input_layout(arr: np.ndarray, g: Geometry) -> np.ndarray:
    """(S, H, W) -> the input's spatial shape."""
    if g.kind == "nifti":
        out = arr[0] if g.slice_axis is None else np.moveaxis(arr, 0, g.slice_axis)
    elif g.kind == "dicom":
        return arr  # (slice, row, column): one derived image per source slice
    else:
        out = arr[0]
    if out.shape != tuple(g.shape):
        raise AssertionError(f"output {out.shape} does not match the input's {g.shape}")  # a bug, not a user error
    return out


def _dicom_series(name: str, arr: np.ndarray, g: Geometry, kind: str) -> list[tuple[str, bytes]]:
    """A derived DICOM series (one file per slice, ``name/0000.dcm`` ...): each source slice's header with new
    instance and series UIDs, the study kept, so that a viewer overlays it on the scan it came from. Masks
    are 0/1; probabilities integers in [0, DICOM_SCALE] with RescaleSlope 1/DICOM_SCALE."""
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    series_uid = generate_uid()
    values = arr.astype(np.uint16) if kind == "mask" else np.rint(np.clip(arr, 0, 1) * DICOM_SCALE).astype(np.uint16)
    files = []
    for j, (header, plane) in enumerate(zip(g.extra["headers"], values)):
        ds = copy.deepcopy(header)  # the volume's maps are encoded in parallel: nothing shared is changed
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = f"harmonizer-fast {name}"
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = (1, 0) if kind == "mask" else (1 / DICOM_SCALE, 0)
        ds.WindowCenter, ds.WindowWidth = (0.5, 1) if kind == "mask" else (0.5, 1.0)
        ds.add_new(0x7FE00010, "OW", np.ascontiguousarray(plane, dtype="<u2").tobytes())  # PixelData, 16 bit
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        files.append((f"{name}/{j:04d}.dcm", buf.getvalue()))
    return files


def encode_map(name: str, arr: np.ndarray, g: Geometry, kind: str) -> list[tuple[str, bytes]]:
    """One map ``(S, H, W)`` as ``[(relative file name, bytes)]`` in the input's format (one file; a folder of
    slices for DICOM). ``kind``: ``"mask"`` (0/1; PNG 0/255) or ``"probability"`` (float in [0, 1]; PNG 0-255,
    NIfTI uint16 with scl_slope 1 / NIFTI_SCALE, DICOM integers with RescaleSlope 1 / DICOM_SCALE, NumPy float32).
    Encoded in memory, so that the caller writes and syncs each file with one open."""
    if g.kind == "dicom":
        return _dicom_series(name, arr, g, kind)
    return [_encode_file(name, arr, g, kind)]


def _encode_file(name: str, arr: np.ndarray, g: Geometry, kind: str) -> tuple[str, bytes]:
    out = _to_input_layout(arr, g)
    filename = f"{name}{OUTPUT_SUFFIX[g.kind]}"
    buf = io.BytesIO()
    if g.kind == "image":
        from PIL import Image

        scaled = out.astype(np.uint8) * 255 if kind == "mask" else np.rint(np.clip(out, 0, 1) * 255).astype(np.uint8)
        Image.fromarray(scaled, mode="L").save(buf, format="PNG", compress_level=1)  # level 6: 3x the time
        return filename, buf.getvalue()
    if g.kind == "numpy":
        np.save(buf, out.astype(np.uint8) if kind == "mask" else out.astype(np.float32))
        return filename, buf.getvalue()
    import nibabel as nib

    if kind == "mask":
        data, slope = out.astype(np.uint8), 1.0
    else:
        data, slope = np.rint(np.clip(out, 0, 1) * NIFTI_SCALE).astype(np.uint16), 1.0 / NIFTI_SCALE
    header = g.header.copy() if g.header is not None else None
    img = g.extra.get("image_class", nib.Nifti1Image)(data, g.affine, header=header)
    img.set_data_dtype(data.dtype)
    img.header.set_slope_inter(slope, 0.0)
    # mtime 0: the same map gives the same bytes (nibabel would stamp the time); level 1 as nibabel's default
    return filename, gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)
