"""The figures of ``harmonizer-fast evaluate`` (matplotlib, Agg): samples and heads with the raters' contours
beside the uncertainty map, GED and Dice_soft against K (appendix B), the reliability diagram (appendix F)
and the robustness curves (Table 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .data import MultiRaterData
from .metrics import entropy_map
from .model import HarmonizerNet


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path.name


def samples_figure(path: Path, model: HarmonizerNet, data: MultiRaterData, idx: np.ndarray, seed: int) -> str:
    """Four images: the image, the uncertainty map, 4 prior samples and (trained personalizer) every head."""
    plt = _pyplot()
    show = idx[:4]
    x = torch.from_numpy(data.images[show]).to(next(model.parameters()).device)
    g = torch.Generator().manual_seed(seed)
    probs, heads = model.predict(x, 4, heads=model.personalizer_trained, generator=g)
    ent = entropy_map(model.sample(x, 16, generator=g)).cpu()
    cols = 2 + probs.shape[1] + (0 if heads is None else heads.shape[1])
    fig, axes = plt.subplots(len(show), cols, figsize=(1.6 * cols, 1.6 * len(show)), squeeze=False)
    for r, i in enumerate(show):
        panels = [("image", data.images[i, 0]), ("uncertainty", ent[r].numpy())]
        panels += [(f"sample {k + 1}", probs[r, k].cpu().numpy()) for k in range(probs.shape[1])]
        if heads is not None:
            panels += [(f"rater {k + 1} head", heads[r, k].cpu().numpy()) for k in range(heads.shape[1])]
        for c, (title, img) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray" if c == 0 else ("magma" if c == 1 else "viridis"), vmin=0, vmax=1)
            for k in range(data.masks.shape[1]):
                ax.contour(data.masks[i, k], levels=[0.5], colors=[plt.cm.tab10(k)], linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
    return _save(fig, path)


def ged_vs_k_figure(path: Path, per_k: dict[int, dict[str, list[float]]]) -> str:
    plt = _pyplot()
    fig, ax1 = plt.subplots(figsize=(4, 3))
    ks = sorted(per_k)
    ax1.errorbar(ks, [np.mean(per_k[k]["ged"]) for k in ks], [np.std(per_k[k]["ged"]) for k in ks], marker="o",
                 label="GED", capsize=2)  # fmt: skip
    ax1.set_xlabel("samples K")
    ax1.set_ylabel("GED (lower is better; bars: std over images)")
    ax2 = ax1.twinx()
    ax2.plot(ks, [np.mean(per_k[k]["dice_soft"]) for k in ks], "s--", color="tab:orange", label="Dice_soft")
    ax2.set_ylabel("Dice_soft")
    return _save(fig, path)


def reliability_figure(path: Path, summary: dict[str, Any]) -> str:
    plt = _pyplot()
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
    return _save(fig, path)


def robustness_figure(path: Path, robustness: dict[str, Any]) -> Optional[str]:
    plt = _pyplot()
    key = robustness["metric"]
    fig, ax = plt.subplots(figsize=(4.2, 3))
    for kind, rows in robustness["by_kind"].items():
        ax.plot(range(len(rows) + 1), [robustness["clean"][key]] + [r[key] for r in rows], "o-", label=kind)
    ax.set_xticks(range(4), ["clean", "level 1", "level 2", "level 3"])
    ax.set_ylabel(robustness["metric_label"])
    ax.legend(fontsize=7)
    return _save(fig, path)
