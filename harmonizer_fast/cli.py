"""The command line ``harmonizer-fast`` (also ``python -m harmonizer_fast.cli``).

    harmonizer-fast train --data PATH --config small|paper --out DIR [--epochs N] [--max-minutes M]
                          [--phase 1|2|both] [--resume] [--seed S] [--no-harmonizer] [--no-personalizer]
                          [--no-ged-loss] [--format F] [--batch-size B] [--rater-order stored|area] ...
    harmonizer-fast convert SRC OUT.npz [--format F]
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
    if args.epochs is not None:
        tc.epochs_phase1 = tc.epochs_phase2 = args.epochs
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
    t.add_argument("--max-minutes", type=float, default=None, help="stop cleanly after this much training time")
    t.add_argument("--phase", choices=("1", "2", "both"), default="both")
    t.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    t.add_argument("--init", default=None, help="start from the weights of this checkpoint (e.g. for --phase 2)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=None, help="phase-1 learning rate (phase 2 uses half)")
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
    i = sub.add_parser("info", help="backends, versions, devices")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    from .train import TrainingError

    try:
        return args.func(args)
    except (DataError, CheckpointError, TrainingError, FileNotFoundError, PermissionError) as exc:
        print(f"harmonizer-fast {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"harmonizer-fast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
