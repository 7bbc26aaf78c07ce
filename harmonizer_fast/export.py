"""Export the inference model for deployment: ``torch.export`` (a ``.pt2`` archive) or ONNX, custom ops removed.

    harmonizer-fast export --checkpoint RUN --format onnx|pt2 --out FILE [--num-samples K] [--heads auto|...]

What is exported is :meth:`HarmonizerNet.decode_draws`, the computation of ``predict`` once its draws are made:

    images (B, C, H, W), sample_noise (B, K, latent) [, bank_noise (B, M_z, latent)]
        -> samples (B, K, H, W) [, heads (B, R, H, W)]      (probabilities, float32)

The standard-normal draws are inputs, so the program is deterministic and a deployment draws them with its
own generator (``sample_noise`` gives the K prior samples; ``bank_noise`` the personalizer's bank of M_z prior
samples, personalized heads only); with the draws ``predict`` makes from one generator (the samples' first,
then the bank's), the exported program returns ``predict``'s outputs. The batch B is dynamic; H and W are
dynamic multiples of the network's size multiple (32), at least twice it (64: at 32 the deepest stage is one
pixel and is traced as a special case). K is fixed at export.

The package's custom ops (Haar, FiLM, attention pooling, the fused head) are replaced by their pure-torch
references (:func:`harmonizer_fast.ops.decompositions`) with ``ExportedProgram.run_decompositions``, so the
``.pt2`` runs on stock PyTorch (``torch.export.load(path).module()``) and the ONNX file on onnxruntime, neither
needing this package. The file carries its metadata inside it (inputs, outputs, K, the heads, the model config,
the preprocessing and the checkpoint: :func:`read_metadata`; a pt2 extra file or an ONNX ``metadata_props``
entry named ``harmonizer_fast.json``), so a kill can never leave a model beside another model's description;
``FILE.json`` beside it is a readable copy with the file's size and SHA-256. Each file is written atomically.
ONNX needs the optional extra ``harmonizer-fast[export]`` (onnx, onnxscript; onnxruntime to run the file).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ._deprecation import renamed_kwargs
from ._extras import MissingExtraError, check_available
from ._io import PathLike, remove, write_atomic
from .model import HarmonizerNet
from .model.net import HEADS
from .model.net import resolve_heads as resolve_model_heads
from .preprocessing import Preprocessing

FORMATS = ("onnx", "pt2")
MIN_SIZE_MULTIPLES = 2  # H and W of at least 2 x config.size_multiple (see the module docstring)


class ExportError(ValueError):
    """An export the model or this installation cannot make (reported as a usage error by the CLI)."""


class InferenceModel(nn.Module):
    """``HarmonizerNet.decode_draws`` as a module whose inputs are all tensors (what ``torch.export`` captures)."""

    def __init__(self, model: HarmonizerNet, heads: str) -> None:
        super().__init__()
        self.model = model.eval()
        self.heads = heads

    def forward(self, images: Tensor, sample_noise: Tensor, bank_noise: Optional[Tensor] = None):
        samples, heads = self.model.decode_draws(images, sample_noise, bank_noise, heads=self.heads)
        return samples if heads is None else (samples, heads)


@dataclass(frozen=True)
class ExportSpec:
    """What one export holds: K samples, the heads' kind, the example input size (H, W) it was traced at."""

    samples: int
    heads: str
    size: tuple[int, int]

    def input_names(self) -> list[str]:
        return ["images", "sample_noise"] + (["bank_noise"] if self.heads == "personalized" else [])

    def output_names(self) -> list[str]:
        return ["samples"] + ([] if self.heads == "none" else ["heads"])


def resolve_heads(model: HarmonizerNet, heads: str) -> str:
    """``auto``: the personalized heads when phase 2 trained them, else no heads (the rule of
    :func:`harmonizer_fast.model.net.resolve_heads`). An explicit request the model cannot serve raises
    :class:`ExportError`."""
    try:
        return resolve_model_heads(model, heads, "export")
    except ValueError as exc:
        raise ExportError(str(exc)) from None


def example_inputs(model: HarmonizerNet, spec: ExportSpec, batch: int = 2) -> tuple[Tensor, ...]:
    """Seeded inputs of the exported program's shapes (batch 2: a batch of 1 would be traced as a constant)."""
    g = torch.Generator().manual_seed(0)
    c = model.config
    out = [torch.randn((batch, c.in_channels, *spec.size), generator=g),
           torch.randn((batch, spec.samples, c.latent_dim), generator=g)]  # fmt: skip
    if spec.heads == "personalized":
        out.append(torch.randn((batch, c.prior_bank, c.latent_dim), generator=g))
    return tuple(out)


def _dynamic_shapes(model: HarmonizerNet, spec: ExportSpec) -> dict[str, Any]:
    from torch.export import Dim

    m = model.config.size_multiple
    batch = Dim("batch", min=1, max=2**20)
    h, w = Dim("h", min=MIN_SIZE_MULTIPLES, max=2**16 // m), Dim("w", min=MIN_SIZE_MULTIPLES, max=2**16 // m)
    shapes: dict[str, Any] = {"images": {0: batch, 2: m * h, 3: m * w}, "sample_noise": {0: batch}}
    if spec.heads == "personalized":
        shapes["bank_noise"] = {0: batch}
    return shapes


def check_spec(model: HarmonizerNet, spec: ExportSpec) -> None:
    m = model.config.size_multiple
    if spec.samples < 1:
        raise ExportError(f"samples must be at least 1, got {spec.samples}")
    if any(s % m or s < MIN_SIZE_MULTIPLES * m for s in spec.size):
        raise ExportError(f"size must be multiples of {m} of at least {MIN_SIZE_MULTIPLES * m}, got {spec.size}")


@contextlib.contextmanager
def _quiet() -> Any:
    """Torch's own noise during an export, which says nothing about the user's model: its pytree deprecation
    warning (torch 2.13) and the ONNX registry's notes on torchvision ops this model does not use."""
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            yield
    finally:
        registry.setLevel(level)


def export_program(model: HarmonizerNet, spec: ExportSpec) -> torch.export.ExportedProgram:
    """The inference program of ``model`` with the custom ops decomposed to standard ATen ops."""
    from .ops import decompositions

    check_spec(model, spec)
    # A CPU copy: the caller's model keeps its device and mode, and the program holds no device constants.
    module = InferenceModel(copy.deepcopy(model).cpu().eval(), spec.heads)
    with torch.no_grad(), _quiet():  # inference: no grad-mode regions traced as higher-order ops
        program = torch.export.export(module, example_inputs(model, spec), dynamic_shapes=_dynamic_shapes(model, spec))
        return program.run_decompositions(decompositions())


def onnx_unavailable() -> str:
    """Why ONNX export cannot run here ("" when it can)."""
    try:
        check_available("ONNX export", "onnx", "onnxscript")
    except MissingExtraError as exc:
        return str(exc)
    return ""


# the metadata's name inside the file: a pt2 extra file, an ONNX metadata_props key
METADATA_KEY = "harmonizer_fast.json"


def serialize(program: torch.export.ExportedProgram, spec: ExportSpec, fmt: str, meta: dict[str, Any]) -> bytes:
    """``program`` as the bytes of a ``fmt`` file (``onnx`` or ``pt2``) with ``meta`` inside it, so the model and
    its description can never disagree ([reliability] #36: a kill between two files left a K = 5 model beside
    metadata saying K = 2). Serialized in memory, then written by one atomic write: a full disk is an OSError
    naming the path, never a C++ abort mid-file."""
    text = json.dumps(meta, sort_keys=True)
    if fmt == "pt2":
        buf = io.BytesIO()
        torch.export.save(program, buf, extra_files={METADATA_KEY: text})
        return buf.getvalue()
    if fmt == "onnx":
        why = onnx_unavailable()
        if why:
            raise ExportError(why)
        import onnx

        args, _ = program.example_inputs  # the dynamic shapes come with the program
        names = dict(input_names=spec.input_names(), output_names=spec.output_names())
        with _quiet():
            proto = torch.onnx.export(program, args, dynamo=True, verbose=False, **names).model_proto
        proto.metadata_props.append(onnx.StringStringEntryProto(key=METADATA_KEY, value=text))
        return proto.SerializeToString()
    raise ExportError(f"format must be one of {FORMATS}, got {fmt!r}")


def read_metadata(path: PathLike) -> dict[str, Any]:
    """The metadata an exported file carries inside it (:func:`serialize`)."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(props[METADATA_KEY])
    extra = {METADATA_KEY: ""}
    torch.export.load(path, extra_files=extra)
    return json.loads(extra[METADATA_KEY])


def metadata(model: HarmonizerNet, spec: ExportSpec, fmt: str, source: str,
             preprocessing: Optional[Preprocessing] = None) -> dict[str, Any]:
    """The sidecar JSON: inputs, outputs, noise, sizes, config, and the preprocessing ``images`` must have had
    (the checkpoint's recipe, :mod:`harmonizer_fast.preprocessing`)."""
    c = model.config
    pre = preprocessing or Preprocessing()
    return {
        "format": fmt,
        "source": source,
        "torch": torch.__version__,
        "samples": spec.samples,
        "heads": spec.heads,
        "raters": list(range(c.num_raters)) if spec.heads != "none" else [],
        "inputs": {
            "images": ["B", c.in_channels, "H", "W"],
            "sample_noise": ["B", spec.samples, c.latent_dim],
            **({"bank_noise": ["B", c.prior_bank, c.latent_dim]} if spec.heads == "personalized" else {}),
        },
        "outputs": {"samples": ["B", spec.samples, "H", "W"],
                    **({"heads": ["B", c.num_raters, "H", "W"]} if spec.heads != "none" else {})},  # fmt: skip
        "noise": "standard normal draws; predict() draws sample_noise first, then bank_noise, from one generator",
        "size": {"traced_at": list(spec.size), "multiple_of": c.size_multiple,
                 "at_least": MIN_SIZE_MULTIPLES * c.size_multiple},  # fmt: skip
        "preprocessing": {**pre.to_dict(), "description": pre.describe()},
        "config": c.to_dict(),
    }


@renamed_kwargs(samples="num_samples")
def export_model(
    model: HarmonizerNet,
    path: PathLike,
    fmt: str,
    *,
    num_samples: int = 16,
    heads: str = "auto",
    size: tuple[int, int] = (128, 128),
    source: str = "",
    preprocessing: Optional[Preprocessing] = None,
) -> dict[str, Any]:
    """Export ``model``'s inference (K = ``num_samples``, ``heads`` as in :func:`resolve_heads`) to ``path`` in
    ``fmt``, and its metadata to ``path`` + ``.json``; returns the metadata."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "onnx" and onnx_unavailable():
        raise ExportError(onnx_unavailable())  # before the minutes of tracing
    spec = ExportSpec(int(num_samples), resolve_heads(model, heads), (int(size[0]), int(size[1])))
    program = export_program(model, spec)
    meta = metadata(model, spec, fmt, source, preprocessing)
    blob = serialize(program, spec, fmt, meta)
    existed = Path(path).exists()
    write_atomic(path, blob)
    # the sidecar is a readable copy; the file's own metadata is authoritative, and the hash ties the two
    meta = {**meta, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    try:
        write_atomic(Path(f"{path}.json"), json.dumps(meta, indent=2) + "\n")
    except OSError:
        if not existed:  # no half of a new export is left behind
            remove(path)
        raise
    return meta


@renamed_kwargs(samples="num_samples")
def export_checkpoint(checkpoint: PathLike, path: PathLike, fmt: str, **kwargs: Any) -> dict[str, Any]:
    """:func:`export_model` of a checkpoint (a run directory's best, or a manifest)."""
    from .checkpoint import load_model, preprocessing_of

    model, manifest = load_model(checkpoint)
    return export_model(model, path, fmt, source=str(checkpoint), preprocessing=preprocessing_of(manifest), **kwargs)


__all__ = ["FORMATS", "HEADS", "ExportError", "ExportSpec", "InferenceModel", "export_checkpoint", "export_model",
           "export_program", "read_metadata", "resolve_heads", "serialize"]  # fmt: skip
