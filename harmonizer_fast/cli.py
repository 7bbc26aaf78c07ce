"""The command line ``harmonizer-fast`` (also ``python -m harmonizer_fast.cli``).

    harmonizer-fast train --data PATH --config small|paper --out DIR [--epochs N] [--max-minutes M]
                          [--phase 1|2|both] [--resume] [--seed S] [--no-harmonizer] [--no-personalizer]
                          [--no-ged-loss] [--format F] [--batch-size B] [--rater-order stored|area] ...
    harmonizer-fast evaluate --checkpoint RUN_DIR_OR_FILE --data PATH --out DIR [--samples K] [--seed S] [--robustness]
    harmonizer-fast sample --checkpoint RUN_DIR_OR_FILE --data PATH --out FILE.npz [--samples K]
    harmonizer-fast demo [--out DIR]
    harmonizer-fast convert SRC OUT.npz [--format F]
    harmonizer-fast profile [--config paper|small] [--batch B] [--samples K] [--size S] [--device cpu|cuda]
                            [--json PATH]
    harmonizer-fast bench [--quick] [--device cpu|cuda] [--out DIR] [--only haar,film,ged,sampling]
    harmonizer-fast info

``--data synthetic`` (or no ``--data``) trains on the embedded synthetic generator. User mistakes (a missing
path, an unknown format, a corrupt PNG, mismatched sizes or rater counts, a truncated or foreign checkpoint)
end with one line on stderr and exit status 2, never a traceback. Distributed: ``torchrun --nproc-per-node 2
-m harmonizer_fast.cli train ...``.
"""

from __future__ import annotations

import argparse
import platform
import sys
from typing import Optional

from .checkpoint import CheckpointError
from .data import DataError

EXIT_USAGE = 2


class UsageError(Exception):
    """A command-line argument the command cannot use (reported in one line, exit status 2)."""


def _data(args: argparse.Namespace):
    from .data import load_dataset, make_synthetic

    if args.data in (None, "synthetic"):
        return make_synthetic(args.synthetic_items, size=64, raters=args.synthetic_raters, seed=args.seed)
    return load_dataset(args.data, format=args.format)


def cmd_train(args: argparse.Namespace) -> int:
    from .model import HarmonizerConfig
    from .train import TrainConfig, Trainer, init_distributed

    init_distributed()
    data = _data(args)
    preset = HarmonizerConfig.paper if args.config == "paper" else HarmonizerConfig.small
    overrides = {}
    if args.no_harmonizer:
        overrides["use_harmonizer"] = False
    if args.no_personalizer:
        overrides["use_personalizer"] = False
    if args.no_ged_loss:
        overrides["use_ged_loss"] = False
    model_config = preset(in_channels=data.in_channels, num_raters=data.num_raters, **overrides)
    phase = args.phase
    if not model_config.use_personalizer and phase == "both":
        phase = "1"  # the baseline has no phase 2
    if not model_config.use_personalizer and phase == "2":
        raise DataError("--phase 2 trains the personalizer, which --no-personalizer removes")
    tc = TrainConfig(phase=phase, seed=args.seed, max_minutes=args.max_minutes, rater_order=args.rater_order,
                     batch_size=args.batch_size, fold=args.fold)  # fmt: skip
    if args.config == "small":
        # The paper's learning rates (1e-4, 5e-5) suit the paper config over 100+ epochs on a GPU; the small
        # config on a CPU budget learns far faster at 3e-3 (synthetic, 12 epochs: validation GED 0.27 and
        # Dice_soft 0.82 at 3e-3, against predictions still empty at 1e-3).
        tc.lr_phase1, tc.lr_phase2 = 3e-3, 1.5e-3
    if args.epochs is not None:
        tc.epochs_phase1 = tc.epochs_phase2 = args.epochs
    if args.epochs2 is not None:
        tc.epochs_phase2 = args.epochs2
    if args.lr is not None:
        tc.lr_phase1, tc.lr_phase2 = args.lr, args.lr / 2
    trainer = Trainer(data, model_config, tc, args.out, progress=not args.no_progress)
    result = trainer.fit(resume=args.resume, init_from=args.init)
    print(f"{result.stopped}: {result.epochs_done} epochs, best validation score {result.best_score}, run in "
          f"{result.run_dir}")  # fmt: skip
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .data import load_dataset, write_npz

    data = load_dataset(args.src, format=args.format)
    write_npz(data, args.out)
    print(f"wrote {args.out}: {len(data)} items, {data.in_channels} channel(s), {data.num_raters} raters, "
          f"{data.images.shape[2]} x {data.images.shape[3]}, {len(data.patients())} patients")  # fmt: skip
    return 0


def _checkpoint_and_data(args: argparse.Namespace):
    """(model, data prepared as in training, indices to use, description) for evaluate and sample."""
    import json
    from pathlib import Path

    import numpy as np

    from .checkpoint import load_model, read_manifest
    from .evaluate import held_out_split

    model, manifest = load_model(args.checkpoint)
    data = _data(args)
    if data.num_raters != model.config.num_raters or data.in_channels != model.config.in_channels:
        raise DataError(f"the data has {data.num_raters} raters and {data.in_channels} channel(s); the checkpoint "
                        f"expects {model.config.num_raters} and {model.config.in_channels}")  # fmt: skip
    mpath, _ = read_manifest(args.checkpoint)
    run_dir = mpath.parent
    state = json.loads((run_dir / "last.json").read_text())["state"] if (run_dir / "last.json").is_file() else {}
    if state.get("n_items") == len(data) and "split" in state:
        prepared, idx = held_out_split(run_dir, data)
        where = f"the {len(idx)} held-out test images of {Path(run_dir)}"
    else:
        prepared, idx = data.padded(2**model.config.downsamplings), np.arange(len(data))
        where = f"all {len(idx)} images of {args.data or 'synthetic'}"
    return model, prepared, idx, where


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import report, run_evaluation

    model, data, idx, where = _checkpoint_and_data(args)
    print(f"evaluating {args.checkpoint} on {where}, K = {args.samples}, seed {args.seed}")
    result = run_evaluation(model, data, idx, args.out, samples=args.samples, seed=args.seed,
                            robustness=args.robustness, label=str(args.checkpoint))  # fmt: skip
    print(report(result))
    print(f"wrote {args.out}/metrics.json, report.md and {len(result.get('figures', []))} figures")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import time

    import torch

    from .sampling import stream_samples

    model, data, idx, where = _checkpoint_and_data(args)
    idx = idx if args.split == "test" else list(range(len(data)))
    t0 = time.perf_counter()
    n_img = stream_samples(model, data, idx, args.out, samples=args.samples, seed=args.seed, batch=args.batch,
                           progress=not args.no_progress)  # fmt: skip
    dt = time.perf_counter() - t0
    print(
        f"wrote {args.out}: {n_img} images x {args.samples} samples (+ personalized heads) in {dt:.1f} s: "
        f"{n_img / dt:.1f} images/s, {n_img * args.samples / dt:.0f} samples/s ({torch.get_num_threads()} threads)"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Synthetic data, the small config, both phases, evaluation and figures; the untrained model beside."""
    import time

    import torch

    from .data import make_synthetic
    from .evaluate import evaluate_model, run_evaluation, table
    from .model import HarmonizerConfig, HarmonizerNet
    from .train import TrainConfig, Trainer

    t0 = time.perf_counter()
    data = make_synthetic(args.items, size=64, raters=4, seed=args.seed)
    cfg = HarmonizerConfig.small(num_raters=4)
    tc = TrainConfig(phase="both", epochs_phase1=args.epochs, epochs_phase2=max(1, args.epochs // 3),
                     lr_phase1=3e-3, lr_phase2=1.5e-3, batch_size=16, val_samples=8, seed=args.seed)  # fmt: skip
    print(f"demo: {len(data)} synthetic images (64 x 64, 4 raters, {len(data.patients())} patients), small config "
          f"({sum(p.numel() for p in HarmonizerNet(cfg).parameters()) / 1e6:.2f} M parameters), "
          f"{tc.epochs_phase1} + {tc.epochs_phase2} epochs")  # fmt: skip
    trainer = Trainer(data, cfg, tc, f"{args.out}/run", progress=not args.no_progress)
    trainer.fit()
    from .checkpoint import load_model

    trained, _ = load_model(f"{args.out}/run")
    prepared = data.padded(32)
    test = trainer.split.test
    torch.manual_seed(args.seed)
    untrained = HarmonizerNet(cfg)
    results = {"untrained": evaluate_model(untrained, prepared, test, samples=16, seed=0)[0].summary()}
    results["trained"] = run_evaluation(trained, prepared, test, f"{args.out}/eval", samples=16, seed=0,
                                        label="demo (trained)")  # fmt: skip
    print(
        f"\nheld-out test patients ({len(test)} images), K = 16 prior samples, personalized heads for dice_each_mean:\n"
    )
    print(table(results))
    print(
        f"figures and metrics in {args.out}/eval; the run (checkpoints, log.jsonl) in {args.out}/run; "
        f"{time.perf_counter() - t0:.0f} s in all"
    )
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    import json

    import torch

    from ._io import write_atomic
    from .profiler import markdown, profile

    if args.batch < 1 or args.samples < 1:
        raise UsageError(f"--batch and --samples: expected at least 1, got {args.batch} and {args.samples}")
    if args.size < 32 or args.size % 32:
        raise UsageError(f"--size: expected a multiple of 32 (the encoder downsamples 5 times), got {args.size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible to torch (a CPU build, or no GPU)")
    result = profile(args.config, batch=args.batch, samples=args.samples, size=args.size, device=args.device)
    print(markdown(result))
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=1) + "\n")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Runs ``benchmarks/report.py`` of the source checkout: the benchmarks compare against peers that are
    test extras and stay out of the installed package (DESIGN.md section 2 keeps them in benchmarks/)."""
    import importlib.util
    from pathlib import Path

    candidates = [Path(__file__).resolve().parent.parent / "benchmarks", Path.cwd() / "benchmarks"]
    script = next((c / "report.py" for c in candidates if (c / "report.py").is_file()), None)
    if script is None:
        raise UsageError("the benchmarks live in a source checkout (benchmarks/report.py), found neither next to "
                         "the package nor in the current directory; run it from a clone of the repository")  # fmt: skip
    spec = importlib.util.spec_from_file_location("harmonizer_fast_bench_report", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(args.bench_args)


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__, format_backend_info

    print(f"harmonizer_fast {__version__}, Python {platform.python_version()}, torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB")
    else:
        print("no CUDA device")
    print(format_backend_info())
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harmonizer-fast", description="The Harmonizer Network for multi-rater "
                                "medical image segmentation (arXiv 2605.08210).")  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train phase 1, phase 2 or both")
    t.add_argument("--data", default=None, help="dataset path (LIDC folder, .pkl, .h5 folder, .npz) or 'synthetic'")
    t.add_argument("--format", default=None, help="force a reader: lidc-folder, lidc-pickle, npc-h5, npz")
    t.add_argument("--config", choices=("small", "paper"), default="small")
    t.add_argument("--out", required=True, help="run directory (checkpoints, log.jsonl)")
    t.add_argument("--epochs", type=int, default=None, help="epochs per phase (paper: 100 and 150)")
    t.add_argument("--epochs2", type=int, default=None, help="epochs of phase 2 when it differs from --epochs")
    t.add_argument("--max-minutes", type=float, default=None, help="stop cleanly after this much training time")
    t.add_argument("--phase", choices=("1", "2", "both"), default="both")
    t.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    t.add_argument("--init", default=None, help="start from the weights of this checkpoint (e.g. for --phase 2)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument(
        "--lr",
        type=float,
        default=None,
        help="phase-1 learning rate (phase 2 uses half); default: "
        "the paper's 1e-4 for --config paper, 3e-3 for --config small",
    )
    t.add_argument("--fold", type=int, default=0, help="test fold of the 4-fold patient split (never trained on)")
    t.add_argument("--rater-order", choices=("stored", "area"), default="stored")
    t.add_argument("--no-harmonizer", action="store_true")
    t.add_argument("--no-personalizer", action="store_true")
    t.add_argument("--no-ged-loss", action="store_true")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--synthetic-items", type=int, default=256)
    t.add_argument("--synthetic-raters", type=int, default=4)
    t.set_defaults(func=cmd_train)
    c = sub.add_parser("convert", help="any supported dataset -> the .npz format")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--format", default=None)
    c.set_defaults(func=cmd_convert)
    e = sub.add_parser("evaluate", help="metrics, analyses and figures of a checkpoint")
    e.add_argument("--checkpoint", required=True, help="run directory (its best checkpoint) or a checkpoint file")
    e.add_argument("--data", default=None)
    e.add_argument("--format", default=None)
    e.add_argument("--out", required=True)
    e.add_argument("--samples", type=int, default=16)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--robustness", action="store_true", help="the noise / blur / gamma protocol of paper Table 5")
    e.add_argument("--synthetic-items", type=int, default=256)
    e.add_argument("--synthetic-raters", type=int, default=4)
    e.set_defaults(func=cmd_evaluate)
    sm = sub.add_parser("sample", help="K samples and the personalized maps of every image, streamed to disk")
    sm.add_argument("--checkpoint", required=True)
    sm.add_argument("--data", default=None)
    sm.add_argument("--format", default=None)
    sm.add_argument("--out", required=True, help="output .npz (samples and heads as float16)")
    sm.add_argument("--samples", type=int, default=16)
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--batch", type=int, default=16)
    sm.add_argument("--split", choices=("all", "test"), default="all")
    sm.add_argument("--no-progress", action="store_true")
    sm.add_argument("--synthetic-items", type=int, default=256)
    sm.add_argument("--synthetic-raters", type=int, default=4)
    sm.set_defaults(func=cmd_sample)
    d = sub.add_parser("demo", help="train and evaluate the small config on synthetic data (a few minutes on a CPU)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--epochs", type=int, default=18, help="phase-1 epochs (phase 2 gets a third)")
    d.add_argument("--items", type=int, default=256)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)
    pr = sub.add_parser("profile", help="parameters, MACs, latency and the paper's budget verdict")
    pr.add_argument("--config", choices=("paper", "small"), default="paper")
    pr.add_argument("--batch", type=int, default=1)
    pr.add_argument("--samples", type=int, default=1)
    pr.add_argument("--size", type=int, default=128, help="image side for this run (the budget is always 128)")
    pr.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    pr.add_argument("--json", default=None)
    pr.set_defaults(func=cmd_profile)
    bn = sub.add_parser("bench", add_help=False, help="run every benchmark and write one report with charts "
                        "(from a source checkout; --help for its options)")  # fmt: skip
    bn.set_defaults(func=cmd_bench)
    i = sub.add_parser("info", help="backends, versions, devices")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)  # bench hands its options (--help included) to benchmarks/report.py
    if args.command == "bench":
        args.bench_args = extra
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    from .train import TrainingError

    try:
        return args.func(args)
    except (UsageError, DataError, CheckpointError, TrainingError, FileNotFoundError, PermissionError) as exc:
        print(f"harmonizer-fast {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"harmonizer-fast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
