"""Evaluation of a trained model with the field's metrics, the paper's tables, analyses and figures.

- :func:`evaluate_model`: per image, K prior samples and (for a two-phase model) the R personalized heads,
  from one backbone pass, pooled into two :class:`~harmonizer_fast.metrics.MetricAccumulator` tables:
  **Table 1** on the K prior samples (GED, Dice_soft, Dice_max, Dice_match) and **Table 2** on the R heads
  (the same four computed on the heads, as D-Persona's stage-2 evaluation does, plus Dice_A(i) of head i
  against rater i and their mean Dice_mean; the per-rater ECE and Brier of the heads are Table 4).
  ``heads="identity"`` scores every rater with the prior-mean prediction instead (z'_i = z: a model without
  personalization), the baseline a personalizer must beat. Deterministic for a seed.
- :func:`robustness_table`: paper Table 5, the drop of the personalized Dice_mean under noise, blur and gamma;
  the degradations draw from their own generator keyed by (seed, image), so every model sees identical
  inputs whatever it samples.
- :func:`run_evaluation`: everything ``harmonizer-fast evaluate`` writes: ``metrics.json``, ``report.md``
  and the figures (:mod:`harmonizer_fast.figures`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import figures as plots
from ._deprecation import renamed_kwargs
from ._io import write_atomic
from ._random import generator
from .data import MultiRaterData
from .latent_stats import collapse_flags, latent_statistics
from .metrics import MetricAccumulator, dice_soft
from .metrics.energy import ged
from .model import HarmonizerNet
from .model.checks import check_counts
from .model.latent import reparameterize
from .model.net import resolve_heads
from .references import label_only_references

K_VALUES = (1, 4, 8, 16, 32)
TABLE_COLUMNS = (("GED", "ged"), ("Dice_soft", "dice_soft"), ("Dice_max", "dice_max"), ("Dice_match", "dice_match"))
# Paper Table 5: Gaussian noise sigma, Gaussian blur sigma (11 x 11 kernel), gamma.
ROBUSTNESS = {
    "noise": (0.10, 0.15, 0.25),
    "blur": (1.0, 1.5, 1.75),
    "gamma": (0.75, 1.5, 1.75),
}
Transform = Callable[[torch.Tensor, np.ndarray], torch.Tensor]  # (images, their dataset indices) -> images


@dataclass
class Scores:
    """What :func:`evaluate_model` measures: Table 1 (prior samples), Table 2 (heads, or None), and GED /
    Dice_soft per image for each K of ``k_values``."""

    prior: MetricAccumulator
    heads: Optional[MetricAccumulator]
    per_k: dict[int, dict[str, list[float]]]
    heads_kind: str  # "personalized", "identity" or "none"


def _predict(model: HarmonizerNet, x: torch.Tensor, k: int, gens: tuple[torch.Generator, torch.Generator], kind: str):
    """K prior samples and the maps Table 2 scores (personalized heads, or the prior mean per rater). The
    samples and the heads' bank draw from separate streams, so Table 1 is the same whatever Table 2 scores."""
    probs, heads = model.predict(x, k, heads=kind, generator=gens[0], bank_generator=gens[1])
    return probs.float(), None if heads is None else heads.float()


@torch.no_grad()
@renamed_kwargs(samples="num_samples")
def evaluate_model(
    model: HarmonizerNet,
    data: MultiRaterData,
    indices: Optional[np.ndarray] = None,
    *,
    num_samples: int = 16,
    seed: int = 0,
    batch: int = 32,
    heads: str = "auto",
    device: Optional[torch.device] = None,
    transform: Optional[Transform] = None,
    k_values: tuple[int, ...] = (),
) -> Scores:
    """Tables 1 and 2 over ``data[indices]`` (all items by default), and GED / Dice_soft per image for each K
    in ``k_values`` (the first K of the same samples). ``heads``: "auto" (the personalized heads when phase 2
    trained the personalizer, else none), "personalized", "identity" or "none". ``transform(images,
    indices)`` perturbs the inputs."""
    ks = {f"k_values[{i}]": k for i, k in enumerate(k_values)}
    check_counts("evaluate_model", {"num_samples": num_samples, "batch": batch, **ks})
    kind = resolve_heads(model, heads, "evaluate_model")
    device = device or next(model.parameters()).device
    was = model.training
    model.eval()
    idx = np.arange(len(data)) if indices is None else np.asarray(indices)
    if idx.size == 0:
        raise ValueError("evaluate_model: no images to evaluate (indices is empty)")
    gens = (torch.Generator().manual_seed(seed), generator(seed, 1))
    prior_acc, heads_acc = MetricAccumulator(), (None if kind == "none" else MetricAccumulator())
    per_k: dict[int, dict[str, list[float]]] = {k: {"ged": [], "dice_soft": []} for k in k_values}
    for s in range(0, len(idx), batch):
        part = idx[s : s + batch]
        x = torch.from_numpy(data.images[part])
        x = (x if transform is None else transform(x, part)).to(device)
        y = torch.from_numpy(data.masks[part]).to(device)
        probs, maps = _predict(model, x, max([num_samples, *k_values]), gens, kind)
        prior_acc.update(probs[:, :num_samples], y)
        if heads_acc is not None:
            heads_acc.update(maps, y, maps)  # the heads are the samples, and head i is rater i's
        for k in k_values:
            per_k[k]["ged"] += ged(probs[:, :k], y).tolist()
            per_k[k]["dice_soft"] += dice_soft(probs[:, :k], y).tolist()
    model.train(was)
    return Scores(prior_acc, heads_acc, per_k, kind)


# ---------------------------------------------------------------------------------------------------------
# Robustness (Table 5): inputs in [0, 1], degradations seeded per image.


def gaussian_blur(x: torch.Tensor, sigma: float, size: int = 11) -> torch.Tensor:
    r = torch.arange(size, dtype=x.dtype) - size // 2
    k = torch.exp(-(r**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    xp = F.pad(x, (size // 2,) * 4, mode="reflect")
    xp = F.conv2d(xp, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(xp, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def perturbation(kind: str, level: float, seed: int = 0) -> Transform:
    """A transform ``(images, dataset indices) -> images`` of the robustness protocol. Noise for image i comes
    from a generator keyed by (seed, level, i): the same image gets the same noise for every model."""
    if kind == "noise":

        def noisy(x: torch.Tensor, indices: np.ndarray) -> torch.Tensor:
            keys = (seed, round(level * 1e6))
            noise = torch.stack([torch.randn(x.shape[1:], generator=generator(*keys, int(i))) for i in indices])
            return (x + level * noise.to(x.dtype)).clamp(0, 1)

        return noisy
    if kind == "blur":
        return lambda x, indices: gaussian_blur(x, level)
    if kind == "gamma":
        return lambda x, indices: x.clamp(0, 1) ** level
    raise ValueError(f"unknown perturbation {kind!r}; expected one of {sorted(ROBUSTNESS)}")


def _robust_label(scores: Scores) -> str:
    """What Table 5's Dice_mean is here: the personalized heads' when there are trained ones (the paper's),
    else the prior samples' matched per-rater Dice."""
    if scores.heads_kind == "personalized":
        return "personalized Dice_mean"
    return "Dice_mean of the matched prior samples (no trained personalizer)"


def _robust_row(scores: Scores) -> dict[str, float]:
    table = scores.heads if scores.heads_kind == "personalized" else scores.prior
    mean = scores.prior.summary()["mean"]
    return {"dice_mean": table.summary()["mean"]["dice_each_mean"], "ged": mean["ged"], "dice_soft": mean["dice_soft"]}


@renamed_kwargs(samples="num_samples")
def robustness_table(model: HarmonizerNet, data: MultiRaterData, idx: np.ndarray, clean: Scores, *, num_samples: int,
               seed: int) -> dict[str, Any]:  # fmt: skip
    """Paper Table 5: each degradation's Dice_mean and its drop from ``clean`` (the unperturbed scores)."""
    out: dict[str, Any] = {"metric": "dice_mean", "metric_label": _robust_label(clean), "clean": _robust_row(clean),
                           "by_kind": {}}  # fmt: skip
    for kind, levels in ROBUSTNESS.items():
        rows = []
        for level in levels:
            s = evaluate_model(model, data, idx, num_samples=num_samples, seed=seed, heads=clean.heads_kind,
                               transform=perturbation(kind, level, seed))  # fmt: skip
            row = {"level": level, **_robust_row(s)}
            row["dice_mean_drop"] = out["clean"]["dice_mean"] - row["dice_mean"]
            rows.append(row)
        out["by_kind"][kind] = rows
    return out


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
    eps = torch.randn((x.shape[0], model.config.prior_bank, model.config.latent_dim), generator=generator(seed))
    raters = torch.arange(model.config.num_raters, device=x.device)
    z_all = torch.cat([prior.mean[:, None], model.personalizer(f, prior.mean, reparameterize(prior, eps), raters)], 1)

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
# The whole evaluation.


def summarize(scores: Scores) -> dict[str, Any]:
    """Tables 1 and 2 as JSON: each a MetricAccumulator summary (mean and std over images)."""
    return {
        "table1": scores.prior.summary(),
        "table2": None if scores.heads is None else scores.heads.summary(),
        "table2_heads": scores.heads_kind,
    }


@renamed_kwargs(samples="num_samples")
def run_evaluation(
    model: HarmonizerNet,
    data: MultiRaterData,
    idx: np.ndarray,
    out_dir: os.PathLike,
    *,
    num_samples: int = 16,
    seed: int = 0,
    robustness: bool = False,
    figures: bool = True,
    label: str = "",
    scored: str = "",
    scores: Optional[Scores] = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``data[idx]`` and write metrics.json, report.md and the figures to ``out_dir``.
    ``scored`` says which images these are (for the report). ``scores``: the :func:`evaluate_model` result
    of the same model, images, samples, seed and ``k_values=K_VALUES``, when the caller already has it."""
    if scores is None:
        scores = evaluate_model(model, data, idx, num_samples=num_samples, seed=seed, k_values=K_VALUES)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "label": label,
        "scored": scored,
        "samples": num_samples,  # the key of published metrics.json files
        "seed": seed,
        **summarize(scores),
        "ged_vs_k": {
            str(k): {m: [float(np.mean(v)), float(np.std(v))] for m, v in scores.per_k[k].items()} for k in scores.per_k
        },  # fmt: skip
        "spectral": spectral_response(model, data, idx, seed=seed),
    }
    if len(idx) >= 2:
        result["latent"] = latent_statistics(model, data, idx)
    result["references"] = label_only_references(data, idx, num_samples)
    result["warnings"] = warnings(result)
    if robustness:
        result["robustness"] = robustness_table(model, data, idx, scores, num_samples=num_samples, seed=seed)
    if figures:
        result["figures"] = _figures(out, model, data, idx, result, scores, seed)
    write_atomic(out / "metrics.json", json.dumps(result, indent=1, default=float) + "\n")
    write_atomic(out / "report.md", report(result))
    return result


def _figures(out: Path, model, data, idx, result, scores: Scores, seed: int) -> list[str]:
    made = [plots.samples_figure(out / "samples.png", model, data, idx, seed),
            plots.ged_vs_k_figure(out / "ged_vs_k.png", scores.per_k),
            plots.reliability_figure(out / "reliability.png", result["table2"] or result["table1"])]  # fmt: skip
    if result.get("robustness"):
        made.append(plots.robustness_figure(out / "robustness.png", result["robustness"]))
    return made


# ---------------------------------------------------------------------------------------------------------
# Reports.


def _cell(summary: Optional[dict], key: str) -> str:
    if summary is None or math.isnan(summary["mean"][key]):
        return "n/a"
    return f"{summary['mean'][key]:.4f} ± {summary['std'][key]:.4f}"


def warnings(result: dict[str, Any]) -> list[str]:
    """What a reader must know before the numbers: predictions that are all empty (their scores are not
    results) and a collapsed prior (:func:`~harmonizer_fast.latent_stats.collapse_flags`)."""
    out = [f"every {what} is empty at 0.5 on every image: the model is collapsed (or untrained); its Dice and GED "
           "are those of an all-empty predictor" for what, key in (("prior sample", "table1"), ("rater head", "table2"))
           if collapsed(result.get(key))]  # fmt: skip
    return out + (collapse_flags(result["latent"]) if "latent" in result else [])


def collapsed(table: Optional[dict[str, Any]]) -> bool:
    """Whether every prediction of a table (every sample, or every head, of every image) is empty at 0.5:
    such a model is reported as collapsed, its Dice and GED are not results."""
    return table is not None and table["mean"].get("empty_fraction") == 1.0


def tables_markdown(rows: dict[str, dict[str, Any]]) -> str:
    """Table 1 (K prior samples) and Table 2 (R heads) side by side, one row per evaluated model; mean ± std
    over images. Dice_mean is Table 2's mean of Dice_A(i) (head i against rater i). A table whose
    predictions are all empty is marked collapsed."""
    head = " | ".join(f"{name} (T1)" for name, _ in TABLE_COLUMNS)
    head2 = " | ".join(f"{name} (T2)" for name, _ in TABLE_COLUMNS)
    lines = [f"| model | {head} | {head2} | Dice_mean (T2) |", "|---|" + "---|" * (2 * len(TABLE_COLUMNS) + 1)]
    for name, r in rows.items():
        t1 = " | ".join(_cell(r["table1"], k) for _, k in TABLE_COLUMNS)
        t2 = " | ".join(_cell(r["table2"], k) for _, k in TABLE_COLUMNS)
        marks = [f"{t} collapsed: every prediction empty" for t in ("T1", "T2") if collapsed(r[f"table{t[1]}"])]
        label = f"{name} ({'; '.join(marks)})" if marks else name
        lines.append(f"| {label} | {t1} | {t2} | {_cell(r['table2'], 'dice_each_mean')} |")
    return "\n".join(lines) + "\n"


def per_rater_markdown(table: dict[str, Any]) -> str:
    """Dice_A(i), ECE and Brier per rater (Tables 2 and 4): mean ± std over images; ECE pooled over pixels."""
    lines = ["| rater | Dice_A(i) | ECE (pooled) | ECE (per image) | Brier |", "|---|---|---|---|---|"]
    for i, (name, r) in enumerate(table["per_rater"].items()):
        lines.append(f"| {name} | {r['dice'][0]:.4f} ± {r['dice'][1]:.4f} | {table['calibration']['ece_pooled'][i]:.4f}"
                     f" | {r['ece'][0]:.4f} | {r['brier'][0]:.4f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def report(result: dict[str, Any]) -> str:
    lines = [f"# Evaluation {result.get('label', '')}".rstrip(), ""]
    if result.get("warnings"):
        lines += ["**Warnings**", "", *(f"- {w}" for w in result["warnings"]), ""]
    if result.get("scored"):
        lines += [f"Scored on {result['scored']}; K = {result['samples']} prior samples, seed {result['seed']}.", ""]
    refs = {f"label-only: {name}": r for name, r in result.get("references", {}).items()}
    lines += ["### Table 1 (prior samples) and Table 2 (personalized heads), with label-only references", "",
              tables_markdown({result.get("label") or "model": result, **refs})]  # fmt: skip
    if refs:
        lines += ["The label-only rows never see the image (harmonizer_fast.references): an all-empty predictor "
                  "scores wherever raters left an image empty, and the raters themselves as samples are Table "
                  "1's oracle.", ""]  # fmt: skip
    if result["table2"] is not None:
        lines += ["### Per rater: Table 2's Dice_A(i), Table 4's calibration of the heads", "",
                  per_rater_markdown(result["table2"])]  # fmt: skip
    lines += _uncertainty_lines(result)
    lines += ["### GED and Dice_soft against K", "", "| K | GED | Dice_soft |", "|---|---|---|"]
    for k, v in result["ged_vs_k"].items():
        lines.append(f"| {k} | {v['ged'][0]:.4f} ± {v['ged'][1]:.4f} | {v['dice_soft'][0]:.4f} |")
    lines += _size_lines(result["table1"]["dice_by_size"]) + _spectral_lines(result) + _robustness_lines(result)
    return "\n".join(lines) + "\n"


def _uncertainty_lines(result: dict[str, Any]) -> list[str]:
    """Does the uncertainty follow the raters, and is the latent space alive ([science] #35 items 1-3)."""
    t1, t2 = result["table1"], result["table2"]
    uv = t1["uncertainty_vs_raters"]
    lines = ["### Uncertainty against the raters' disagreement", "",
             f"- Spearman over the {uv['n_images']} images where every rater drew, between the samples' mean "
             f"pairwise 1 - IoU and the raters': {uv['spearman']:.3f} (p = {uv['p']:.2g})",
             f"- PHiSeg's S_NCC of the samples: {t1['mean']['ncc']:.4f} ± {t1['std']['ncc']:.4f}"]  # fmt: skip
    if t2 is not None:
        hi = t2["head_identity"]
        lines += [f"- heads: Dice_mean {t2['mean']['dice_each_mean']:.4f} with head i against rater i (the paper's "
                  f"reading), {t2['mean']['dice_match']:.4f} with heads matched to raters (Hungarian, D-Persona's "
                  f"code); head i matches rater i best on {hi[0]:.1%} of head-image pairs (chance "
                  f"{1 / len(t2['per_rater']):.0%})"]  # fmt: skip
    lat = result.get("latent")
    if lat is not None:
        q = lat["prior_sigma_quantiles"]
        lines += [f"- prior: its mean's spread across images is {lat['mean_spread_ratio']:.3g} of its mean sigma "
                  f"{lat['prior_sigma_mean']:.3g} (sigma quantiles 5/50/95 %: {q['0.05']:.3g} / {q['0.5']:.3g} / "
                  f"{q['0.95']:.3g}; {lat['prior_sigma_clamped_share']:.0%} at a clamp); KL per latent dimension "
                  + ", ".join(f"{v:.3g}" for v in lat["kl_per_dim"])]  # fmt: skip
    return lines + [""]


def _size_lines(sizes: dict[str, Any]) -> list[str]:
    lines = ["", "### Dice by lesion size (consensus)", "", "| bin | n | size range | Dice |", "|---|---|---|---|"]
    for b in ("small", "medium", "large"):
        if b in sizes and sizes[b].get("n"):
            r = sizes[b]
            lines.append(f"| {b} | {r['n']} | {r['size_range'][0]:.0f}-{r['size_range'][1]:.0f} | "
                         f"{r['dice_mean']:.4f} ± {r['dice_std']:.4f} |")  # fmt: skip
    return lines


def _spectral_lines(result: dict[str, Any]) -> list[str]:
    sp = result.get("spectral")
    if not sp:
        return []
    return ["", "### Spectral response (high-frequency energy share of the head's features)", "",
            f"without personalizer: {sp['without_personalizer']:.4f}; with: "
            + ", ".join(f"{k} {v:.4f}" for k, v in sp["with_personalizer"].items())]  # fmt: skip


def _robustness_lines(result: dict[str, Any]) -> list[str]:
    rob = result.get("robustness")
    if not rob:
        return []
    c = rob["clean"]
    lines = ["", f"### Robustness (Table 5 protocol): {rob['metric_label']}", "",
             "| perturbation | level | Dice_mean | drop | GED (T1) | Dice_soft (T1) |", "|---|---|---|---|---|---|",
             f"| clean | - | {c['dice_mean']:.4f} | - | {c['ged']:.4f} | {c['dice_soft']:.4f} |"]  # fmt: skip
    for kind, rows in rob["by_kind"].items():
        for r in rows:
            lines.append(f"| {kind} | {r['level']} | {r['dice_mean']:.4f} | {r['dice_mean_drop']:+.4f} | "
                         f"{r['ged']:.4f} | {r['dice_soft']:.4f} |")  # fmt: skip
    return lines
