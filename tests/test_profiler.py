"""The profiler: a known conv net's MACs, the formulas registered for the package's custom ops (checked
against hand counts), the JSON contract and the budget verdict."""

import json

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
