"""The profiler: a known conv net's MACs, the formulas registered for the package's custom ops (checked
against hand counts), the JSON contract and the budget verdict."""

import json

import pytest
import torch

import harmonizer_fast as hf
from harmonizer_fast import profiler
from harmonizer_fast.cli import main as cli
from harmonizer_fast.ops.fcomb import fcomb_head


def test_known_conv_net_macs():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 3, 16, 16)
    flops = profiler.count_flops(net, x)
    assert flops / 2 == 2 * 16 * 16 * (3 * 8 * 9 + 8 * 4)


def test_custom_op_formulas_are_counted():
    x = torch.randn(2, 6, 8, 10)
    assert profiler.count_flops(hf.film, x, torch.ones(2, 6), torch.zeros(2, 6)) == 2 * x.numel()
    assert profiler.count_flops(hf.haar_dwt2d, x) == 4 * x.numel()
    q, wk, wv = torch.randn(5, 4), torch.randn(4, 6), torch.randn(4, 6)
    # the core op is counted by formula (4 B M C N); the small torch products around it by the counter
    core = 4 * 2 * 5 * 6 * 80
    assert profiler.count_flops(hf.token_attention_pool, x, q, wk, wv) >= core
    base, bias = torch.randn(2, 16, 8, 8), torch.randn(2, 3, 16)
    hw, hb, lw, lb = torch.randn(2, 16, 16), torch.randn(2, 16), torch.randn(16), torch.randn(1)
    assert profiler.count_flops(fcomb_head, base, bias, hw, hb, lw, lb) == 2 * 3 * 64 * (16 + 2 * 2 * 256 + 32)
    s, r = torch.rand(2, 5, 8, 8), (torch.rand(2, 3, 8, 8) > 0.5).float()
    assert profiler.count_flops(hf.ged, s, r) == 2 * 2 * 64 * (5 * 3 + 25 + 9)


def test_verdict_logic():
    assert profiler.verdict(0.42, 2.4e9) == {"latency_budget_s": 0.42, "macs_budget": 2.4e9, "latency_ok": True,
                                             "macs_ok": True}  # fmt: skip
    assert not profiler.verdict(0.43, 2.4e9)["latency_ok"]
    assert profiler.verdict(0.1, 2.64e9)["macs_ok"] and not profiler.verdict(0.1, 2.65e9)["macs_ok"]
    assert profiler.verdict(0.1, 2.16e9)["macs_ok"] and not profiler.verdict(0.1, 2.15e9)["macs_ok"]


def test_profile_json_contract(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert cli(["profile", "--config", "small", "--samples", "2", "--json", str(out)]) == 0
    assert "MACs" in capsys.readouterr().out
    d = json.loads(out.read_text())
    for key in ("params", "macs", "flops", "latency_s", "device", "budget"):
        assert key in d
    assert set(profiler.COMPONENTS) | {"total"} <= set(d["params"])
    assert d["params"]["total"] == sum(p.numel() for p in hf.HarmonizerNet(hf.HarmonizerConfig.small()).parameters())
    assert isinstance(d["budget"]["latency_ok"], bool) and isinstance(d["budget"]["macs_ok"], bool)
    assert d["flops"] == 2 * d["macs"] and d["samples_per_s"] == 2 * d["images_per_s"]
    pr = d["projection"]
    assert pr["device"].startswith("NVIDIA GeForce RTX 3090") and "projection" in pr["note"]
    assert d["bytes"] == sum(r["bytes"] for r in pr["ops"]) and 0 < d["memory_bound_bytes"] <= d["bytes"]
    assert sum(r["flops"] for r in pr["ops"]) == d["flops"]
    assert pr["projected_s"] == max(pr["roofline_s"], pr["host_s"])
    assert d["device"]["type"] == "cpu" and d["device"]["threads"] == torch.get_num_threads()
    # the GPU's NVML facts reach the table (rendered from a CUDA-shaped device record; no GPU here)
    d["device"] = {"type": "cuda", "name": "card", "memory_total_mib": 1024.0, "sm_clock_mhz": 1500, "power_w": 80.2}
    assert "| device | card (1024 MiB, 1500 MHz SM, 80 W) |" in profiler.markdown(d)


def test_profile_rejects_bad_arguments(capsys):
    assert cli(["profile", "--samples", "0"]) == 2
    assert "--samples" in capsys.readouterr().err
    assert cli(["profile", "--size", "100"]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli(["profile", "--device", "cuda"]) == 2
        assert "--device cuda" in capsys.readouterr().err


def test_work_counter_agrees_with_flop_counter():
    model = hf.HarmonizerNet(hf.HarmonizerConfig.small()).eval()
    x = torch.randn(2, 1, 64, 64)
    work = profiler.count_work(lambda: model.sample(x, 3, generator=torch.Generator().manual_seed(0)))
    expected = profiler.count_flops(lambda: model.sample(x, 3, generator=torch.Generator().manual_seed(0)))
    assert sum(w.flops for w in work.values()) == expected
    assert "harmonizer_fast.fcomb_head" in work and "harmonizer_fast.film" in work
    assert all(w.bytes > 0 for op, w in work.items() if not op.startswith("aten.empty"))  # allocations move nothing
    assert profiler.count_work(torch.empty, 1000)["aten.empty"].bytes == 0


def test_bytes_are_the_compulsory_traffic():
    x = torch.randn(2, 6, 8, 10)
    gamma, beta = torch.randn(2, 6), torch.randn(2, 6)
    work = profiler.count_work(hf.film, x, gamma, beta)
    # FiLM reads x, gamma and beta once and writes y once
    assert work["harmonizer_fast.film"].bytes == 4 * (2 * x.numel() + gamma.numel() + beta.numel())
    assert profiler.count_work(hf.haar_dwt2d, x)["harmonizer_fast.haar_dwt2d"].bytes == 2 * 4 * x.numel()
    # views move nothing; a broadcast operand counts the memory it spans, not its logical size
    b = torch.randn(6, 1, 1)
    work = profiler.count_work(lambda: x.view(12, 8, 10).view(2, 6, 8, 10) + b.expand(2, 6, 8, 10))
    assert set(work) == {"aten.add"}
    assert work["aten.add"].bytes == 4 * (2 * x.numel() + b.numel())
    # an in-place op reads and writes its operand
    y = torch.randn(3, 5)
    assert profiler.count_work(torch.relu_, y)["aten.relu_"].bytes == 2 * 4 * y.numel()


def test_roofline_projection():
    peaks = {"name": "toy", "fp32_flops": 100.0, "dram_bytes_per_s": 10.0}  # ridge: 10 FLOP/byte
    conv = profiler.OpWork([(1000, 20), (50, 100)])  # one compute-bound call (10 s), one memory-bound (10 s)
    copy = profiler.OpWork([(0, 30)])  # 3 s
    r = profiler.roofline({"conv": conv, "copy": copy}, peaks)
    assert r["ridge_flop_per_byte"] == 10.0
    rows = {(row["op"], row["bound"]): row for row in r["ops"]}
    assert set(rows) == {("conv", "compute"), ("conv", "memory"), ("copy", "memory")}
    assert rows[("conv", "compute")]["projected_s"] == 10.0 and rows[("conv", "memory")]["projected_s"] == 10.0
    assert rows[("copy", "memory")]["intensity_flop_per_byte"] == 0.0
    assert r["roofline_s"] == 23.0 and r["calls"] == 3
    assert r["memory_bound_bytes"] == 130 and r["memory_bound_s"] == 13.0
    assert r["host_s"] == 3 * profiler.LAUNCH_OVERHEAD_S and r["projected_s"] == 23.0
    fast = {"peaks": {"name": "fast", "fp32_flops": 1e15, "dram_bytes_per_s": 1e12}}
    tiny = profiler.roofline({"copy": copy}, fast["peaks"])
    assert tiny["projected_s"] == tiny["host_s"] == profiler.LAUNCH_OVERHEAD_S  # host-bound when kernels are tiny


@pytest.mark.slow
def test_bench_report(tmp_path):
    """The report is assembled from the files of this run only: its tables, targets and chart match them."""
    from PIL import Image

    assert cli(["bench", "--quick", "--only", "film", "--no-profile", "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench-cpu-quick.json").read_text())
    film = json.loads((tmp_path / "film-cpu-quick.json").read_text())
    assert report["benchmarks"]["film"] == film and not report["failed"]
    assert report["targets"] == [{"benchmark": "film", **t} for t in film["targets"]]
    md = (tmp_path / "bench-cpu-quick.md").read_text()
    assert report["machine"]["cpu"] in md and "![film speedups](bench-cpu-quick-film.png)" in md
    ours = next(r for r in film["rows"] if r["variant"].startswith("harmonizer_fast (auto") and r["op"] == "forward")
    assert f"{ours['median_ms']:.2f}" in md
    with Image.open(tmp_path / "bench-cpu-quick-film.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bench-")]  # scratch folder removed


def test_bench_rejects_unknown_benchmark(capsys):
    assert cli(["bench", "--only", "nope"]) == 2  # the CLI's contract: a return code, one line, no SystemExit
    assert "--only" in capsys.readouterr().err


def test_model_conv_macs_match_module_hooks():
    """An independent count: every Conv2d module's output size x fan-in, from forward hooks, plus the one
    convolution the sampler calls functionally (fcomb's first conv on the features alone, see model/fcomb.py)."""
    model = hf.HarmonizerNet(hf.HarmonizerConfig.small()).eval()
    x = torch.randn(2, 1, 64, 64)
    hooked = []

    def hook(mod, inputs, out):
        hooked.append(out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1])

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model.sample(x, 3)
    for h in handles:
        h.remove()
    first = model.fcomb.first
    split = x.shape[0] * 64 * 64 * first.out_channels * (first.in_channels - model.config.latent_dim)
    work = profiler.count_work(lambda: model.sample(x, 3))
    assert work["aten.convolution"].flops == 2 * (sum(hooked) + split)
    assert work["aten.convolution"].calls == len(hooked) + 1


ISA_PROBE = '''
import sys
sys.path.insert(0, {bench!r})
import torch
import harmonizer_fast as hf
from common import bench_main

def run(device, quick):
    value = float(hf.supported_cpu_isas().index(hf.cpu_isa()))
    return {{"rows": [], "seen": {{"kernels": hf.cpu_isa(), "aten": torch.backends.cpu.get_cpu_capability()}},
            "targets": [{{"target": "build index", "value": value, "ok": True}}]}}

sys.exit(bench_main("probe", "probe", "probe", (), run, render=lambda p: "# probe\\n"))
'''


def test_benchmarks_run_under_each_cpu_build(tmp_path):
    """``--isa all`` runs a benchmark once per build this CPU executes, each in a process where our kernels
    and ATen's vectorized kernels are capped to it (benchmarks/common.py ISA_ENV), and puts the targets side
    by side; every JSON records the builds that ran."""
    import subprocess
    import sys
    from pathlib import Path

    supported = hf.supported_cpu_isas()
    if not supported:
        pytest.skip("the C++ CPU kernels are not built here")
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    script = tmp_path / "bench_probe.py"
    script.write_text(ISA_PROBE.format(bench=str(bench)))
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([sys.executable, str(script), "--isa", "all", "--device", "cpu", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    combined = json.loads((out / "probe-cpu-isas.json").read_text())
    assert list(combined["per_isa"]) == list(supported)
    aten = {"baseline": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512"}
    for isa, payload in combined["per_isa"].items():
        assert payload["seen"] == {"kernels": isa, "aten": aten[isa]}
        assert payload["machine"]["isa"]["kernels"] == isa
        assert payload["machine"]["isa"]["onednn_max"] != "(all)"
        assert json.loads((out / f"probe-cpu-{isa}.json").read_text()) == payload
    md = (out / "probe-cpu-isas.md").read_text()
    assert "| build index | " + " | ".join(f"{i:.3g} (ok)" for i in range(len(supported))) + " |" in md
