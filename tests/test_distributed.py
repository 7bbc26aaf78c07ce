"""harmonizer_fast.distributed's process-group lifetime: the package ends only the group it created."""

import torch.distributed as dist

from harmonizer_fast import distributed


def test_close_leaves_a_group_the_caller_made(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert distributed.init_distributed() == (0, 1)  # joins nothing: the caller's group stands
        assert distributed.close_distributed() is False
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
    assert distributed.close_distributed() is False  # nothing joined, nothing to end


def test_close_ends_the_group_it_joined(monkeypatch):
    store, real = dist.HashStore(), dist.init_process_group

    def joined(backend):  # what torchrun's env:// rendezvous does, for a world of one
        real(backend, store=store, rank=0, world_size=1)

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the rendezvous itself is stubbed above
    monkeypatch.setattr(distributed.dist, "init_process_group", joined)
    distributed.init_distributed()
    assert dist.is_initialized()
    assert distributed.close_distributed() is True
    assert not dist.is_initialized()
