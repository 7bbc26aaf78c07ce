"""Why the prior collapses on LIDC, measured: phase 1 of the small config trained with the GED term of Eq. 8
reaching the prior's mean and sigma (the package's behaviour until now) or neither (the prior fitted by the
KL term alone), from torch's or He initialization, and without the GED loss; equal data,
split, seed and epochs. Per variant, on the validation patients: the prior's statistics
(:func:`harmonizer_fast.latent_stats.latent_statistics`), whether the samples' spread follows the raters'
(Spearman over images where every rater drew) and Table 1. The initialization of the prior nets and fcomb
is the second factor measured (``HarmonizerConfig.init``).

    python benchmarks/prior_collapse.py --data ../shared/data/lidc --epochs 6 --variants 0,1,2,3

Each variant trains in ``--runs/<variant>`` and resumes there, so a killed invocation continues; the JSON and
markdown go to ``benchmarks/results/lidc-prior-collapse-small-cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import torch

from harmonizer_fast.data import load_dataset
from harmonizer_fast.evaluate import evaluate_model
from harmonizer_fast.latent_stats import collapse_flags, latent_statistics
from harmonizer_fast.model import HarmonizerConfig
from harmonizer_fast.profiler import cpu_model
from harmonizer_fast.train import TrainConfig, Trainer

VARIANTS = {  # name: HarmonizerConfig overrides
    "old: GED through the prior, torch init": dict(ged_through_prior="full", init="torch"),
    "GED through the prior, He init": dict(ged_through_prior="full", init="he"),
    "prior by KL only, torch init": dict(ged_through_prior="none", init="torch"),
    "new: prior by KL only, He init": dict(ged_through_prior="none", init="he"),
    "no GED loss, He init": dict(use_ged_loss=False, init="he"),
}
# every variant above keeps sigma with the clamp used before; the package's default adds the soft bound
HARD = dict(sigma_bound="hard")
VARIANTS = {name: {**HARD, **kw} for name, kw in VARIANTS.items()}
VARIANTS["new + soft sigma bound (the package's default)"] = dict(ged_through_prior="none", init="he",
                                                                 sigma_bound="soft")  # fmt: skip


def run_variant(name: str, data, args) -> dict:
    cfg = HarmonizerConfig.small(**VARIANTS[name])
    # the prior at lr_phase1 in every variant, as when these were measured (its own rate, TrainConfig.lr_prior,
    # is the fourth cause, measured at convergence by lidc_convergence.py --ablation)
    tc = TrainConfig.for_model(cfg, phase="1", epochs_phase1=args.epochs, seed=args.seed, fold=args.fold,
                               min_raters=args.min_raters, lr_prior=None)  # fmt: skip
    t0 = time.time()
    folder = re.sub(r"[^A-Za-z0-9]+", "-", name.split(": ")[-1]).strip("-")
    trainer = Trainer(data, cfg, tc, Path(args.runs) / folder, progress=False, log=lambda m: print(f"[{name}] {m}"))
    trainer.fit(resume=True)
    net = trainer.net
    net.load_state_dict(trainer.run.load_model("last")[0].state_dict())
    val = trainer.split.val
    stats = latent_statistics(net, trainer.data, val)
    scores = evaluate_model(net, trainer.data, val, num_samples=16, seed=args.seed, heads="none")
    acc = scores.prior
    summary = acc.summary()
    return {
        "config": VARIANTS[name],
        "minutes_this_call": (time.time() - t0) / 60,
        "history": [{k: h[k] for k in ("epoch", "train_seg", "train_kl", "train_ged", "val_ged", "val_ged_unbiased",
                                        "val_dice_match", "minutes") if k in h} for h in trainer.history],
        "latent": stats,
        "flags": collapse_flags(stats),
        "table1": {k: summary["mean"][k] for k in ("ged", "ged_unbiased", "dice_soft", "dice_match",
                                                     "sample_diversity", "ncc", "empty_fraction")},
        "uncertainty_vs_raters": summary.get("uncertainty_vs_raters"),
    }


def markdown(result: dict) -> str:
    n_images = next(iter(result["variants"].values()))["latent"]["n_images"]
    lines = [f"# Prior collapse on LIDC: which prior parameters the GED term trains ({result['cpu']})", "",
             f"`{result['command']}`; small config, phase 1 only, {result['epochs']} epochs, fold {result['fold']}, "
             f"slices where at least {result['min_raters']} raters drew, "
             f"seed {result['seed']}; statistics on the {n_images} "
             "validation images.", "",
             "| variant | prior mean spread / sigma | sigma median | sigma at clamp | KL total (nats) | rater spread "
             "(prior sigmas) | Spearman(sample div., rater div.) | S_NCC | GED | GED unbiased | Dice_match | flags |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, v in result["variants"].items():
        lat, t1, uv = v["latent"], v["table1"], v["uncertainty_vs_raters"] or {}
        lines.append(f"| {name} | {lat['mean_spread_ratio']:.3g} | {lat['prior_sigma_quantiles']['0.5']:.3g} | "
                     f"{lat['prior_sigma_clamped_share']:.0%} | {lat['kl_total']:.3g} | "
                     f"{lat['rater_spread_in_prior_sigmas']:.3g} | {uv.get('spearman', float('nan')):.3f} "
                     f"(n={uv.get('n_images', 0)}) | {t1['ncc']:.3f} | {t1['ged']:.4f} | {t1['ged_unbiased']:.4f} | "
                     f"{t1['dice_match']:.4f} | {'; '.join(v['flags']) or 'none'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--min-raters", type=int, default=4, help="the protocol (TrainConfig.min_raters)")
    p.add_argument("--variants", default=",".join(map(str, range(len(VARIANTS)))), help="indices into VARIANTS")
    p.add_argument("--runs", default="runs/prior-collapse")
    p.add_argument("--out", default="benchmarks/results/lidc-prior-collapse-small-cpu")
    args = p.parse_args(argv)
    data = load_dataset(args.data)
    out = Path(args.out)
    result = {"command": "python benchmarks/prior_collapse.py " + " ".join(argv or __import__("sys").argv[1:]),
              "cpu": cpu_model(), "torch": torch.__version__, "python": platform.python_version(),
              "epochs": args.epochs, "seed": args.seed, "fold": args.fold, "min_raters": args.min_raters,
              "variants": {}}  # fmt: skip
    previous = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    same = all(previous.get(k) == result[k] for k in ("epochs", "seed", "fold", "min_raters"))
    if same:  # keep the variants measured by an earlier invocation with the same protocol
        result["variants"] = previous["variants"]
        result["command"] = previous["command"] + "; then " + result["command"]
    for name in [list(VARIANTS)[int(i)] for i in args.variants.split(",")]:
        result["variants"][name] = run_variant(name, data, args)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(result))
        print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
