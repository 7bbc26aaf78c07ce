"""``harmonizer-fast predict`` end to end against the in-process ``model.predict`` of the same slices.

    python benchmarks/bench_predict.py [--model lidc-small] [--images 1000] [--volume 256 256 64] [--rounds 3]

Two inputs: a folder of N PNG images (128 x 128; LIDC-IDRI slices from ../shared/data/lidc when present,
else random pixels) and one NIfTI volume (default 256 x 256 x 64, cut into 64 axial slices). Each is run by
the command line as users run it, K = 16 with the rater heads and every map written, in one process (the
machine's threads) and as two torchrun processes of one thread each; the time is the run's own record
(``predict.json``: discovery, reading, preprocessing, sampling, post-processing, writing and the summary;
not the interpreter's start or the model's load). The reference is ``model.predict`` on the same slices,
already in memory and preprocessed, in batches of the same size, in this process. The ratio command /
reference is what the file I/O and the pre- and post-processing cost on top (target: at most 1.25).
Rounds alternate the variants; medians are reported. Writes benchmarks/results/predict-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_header, machine_info, write_results

from harmonizer_fast import pretrained
from harmonizer_fast._alloc import keep_freed_memory
from harmonizer_fast.checkpoint import load_model
from harmonizer_fast.predict.runner import Predictor, slice_seed

ROOT = Path(__file__).resolve().parent.parent
LIDC = ROOT.parent / "shared" / "data" / "lidc" / "LIDC-IDRI-slices"
K, BATCH = 16, 16


def make_pngs(folder: Path, n: int) -> str:
    from PIL import Image

    folder.mkdir(parents=True)
    sources = sorted(LIDC.glob("*/nodule-*/images/slice-*.png"))[:n] if LIDC.is_dir() else []
    rng = np.random.default_rng(0)
    for i in range(n):
        if i < len(sources):
            shutil.copyfile(sources[i], folder / f"case{i:05d}.png")
        else:
            Image.fromarray(rng.integers(0, 256, (128, 128), dtype=np.uint8)).save(folder / f"case{i:05d}.png")
    return f"{min(n, len(sources))} LIDC-IDRI slices" + (f" + {n - len(sources)} random" if n > len(sources) else "")


def make_volume(folder: Path, shape: tuple[int, int, int]) -> None:
    import nibabel as nib

    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    vol = rng.normal(-600, 400, shape).astype(np.int16)
    nib.save(nib.Nifti1Image(vol, np.diag([0.7, 0.7, 2.5, 1.0])), str(folder / "volume.nii.gz"))


def reference_seconds(model, folder: Path, warm: bool = True) -> tuple[float, int]:
    """model.predict on the preprocessed slices, in memory, same seeds and batches: the seconds and slices.
    ``warm``: after one untimed batch (oneDNN's primitives made, the heap's pages touched)."""
    predictor = Predictor(model, num_samples=K, batch_size=BATCH)
    from harmonizer_fast.predict import find_cases, load_case

    cases, _ = find_cases(folder)
    loaded = [load_case(c, model.config.in_channels) for c in cases]
    pre = predictor.preprocessing
    # PNGs are single slices: group them into batches as a caller of model.predict would
    xs = [torch.from_numpy(pre.pad(pre.normalize(lc.images))) for lc in loaded]
    slices = torch.cat(xs)
    heads = predictor.heads
    # the command's batches: BATCH slices of 128 x 128, fewer of larger ones (Predictor.slices_per_batch)
    bs = predictor.slices_per_batch(*loaded[0].images.shape[2:])
    if warm:
        model.predict(slices[:bs], K, heads=heads)
    t0 = time.perf_counter()
    for s in range(0, slices.shape[0], bs):
        g = torch.Generator().manual_seed(slice_seed(0, cases[0].name, s))
        model.predict(slices[s : s + bs], K, heads=heads, generator=g)
    return time.perf_counter() - t0, int(slices.shape[0])


def cold_reference_seconds(model_arg: str, src: Path) -> float:
    """reference_seconds in a fresh process, its first batch timed: what the command's own forward passes cost
    (a new process pays for creating oneDNN's primitives and touching its heap on the first batch of a size)."""
    code = (f"import sys; sys.argv = ['bench_predict.py', '--cold-reference', {str(src)!r}, '--model', "
            f"{model_arg!r}]; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_predict; "
            "bench_predict.main()")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"cold reference failed: {r.stderr[-2000:]}")
    return float(r.stdout.strip().splitlines()[-1])


def command_seconds(model_arg: str, src: Path, out: Path, processes: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cli = ["-m", "harmonizer_fast.cli", "predict", "-i", str(src), "-o", str(out), "-m", model_arg, "-k", str(K),
           "--batch", str(BATCH), "--no-progress"]  # fmt: skip
    env = dict(os.environ)
    if processes > 1:
        env["OMP_NUM_THREADS"] = str(max(1, torch.get_num_threads() // processes))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port",
               "29577", *cli]  # fmt: skip
    else:
        cmd = [sys.executable, *cli]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"predict failed: {r.stderr[-2000:]}")
    return float(json.loads((out / "predict.json").read_text())["seconds"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="lidc-small", help="bundled model name or run directory")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--volume", type=int, nargs=3, default=[256, 256, 64], metavar=("X", "Y", "Z"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--cold-reference", default=None, help=argparse.SUPPRESS)  # internal: one cold reference run
    args = p.parse_args(argv)
    keep_freed_memory()  # the allocator policy the command line runs with (harmonizer_fast._alloc)
    model_path = pretrained.path(args.model) if args.model in pretrained.available() else Path(args.model)
    model, _ = load_model(model_path)
    if args.cold_reference:
        print(reference_seconds(model, Path(args.cold_reference), warm=False)[0])
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    try:
        pngs, vol = work / "pngs", work / "volume"
        png_source = make_pngs(pngs, args.images)
        make_volume(vol, tuple(args.volume))
        inputs = {"png": (pngs, args.images), "nifti": (vol, 1)}
        variants = ("reference", "reference, fresh process", "1 process", "2 processes")
        times: dict[str, dict[str, list[float]]] = {n: {v: [] for v in variants} for n in inputs}
        slices: dict[str, int] = {}
        for r in range(args.rounds):
            for name, (src, _) in inputs.items():
                sec, slices[name] = reference_seconds(model, src)
                times[name]["reference"].append(sec)
                times[name]["reference, fresh process"].append(cold_reference_seconds(str(model_path), src))
                times[name]["1 process"].append(command_seconds(str(model_path), src, work / "out", 1))
                times[name]["2 processes"].append(command_seconds(str(model_path), src, work / "out", 2))
                print(f"round {r + 1}/{args.rounds} {name}: " + ", ".join(
                    f"{k} {v[-1]:.2f} s" for k, v in times[name].items()), flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for name, (_, cases) in inputs.items():
        med = {k: statistics.median(v) for k, v in times[name].items()}
        for variant, sec in med.items():
            rows.append({"input": name, "variant": variant, "cases": cases, "slices": slices[name], "median_s": sec,
                         "all_s": times[name][variant], "cases_per_s": cases / sec, "slices_per_s": slices[name] / sec,
                         "over_reference": sec / med["reference"],
                         "over_fresh_reference": sec / med["reference, fresh process"]})  # fmt: skip
    vol_batch = Predictor(model, num_samples=K, batch_size=BATCH).slices_per_batch(*args.volume[:2])
    payload = {"machine": machine_info(), "device": "cpu", "model": str(model_path), "num_samples": K, "batch": BATCH,
               "volume_batch": vol_batch,
               "png_source": png_source, "volume": args.volume, "rounds": args.rounds, "rows": rows,
               "target_over_reference": 1.25}  # fmt: skip
    md = ["# harmonizer-fast predict against in-process model.predict", "", machine_header(payload), "",
          f"Inputs: {args.images} PNG 128 x 128 ({png_source}); one NIfTI volume {' x '.join(map(str, args.volume))} "
          f"(int16, sliced along its third axis). K = {K}, batch {BATCH} (slices of 128 x 128; {vol_batch} of the "
          f"volume's {args.volume[0]} x {args.volume[1]}), personalized heads, every map written; "
          f"medians of {args.rounds} alternating rounds. Reference: model.predict on the same slices, preprocessed, "
          "in memory, in batches of the same size: warm (after one untimed batch) in this process, and in a fresh "
          "process with its first batch timed, as the command's is. The command's time is its own record "
          "(predict.json: discovery, reading, preprocessing, sampling, post-processing, writing, the summary; not "
          "the interpreter's start or the model's load).", "",
          "| input | variant | median s | cases/s | slices/s | / reference | / fresh-process reference (target <= "
          "1.25) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        md.append(f"| {r['input']} | {r['variant']} | {r['median_s']:.2f} | {r['cases_per_s']:.2f} | "
                  f"{r['slices_per_s']:.1f} | {r['over_reference']:.2f} | "
                  f"{r['over_fresh_reference']:.2f} |")  # fmt: skip
    out_dir = Path(args.out) if args.out else None
    paths = write_results("predict-cpu", payload, "\n".join(md) + "\n", **({"out_dir": out_dir} if out_dir else {}))
    print("\n".join(md))
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
