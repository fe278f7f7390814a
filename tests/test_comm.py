"""comm.py's collectives on real gloo worlds: each way of moving the bytes gives the same result."""

from __future__ import annotations

import pytest
import torch

from shardopt import comm as comm_module
from shardopt.comm import Comm
from tests.world import run_world


def collectives(via_all_reduce: bool, numel: int) -> dict[str, torch.Tensor]:
    import torch.distributed as dist

    comm = Comm(None, timeout=60)
    comm._via_all_reduce = via_all_reduce
    comm_module.ALL_GATHER_VIA_ALL_REDUCE_NUMEL = 0  # take the all-reduce path at any size
    rank, world = comm.rank, comm.world_size
    generator = torch.Generator().manual_seed(rank)
    full = torch.randn(numel * world, generator=generator)
    inputs = full.clone()
    shard = torch.empty(numel)
    comm.reduce_scatter(shard, full, "test reduce-scatter").wait()
    flat = torch.zeros(numel * world)
    flat[rank * numel : (rank + 1) * numel] = rank + 1
    comm.all_gather(flat, flat[rank * numel : (rank + 1) * numel], "test all-gather").wait()
    separate = torch.full((numel * world,), -1.0)
    comm.all_gather(separate, torch.full((numel,), float(rank)), "test all-gather").wait()
    assert dist.get_world_size() == world
    return {"inputs": inputs, "shard": shard, "in_place": flat, "separate": separate}


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("via_all_reduce", [False, True], ids=["native", "via-all-reduce"])
def test_reduce_scatter_and_all_gather(world_size: int, via_all_reduce: bool) -> None:
    numel = 5
    # fresh: collectives() rebinds comm.ALL_GATHER_VIA_ALL_REDUCE_NUMEL for the rest of its process.
    per_rank = run_world(collectives, world_size, via_all_reduce, numel, fresh=True)
    total = sum(result["inputs"] for result in per_rank)
    expected_gather = torch.arange(1, world_size + 1, dtype=torch.float32).repeat_interleave(numel)
    for rank, result in enumerate(per_rank):
        torch.testing.assert_close(result["shard"], total[rank * numel : (rank + 1) * numel])
        assert torch.equal(result["in_place"], expected_gather)
        assert torch.equal(result["separate"], expected_gather - 1)


def test_a_world_of_one_needs_no_process_group() -> None:
    comm = Comm(None, timeout=1)
    assert (comm.rank, comm.world_size) == (0, 1)
    full, shard = torch.arange(4.0), torch.empty(4)
    comm.reduce_scatter(shard, full, "x").wait()
    assert torch.equal(shard, full)
