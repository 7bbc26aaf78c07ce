"""Evaluation of a trained model with the field's metrics, the paper's analyses and figures.

- :func:`evaluate_model`: K prior samples (and the personalized heads) per image, pooled by a
  :class:`~harmonizer_fast.metrics.MetricAccumulator`; deterministic for a seed.
- :func:`held_out_split`: the data prepared as a training run prepared it, and that run's test patients.
- :func:`run_evaluation`: everything ``harmonizer-fast evaluate`` writes: ``metrics.json`` (``mean`` and
  ``std`` per metric, per-rater Dice/ECE/Brier, the uncertainty analyses of appendices C-E, GED and
  Dice_soft against K as in appendix B, optionally the robustness protocol of Table 5, the spectral
  response of appendix H), ``report.md`` and PNG figures.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ._io import write_atomic
from .data import MultiRaterData
from .metrics import MetricAccumulator, dice_soft, entropy_map
from .model import HarmonizerNet
from .ops.ged import ged

K_VALUES = (1, 4, 8, 16, 32)
# Paper Table 5: Gaussian noise sigma, Gaussian blur sigma (11 x 11 kernel), gamma.
ROBUSTNESS = {
    "noise": (0.10, 0.15, 0.25),
    "blur": (1.0, 1.5, 1.75),
    "gamma": (0.75, 1.5, 1.75),
}


@torch.no_grad()
def evaluate_model(
    model: HarmonizerNet,
    data: MultiRaterData,
    indices: Optional[np.ndarray] = None,
    *,
    samples: int = 16,
    seed: int = 0,
    batch: int = 32,
    personalized: Optional[bool] = None,
    device: Optional[torch.device] = None,
    transform=None,
    k_values: tuple[int, ...] = (),
) -> tuple[MetricAccumulator, dict[int, dict[str, list[float]]]]:
    """Metrics over ``data[indices]`` (all items by default), and GED / Dice_soft per image for each K in
    ``k_values`` (the first K of the same samples). ``transform(images, generator)`` perturbs the inputs."""
    checks = [("samples", samples), ("batch", batch), *((f"k_values[{i}]", k) for i, k in enumerate(k_values))]
    for name, value in checks:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"evaluate_model: {name} must be an integer >= 1, got {value!r}")
    device = device or next(model.parameters()).device
    was = model.training
    model.eval()
    idx = np.arange(len(data)) if indices is None else np.asarray(indices)
    if idx.size == 0:
        raise ValueError("evaluate_model: no images to evaluate (indices is empty)")
    use_heads = model.personalizer_trained if personalized is None else personalized
    g = torch.Generator().manual_seed(seed)
    acc = MetricAccumulator()
    per_k: dict[int, dict[str, list[float]]] = {k: {"ged": [], "dice_soft": []} for k in k_values}
    kmax = max([samples, *k_values])
    for s in range(0, len(idx), batch):
        part = idx[s : s + batch]
        x = torch.from_numpy(data.images[part])
        if transform is not None:
            x = transform(x, g)
        x = x.to(device)
        y = torch.from_numpy(data.masks[part]).to(device)
        probs = model.sample(x, kmax, generator=g).float()
        heads = model.personalize(x, generator=g).float() if use_heads else None
        acc.update(probs[:, :samples], y, heads)
        for k in k_values:
            per_k[k]["ged"] += ged(probs[:, :k], y).tolist()
            per_k[k]["dice_soft"] += dice_soft(probs[:, :k], y).tolist()
    model.train(was)
    return acc, per_k


def held_out_split(run_dir: os.PathLike, data: MultiRaterData) -> tuple[MultiRaterData, np.ndarray]:
    """(the data prepared as the run prepared it, the run's test indices) from ``run_dir/last.json``."""
    from .checkpoint import CheckpointError, config_of, read_manifest

    path, manifest = read_manifest(Path(run_dir) / "last.json")
    state = manifest["state"]
    prepared = data.padded(2 ** config_of(path, manifest).downsamplings)
    try:
        if state["train_config"].get("rater_order") == "area":
            prepared = prepared.ordered_by_area()
        test = np.asarray(state["split"]["test"], dtype=np.int64)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: damaged manifest: no usable train_config / split ({exc})") from None
    if test.ndim != 1 or (test.size and (test.min() < 0 or test.max() >= len(prepared))):
        raise CheckpointError(f"{path}: its test split does not index this dataset of {len(prepared)} images")
    return prepared, test


# ---------------------------------------------------------------------------------------------------------
# Robustness transforms (inputs in [0, 1]).


def gaussian_blur(x: torch.Tensor, sigma: float, size: int = 11) -> torch.Tensor:
    r = torch.arange(size, dtype=x.dtype) - size // 2
    k = torch.exp(-(r**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    xp = F.pad(x, (size // 2,) * 4, mode="reflect")
    xp = F.conv2d(xp, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(xp, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def perturbation(kind: str, level: float):
    """A transform ``(images, generator) -> images`` of the robustness protocol."""
    if kind == "noise":
        return lambda x, g: (x + level * torch.randn(x.shape, generator=g)).clamp(0, 1)
    if kind == "blur":
        return lambda x, g: gaussian_blur(x, level)
    if kind == "gamma":
        return lambda x, g: x.clamp(0, 1) ** level
    raise ValueError(f"unknown perturbation {kind!r}; expected one of {sorted(ROBUSTNESS)}")


# ---------------------------------------------------------------------------------------------------------
# Spectral response (appendix H).


def high_frequency_fraction(maps: torch.Tensor) -> torch.Tensor:
    """Share of the (mean-removed) spectral energy above a quarter of the Nyquist radius, per map ``(..., H, W)``."""
    x = maps - maps.mean((-2, -1), keepdim=True)
    power = torch.fft.fft2(x).abs() ** 2
    h, w = x.shape[-2:]
    fy = torch.fft.fftfreq(h).abs()[:, None]
    fx = torch.fft.fftfreq(w).abs()[None, :]
    high = (torch.sqrt(fy**2 + fx**2) > 0.125).to(power.dtype)
    return (power * high).sum((-2, -1)) / power.sum((-2, -1)).clamp_min(1e-12)


@torch.no_grad()
def spectral_response(model: HarmonizerNet, data: MultiRaterData, idx: np.ndarray, *, seed: int = 0) -> dict:
    """High-frequency energy of the decoder's final hidden features with the prior-mean latent (no
    personalizer) and with each rater's personalized latent."""
    if not model.personalizer_trained:
        return {}
    model.eval()
    x = torch.from_numpy(data.images[idx[:32]]).to(next(model.parameters()).device)
    f, _ = model.features(x)
    prior = model.prior(x)
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn((x.shape[0], model.config.prior_bank, model.config.latent_dim), generator=g).to(x.device)
    bank = prior.mean[:, None] + prior.stddev[:, None] * eps
    raters = torch.arange(model.config.num_raters, device=x.device)
    z_all = torch.cat([prior.mean[:, None], model.personalizer(f, prior.mean, bank, raters)], dim=1)

    def hidden(z: torch.Tensor) -> torch.Tensor:  # fcomb's last hidden activations
        w_f, w_z = model.fcomb._split()
        h = F.relu(F.conv2d(f, w_f[:, :, None, None], model.fcomb.first.bias) + (z @ w_z.t())[..., None, None])
        for conv in model.fcomb.hidden:
            h = F.relu(conv(h))
        return h

    fractions = [float(high_frequency_fraction(hidden(z_all[:, i])).mean()) for i in range(z_all.shape[1])]
    return {"without_personalizer": fractions[0],
            "with_personalizer": {f"rater_{i + 1}": v for i, v in enumerate(fractions[1:])}}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Figures.


def _figures(out: Path, model, data, idx, summary, per_k, robustness, seed) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    device = next(model.parameters()).device
    show = idx[:4]
    x = torch.from_numpy(data.images[show]).to(device)
    g = torch.Generator().manual_seed(seed)
    probs = model.sample(x, 4, generator=g).cpu()
    heads = model.personalize(x, generator=g).cpu() if model.personalizer_trained else None
    ent = entropy_map(model.sample(x, 16, generator=g)).cpu()
    cols = 2 + probs.shape[1] + (0 if heads is None else heads.shape[1])
    fig, axes = plt.subplots(len(show), cols, figsize=(1.6 * cols, 1.6 * len(show)), squeeze=False)
    for r, i in enumerate(show):
        panels = [("image", data.images[i, 0]), ("uncertainty", ent[r].numpy())]
        panels += [(f"sample {k + 1}", probs[r, k].numpy()) for k in range(probs.shape[1])]
        if heads is not None:
            panels += [(f"rater {k + 1} head", heads[r, k].numpy()) for k in range(heads.shape[1])]
        for c, (title, img) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray" if c == 0 else ("magma" if c == 1 else "viridis"), vmin=0, vmax=1)
            for k in range(data.masks.shape[1]):
                ax.contour(data.masks[i, k], levels=[0.5], colors=[plt.cm.tab10(k)], linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
    save(fig, "samples.png")

    fig, ax1 = plt.subplots(figsize=(4, 3))
    ks = sorted(per_k)
    ax1.errorbar(ks, [np.mean(per_k[k]["ged"]) for k in ks], [np.std(per_k[k]["ged"]) for k in ks], marker="o",
                 label="GED", capsize=2)  # fmt: skip
    ax1.set_xlabel("samples K")
    ax1.set_ylabel("GED (lower is better)")
    ax2 = ax1.twinx()
    ax2.plot(ks, [np.mean(per_k[k]["dice_soft"]) for k in ks], "s--", color="tab:orange", label="Dice_soft")
    ax2.set_ylabel("Dice_soft")
    save(fig, "ged_vs_k.png")

    cal = np.asarray(summary["calibration"]["reliability"])  # (N, 10, 3)
    fig, ax = plt.subplots(figsize=(3.6, 3.4))
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    for r in range(cal.shape[0]):
        n, conf, lab = cal[r, :, 0], cal[r, :, 1], cal[r, :, 2]
        keep = n > 0
        ax.plot(conf[keep] / n[keep], lab[keep] / n[keep], "o-", ms=3, label=f"rater {r + 1}")
    ax.set_xlabel("confidence")
    ax.set_ylabel("foreground frequency")
    ax.legend(fontsize=7)
    save(fig, "reliability.png")

    if robustness:
        fig, ax = plt.subplots(figsize=(4.2, 3))
        for kind, levels in robustness["by_kind"].items():
            ax.plot(range(len(levels) + 1), [robustness["clean"]["dice_soft"]] + [v["dice_soft"] for v in levels],
                    "o-", label=kind)  # fmt: skip
        ax.set_xticks(range(4), ["clean", "level 1", "level 2", "level 3"])
        ax.set_ylabel("Dice_soft")
        ax.legend(fontsize=7)
        save(fig, "robustness.png")
    return written


# ---------------------------------------------------------------------------------------------------------
# The whole evaluation.


def run_evaluation(
    model: HarmonizerNet,
    data: MultiRaterData,
    idx: np.ndarray,
    out_dir: os.PathLike,
    *,
    samples: int = 16,
    seed: int = 0,
    robustness: bool = False,
    figures: bool = True,
    label: str = "",
) -> dict[str, Any]:
    """Evaluate ``model`` on ``data[idx]`` and write metrics.json, report.md and the figures to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    acc, per_k = evaluate_model(model, data, idx, samples=samples, seed=seed, k_values=K_VALUES)
    summary = acc.summary()
    result: dict[str, Any] = {
        "label": label,
        "samples": samples,
        "seed": seed,
        **summary,
        "ged_vs_k": {str(k): {m: [float(np.mean(v)), float(np.std(v))] for m, v in per_k[k].items()} for k in per_k},
        "spectral": spectral_response(model, data, idx, seed=seed),
    }
    rob: dict[str, Any] = {}
    if robustness:
        clean = summary["mean"]
        rob = {"clean": {k: clean[k] for k in ("ged", "dice_soft", "dice_each_mean")}, "by_kind": {}}
        for kind, levels in ROBUSTNESS.items():
            rows = []
            for level in levels:
                a, _ = evaluate_model(model, data, idx, samples=samples, seed=seed, transform=perturbation(kind, level))
                m = a.summary()["mean"]
                rows.append({"level": level, **{k: m[k] for k in ("ged", "dice_soft", "dice_each_mean")},
                             "dice_soft_drop": rob["clean"]["dice_soft"] - m["dice_soft"]})  # fmt: skip
            rob["by_kind"][kind] = rows
        result["robustness"] = rob
    if figures:
        result["figures"] = _figures(out, model, data, idx, summary, per_k, rob, seed)
    write_atomic(out / "metrics.json", json.dumps(result, indent=1, default=float) + "\n")
    write_atomic(out / "report.md", report(result, acc))
    return result


def report(result: dict[str, Any], acc: Optional[MetricAccumulator] = None) -> str:
    lines = [f"# Evaluation {result.get('label', '')}".rstrip(), ""]
    if acc is not None:
        lines.append(acc.markdown(f"K = {result['samples']} prior samples"))
    lines += ["### GED and Dice_soft against K", "", "| K | GED | Dice_soft |", "|---|---|---|"]
    for k, v in result["ged_vs_k"].items():
        lines.append(f"| {k} | {v['ged'][0]:.4f} ± {v['ged'][1]:.4f} | {v['dice_soft'][0]:.4f} |")
    sizes = result["dice_by_size"]
    lines += ["", "### Dice by lesion size (consensus)", "", "| bin | n | size range | Dice |", "|---|---|---|---|"]
    for b in ("small", "medium", "large"):
        if b in sizes and sizes[b].get("n"):
            r = sizes[b]
            lines.append(f"| {b} | {r['n']} | {r['size_range'][0]:.0f}-{r['size_range'][1]:.0f} | "
                         f"{r['dice_mean']:.4f} ± {r['dice_std']:.4f} |")  # fmt: skip
    if result.get("spectral"):
        sp = result["spectral"]
        lines += ["", "### Spectral response (high-frequency energy share of the head's features)", "",
                  f"without personalizer: {sp['without_personalizer']:.4f}; with: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in sp["with_personalizer"].items())]  # fmt: skip
    if result.get("robustness"):
        rob = result["robustness"]
        clean = rob["clean"]
        lines += ["", "### Robustness (Table 5 protocol)", "", "| perturbation | level | GED | Dice_soft | drop |"]
        lines += ["|---|---|---|---|---|", f"| clean | - | {clean['ged']:.4f} | {clean['dice_soft']:.4f} | - |"]
        for kind, rows in rob["by_kind"].items():
            for r in rows:
                cells = f"{r['ged']:.4f} | {r['dice_soft']:.4f} | {r['dice_soft_drop']:+.4f}"
                lines.append(f"| {kind} | {r['level']} | {cells} |")
    return "\n".join(lines) + "\n"


def table(results: dict[str, dict[str, Any]]) -> str:
    """Side-by-side markdown of several evaluations' means (e.g. untrained and trained)."""
    keys = ("ged", "dice_soft", "dice_max", "dice_match", "dice_each_mean")
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, r in results.items():
        cells = [f"{r['mean'][k]:.4f} ± {r['std'][k]:.4f}" if not math.isnan(r["mean"][k]) else "n/a" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
