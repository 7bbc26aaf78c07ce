"""Checkpoints: weights in safetensors, everything else in JSON, never a pickle (DESIGN.md, engineering
standards). A checkpoint named ``<stem>`` in a run directory is

- ``<stem>.safetensors``        the model's state dict (weights and buffers);
- ``<stem>.optim.safetensors``  optimizer tensors (Adam moments, step counts), when training state is kept;
- ``<stem>.json``               the manifest: format tag and version, model config, training state (epoch,
                                step, phase, scheduler, RNG), metrics, and the SHA-256 of each safetensors file.

Every file is written to a temporary name and renamed into place, the manifest last: a run killed at any
moment leaves the previous checkpoint intact, and a manifest never points at files it does not match
(checked on load: a truncated, swapped or foreign file is refused with a clear error).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ._io import write_atomic
from .model import HarmonizerConfig, HarmonizerNet

FORMAT = "harmonizer-fast-checkpoint"
VERSION = 1
PathLike = Union[str, os.PathLike]


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


def save_checkpoint(
    run_dir: PathLike,
    stem: str,
    model: torch.nn.Module,
    *,
    optimizer: Optional[torch.optim.Optimizer] = None,
    state: Optional[dict[str, Any]] = None,
) -> Path:
    """Write ``<stem>.safetensors`` (+ ``.optim.safetensors``) and then the manifest ``<stem>.json``."""
    run = Path(run_dir)
    net = getattr(model, "module", model)  # DDP wraps the model
    weights = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    blob = st_save(weights, metadata={"format": FORMAT})
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": net.config.to_dict(),
        "files": {"weights": f"{stem}.safetensors"},
        "sha256": {"weights": _sha256(blob)},
        "state": state or {},
    }
    write_atomic(run / f"{stem}.safetensors", blob)
    if optimizer is not None:
        tensors, meta = _optimizer_tensors(optimizer)
        oblob = st_save(tensors, metadata={"format": FORMAT})
        write_atomic(run / f"{stem}.optim.safetensors", oblob)
        manifest["files"]["optimizer"] = f"{stem}.optim.safetensors"
        manifest["sha256"]["optimizer"] = _sha256(oblob)
        manifest["optimizer"] = meta
    write_atomic(run / f"{stem}.json", json.dumps(manifest, indent=1, default=_json_default).encode())
    return run / f"{stem}.json"


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_manifest(path: PathLike) -> tuple[Path, dict[str, Any]]:
    """Resolve a run directory (its ``best``), a stem path, or a file of a checkpoint, to its manifest."""
    p = Path(path)
    if p.is_dir():
        for stem in ("best", "last"):
            if (p / f"{stem}.json").is_file():
                p = p / f"{stem}.json"
                break
        else:
            raise CheckpointError(f"{path}: no checkpoint in this directory (best.json or last.json)")
    elif p.suffix == ".safetensors":
        p = p.with_name(p.name.split(".")[0] + ".json")
    elif p.suffix != ".json":
        p = p.with_suffix(".json")
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint manifest not found")
    try:
        manifest = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{p}: not a harmonizer-fast checkpoint manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not a harmonizer-fast checkpoint (format tag missing or foreign)")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{p}: checkpoint version {manifest.get('version')} is not supported ({VERSION})")
    return p, manifest


def _load_verified(manifest_path: Path, manifest: dict[str, Any], key: str) -> dict[str, torch.Tensor]:
    f = manifest_path.parent / manifest["files"][key]
    if not f.is_file():
        raise CheckpointError(f"{f}: missing (listed in {manifest_path.name})")
    data = f.read_bytes()
    if _sha256(data) != manifest["sha256"][key]:
        raise CheckpointError(f"{f}: does not match its manifest {manifest_path.name} (truncated or replaced)")
    try:
        return st_load(data)
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"{f}: not a readable safetensors file ({exc})") from None


def load_model(path: PathLike, *, map_location: Union[str, torch.device] = "cpu") -> tuple[HarmonizerNet, dict]:
    """The model of a checkpoint (run directory: its best) in eval mode, and its manifest."""
    mpath, manifest = read_manifest(path)
    try:
        config = HarmonizerConfig.from_dict(manifest["model_config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{mpath}: invalid model config ({exc})") from None
    model = HarmonizerNet(config)
    weights = _load_verified(mpath, manifest, "weights")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{mpath}: weights do not fit the config (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]})")  # fmt: skip
    return model.to(map_location).eval(), manifest


def load_training_state(
    path: PathLike, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]
) -> dict[str, Any]:
    """Load weights (and optimizer tensors) of a checkpoint into existing objects; returns the manifest."""
    mpath, manifest = read_manifest(path)
    net = getattr(model, "module", model)
    try:
        same = HarmonizerConfig.from_dict(manifest["model_config"]) == net.config
    except (KeyError, TypeError, ValueError):
        same = False
    if not same:
        raise CheckpointError(f"{mpath}: its model config differs from this run's")
    net.load_state_dict(_load_verified(mpath, manifest, "weights"))
    if optimizer is not None:
        if "optimizer" not in manifest["files"]:
            raise CheckpointError(f"{mpath}: has no optimizer state to resume from")
        tensors = _load_verified(mpath, manifest, "optimizer")
        optimizer.load_state_dict(_optimizer_state(tensors, manifest["optimizer"]))
    return manifest
