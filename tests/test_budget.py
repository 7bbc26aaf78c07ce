"""The network's build is planned on ``meta`` and bounded before anything is allocated ([reliability] #36)."""

from __future__ import annotations

import pytest
import torch

from harmonizer_fast.model import HarmonizerConfig, HarmonizerNet, budget
from harmonizer_fast.model.budget import WeightsBound, culprits, plan_network


@pytest.mark.parametrize("preset", ["small", "paper"])
@pytest.mark.parametrize("overrides", [{}, {"use_harmonizer": False, "use_personalizer": False},
                                       {"personalizer": "dpersona"}, {"harmonizer_shared": False}])  # fmt: skip
def test_plan_has_the_real_networks_tensors(preset, overrides):
    config = getattr(HarmonizerConfig, preset)(**overrides)
    real = {k: v.shape for k, v in HarmonizerNet(config).state_dict().items()}
    assert plan_network(config) == real


def test_plan_allocates_nothing(monkeypatch):
    monkeypatch.setattr(budget, "memory_available", lambda: 2**40)  # let a 4 GB network be planned
    before = torch.empty(0).device.type
    planned = plan_network(HarmonizerConfig.small(harmonizer_tokens=10**6, harmonizer_dim=10**3))
    assert planned["harmonizer.tokens"] == (10**6, 10**3)  # 4 GB of float32 that were never allocated
    assert torch.empty(0).device.type == before == "cpu"  # the meta device does not leak out of the plan


def test_memory_bound_names_the_sizes(monkeypatch):
    config = HarmonizerConfig.small()
    params = sum(t.numel() * 4 for t in HarmonizerNet(config).state_dict().values())
    monkeypatch.setattr(budget, "memory_available", lambda: params // 2)
    with pytest.raises(ValueError, match=r"needs more than .* GiB; this machine has .* GiB available"):
        HarmonizerNet(config)
    monkeypatch.setattr(budget, "memory_available", lambda: 4 * params)
    HarmonizerNet(config)  # the same network within the bound


def test_module_count_is_bounded():
    with pytest.raises(ValueError, match=f"more than {budget.MAX_MODULES} modules"):
        HarmonizerNet(HarmonizerConfig.small(fcomb_layers=budget.MAX_MODULES + 10))


def test_weights_bound_stops_the_plan_early_and_names_the_field():
    small = HarmonizerNet(HarmonizerConfig.small()).state_dict()
    shapes = {k: v.shape for k, v in small.items()}
    bound = WeightsBound(len(small), sum(t.numel() for t in small.values()), "the file")
    registered = []
    hook = torch.nn.modules.module.register_module_parameter_registration_hook(lambda m, n, p: registered.append(n))
    try:
        with pytest.raises(ValueError, match="weights do not fit the model config: it describes a network larger"):
            plan_network(HarmonizerConfig.small(stem_channels=10**7), weights=bound)
    finally:
        hook.remove()
    assert len(registered) <= len(small)  # refused at the first tensor past the file, not after the build
    bad = HarmonizerConfig.small(harmonizer_tokens=10**9, latent_dim=6)
    assert culprits(bad, shapes, bound) == ["harmonizer_tokens = 1000000000 (its preset has 4)"]
    assert culprits(HarmonizerConfig.small(), shapes, bound) == []  # nothing to name when it fits


def test_forward_counts_are_bounded_before_drawing():
    net = HarmonizerNet(HarmonizerConfig.small(prior_bank=10**12)).eval()
    with pytest.raises(ValueError, match="prior_bank=1000000000000 for 1 image"):
        net.predict(torch.rand(1, 1, 32, 32), num_samples=2, heads="personalized", allow_untrained=True)
