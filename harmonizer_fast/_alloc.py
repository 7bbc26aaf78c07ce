"""glibc's allocator policy for the package's training and evaluation processes.

A training step allocates and frees the same large activation tensors every step: the sampling head's maps
over the posterior and the K prior samples of the GED loss are B x K x 16 x H x W floats (67 MB each at the
small config's batch of 16 at 128 x 128). glibc serves every such block with a fresh ``mmap`` and unmaps it
on free, so each step page-faults and zeroes all of them again, and trims the heap it could have reused.
Measured on a 2-core AMD EPYC (``benchmarks/bench_train.py``): the small config's phase-1 step took 2.2 s
with glibc's default policy and 1.0-1.2 s with mmap off and trimming deferred, the same arithmetic.

:func:`keep_freed_memory` switches the policy for the whole process (``mallopt``: ``M_MMAP_MAX = 0``,
``M_TRIM_THRESHOLD`` at its maximum), so the process keeps its peak heap instead of returning it between
steps. :class:`~harmonizer_fast.train.Trainer` and the CLI's ``evaluate`` and ``sample`` call it; importing
the package does not. ``HARMONIZER_FAST_MALLOC=system`` leaves glibc's policy alone. Elsewhere than glibc
Linux it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
ENV = "HARMONIZER_FAST_MALLOC"

_state: dict[str, bool] = {}


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse; returns whether that policy is in effect (idempotent)."""
    if "on" in _state:
        return _state["on"]
    on = False
    if sys.platform.startswith("linux") and os.environ.get(ENV, "keep") != "system":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            on = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
        except (OSError, AttributeError):  # not glibc (musl has no mallopt): keep the system's policy
            on = False
    _state["on"] = on
    return on


def memory_available() -> int:
    """Bytes this machine can still give a process: ``MemAvailable`` of ``/proc/meminfo`` on Linux, else the
    physical memory. A bound for sizes read from files or flags before anything is allocated for them."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**63 - 1  # unknown: no bound


class InsufficientMemoryError(ValueError):
    """A size asked for by an input (a flag, a file's header, a config's count) that this machine cannot hold,
    refused before allocating; the command line reports it in one line, exit 2, like any bad input."""


def check_fits(nbytes: int, what: str) -> None:
    """InsufficientMemoryError naming ``what`` when ``nbytes`` exceed the memory available (both in GiB).
    Requests below 256 MiB pass without reading /proc: predict asks once per batch of the sampling loop."""
    if nbytes < 2**28:
        return
    have = memory_available()
    if nbytes > have:
        raise InsufficientMemoryError(f"{what} needs {nbytes / 2**30:.1f} GiB; this machine has "
                                      f"{have / 2**30:.1f} GiB available")  # fmt: skip
