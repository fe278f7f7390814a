"""memory_stats(): each rank holds 1/N of the optimizer state (plus alignment padding)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import shardopt
from tests.world import run_world


def make_wide_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(61, 37), nn.Linear(37, 29), nn.Linear(29, 3))


def measure(stage: int) -> dict[str, int]:
    import torch.distributed as dist

    model = make_wide_model()
    optimizer = shardopt.AdamW(model.parameters(), lr=1e-3, stage=stage)
    before = optimizer.memory_stats()
    model(torch.randn(8, 61)).sum().backward()
    optimizer.step()
    stats = optimizer.memory_stats()
    (buffer,) = optimizer.buffers
    full_state = optimizer.state_dict()["state"]
    return {
        "before": before["state_bytes"],
        **stats,
        "padded_numel": buffer.layout.numel,
        "numel": sum(p.numel() for p in model.parameters()),
        "params": len(list(model.parameters())),
        "full_state_bytes": sum(t.numel() * t.element_size() for e in full_state.values() for t in e.values()),
        "world": dist.get_world_size(),
    }


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_state_per_rank_is_total_over_n_plus_padding(world_size: int, stage: int) -> None:
    per_rank = run_world(measure, world_size, stage)
    first = per_rank[0]
    numel, padded = first["numel"], first["padded_numel"]
    # AdamW: exp_avg and exp_avg_sq (fp32) per element; steps are 0-d scalars.
    total_state = 2 * 4 * numel
    padding = padded - numel
    assert padding < (first["params"] + world_size) * 4  # 16-byte alignment of each start and of each shard
    for stats in per_rank:
        assert stats["before"] == 0  # no state before the first step: nothing is created ahead
        assert stats["state_bytes"] <= total_state / world_size + 2 * 4 * padding / world_size
        assert stats["param_bytes"] == 4 * numel  # the parameters' own storage
        assert stats["grad_bytes"] == 4 * (padded if stage == 1 else padded // world_size)
    assert sum(stats["state_bytes"] for stats in per_rank) == 2 * 4 * padded
    assert first["full_state_bytes"] == total_state + 4 * first["params"]  # + one fp32 step per parameter
