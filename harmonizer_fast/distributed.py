"""Scale-out through torch.distributed (launched by torchrun): process-group setup, and a batch norm whose
statistics cover the global batch on any device, so that two processes compute what one does."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_JOINED = False  # whether init_distributed created the process group (then close_distributed ends it)


def init_distributed() -> tuple[int, int]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); returns (rank, world size)."""
    global _JOINED
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        _JOINED = True
    return rank_and_world()


def close_distributed() -> bool:
    """Destroy the process group :func:`init_distributed` created (a group the caller made is theirs to end);
    returns whether there was one. No barrier: a rank that failed must not wait for ranks that never come."""
    global _JOINED
    if not _JOINED:
        return False
    _JOINED = False
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return True


class SyncBatchNorm2d(torch.nn.BatchNorm2d):
    """Batch norm whose training statistics cover the global batch of all processes, on any device.

    torch's SyncBatchNorm runs on GPUs only; this one all-reduces the per-channel count, sum and sum of
    squares (through the autograd-aware all_reduce, so the backward sums the gradients of the statistics
    too). Used for CPU (gloo) runs, so two processes compute what one does on the same global batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        # Statistics in float64, as ATen's CPU batch norm accumulates (acc_type<float> is double there): the
        # one-pass E[x^2] - E[x]^2 would otherwise lose digits to cancellation in float32.
        c = x.shape[1]
        xd = x.double()
        count = torch.full((1,), x.numel() / c, dtype=torch.float64, device=x.device)
        stats = all_reduce(torch.cat([xd.sum((0, 2, 3)), (xd * xd).sum((0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c : 2 * c] / n - mean * mean
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean.detach().to(x.dtype))
            self.running_var.mul_(1 - m).add_((m * var.detach() * n / (n - 1)).to(x.dtype))
        invstd = torch.rsqrt(var + self.eps)
        y = ((xd - mean[None, :, None, None]) * invstd[None, :, None, None]).to(x.dtype)
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def convert_sync_batchnorm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """torch's SyncBatchNorm on CUDA, :class:`SyncBatchNorm2d` elsewhere (same parameters and buffers)."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is torch.nn.BatchNorm2d:
            new = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats)  # fmt: skip
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            new.requires_grad_(child.weight.requires_grad)
            setattr(module, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return module
