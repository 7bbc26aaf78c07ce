"""The NVIDIA targets the compile check builds for: per-SM limits, occupancy, and datasheet peaks.

Limits are from NVIDIA's CUDA C++ Programming Guide, table "Technical Specifications per Compute
Capability" (CUDA 12): registers per SM, the largest shared memory a block may opt into, shared memory per
SM (1 KiB of it reserved per resident block), threads and blocks per SM. Peaks are the datasheet figures of
one card per target (dense tensor-core rates with FP32 accumulation); a projection from them is a lower
bound on time, never a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

REGISTERS_PER_SM = 65536
REGISTER_ALLOCATION_UNIT = 256  # registers are allocated per warp in units of 256
SHARED_RESERVED_PER_BLOCK = 1024


@dataclass(frozen=True)
class Target:
    arch: int  # compute capability x 10
    card: str
    shared_per_block: int  # the opt-in maximum, bytes
    shared_per_sm: int
    threads_per_sm: int
    blocks_per_sm: int
    fp32_flops: float
    fp16_tensor_flops: float  # dense, FP32 accumulate
    dram_bytes_per_s: float

    @property
    def name(self) -> str:
        return f"sm_{self.arch}"


TARGETS = {
    t.name: t
    for t in (
        # A100 SXM4 80 GB datasheet: 19.5 TFLOPS FP32, 312 TFLOPS FP16 tensor, 2039 GB/s.
        Target(80, "A100 SXM4 80GB", 166912, 167936, 2048, 32, 19.5e12, 312e12, 2039e9),
        # GeForce RTX 3090 (GA102 whitepaper): the paper's card; FP16 tensor at FP32 accumulate is half rate.
        Target(86, "GeForce RTX 3090", 101376, 102400, 1536, 16, 35.58e12, 71.16e12, 936.2e9),
        # L4 datasheet: 30.3 TFLOPS FP32, 121 TFLOPS FP16 tensor (dense), 300 GB/s.
        Target(89, "L4", 101376, 102400, 1536, 24, 30.3e12, 121e12, 300e9),
        # H100 SXM5 datasheet: 67 TFLOPS FP32, 989 TFLOPS FP16 tensor (dense), 3350 GB/s.
        Target(90, "H100 SXM5", 232448, 233472, 2048, 32, 67e12, 989e12, 3350e9),
    )
}


def occupancy(target: Target, registers: int, shared: int, num_warps: int) -> dict[str, int | str]:
    """Resident blocks and warps per SM that registers, shared memory, threads and the block limit allow,
    and which of them binds (the CUDA occupancy calculator's rules)."""
    regs_per_warp = -(-max(registers, 1) * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    limits = {
        "registers": REGISTERS_PER_SM // regs_per_warp // num_warps,
        "threads": target.threads_per_sm // (32 * num_warps),
        "blocks": target.blocks_per_sm,
    }
    if shared:
        limits["shared"] = target.shared_per_sm // (shared + SHARED_RESERVED_PER_BLOCK)
    blocks = min(limits.values())
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * num_warps,
        "occupancy_pct": round(100 * blocks * num_warps * 32 / target.threads_per_sm),
        "limited_by": min(limits, key=limits.get),
    }


def nvidia_tool(name: str) -> str:
    """The path of an NVIDIA binary (ptxas, cuobjdump) that triton ships with its nvidia backend."""
    from pathlib import Path

    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
