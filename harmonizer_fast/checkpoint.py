"""Checkpoints: weights in safetensors, everything else in JSON, never a pickle. A checkpoint named
``<stem>`` (``last``, ``best``, ``best_phase1``) in a run directory is

- ``<stem>.json``                  the manifest: format tag and version, model config, training state (epoch,
                                   step, phase, scheduler, RNG keys), metrics, and the name and SHA-256 of
                                   each tensor file below;
- ``weights-<sha>.safetensors``    the model's state dict (weights and buffers);
- ``optim-<sha>.safetensors``      optimizer tensors (Adam moments, step counts), when kept.

``<sha>`` is the first 16 hex digits of the file's SHA-256: tensor files are named by their content, so a
file is never overwritten by different bytes, and two checkpoints of the same weights (``best`` and
``best_phase1`` during phase 1) share one file. Saving has **one commit point**: the tensor files are
written under their names (temporary name, fsync, rename, fsync of the folder), then the manifest the same
way, and the manifest's rename is what makes the new checkpoint current. Only after it are the tensor files
that no manifest of the folder names any more deleted (and temporaries left by a killed writer). So a
process killed at any instant leaves either the previous checkpoint or the new one, each complete; every
load checks each file against the manifest's SHA-256 (a truncated, swapped or foreign file is refused with
a clear error).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ._alloc import check_fits
from ._io import remove, write_atomic
from .model import HarmonizerConfig, HarmonizerNet
from .model.budget import WeightsBound, culprits, plan_network
from .model.config import PERSONALIZER_FIELDS
from .preprocessing import Preprocessing

FORMAT = "harmonizer-fast-checkpoint"
VERSION = 1
PathLike = Union[str, os.PathLike]
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, foreign or inconsistent (the message says which file)."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and the JSON-able rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in [*tensors.items(), *meta["scalars"].items()]:
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _write_tensor_file(run: Path, kind: str, blob: bytes) -> tuple[str, str]:
    """Write ``blob`` under its content name ``<kind>-<sha>.safetensors``; returns (name, full SHA-256)."""
    sha = _sha256(blob)
    name = f"{kind}-{sha[:16]}.safetensors"
    target = run / name
    # Same name, same bytes: a file already there (an unchanged optimizer, a repeated save) is kept as it is,
    # unless it was damaged, in which case it is replaced (it cannot be referenced validly by anything).
    if not (target.is_file() and _sha256(target.read_bytes()) == sha):
        write_atomic(target, blob)
    return name, sha


_TENSOR_FILE = re.compile(r"(weights|optim)-[0-9a-f]{16}\.safetensors")


def _referenced(manifest_path: Path) -> set[str]:
    try:
        files = json.loads(manifest_path.read_text()).get("files", {})
        return {v for v in files.values() if isinstance(v, str)} if isinstance(files, dict) else set()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return set()


def collect_garbage(run_dir: PathLike) -> None:
    """Delete the tensor files that no manifest of ``run_dir`` names, and the temporaries a killed writer
    left. Only names this module writes are touched."""
    run = Path(run_dir)
    keep = set().union(*(_referenced(m) for m in run.glob("*.json")))
    for f in run.glob("*.safetensors"):
        if _TENSOR_FILE.fullmatch(f.name) and f.name not in keep:
            remove(f)
    for f in run.glob(".*.tmp"):
        remove(f)


def save_checkpoint(
    run_dir: PathLike,
    stem: str,
    model: torch.nn.Module,
    *,
    optimizer: Optional[torch.optim.Optimizer] = None,
    state: Optional[dict[str, Any]] = None,
    preprocessing: Optional[Preprocessing] = None,
) -> Path:
    """Save ``model`` (and ``optimizer``) as checkpoint ``stem`` of ``run_dir`` (see the module docstring for
    the commit protocol); returns the manifest's path. ``preprocessing`` is the recipe the model's inputs were
    prepared with (default: the readers' own, :class:`~harmonizer_fast.preprocessing.Preprocessing`)."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    net = getattr(model, "module", model)  # DDP wraps the model
    weights = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    name, sha = _write_tensor_file(run, "weights", st_save(weights, metadata={"format": FORMAT}))
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": net.config.to_dict(),
        "preprocessing": (preprocessing or Preprocessing()).to_dict(),
        "files": {"weights": name},
        "sha256": {"weights": sha},
        "state": state or {},
    }
    if optimizer is not None:
        tensors, meta = _optimizer_tensors(optimizer)
        oname, osha = _write_tensor_file(run, "optim", st_save(tensors, metadata={"format": FORMAT}))
        manifest["files"]["optimizer"] = oname
        manifest["sha256"]["optimizer"] = osha
        manifest["optimizer"] = meta
    path = run / f"{stem}.json"
    write_atomic(path, json.dumps(manifest, indent=1, default=_json_default).encode())  # the commit point
    collect_garbage(run)
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _resolve(path: PathLike) -> Path:
    """The manifest of a run directory (its ``best``, else ``last``), a stem path, or any file of a checkpoint."""
    p = Path(path)
    if p.is_dir():
        for stem in ("best", "last"):
            if (p / f"{stem}.json").is_file():
                return p / f"{stem}.json"
        raise CheckpointError(f"{path}: no checkpoint in this directory (best.json or last.json)")
    if p.suffix == ".safetensors":  # the manifest that names this file
        for m in sorted(p.parent.glob("*.json")):
            try:
                if p.name in json.loads(m.read_text()).get("files", {}).values():
                    return m
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                continue
        raise CheckpointError(f"{p}: no checkpoint manifest in {p.parent} names this file")
    return p if p.suffix == ".json" else p.with_suffix(".json")


def _check_manifest(p: Path, manifest: Any) -> dict[str, Any]:
    """The structure every reader relies on, so that a damaged manifest fails here with its name."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not a harmonizer-fast checkpoint (format tag missing or foreign)")
    if manifest.get("version") != VERSION or isinstance(manifest.get("version"), bool):  # True == 1 in Python
        raise CheckpointError(f"{p}: checkpoint version {manifest.get('version')} is not supported ({VERSION})")
    files, shas = manifest.get("files"), manifest.get("sha256")
    if not isinstance(files, dict) or not isinstance(files.get("weights"), str):
        raise CheckpointError(f"{p}: damaged manifest: 'files' must name the 'weights' file")
    if not isinstance(shas, dict) or set(shas) != set(files):
        raise CheckpointError(f"{p}: damaged manifest: 'sha256' must hold one digest per entry of 'files'")
    for key, name in files.items():
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
            raise CheckpointError(f"{p}: damaged manifest: files.{key} must be a .safetensors file name beside it")
        if not isinstance(shas[key], str) or not _SHA256.fullmatch(shas[key]):
            raise CheckpointError(f"{p}: damaged manifest: sha256.{key} is not a SHA-256 digest")
    if "optimizer" in files and not isinstance(manifest.get("optimizer"), dict):
        raise CheckpointError(f"{p}: damaged manifest: the optimizer's parameter groups are missing")
    for key in ("model_config", "state"):
        if not isinstance(manifest.get(key), dict):
            raise CheckpointError(f"{p}: damaged manifest: '{key}' must be an object")
    try:
        Preprocessing.from_dict(manifest.get("preprocessing"))
    except ValueError as exc:
        raise CheckpointError(f"{p}: damaged manifest: {exc}") from None
    return manifest


def preprocessing_of(manifest: dict[str, Any]) -> Preprocessing:
    """The recipe a checked manifest records (the default for checkpoints older than the field)."""
    return Preprocessing.from_dict(manifest.get("preprocessing"))


def read_manifest(path: PathLike) -> tuple[Path, dict[str, Any]]:
    """Resolve a run directory (its ``best``), a stem path, or a file of a checkpoint, to its checked manifest."""
    p = _resolve(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint manifest not found")
    try:
        manifest = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{p}: not a harmonizer-fast checkpoint manifest ({exc})") from None
    return p, _check_manifest(p, manifest)


def _load_verified(manifest_path: Path, manifest: dict[str, Any], key: str) -> dict[str, torch.Tensor]:
    f = manifest_path.parent / manifest["files"][key]
    if not f.is_file():
        raise CheckpointError(f"{f}: missing (listed in {manifest_path.name})")
    try:  # the bytes and the tensors made from them
        check_fits(2 * f.stat().st_size, f"{f}")
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    data = f.read_bytes()
    if _sha256(data) != manifest["sha256"][key]:
        raise CheckpointError(f"{f}: does not match its manifest {manifest_path.name} (truncated or replaced)")
    try:
        return st_load(data)
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"{f}: not a readable safetensors file ({exc})") from None


def verify_checkpoint(path: PathLike) -> dict[str, Any]:
    """Check every file of a checkpoint against its manifest (present, same SHA-256, readable); returns the
    manifest. Raises :class:`CheckpointError` naming the first file that fails."""
    mpath, manifest = read_manifest(path)
    for key in manifest["files"]:
        _load_verified(mpath, manifest, key)
    return manifest


def config_of(manifest_path: Path, manifest: dict[str, Any]) -> HarmonizerConfig:
    try:
        return HarmonizerConfig.from_dict(manifest["model_config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{manifest_path}: invalid model config ({exc})") from None


def config_difference(a: HarmonizerConfig, b: HarmonizerConfig) -> list[str]:
    """The config fields in which ``a`` and ``b`` differ, as ``name: a != b``."""
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: {da.get(k)!r} != {db.get(k)!r}" for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k)]


# Buffers a checkpoint may lack because it predates them (the weights keep their default): see _load_weights.
_ADDED_BUFFERS = ("personalizer.trained_steps",)


def _plan_fits(config: HarmonizerConfig, weights: dict[str, torch.Tensor], mpath: Path, file: str) -> None:
    """Refuse a config that does not describe these weights before building its network: the plan on ``meta``
    stops as soon as the config registers more than the weights file holds (a hand-edited count of 10**12
    would otherwise allocate first), then every tensor's shape is compared with the file's."""
    bound = WeightsBound(len(weights) + len(_ADDED_BUFFERS), sum(t.numel() for t in weights.values()) + 1,
                         f"its weights file {file}")  # fmt: skip
    try:
        planned = plan_network(config, weights=bound, name=str(mpath))
        wrong = [f"{k}: {tuple(weights[k].shape)} in the file, {tuple(v)} in the config" for k, v in planned.items()
                 if k in weights and weights[k].shape != v]  # fmt: skip
        wrong += [f"{k}: in the file, not in the config" for k in sorted(set(weights) - set(planned))]
        wrong += [f"{k}: in the config, not in the file" for k in sorted(set(planned) - set(weights))
                  if k not in _ADDED_BUFFERS]  # fmt: skip
        if wrong:
            raise ValueError(f"{mpath}: weights do not fit the model config ({'; '.join(wrong[:2])})")
    except ValueError as exc:  # name the field when setting one back to its preset's value resolves it
        named = culprits(config, {k: t.shape for k, t in weights.items()}, bound)
        raise CheckpointError(f"{exc}{'; ' if named else ''}{'; '.join(f'model_config.{n}' for n in named)}") from None


def _load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], mpath: Path) -> None:
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shapes that do not fit
        raise CheckpointError(f"{mpath}: weights do not fit the model ({str(exc).splitlines()[-1].strip()})") from None
    # Checkpoints written before the personalizer counted its phase-2 steps lack that buffer: it stays 0
    # (untrained), so personalize() asks for phase 2 or allow_untrained=True instead of guessing.
    missing = [k for k in missing if k != "personalizer.trained_steps"]
    if missing or unexpected:
        raise CheckpointError(f"{mpath}: weights do not fit the config (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]})")  # fmt: skip


def load_model(path: PathLike, *, map_location: Union[str, torch.device] = "cpu") -> tuple[HarmonizerNet, dict]:
    """The model of a checkpoint (run directory: its best) in eval mode, and its manifest."""
    mpath, manifest = read_manifest(path)
    config, weights = config_of(mpath, manifest), _load_verified(mpath, manifest, "weights")
    _plan_fits(config, weights, mpath, manifest["files"]["weights"])
    model = HarmonizerNet(config)
    _load_weights(model, weights, mpath)
    return model.to(map_location).eval(), manifest


def load_training_state(
    path: PathLike, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], *,
    fresh_personalizer: bool = False,
) -> dict[str, Any]:
    """Load weights (and optimizer tensors) of a checkpoint into existing objects; returns the manifest.

    ``fresh_personalizer`` (a phase 2 starting from a phase-1 model): the checkpoint may differ from ``model``
    in the personalizer's fields only (:data:`~harmonizer_fast.model.config.PERSONALIZER_FIELDS`; e.g. a Prob.
    U-Net trained without heads, given D-Persona's); every other weight is loaded and the personalizer keeps
    ``model``'s initialization, whatever the checkpoint held for it."""
    mpath, manifest = read_manifest(path)
    net = getattr(model, "module", model)
    config = config_of(mpath, manifest)
    diff = config_difference(config, net.config)
    if fresh_personalizer:
        diff = [d for d in diff if d.split(":")[0] not in PERSONALIZER_FIELDS]
    if diff:
        raise CheckpointError(f"{mpath}: its model config differs from this run's ({'; '.join(diff[:3])})")
    weights = _load_verified(mpath, manifest, "weights")
    if fresh_personalizer:
        _plan_fits(config, weights, mpath, manifest["files"]["weights"])  # the file is what its config says
        ours = {k: v for k, v in net.state_dict().items() if k.startswith("personalizer.")}
        weights = {**{k: v for k, v in weights.items() if not k.startswith("personalizer.")}, **ours}
    _load_weights(net, weights, mpath)
    if optimizer is not None:
        if "optimizer" not in manifest["files"]:
            raise CheckpointError(f"{mpath}: has no optimizer state to resume from")
        tensors = _load_verified(mpath, manifest, "optimizer")
        try:
            optimizer.load_state_dict(_optimizer_state(tensors, manifest["optimizer"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{mpath}: optimizer state does not fit this run ({exc})") from None
    return manifest
