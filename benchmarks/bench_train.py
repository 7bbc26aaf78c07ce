"""Training throughput: one phase-1 step (forward, Eq. 8 loss, backward, AdamW step) of the small and the
paper config at 128 x 128, with the package's kernels (automatic backend) against the same model on the torch
reference ops (``HARMONIZER_FAST_BACKEND=torch``), under glibc's default allocator policy and under the one
the trainer sets (:mod:`harmonizer_fast._alloc`: freed blocks kept for reuse), and where the small config's
step spends its time. The allocator policy is per process, so each is measured in its own child process.

The breakdown times the sampling head alone at the step's shapes (fcomb forward + backward over the posterior
sample and the K = ``ged_samples`` prior samples of the GED loss) and the backbone + harmonizer alone
(forward + backward of the features), against the whole step, all as medians of interleaved rounds in one
process.

    python benchmarks/bench_train.py [--quick] [--out DIR]

Writes ``train-cpu[-quick].json`` and ``.md`` into benchmarks/results/ and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, forced_backend, interleaved_medians, machine_info, write_results

from harmonizer_fast import losses
from harmonizer_fast._alloc import ENV as MALLOC_ENV
from harmonizer_fast._alloc import keep_freed_memory
from harmonizer_fast.model import HarmonizerConfig, HarmonizerNet

SIZE = 128
BATCH = {"small": 16, "paper": 4}  # the paper config's step at B = 16 takes tens of seconds on 2 cores


def _setup(preset: str):
    torch.manual_seed(0)
    cfg = getattr(HarmonizerConfig, preset)()
    net = HarmonizerNet(cfg).train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    b = BATCH[preset]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, 1, SIZE, SIZE, generator=g)
    y = (torch.rand(b, cfg.num_raters, SIZE, SIZE, generator=g) > 0.95).float()
    noise = net.draw_noise(b, g)
    return cfg, net, opt, x, y, noise


def step_case(preset: str) -> Callable[[], Any]:
    cfg, net, opt, x, y, noise = _setup(preset)

    def step() -> None:
        loss, _ = losses.total_loss(net(x, y, noise=noise), y, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def part_cases() -> dict[str, Callable[[], Any]]:
    """The small config's step and two of its parts at the step's shapes."""
    cfg, net, _, x, y, noise = _setup("small")
    f = net.features(x)[0].detach().requires_grad_()
    z = torch.randn(x.shape[0], 1 + cfg.ged_samples, cfg.latent_dim, requires_grad=True)

    def fcomb() -> None:
        net.fcomb.logits(f, z).square().mean().backward()

    def features() -> None:
        net.features(x)[0].square().mean().backward()

    return {"whole step": step_case("small"), "fcomb (posterior + K prior samples)": fcomb,
            "backbone + harmonizer": features}  # fmt: skip


POLICIES = {"glibc default": "system", "kept (the trainer's)": "keep"}


def child(quick: bool) -> dict[str, Any]:
    """Everything measured in this process, under its allocator policy."""
    kept = keep_freed_memory()
    rounds, warmup = (3, 1) if quick else (7, 2)
    dev = torch.device("cpu")
    throughput = {}
    for preset in ("small", "paper"):
        cases = {}
        for backend in (None, "torch"):
            with forced_backend(backend):
                cases[backend or "auto"] = step_case(preset)
        med = interleaved_medians(cases, dev, warmup=warmup, rounds=rounds,
                                  around=lambda k: forced_backend(None if k == "auto" else k))  # fmt: skip
        b = BATCH[preset]
        throughput[preset] = {k: {"step_ms": v["median_ms"], "images_per_s": 1e3 * b / v["median_ms"], "batch": b}
                              for k, v in med.items()}  # fmt: skip
    parts = interleaved_medians(part_cases(), dev, warmup=warmup, rounds=rounds)
    whole = parts["whole step"]["median_ms"]
    breakdown = {k: {"ms": v["median_ms"], "share_of_step": v["median_ms"] / whole} for k, v in parts.items()}
    return {"kept": kept, "rounds": rounds, "throughput": throughput, "breakdown": breakdown}


def run(quick: bool) -> dict[str, Any]:
    by_policy = {}
    for name, value in POLICIES.items():
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, "--child", f.name] + (["--quick"] if quick else [])
            subprocess.run(cmd, check=True, env={**os.environ, MALLOC_ENV: value})
            by_policy[name] = json.loads(Path(f.name).read_text())
    default, kept = (by_policy[k]["throughput"]["small"]["auto"]["step_ms"] for k in POLICIES)
    target = {"target": "small config, auto ops: the trainer's step >= 2x the glibc-default step",
              "value": default / kept, "ok": default / kept >= 2.0}  # fmt: skip
    return {"benchmark": "train", "machine": machine_info(), "size": SIZE, "allocator": by_policy,
            "targets": [target]}  # fmt: skip


def markdown(payload: dict[str, Any]) -> str:
    m, pols = payload["machine"], payload["allocator"]
    first = next(iter(pols.values()))
    lines = [f"# Training throughput ({m['cpu']}, {m['cpu_cores']} cores, torch {m['torch']})", "",
             f"One phase-1 step (forward, Eq. 8, backward, AdamW) at {payload['size']} x {payload['size']}; "
             f"medians of {first['rounds']} interleaved rounds, one process per allocator policy.", "",
             "| config | batch | ops | allocator | step (ms) | images/s | vs glibc default, same ops |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    base = pols["glibc default"]["throughput"]
    for preset in first["throughput"]:
        for backend in first["throughput"][preset]:
            ops = "harmonizer_fast (auto)" if backend == "auto" else "torch reference ops"
            for policy, res in pols.items():
                r = res["throughput"][preset][backend]
                ratio = base[preset][backend]["step_ms"] / r["step_ms"]
                lines.append(f"| {preset} | {r['batch']} | {ops} | {policy} | {r['step_ms']:.0f} | "
                             f"{r['images_per_s']:.2f} | {ratio:.2f}x |")  # fmt: skip
    for t in payload["targets"]:
        lines += ["", f"Target: {t['target']}: {t['value']:.2f}x ({'met' if t['ok'] else 'NOT met'})."]
    for policy, res in pols.items():
        lines += ["", f"Where the small config's step goes, allocator {policy} (each part timed alone at the "
                  "step's shapes):", "", "| part | ms | share of the step |", "|---|---|---|"]  # fmt: skip
        for k, v in res["breakdown"].items():
            lines.append(f"| {k} | {v['ms']:.0f} | {v['share_of_step']:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one policy's measurements
    args = p.parse_args(argv)
    if args.child:
        Path(args.child).write_text(json.dumps(child(args.quick)))
        return 0
    payload = run(args.quick)
    md = markdown(payload)
    write_results(f"train-cpu{'-quick' if args.quick else ''}", payload, md, args.out)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
