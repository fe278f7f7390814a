"""Optimizer memory per rank: shardopt at N = 1, 2, 4 against one unsharded torch.optim.

    python -m benchmarks.memory_per_rank [--numel 1000000]

Spawns real gloo worlds on loopback; for every sharded algorithm, takes one step on a model of
``--numel`` fp32 parameters and prints, per world size, the state bytes the busiest rank holds
(memory_stats()) as a fraction of torch.optim's (what the consolidated state_dict holds).
Writes the table to benchmarks/results/memory_per_rank.md.
"""

from __future__ import annotations

import argparse
import pathlib
import platform

import torch
from torch import nn

import shardopt
from shardopt.algorithms import ALGORITHMS
from tests.world import run_world

WORLD_SIZES = (1, 2, 4)


def make_model(numel: int) -> nn.Module:
    width = max(8, int((numel / 3) ** 0.5))
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width))


def measure(numel: int) -> dict[str, dict[str, int]]:
    results = {}
    for torch_class in ALGORITHMS:
        model = make_model(numel)
        optimizer = shardopt.ShardedOptimizer(model.parameters(), torch_class)
        model(torch.randn(4, model[0].in_features)).sum().backward()
        optimizer.step()
        full = optimizer.state_dict()["state"]
        results[torch_class.__name__] = {
            **optimizer.memory_stats(),
            "unsharded_state_bytes": sum(t.numel() * t.element_size() for e in full.values() for t in e.values()),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1_000_000)
    args = parser.parse_args()
    by_world = {n: run_world(measure, n, args.numel, timeout=900) for n in WORLD_SIZES}
    numel = sum(p.numel() for p in make_model(args.numel).parameters())
    header = "| algorithm | torch.optim state (MB) | " + " | ".join(f"N={n}: MB/rank (x of torch)" for n in WORLD_SIZES)
    lines = [
        f"Optimizer state per rank, {numel:,} fp32 parameters, stage 2 "
        f"({platform.machine()}, torch {torch.__version__}).",
        "",
        header + " |",
        "|" + " --- |" * (2 + len(WORLD_SIZES)),
    ]
    for name in by_world[1][0]:
        unsharded = by_world[1][0][name]["unsharded_state_bytes"]
        cells = []
        for n in WORLD_SIZES:
            busiest = max(rank[name]["state_bytes"] for rank in by_world[n])
            ratio = f"{busiest / unsharded:.3f}" if unsharded else "-"
            cells.append(f"{busiest / 1e6:.2f} ({ratio})")
        lines.append(f"| {name} | {unsharded / 1e6:.2f} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    out = pathlib.Path(__file__).parent / "results" / "memory_per_rank.md"
    out.write_text(table + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
