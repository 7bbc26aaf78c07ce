"""The command line ``harmonizer-fast`` (also ``python -m harmonizer_fast.cli``).

    harmonizer-fast train --data PATH --config small|paper --out DIR [--epochs N] [--max-minutes M]
                          [--phase 1|2|both] [--resume] [--seed S] [--split-seed S] [--no-harmonizer]
                          [--no-personalizer] [--no-ged-loss] [--format F] [--batch-size B]
                          [--rater-order stored|area-asc|area-desc]
                          [--select-phase1 S] [--select-phase2 S] [--phase2-z anneal|sample|mean]
                          [--no-harmonizer-sharing] [--personalizer frequency|dpersona] [--init CHECKPOINT] ...
    harmonizer-fast evaluate --checkpoint RUN_DIR_OR_FILE --data PATH --out DIR [--num-samples K] [--seed S]
                             [--split test|all] [--robustness]
    harmonizer-fast sample --checkpoint RUN_DIR_OR_FILE --data PATH --out FILE.npz [--num-samples K] [--split test|all]
                           [--device auto|cpu|cuda[:i]]
    harmonizer-fast predict -i FILE_OR_FOLDER -o OUT_DIR -m lidc-small|RUN_DIR_OR_FILE [-k K] [--device D]
                            [--num-parts N --part-id I] [--overwrite] [--report] [--window LOW HIGH] ...
    harmonizer-fast export --checkpoint RUN_DIR_OR_FILE --format onnx|pt2 --out FILE [--num-samples K]
                           [--heads auto|personalized|identity|none] [--size H W]
    harmonizer-fast compare --data PATH --out DIR [--variants full,probunet,dpersona,per-rater,...] [--folds 0,1,2]
                            [--seeds 0] [--epochs1 30 --epochs2 20 | --minutes1 M --minutes2 M] [--min-raters N]
                            [--robustness] [--reuse UNIT=RUN ...] [--scores DIR] [--report-dir DIR] [--stem NAME]
    harmonizer-fast compare --render RESULT.json
    harmonizer-fast demo [--out DIR]
    harmonizer-fast convert SRC OUT.npz [--format F]
    harmonizer-fast profile [--config paper|small] [--batch B] [--num-samples K] [--size S] [--device cpu|cuda]
                            [--json PATH]
    harmonizer-fast bench [--quick] [--device cpu|cuda] [--out DIR] [--only haar,haar3d,film,ged,...]
    harmonizer-fast info

``--data synthetic`` (or no ``--data``) trains on the embedded synthetic generator. User mistakes (a missing
path, an unknown format, a corrupt PNG or npz, mismatched sizes or rater counts, a truncated or foreign
checkpoint, an output path that cannot be written, a numeric flag out of range) end with one line on stderr
and exit status 2, never a traceback; numeric flags are checked when the command line is parsed, output paths
before any work starts. An unexpected failure (a bug) also prints one line and exits 1; set
``HARMONIZER_FAST_DEBUG=1`` for its traceback. Distributed: ``torchrun --nproc-per-node 2 -m
harmonizer_fast.cli train ...`` (or ``predict``, which shards its cases over the ranks). ``predict`` exits 3
when it finished but some cases failed (their rows in summary.csv say why).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
from typing import Callable, NoReturn, Optional

from ._extras import MissingExtraError
from ._io import OutputPathError, check_output_dir, check_output_file
from ._version import __version__
from .checkpoint import CheckpointError
from .data import DataError
from .data.dataset import RATER_ORDERS
from .model.config import PERSONALIZERS
from .model.dpersona import BANK as DPERSONA_BANK
from .selection import DEFAULTS, PHASE_SCORES
from .train import PHASE2_Z

EXIT_USAGE = 2
EXIT_INTERNAL = 1
EXIT_FAILED = 1  # a valid command that failed on its way (a diverged training run)
EXIT_CASES_FAILED = 3  # predict finished, but some cases failed (their rows in summary.csv say why)


class UsageError(Exception):
    """A command-line argument the command cannot use (reported in one line, exit status 2)."""


# One example per subcommand, printed at the end of its --help.
EXAMPLES = {
    "train": "harmonizer-fast train --data ../shared/data/lidc --config small --out runs/lidc --epochs 20",
    "convert": "harmonizer-fast convert ../shared/data/lidc lidc.npz",
    "evaluate": "harmonizer-fast evaluate --checkpoint runs/lidc --data ../shared/data/lidc --out eval/lidc",
    "predict": "harmonizer-fast predict -i scans/ -o predictions/ --model lidc-small --report",
    "sample": "harmonizer-fast sample --checkpoint runs/lidc --data ../shared/data/lidc --out samples.npz -k 16",
    "compare": "harmonizer-fast compare --data ../shared/data/lidc --out runs/cmp --folds 0,1,2 --min-raters 4",
    "export": "harmonizer-fast export --checkpoint runs/lidc --format onnx --out lidc.onnx --num-samples 16",
    "demo": "harmonizer-fast demo --out runs/demo",
    "profile": "harmonizer-fast profile --config paper --json profile.json",
    "bench": "harmonizer-fast bench --quick --only haar,ged",
    "info": "harmonizer-fast info",
}


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: one line on stderr, exit status 2 (no usage block).

    A subcommand's parser (prog "harmonizer-fast NAME") ends its --help with NAME's line of :data:`EXAMPLES`.
    """

    def __init__(self, *args, **kwargs) -> None:
        example = EXAMPLES.get(str(kwargs.get("prog", "")).split(" ")[-1])
        if example is not None:
            kwargs.update(epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {v}")
        return v

    return parse


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An integer in [low, high] (the bound is in the message)."""

    def parse(text: str) -> int:
        v = int_at_least(low)(text)
        if v > high:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}], got {v}")
        return v

    return parse


def finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return v


def seed(text: str) -> int:
    v = int_at_least(0)(text)
    if v >= 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {v}")
    return v


def image_size(text: str) -> int:
    from .model import HarmonizerConfig

    m = HarmonizerConfig().size_multiple  # the same for every preset: five halvings
    v = int_at_least(m)(text)
    if v % m:
        raise argparse.ArgumentTypeError(f"expected a multiple of {m} (the network's size multiple), got {v}")
    return v


def _inputs(args: argparse.Namespace) -> list:
    """What the command reads (--data, a checkpoint's manifest and the files it names, convert's SRC, --init):
    no output may be one of them or lie inside one (_io.check_not_input)."""
    from .checkpoint import read_manifest

    paths = [getattr(args, "src", None), getattr(args, "init", None)]
    data = getattr(args, "data", None)
    paths.append(None if data in (None, "synthetic") else data)
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint is not None and os.path.exists(checkpoint):
        manifest_path, manifest = read_manifest(checkpoint)
        files = manifest.get("files", {}) if isinstance(manifest.get("files"), dict) else {}
        paths += [manifest_path, *(manifest_path.parent / str(f) for f in files.values())]
    return paths


def _data(args: argparse.Namespace):
    from .data import load_dataset, make_synthetic

    if args.data in (None, "synthetic"):
        return make_synthetic(args.synthetic_items, size=64, raters=args.synthetic_raters, seed=args.seed)
    return load_dataset(args.data, format=args.format)


def _model_config(args: argparse.Namespace, data):
    from .model import HarmonizerConfig

    preset = HarmonizerConfig.paper if args.config == "paper" else HarmonizerConfig.small
    switches = (("no_harmonizer", "use_harmonizer"), ("no_personalizer", "use_personalizer"),
                ("no_ged_loss", "use_ged_loss"))  # fmt: skip
    overrides = {field: False for flag, field in switches if getattr(args, flag)}
    if args.no_harmonizer_sharing:
        overrides["harmonizer_shared"] = False
    if args.personalizer == "dpersona":
        overrides.update(personalizer="dpersona", prior_bank=DPERSONA_BANK)
    return preset(in_channels=data.in_channels, num_raters=data.num_raters, **overrides)


def _train_config(args: argparse.Namespace, model_config):
    from .train import TrainConfig

    phase = args.phase
    if not model_config.use_personalizer and phase == "both":
        phase = "1"  # the baseline has no phase 2
    kw = dict(phase=phase, seed=args.seed, split_seed=args.split_seed, max_minutes=args.max_minutes,
              rater_order=args.rater_order, batch_size=args.batch_size, fold=args.fold,
              select_phase1=args.select_phase1, select_phase2=args.select_phase2, phase2_z=args.phase2_z,
              min_raters=args.min_raters)  # fmt: skip
    if args.epochs is not None:
        kw.update(epochs_phase1=args.epochs, epochs_phase2=args.epochs)
    if args.epochs2 is not None:
        kw["epochs_phase2"] = args.epochs2
    if args.lr is not None:
        kw["lr_phase1"] = args.lr
    if args.lr2 is not None:
        kw["lr_phase2"] = args.lr2
    if args.lr_prior is not None:
        kw["lr_prior"] = args.lr_prior
    return TrainConfig.for_model(model_config, **kw)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import Trainer, init_distributed

    check_output_dir(args.out, "--out", _inputs(args))
    if args.phase == "2" and args.no_personalizer:
        raise UsageError("--phase 2 trains the personalizer, which --no-personalizer removes")
    if args.phase == "2" and args.init is None and not args.resume:
        raise UsageError("--phase 2 trains the personalizer of a trained phase-1 model: pass --init CHECKPOINT "
                         "(a phase-1 run directory or manifest of the same --config)")  # fmt: skip
    init_distributed()
    data = _data(args)
    model_config = _model_config(args, data)
    trainer = Trainer(data, model_config, _train_config(args, model_config), args.out, progress=not args.no_progress)
    result = trainer.fit(resume=args.resume, init_from=args.init)
    print(f"{result.stopped}: {result.epochs_done} epochs, best validation score {result.best_score}, run in "
          f"{result.run_dir}")  # fmt: skip
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .data import load_dataset, write_npz

    check_output_file(args.out, "OUT", _inputs(args))
    data = load_dataset(args.src, format=args.format)
    write_npz(data, args.out)
    print(f"wrote {args.out}: {len(data)} items, {data.in_channels} channel(s), {data.num_raters} raters, "
          f"{data.images.shape[2]} x {data.images.shape[3]}, {len(data.patients())} patients")  # fmt: skip
    return 0


def _scoring(args: argparse.Namespace):
    """(model, the images to score) for evaluate and sample: the run's held-out patients only on its data."""
    from .checkpoint import load_model, read_manifest
    from .rundir import RunDir

    device = _device(args.device)
    model, _ = load_model(args.checkpoint, map_location=device)
    data = _data(args)
    if data.num_raters != model.config.num_raters or data.in_channels != model.config.in_channels:
        raise DataError(f"the data has {data.num_raters} raters and {data.in_channels} channel(s); the checkpoint "
                        f"expects {model.config.num_raters} and {model.config.in_channels}")  # fmt: skip
    manifest_path, _ = read_manifest(args.checkpoint)
    scoring = RunDir(manifest_path.parent).scoring_set(data, model.config, args.split)
    if args.min_raters > model.config.num_raters:
        raise UsageError(f"--min-raters {args.min_raters}: the model has {model.config.num_raters} raters")
    from ._alloc import check_fits

    h, w = (-(-n // model.config.size_multiple) * model.config.size_multiple for n in data.images.shape[2:])
    try:  # one image's K maps and a temporary of their size, before any is allocated
        check_fits(2 * 4 * args.num_samples * h * w, f"--num-samples {args.num_samples} at {h} x {w}")
    except ValueError as exc:
        raise UsageError(f"{exc}: lower --num-samples") from None
    return model, scoring.restricted(args.min_raters)


def _device(text: str):
    """--device as a torch.device, or the one-line usage error."""
    from .predict import resolve_device

    try:
        return resolve_device(text)
    except ValueError as exc:
        raise UsageError(f"--{exc}") from None


def cmd_predict(args: argparse.Namespace) -> int:
    import time

    from ._alloc import keep_freed_memory
    from .predict import CaseError, Predictor
    from .preprocessing import Preprocessing

    keep_freed_memory()
    check_output_dir(args.output, "-o/--output", [args.input])
    if not os.path.exists(args.input):
        raise UsageError(f"-i/--input: {args.input}: no such file or directory")
    if args.part_id >= args.num_parts:
        raise UsageError(f"--part-id: expected an integer in [0, --num-parts={args.num_parts}), got {args.part_id}")
    device = _device(args.device)
    try:
        window = Preprocessing.ct_window(*args.window) if args.window is not None else None
    except ValueError as exc:
        raise UsageError(f"--window: {exc}") from None
    try:
        predictor = Predictor(args.model, num_samples=args.num_samples, seed=args.seed, device=device,
                              batch_size=args.batch, heads=args.heads, preprocessing=window)  # fmt: skip
    except CheckpointError as exc:
        raise UsageError(f"--model {args.model}: {exc}") from None
    except ValueError as exc:  # the messages name the argument (heads, device, ...)
        raise UsageError(str(exc)) from None
    t0 = time.perf_counter()
    try:
        record = predictor.run(args.input, args.output, overwrite=args.overwrite, num_parts=args.num_parts,
                               part_id=args.part_id, save_samples=args.save_samples, slice_axis=args.slice_axis,
                               report=args.report, progress=not args.no_progress)  # fmt: skip
    except CaseError as exc:
        raise UsageError(str(exc)) from None
    c = record["this_part"]
    dt = time.perf_counter() - t0
    print(f"{c['done']} case(s) predicted, {c['skipped']} already done, {c['failed']} failed in {dt:.1f} s "
          f"({c['done'] / dt:.2f} cases/s on {record['device']}, K = {record['num_samples']}, heads "
          f"{record['heads']}); {args.output}/summary.csv")  # fmt: skip
    if c["failed"]:
        print(f"harmonizer-fast predict: {c['failed']} case(s) failed; their errors are in "
              f"{args.output}/summary.csv", file=sys.stderr)  # fmt: skip
        return EXIT_CASES_FAILED
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ._alloc import keep_freed_memory
    from .evaluate import report, run_evaluation

    keep_freed_memory()
    check_output_dir(args.out, "--out", _inputs(args))
    model, scoring = _scoring(args)
    print(f"evaluating {args.checkpoint} on {scoring.description}, K = {args.num_samples}, seed {args.seed}")
    result = run_evaluation(model, scoring.data, scoring.indices, args.out, num_samples=args.num_samples,
                            seed=args.seed, robustness=args.robustness, label=str(args.checkpoint),
                            scored=scoring.description)  # fmt: skip
    for w in result["warnings"]:  # first, before any number
        print(f"warning: {w}")
    print(report(result))
    print(f"wrote {args.out}/metrics.json, report.md and {len(result.get('figures', []))} figures")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import time

    import torch

    from ._alloc import keep_freed_memory
    from .sampling import stream_samples

    keep_freed_memory()
    check_output_file(args.out, "--out", _inputs(args))
    model, scoring = _scoring(args)
    print(f"sampling {scoring.description}")
    t0 = time.perf_counter()
    n_img = stream_samples(model, scoring.data, scoring.indices, args.out, num_samples=args.num_samples, seed=args.seed,
                           batch=args.batch, progress=not args.no_progress)  # fmt: skip
    dt = time.perf_counter() - t0
    heads = "+ personalized heads" if model.personalizer_trained else "no heads: the personalizer is untrained"
    print(
        f"wrote {args.out}: {n_img} images x {args.num_samples} samples ({heads}) in {dt:.1f} s: "
        f"{n_img / dt:.1f} images/s, {n_img * args.num_samples / dt:.0f} samples/s ({torch.get_num_threads()} threads)"
    )
    return 0


def int_list(low: int, high: Optional[int] = None) -> Callable[[str], list[int]]:
    """A comma-separated list of distinct integers in [low, high)."""

    def parse(text: str) -> list[int]:
        try:
            vals = [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        bad = [v for v in vals if v < low or (high is not None and v >= high)]
        if not vals or bad or len(set(vals)) != len(vals):
            span = f">= {low}" if high is None else f"in [{low}, {high})"
            raise argparse.ArgumentTypeError(f"expected distinct comma-separated integers {span}, got {text!r}")
        return vals

    return parse


def variant_list(text: str) -> list[str]:
    from .compare import VARIANTS

    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated names from {','.join(VARIANTS)}, "
                                         f"got {text!r}")  # fmt: skip
    return names


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import CompareConfig, EarlierResultError, render, run_compare

    if args.render is not None:
        try:
            print(f"wrote {render(args.render)}")
        except EarlierResultError as exc:
            raise UsageError(f"--render: {exc}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # not JSON, or not a comparison's
            raise UsageError(f"--render {args.render}: not a comparison result JSON ({type(exc).__name__}: "
                             f"{exc})") from None  # fmt: skip
        return 0
    if args.out is None:
        raise UsageError("--out DIR is required (or --render RESULT.json)")
    check_output_dir(args.out, "--out", _inputs(args))
    reuse = {}
    for item in args.reuse:
        unit, eq, run = item.partition("=")
        if not eq or not unit or not run or unit in reuse:
            raise UsageError(f"--reuse: expected distinct UNIT=RUN_DIR items, got {item!r}")
        reuse[unit] = run
    if not args.stem or any(c in args.stem for c in "/\\") or args.stem.startswith("."):
        raise UsageError(f"--stem: expected a file name stem without path separators, got {args.stem!r}")
    if args.report_dir is not None:
        check_output_dir(args.report_dir, "--report-dir")
    if args.scores is not None:
        check_output_dir(args.scores, "--scores", _inputs(args))
    try:
        cc = CompareConfig(variants=args.variants, folds=args.folds, seeds=args.seeds, minutes1=args.minutes1,
                           minutes2=args.minutes2, epochs1=args.epochs1, epochs2=args.epochs2, preset=args.config,
                           samples=args.num_samples, batch_size=args.batch_size, rater_order=args.rater_order,
                           min_raters=args.min_raters, dpersona_lr2=args.dpersona_lr2,
                           robustness=args.robustness)  # fmt: skip
        data = _data(args)
        result = run_compare(data, args.out, cc, data_label=args.data or "synthetic", report_dir=args.report_dir,
                             stem=args.stem, reuse=reuse, scores=args.scores,
                             log=lambda line: print(line, flush=True))  # fmt: skip
    except ValueError as exc:  # a plan that does not fit the options or the directory, a run not reusable
        raise UsageError(str(exc)) from None
    target = args.report_dir or args.out
    print(f"wrote {target}/{args.stem}.json and {args.stem}.md ({len(result['variants'])} variants)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import markdown, run_demo

    check_output_dir(args.out, "--out")
    result = run_demo(args.out, epochs=args.epochs, items=args.items, seed=args.seed, progress=not args.no_progress)
    print("\n" + markdown(result))
    print(f"tables in {args.out}/demo.md and demo.json, figures and metrics in {args.out}/eval, the run "
          f"(checkpoints, log.jsonl) in {args.out}/run; {result['seconds']:.0f} s in all")  # fmt: skip
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    import json

    import torch

    from ._io import write_atomic
    from .profiler import markdown, profile

    if args.json:
        check_output_file(args.json, "--json")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible to torch (a CPU build, or no GPU)")
    result = profile(args.config, batch=args.batch, num_samples=args.num_samples, size=args.size, device=args.device)
    print(markdown(result))
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=1) + "\n")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Runs ``benchmarks/report.py`` of the source checkout: the benchmarks compare against peers that are
    test extras and stay out of the installed package (docs/architecture.md, "Layout" keeps them in benchmarks/)."""
    import importlib.util
    from pathlib import Path

    candidates = [Path(__file__).resolve().parent.parent / "benchmarks", Path.cwd() / "benchmarks"]
    script = next((c / "report.py" for c in candidates if (c / "report.py").is_file()), None)
    if script is None and {"-h", "--help"} & set(args.bench_args):
        print(f"usage: harmonizer-fast bench [--quick] [--device cpu|cuda] [--out DIR] [--only OPS] [--isa ISA]\n\n"
              f"Runs every benchmark of a source checkout (benchmarks/report.py) and writes one report with charts;\n"
              f"its --help there lists every option.\n\nexample:\n  {EXAMPLES['bench']}")  # fmt: skip
        return 0
    if script is None:
        raise UsageError("the benchmarks live in a source checkout (benchmarks/report.py), found neither next to "
                         "the package nor in the current directory; run it from a clone of the repository")  # fmt: skip
    spec = importlib.util.spec_from_file_location("harmonizer_fast_bench_report", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.main(args.bench_args)
    except SystemExit as exc:  # its argparse (--help, a bad option) ends this way
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


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


def cmd_export(args: argparse.Namespace) -> int:
    from .export import ExportError, export_checkpoint

    check_output_file(args.out, "--out", _inputs(args))
    check_output_file(f"{args.out}.json", "--out", _inputs(args))  # its metadata beside it
    print(f"exporting {args.checkpoint} as {args.format}: K = {args.num_samples}, heads {args.heads}, traced at "
          f"{args.size[0]} x {args.size[1]} (batch, H and W stay dynamic)")  # fmt: skip
    try:
        meta = export_checkpoint(args.checkpoint, args.out, args.format, num_samples=args.num_samples, heads=args.heads,
                                 size=tuple(args.size))  # fmt: skip
    except ExportError as exc:
        raise UsageError(str(exc)) from None
    print(f"wrote {args.out} ({meta['bytes'] / 2**20:.1f} MiB; heads: {meta['heads']}; inputs: "
          f"{', '.join(meta['inputs'])}) and {args.out}.json")  # fmt: skip
    return 0


def _data_options() -> argparse.ArgumentParser:
    """--data and its companions, shared by train, evaluate and sample."""
    g = argparse.ArgumentParser(add_help=False)
    g.add_argument("--data", default=None, help="dataset path (LIDC folder, .pkl, .h5 folder, .npz) or 'synthetic'")
    g.add_argument("--format", default=None, help="force a reader: lidc-folder, lidc-pickle, npc-h5, npz")
    g.add_argument("--synthetic-items", type=int_at_least(5), default=256, help="images of --data synthetic")
    g.add_argument("--synthetic-raters", type=int_at_least(1), default=4, help="raters of --data synthetic")
    return g


def _inference_options() -> argparse.ArgumentParser:
    """--checkpoint, --num-samples and --seed, shared by evaluate and sample."""
    g = argparse.ArgumentParser(add_help=False)
    g.add_argument("--checkpoint", required=True, help="run directory (its best checkpoint) or a checkpoint manifest")
    g.add_argument("-k", "--num-samples", "--samples", dest="num_samples", type=int_at_least(1), default=16,
                   help="prior samples K per image (--samples: its old name)")
    g.add_argument("--seed", type=seed, default=0)
    g.add_argument("--device", default="auto", help="auto (CUDA when torch sees one), cpu, cuda or cuda:<index>")
    g.add_argument("--split", choices=("test", "all"), default="test",
                   help="test: the run's held-out test patients when --data is the run's dataset (all images of "
                   "any other dataset); all: every image, the run's training patients included")  # fmt: skip
    g.add_argument("--min-raters", type=int_at_least(0), default=0,
                   help="score only images where at least this many raters drew (LIDC: 4 is the paper's protocol)")
    return g


def _add_train(sub, data: argparse.ArgumentParser) -> None:
    t = sub.add_parser("train", parents=[data], help="train phase 1, phase 2 or both")
    t.add_argument("--config", choices=("small", "paper"), default="small")
    t.add_argument("--out", required=True, help="run directory (checkpoints, log.jsonl)")
    t.add_argument("--epochs", type=int_at_least(1), default=None, help="epochs per phase (paper: 100 and 150)")
    t.add_argument("--epochs2", type=int_at_least(1), default=None, help="epochs of phase 2 when it differs")
    t.add_argument("--max-minutes", type=positive_float, default=None, help="stop cleanly after this much time")
    t.add_argument("--phase", choices=("1", "2", "both"), default="both")
    t.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    t.add_argument("--init", default=None, help="start from the weights of this checkpoint (e.g. for --phase 2)")
    t.add_argument("--seed", type=seed, default=0)
    t.add_argument("--split-seed", type=seed, default=None,
                   help="seed of the patient partition (default: --seed); `compare` keeps 0 for every seed, so "
                   "--seed S --split-seed 0 trains the unit `--reuse` takes for its seed S")  # fmt: skip
    t.add_argument("--batch-size", type=int_at_least(1), default=16)
    t.add_argument("--lr", type=positive_float, default=None, help="phase-1 learning rate (default: the config's "
                   "preset, 1e-4 for --config paper as in the paper, 3e-3 for --config small)")  # fmt: skip
    t.add_argument("--lr2", type=positive_float, default=None, help="phase-2 learning rate (default: the config's "
                   "preset, 5e-5 for --config paper as in the paper, 1e-2 for --config small)")  # fmt: skip
    t.add_argument("--lr-prior", type=positive_float, default=None, help="phase-1 learning rate of the prior net "
                   "(default: the config's preset, --lr for --config paper, 3e-4 for --config small)")  # fmt: skip
    t.add_argument("--fold", type=int, choices=range(4), default=0, metavar="{0..3}",
                   help="test fold of the 4-fold patient split (never trained on)")  # fmt: skip
    t.add_argument("--rater-order", choices=RATER_ORDERS, default="stored",
                   help="raters as the reader gives them (LIDC readers: by area, smallest first) or re-ordered "
                   "per image by area")  # fmt: skip
    t.add_argument("--min-raters", type=int_at_least(0), default=0,
                   help="train, select and test on items where at least this many raters drew (0: all; LIDC: 4 is "
                   "the closest to the paper's slices); the patient split is made before the filter")  # fmt: skip
    t.add_argument("--select-phase1", choices=PHASE_SCORES[1], default=DEFAULTS[1],
                   help="validation score that picks best_phase1 (see harmonizer_fast.selection)")  # fmt: skip
    t.add_argument("--select-phase2", choices=PHASE_SCORES[2], default=DEFAULTS[2],
                   help="validation score that picks the personalizer of best")  # fmt: skip
    t.add_argument("--phase2-z", choices=PHASE2_Z, default=PHASE2_Z[0],
                   help="phase 2's prior latent z: noise annealed to the mean (default), the paper's sample, or the "
                   "mean (see TrainConfig.phase2_z)")  # fmt: skip
    t.add_argument("--no-harmonizer", action="store_true")
    t.add_argument("--no-personalizer", action="store_true")
    t.add_argument("--no-ged-loss", action="store_true")
    t.add_argument("--no-harmonizer-sharing", action="store_true",
                   help="each decoder layer gets its own harmonizer tokens and first MLP layer")
    t.add_argument("--personalizer", choices=PERSONALIZERS, default=PERSONALIZERS[0],
                   help="phase-2 heads: the paper's frequency prompts, or D-Persona's projection heads "
                   f"(with D-Persona's bank of {DPERSONA_BANK} prior samples)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)


def _add_predict(sub) -> None:
    from .model.net import HEADS

    pd = sub.add_parser("predict", help="run a trained or bundled model on PNG/TIFF/JPEG, NumPy, NIfTI or DICOM "
                        "inputs: rater masks, probability and uncertainty maps in the input's geometry")  # fmt: skip
    pd.add_argument("-i", "--input", required=True, help="a file, or a folder of files (nnU-Net channel naming "
                    "NAME_0000, NAME_0001 for several channels) and DICOM series folders")  # fmt: skip
    pd.add_argument("-o", "--output", required=True, help="output folder (one folder per case, summary.csv, "
                    "predict.json)")  # fmt: skip
    pd.add_argument("-m", "--model", required=True, help="a bundled model name (lidc-small), a run directory or a "
                    "checkpoint manifest")  # fmt: skip
    pd.add_argument("-k", "--num-samples", "--samples", dest="num_samples", type=int_in(1, 4096), default=16,
                    help="prior samples K per slice")  # fmt: skip
    pd.add_argument("--seed", type=seed, default=0)
    pd.add_argument("--device", default="auto", help="auto (CUDA when torch sees one), cpu, cuda or cuda:<index>")
    pd.add_argument("--batch", type=int_in(1, 4096), default=16,
                    help="slices of up to 128 x 128 per forward pass (fewer of larger slices)")
    pd.add_argument("--heads", choices=HEADS, default="auto",
                    help="rater heads: auto (personalized when phase 2 trained them, else none)")  # fmt: skip
    pd.add_argument("--num-parts", type=int_in(1, 1 << 20), default=1, help="split the cases into this many parts")
    pd.add_argument("--part-id", type=int_in(0, 1 << 20), default=0, help="the part this process runs")
    pd.add_argument("--overwrite", action="store_true", help="redo cases whose outputs exist (default: skip them)")
    pd.add_argument("--save-samples", action="store_true", help="also write the K samples (samples.npy, float16)")
    pd.add_argument("--slice-axis", type=int, choices=(0, 1, 2), default=None,
                    help="voxel axis to slice volumes along (default: the head-foot axis of the NIfTI affine)")
    pd.add_argument("--window", type=finite_float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                    help="intensity window instead of the model's recorded normalisation (CT: e.g. -1350 150)")
    pd.add_argument("--report", action="store_true", help="also write report.html, the least certain cases first")
    pd.add_argument("--no-progress", action="store_true")
    pd.set_defaults(func=cmd_predict)


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="harmonizer-fast", description="The Harmonizer Network for multi-rater medical image "
               "segmentation (arXiv 2605.08210).")  # fmt: skip
    p.add_argument("--version", action="version", version=f"harmonizer-fast {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    data, inference = _data_options(), _inference_options()
    _add_train(sub, data)
    c = sub.add_parser("convert", help="any supported dataset -> the .npz format")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--format", default=None)
    c.set_defaults(func=cmd_convert)
    e = sub.add_parser("evaluate", parents=[inference, data], help="metrics, analyses and figures of a checkpoint")
    e.add_argument("--out", required=True, help="folder for metrics.json, report.md and the figures")
    e.add_argument("--robustness", action="store_true", help="the noise / blur / gamma protocol of paper Table 5")
    e.set_defaults(func=cmd_evaluate)
    sm = sub.add_parser("sample", parents=[inference, data], help="K samples and the personalized maps of every "
                        "image, streamed to disk")  # fmt: skip
    sm.add_argument("--out", required=True, help="output .npz (samples and heads as float16)")
    sm.add_argument("--batch", type=int_at_least(1), default=16)
    sm.add_argument("--no-progress", action="store_true")
    sm.set_defaults(func=cmd_sample)
    _add_predict(sub)
    from .compare.runner import DPERSONA_LR2
    from .compare.variants import VARIANTS

    cp = sub.add_parser("compare", parents=[data], help="variants x folds x seeds at equal epochs: Tables 1-2, "
                        "GED against K, paired tests over patients (resumable)")  # fmt: skip
    cp.add_argument("--out", default=None, help="comparison directory (runs, evaluations; continued when it exists)")
    cp.add_argument("--variants", type=variant_list, default=None,
                    help=f"comma-separated, from {','.join(VARIANTS)} (default: all; with --minutes1/2 all but "
                         "per-rater; 'full' is always included)")
    cp.add_argument("--folds", type=int_list(0, 4), default=[0], help="test folds of 4, comma-separated")
    cp.add_argument("--seeds", type=int_list(0), default=[0], help="training seeds, comma-separated")
    cp.add_argument("--epochs1", type=int_at_least(1), default=30,
                    help="epochs of every phase-1 training and of the per-rater baseline (default 30)")
    cp.add_argument("--epochs2", type=int_at_least(1), default=20, help="epochs of every phase-2 training (default 20)")
    cp.add_argument("--minutes1", type=positive_float, default=None,
                    help="instead of equal epochs, a budget of compute minutes for every phase-1 run (the epochs "
                         "become caps)")  # fmt: skip
    cp.add_argument("--minutes2", type=positive_float, default=None, help="the same for every phase-2 run")
    cp.add_argument("--min-raters", type=int_at_least(0), default=0,
                    help="train and score only images where at least N raters drew (LIDC's all-raters protocol: 4)")
    cp.add_argument("--dpersona-lr2", type=positive_float, default=DPERSONA_LR2,
                    help=f"D-Persona's heads' learning rate (default {DPERSONA_LR2:g}, chosen on LIDC validation)")
    cp.add_argument("--robustness", action="store_true",
                    help="Table 1 also on the test images with noise, blur and a gamma curve, the harmonizer's "
                         "orderings tested under each")  # fmt: skip
    cp.add_argument("--reuse", nargs="+", default=[], metavar="UNIT=RUN",
                    help="take a training done outside the comparison for one of its units (p1-full-f0-s0, "
                         "p2-dpersona-f0-s0, per-rater-f0-s0, ...) after checking it is that training")  # fmt: skip
    cp.add_argument("--scores", default=None, metavar="DIR",
                    help="keep each unit's scores here instead of in --out/evals: a directory to commit, from which "
                         "the comparison continues on another machine, training only what has no score yet")
    cp.add_argument("--config", choices=("small", "paper"), default="small")
    cp.add_argument("-k", "--num-samples", "--samples", dest="num_samples", type=int_at_least(1), default=16,
                    help="prior samples K per test image (--samples: its old name)")
    cp.add_argument("--batch-size", type=int_at_least(1), default=16)
    cp.add_argument("--rater-order", choices=RATER_ORDERS, default="stored")
    cp.add_argument("--report-dir", default=None, help="where the report goes (default: --out)")
    cp.add_argument("--stem", default="compare", help="file name stem of the report")
    cp.add_argument("--render", default=None, metavar="RESULT.json",
                    help="only rewrite the markdown next to an aggregated result JSON")  # fmt: skip
    cp.set_defaults(func=cmd_compare, seed=0)  # seed: of --data synthetic, the same data for every training seed

    from .export import FORMATS, HEADS

    ex = sub.add_parser("export", help="the inference model (K samples and the rater heads, noise as inputs) as ONNX "
                        "or a torch.export .pt2, with no custom op left")  # fmt: skip
    ex.add_argument("--checkpoint", required=True, help="run directory (its best checkpoint) or a checkpoint manifest")
    ex.add_argument("--format", choices=FORMATS, required=True)
    ex.add_argument("--out", required=True, help="output file; its metadata goes to OUT.json")
    ex.add_argument("-k", "--num-samples", "--samples", dest="num_samples", type=int_at_least(1), default=16,
                    help="prior samples K (fixed in the export; --samples: its old name)")
    ex.add_argument("--heads", choices=HEADS, default="auto",
                    help="rater heads: auto (personalized when phase 2 trained them, else none), personalized, "
                    "identity (the prior mean for every rater) or none")  # fmt: skip
    ex.add_argument("--size", type=image_size, nargs=2, default=[128, 128], metavar=("H", "W"),
                    help="image size to trace at (the exported program takes any multiple of 32 from 64)")  # fmt: skip
    ex.set_defaults(func=cmd_export)

    d = sub.add_parser("demo", help="train and evaluate the small config on synthetic data (a few minutes on a CPU)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--epochs", type=int_at_least(1), default=24, help="epochs of each phase")
    d.add_argument("--items", type=int_at_least(16), default=256)
    d.add_argument("--seed", type=seed, default=0)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)
    pr = sub.add_parser("profile", help="parameters, MACs, latency and the paper's budget verdict")
    pr.add_argument("--config", choices=("paper", "small"), default="paper")
    pr.add_argument("--batch", type=int_at_least(1), default=1)
    pr.add_argument("-k", "--num-samples", "--samples", dest="num_samples", type=int_at_least(1), default=1,
                    help="prior samples K per image (--samples: its old name)")
    pr.add_argument("--size", type=image_size, default=128, help="image side for this run (the budget is always 128)")
    pr.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    pr.add_argument("--json", default=None)
    pr.set_defaults(func=cmd_profile)
    bn = sub.add_parser("bench", add_help=False, help="run every benchmark and write one report with charts "
                        "(from a source checkout; --help for its options)")  # fmt: skip
    bn.set_defaults(func=cmd_bench)
    i = sub.add_parser("info", help="backends, versions, devices")
    i.set_defaults(func=cmd_info)
    return p


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return text


def main(argv: Optional[list[str]] = None) -> int:
    """The command line; returns the exit status. A process that joined a torchrun process group (``train``,
    ``predict``) leaves it and ends here, streams flushed, without the interpreter's finalization: gloo's
    worker threads abort that now and then (SIGABRT, "terminate called without an active exception", about
    1 run in 40 of two CPU ranks on torch 2.13) after every output is written and the group destroyed, and
    torchrun would report the rank as failed."""
    from .distributed import close_distributed

    rc = _run(argv)
    if close_distributed():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _run(argv: Optional[list[str]]) -> int:
    p = parser()
    try:  # argparse ends with SystemExit (--help: 0, a bad flag: 2, printed in one line by Parser.error)
        args, extra = p.parse_known_args(argv)  # bench hands its options (--help included) to benchmarks/report.py
        if args.command != "bench" and extra:
            p.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    args.bench_args = extra
    from ._alloc import InsufficientMemoryError
    from ._backend import BackendUnavailableError
    from .train import DivergedError, TrainingError

    expected = (UsageError, DataError, CheckpointError, TrainingError, OutputPathError, BackendUnavailableError,
                MissingExtraError, InsufficientMemoryError, OSError)  # fmt: skip
    try:
        return args.func(args)
    except DivergedError as exc:  # not a usage error: the run was valid and failed (exit 1, one line)
        print(f"harmonizer-fast {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except expected as exc:
        print(f"harmonizer-fast {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"harmonizer-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line, with the way to the traceback
        if os.environ.get("HARMONIZER_FAST_DEBUG") == "1":
            raise
        print(f"harmonizer-fast {args.command}: internal error: {type(exc).__name__}: {_one_line(exc)} "
              "(HARMONIZER_FAST_DEBUG=1 shows the traceback)", file=sys.stderr)  # fmt: skip
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
