"""What a config's network costs, found before anything is allocated for it ([reliability] #36 item 3).

A config is data (a manifest, a preset with overrides, a user's dataclass), and its counts and widths decide
how much the network takes: a hand-edited manifest with ``harmonizer_tokens: 10**12`` asked ``load_model``
for 4 TB of weights, and ``encoder_blocks: [10**9]`` would loop in Python for hours before torch allocated
anything. (Counts that size only the forward, ``prior_bank`` and ``ged_samples``, are checked against the
memory available before drawing, in ``HarmonizerNet``.)
:func:`plan_network` builds the network on the ``meta`` device (shapes only, no storage) while global
module-registration hooks count what it registers, and stops the build with a ValueError the moment it
passes a bound:

- the memory this machine has available (its parameters' and buffers' bytes, and a few KiB of Python per
  module), so a config from the API or the command line fails before the real build;
- when a weights file is at hand (``load_model``), that file's own tensors: a config whose network
  registers more tensors or elements than the file holds cannot be the file's config. The bound then comes
  from bytes already on disk, so a hostile manifest is refused after a few registrations.

``HarmonizerNet.__init__`` calls it first (skipped while it is itself being planned on ``meta``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch.nn.modules import module as _module

from .._alloc import InsufficientMemoryError, memory_available

if TYPE_CHECKING:
    from .config import HarmonizerConfig

# Python's own cost of one nn.Module (its dicts of parameters, buffers, modules and hooks), an upper figure
# measured with tracemalloc on torch 2.13 (3.0 KiB for a Conv2d on meta, 2.1 KiB for a ReLU): it bounds
# configs whose many small modules hold few weights.
MODULE_OVERHEAD_BYTES = 4096
# A bound on the build's time, which memory does not give: Python builds about 6,000 of the network's modules
# a second on ``meta``, so the ~20 GiB a machine may have would allow a quarter-hour build of five million
# modules. The paper's network has 249 modules, the small one 169; 20,000 take about 3 s to refuse.
MAX_MODULES = 20_000


@dataclass(frozen=True)
class WeightsBound:
    """The tensors of a weights file: a config's network may register no more than these."""

    tensors: int
    elements: int
    where: str


class _Tally:
    def __init__(self, budget: int, weights: Optional[WeightsBound], name: str) -> None:
        self.budget, self.weights, self.name = budget, weights, name
        self.tensors = self.elements = self.bytes = self.modules = 0
        self.thread = threading.get_ident()  # the hooks are global: count this thread's build only

    def tensor(self, module: torch.nn.Module, name: str, t: Optional[torch.Tensor]) -> None:
        if t is None or threading.get_ident() != self.thread:
            return
        self.tensors += 1
        self.elements += t.numel()
        self.bytes += t.numel() * t.element_size()
        w = self.weights
        if w is not None and (self.tensors > w.tensors or self.elements > w.elements):
            raise ValueError(f"{self.name}: weights do not fit the model config: it describes a network larger "
                             f"than {w.where} ({w.tensors} tensors, {w.elements} elements)")  # fmt: skip
        self._check_memory()

    def module(self, parent: torch.nn.Module, name: str, child: Optional[torch.nn.Module]) -> None:
        if child is not None and threading.get_ident() == self.thread:
            self.modules += 1
            if self.modules > MAX_MODULES:
                raise ValueError(f"{self.name}: the config's network has more than {MAX_MODULES} modules (the "
                                 "paper's has 249); check its block and layer counts")  # fmt: skip
            self._check_memory()

    def _check_memory(self) -> None:
        need = self.bytes + self.modules * MODULE_OVERHEAD_BYTES
        if need > self.budget:
            raise InsufficientMemoryError(f"{self.name}: the config's network needs more than "
                                          f"{need / 2**30:.1f} GiB; this machine has {self.budget / 2**30:.1f} "
                                          "GiB available")  # fmt: skip


@contextmanager
def _counting(tally: _Tally) -> Iterator[None]:
    handles = [
        _module.register_module_parameter_registration_hook(tally.tensor),
        _module.register_module_buffer_registration_hook(tally.tensor),
        _module.register_module_module_registration_hook(tally.module),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def planning() -> bool:
    """Whether the current build is a plan on the meta device (the network then skips its own plan)."""
    return torch.empty(0).device.type == "meta"


def plan_network(
    config: HarmonizerConfig, *, weights: Optional[WeightsBound] = None, name: str = "HarmonizerNet"
) -> dict[str, torch.Size]:
    """The shape of every tensor of the network ``config`` describes (its state dict, built on ``meta``), or a
    ValueError naming ``name`` as soon as the build passes the memory available or ``weights``."""
    from .net import HarmonizerNet  # net imports this module

    tally = _Tally(memory_available(), weights, name)
    try:
        with _counting(tally), torch.device("meta"):
            net = HarmonizerNet(config)
    except (RuntimeError, OverflowError, TypeError) as exc:  # sizes past int64 overflow torch's shape arithmetic
        raise ValueError(f"{name}: the config's sizes overflow ({str(exc).splitlines()[0][:120]})") from None
    return {k: v.shape for k, v in net.state_dict().items()}


def fits(config: HarmonizerConfig, shapes: dict[str, torch.Size], weights: WeightsBound) -> bool:
    """Whether ``config``'s network holds every tensor of ``shapes`` (a weights file's) with its shape, and its
    other tensors are ones the file may lack (``weights`` allows for them)."""
    try:
        planned = plan_network(config, weights=weights)
    except ValueError:
        return False
    return set(shapes) <= set(planned) and all(shapes.get(k, v) == v for k, v in planned.items())


def culprits(config: HarmonizerConfig, shapes: dict[str, torch.Size], weights: WeightsBound) -> list[str]:
    """The fields of ``config`` that, each alone set back to its preset's value, make the network fit
    ``shapes``: which field of a refused config to name (a few plans on ``meta``, on the error path only)."""
    from dataclasses import fields, replace

    from .config import HarmonizerConfig

    preset = getattr(HarmonizerConfig, config.preset)()
    found = []
    for f in fields(config):
        value, default = getattr(config, f.name), getattr(preset, f.name)
        if value == default:
            continue
        try:
            candidate = replace(config, **{f.name: default})
        except ValueError:
            continue
        if fits(candidate, shapes, weights):
            found.append(f"{f.name} = {value!r} (its preset has {default!r})")
    return found
