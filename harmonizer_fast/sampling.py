"""Batch sampling of a whole dataset, streamed to disk (``harmonizer-fast sample``).

The output is an ``.npz`` (a zip of ``.npy`` entries, stored uncompressed) written while sampling: the K
prior samples go straight into the zip entry ``samples`` ``(N, K, H, W)`` float16 batch by batch; the
personalized maps ``(N, R, H, W)`` float16 go to a temporary file and are appended as ``heads`` at the end;
``index`` holds the dataset indices. A model whose personalizer phase 2 never trained writes no ``heads``.
``numpy.load`` reads it like any npz. Written to a temporary name and renamed, so an interrupted run leaves
no half-written file.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ._deprecation import renamed_kwargs
from .data import MultiRaterData
from .model import HarmonizerNet
from .model.checks import check_counts


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_2_0(buf, {"descr": np.lib.format.dtype_to_descr(dtype),
                                               "fortran_order": False, "shape": shape})  # fmt: skip
    return buf.getvalue()


def _f16_bytes(t: torch.Tensor) -> memoryview:
    """The float16 bytes of ``t``, converted by torch (vectorized; numpy's ``astype`` plus ``tobytes`` took
    15 ms for one batch of 16 x 16 maps of 128 x 128, this 2 ms, on a 2-core Xeon)."""
    return memoryview(t.detach().to("cpu", torch.float16).contiguous().numpy()).cast("B")


def _check_request(data: MultiRaterData, indices, num_samples: int, batch: int) -> np.ndarray:
    check_counts("stream_samples", {"num_samples": num_samples, "batch": batch})
    idx = np.asarray(list(indices), dtype=np.int64)
    if idx.size == 0:
        raise ValueError("stream_samples: no images to sample (indices is empty)")
    if idx.min() < 0 or idx.max() >= len(data):
        raise ValueError(f"stream_samples: indices must lie in [0, {len(data)}), got {idx.min()}..{idx.max()}")
    return idx


def _copy_entry(zf: zipfile.ZipFile, name: str, header: bytes, src) -> None:
    """Append the zip entry ``name``: an npy header, then the bytes of the open file ``src``."""
    with zf.open(name, "w", force_zip64=True) as dst:
        dst.write(header)
        src.seek(0)
        while chunk := src.read(1 << 24):
            dst.write(chunk)


@torch.no_grad()
@renamed_kwargs(samples="num_samples")
def stream_samples(
    model: HarmonizerNet,
    data: MultiRaterData,
    indices,
    out: os.PathLike,
    *,
    num_samples: int = 16,
    seed: int = 0,
    batch: int = 16,
    progress: bool = True,
    device: Optional[torch.device] = None,
) -> int:
    """Sample every image of ``data[indices]`` to ``out`` (see the module docstring); returns the image count."""
    idx = _check_request(data, indices, num_samples, batch)
    device = device or next(model.parameters()).device
    model.eval()
    h, w = data.images.shape[2:]
    heads_on = model.personalizer_trained  # an untrained personalizer's heads are not personalized
    g = torch.Generator().manual_seed(seed)
    out = Path(out)
    tmp_zip = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    steps = range(0, len(idx), batch)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="sampling", unit="batch")
    f16 = np.dtype(np.float16)
    with tempfile.TemporaryFile() as heads_tmp:
        try:
            with zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                with zf.open("samples.npy", "w", force_zip64=True) as fs:
                    fs.write(_npy_header((len(idx), num_samples, h, w), f16))
                    written = 0
                    for s in steps:
                        x = torch.from_numpy(data.images[idx[s : s + batch]]).to(device)
                        probs, heads = model.predict(x, num_samples, heads=heads_on, generator=g)  # one backbone pass
                        written += fs.write(_f16_bytes(probs))
                        if heads_on:
                            heads_tmp.write(_f16_bytes(heads))
                    if written != len(idx) * num_samples * h * w * f16.itemsize:  # the header's promise, kept
                        raise RuntimeError(f"stream_samples: wrote {written} bytes of samples, the header promises "
                                           f"{len(idx) * num_samples * h * w * f16.itemsize}")  # fmt: skip
                if heads_on:
                    _copy_entry(zf, "heads.npy", _npy_header((len(idx), model.config.num_raters, h, w), f16), heads_tmp)
                with zf.open("index.npy", "w") as fi:
                    fi.write(_npy_header((len(idx),), np.dtype(np.int64)) + idx.tobytes())
            os.replace(tmp_zip, out)
        finally:
            if tmp_zip.exists():
                tmp_zip.unlink()
    return len(idx)
