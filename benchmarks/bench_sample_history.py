"""``harmonizer-fast sample`` against earlier commits on the same machine ([cpu-speed] item 4).

The path the command times (``cmd_sample``): the glibc policy it sets (``keep_freed_memory``), then
``stream_samples`` (one backbone pass per batch for the K prior samples and the 4 raters' heads, float16
conversion, the streamed npz writer), paper config, 128 x 128, K = 16, B = 16, heads included, over
160 synthetic images. Each version runs in its own process, the versions alternating round by round so
that a noisy neighbour slows all alike; one warm-up batch per process is not timed. Each earlier commit is
checked out into ``build/history/<commit>`` (a git worktree) and its extension built there, in place.
``--isa`` runs every version under one instruction-set build (our kernels, ATen and oneDNN capped alike,
benchmarks/common.py ISA_ENV), or under each build this CPU executes (``all``, the default): the issue's
machine had AVX2 only, and a build below this CPU's best is an emulation on this machine.

    python benchmarks/bench_sample_history.py [--before c10d907,79f617f] [--rounds 3] [--isa all] [--quick]

The default ``--before``: c10d907, where ``harmonizer-fast sample`` ran ``sample`` then ``personalize``
(two backbone passes, the state the issue measured), and 79f617f, the last commit before the [cpu-speed]
commits (one-pass ``predict`` already there). Each commit samples its own paper-config model.
Writes ``sample-history-cpu[-quick].json`` and ``.md`` into benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ISA_ENV, machine_header, machine_info, write_results

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "c10d907,79f617f"  # two backbone passes per batch; the last commit before the [cpu-speed] commits
IMAGES, SAMPLES, BATCH, SIZE, RATERS = 160, 16, 16, 128, 4
TARGET = 2.0

# Run by each version's interpreter with that tree first on sys.path; uses only API both versions have.
WORKER = """
import json, sys, tempfile, time
from pathlib import Path
import torch
import harmonizer_fast as hf
from harmonizer_fast._alloc import keep_freed_memory
from harmonizer_fast.data import make_synthetic
from harmonizer_fast.model import HarmonizerConfig, HarmonizerNet
from harmonizer_fast.sampling import stream_samples

images, samples, batch, size, raters = (int(a) for a in sys.argv[1:6])
assert Path(hf.__file__).resolve().parents[1] == Path(sys.argv[6]).resolve(), (hf.__file__, sys.argv[6])
keep_freed_memory()
torch.manual_seed(0)
model = HarmonizerNet(HarmonizerConfig.paper(num_raters=raters)).eval()
model.personalizer.trained_steps.fill_(1)  # heads on, as for a trained model
data = make_synthetic(images, size=size, raters=raters, seed=0)
with tempfile.TemporaryDirectory() as tmp:
    stream_samples(model, data, range(batch), Path(tmp) / "warm.npz", num_samples=samples, batch=batch, progress=False)
    t0 = time.perf_counter()
    n = stream_samples(model, data, range(images), Path(tmp) / "s.npz", num_samples=samples, batch=batch,
                       progress=False)
    dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "images": n, "threads": torch.get_num_threads()}))
"""


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def prepare_tree(rev: str) -> tuple[Path, str]:
    """A worktree of ``rev`` with its extension built in place; returns (path, full commit)."""
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    tree = ROOT / "build" / "history" / commit[:12]
    if not (tree / ".git").exists():
        tree.parent.mkdir(parents=True, exist_ok=True)
        _git("worktree", "add", "--detach", "--force", str(tree), commit)
    if not list((tree / "harmonizer_fast").glob("_C*.so")):
        print(f"[history] building the extension of {commit[:12]} (a few minutes) ...", flush=True)
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
    return tree, commit


def run_once(tree: Path, images: int, isa: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HARMONIZER_FAST_", "MALLOC_"))}
    env.pop("ATEN_CPU_CAPABILITY", None)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    env.update(ISA_ENV[isa], PYTHONPATH=str(tree))
    args = [str(a) for a in (images, SAMPLES, BATCH, SIZE, RATERS, tree)]
    out = subprocess.run([sys.executable, "-c", WORKER, *args], cwd=tree, env=env, check=True, capture_output=True,
                         text=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def measure(befores: list[str], isas: list[str], rounds: int, images: int) -> dict[str, Any]:
    head = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    trees = {}
    for rev in befores:
        tree, commit = prepare_tree(rev)
        trees[f"before ({rev})"] = (tree, commit)
    trees["now"] = (ROOT, head + ("+" if dirty else ""))
    builds = []
    for isa in isas:
        runs: dict[str, list[float]] = {name: [] for name in trees}
        threads = 0
        for r in range(rounds):
            for name, (tree, _) in trees.items():
                res = run_once(tree, images, isa)
                runs[name].append(res["seconds"])
                threads = res["threads"]
                print(f"[history] {isa} round {r + 1}/{rounds} {name}: {images / res['seconds']:.1f} images/s",
                      flush=True)  # fmt: skip
        rows = [{"version": name, "commit": trees[name][1], "median_s": statistics.median(secs),
                 "images_per_s": images / statistics.median(secs), "images_per_s_each": [images / s for s in secs],
                 "threads": threads} for name, secs in runs.items()]  # fmt: skip
        now = rows[-1]["images_per_s"]
        for r in rows[:-1]:
            r["now_over_this"] = now / r["images_per_s"]
            r["ok"] = r["now_over_this"] >= TARGET
        builds.append({"isa": isa, "rows": rows})
    return {"builds": builds, "target": TARGET, "images": images, "samples": SAMPLES, "batch": BATCH,
            "size": SIZE, "raters": RATERS, "rounds": rounds}  # fmt: skip


def report(p: dict[str, Any]) -> str:
    lines = [
        "# `harmonizer-fast sample`: now against before [cpu-speed]",
        "",
        f"{machine_header(p)} The command's path (keep_freed_memory, then stream_samples: predict with heads, "
        f"float16, the npz writer), paper config, {p['size']} x {p['size']}, K = {p['samples']}, B = {p['batch']}, "
        f"{p['raters']} rater heads, {p['images']} synthetic images; each version in its own process, alternating, "
        f"{p['rounds']} rounds, one warm-up batch each; medians over the rounds. A build below this CPU's best "
        "(its `cpu_supports`) is an emulation on this machine.",
        "",
        "| build | version | commit | median s | images/s | images/s per round | now / this |",
        "|---|---|---|---|---|---|---|",
    ]
    for b in p["builds"]:
        for r in b["rows"]:
            each = ", ".join(f"{v:.1f}" for v in r["images_per_s_each"])
            gain = f"**{r['now_over_this']:.2f}x** ({'ok' if r['ok'] else 'NO'})" if "ok" in r else ""
            lines.append(f"| {b['isa']} | {r['version']} | `{r['commit'][:12]}` | {r['median_s']:.2f} | "
                         f"{r['images_per_s']:.1f} | {each} | {gain} |")  # fmt: skip
    lines += ["", f"Target: now / before >= {p['target']}x on the same machine and build.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default=BEFORE, help="earlier commits, comma-separated (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--isa", choices=("all", *ISA_ENV), default="all", help="build(s) to run both versions under")
    ap.add_argument("--quick", action="store_true", help="32 images, 1 round (a smoke run)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = ap.parse_args()
    t0 = time.perf_counter()
    import harmonizer_fast as hf

    isas = list(hf.supported_cpu_isas()) if a.isa == "all" else [a.isa]
    if not set(isas) <= set(hf.supported_cpu_isas()):
        raise SystemExit(f"--isa {a.isa}: this CPU executes {list(hf.supported_cpu_isas())}")
    befores = [r for r in a.before.split(",") if r]
    payload = measure(befores, isas, 1 if a.quick else a.rounds, 32 if a.quick else IMAGES)
    machine = machine_info()
    machine.pop("isa")  # this driver's own build; each row names the build its processes ran
    payload.update(machine=machine, device="cpu")
    name = "sample-history-cpu" + ("-quick" if a.quick else "")
    write_results(name, payload, report(payload), a.out)
    print(f"wrote {a.out}/{name}.json and .md in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
