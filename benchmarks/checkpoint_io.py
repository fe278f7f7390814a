"""Checkpoint save and load: shardopt.checkpoint against torch.save of a consolidated state dict.

    python -m benchmarks.checkpoint_io [--params 100000000] [--world 2] [--dir DIR]

Spawns a gloo world of ``--world`` ranks on loopback. Every rank builds the same model of about
``--params`` fp32 parameters and takes one AdamW step; then, one after another:

* shardopt: ``shardopt.checkpoint.save`` (each rank writes its shard), and ``shardopt.checkpoint.load``
  into a fresh model and optimizer;
* torch.save: ``optimizer.state_dict()`` (consolidated, on every rank) and ``torch.save`` of
  ``{"model", "optimizer"}`` by rank 0; loading is ``torch.load(weights_only=True)`` on every rank
  followed by ``model.load_state_dict`` and ``optimizer.load_state_dict``.

Times are wall clock from a barrier to a barrier (the slowest rank). Peak memory is each rank's
resident set above its level just before the operation, sampled every millisecond. Loads read
files the saves just wrote, so mostly from the page cache. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import pathlib
import platform
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import shardopt
from tests.world import run_world

LAYERS = 6
RESULTS = pathlib.Path(__file__).parent / "results"
PAGE = os.sysconf("SC_PAGE_SIZE")


def make_model(params: int) -> nn.Module:
    width = max(8, int(math.sqrt(params / LAYERS)))
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(LAYERS)])


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


class PeakMemory:
    """The most resident memory above the level at entry, sampled by a thread while inside."""

    def __enter__(self) -> PeakMemory:
        self.base = self.peak = resident_bytes()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc: Any) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())

    @property
    def above(self) -> int:
        return self.peak - self.base


def measure(operation: Callable[[], Any]) -> tuple[float, int]:
    """Seconds from barrier to barrier, and this rank's peak memory above its level before."""
    import torch.distributed as dist

    gc.collect()
    dist.barrier()
    with PeakMemory() as memory:
        start = time.perf_counter()
        operation()
        dist.barrier()
        seconds = time.perf_counter() - start
    return seconds, memory.above


def trained(params: int) -> tuple[nn.Module, shardopt.ShardedOptimizer]:
    model = make_model(params)
    optimizer = shardopt.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, model[0].in_features)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def compare(params: int, directory: pathlib.Path) -> dict[str, tuple[float, int]]:
    import torch.distributed as dist

    rank = dist.get_rank()
    sharded, consolidated = directory / "sharded", directory / "consolidated.pt"
    model, optimizer = trained(params)
    results = {"shardopt save": measure(lambda: shardopt.checkpoint.save(sharded, model=model, optimizer=optimizer))}

    def torch_save() -> None:
        state = {"optimizer": optimizer.state_dict(), "model": model.state_dict()}
        if rank == 0:
            torch.save(state, consolidated)

    results["torch.save save"] = measure(torch_save)
    del model, optimizer
    model, optimizer = trained(params)
    results["shardopt load"] = measure(lambda: shardopt.checkpoint.load(sharded, model=model, optimizer=optimizer))

    def torch_load() -> None:
        state = torch.load(consolidated, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    results["torch.save load"] = measure(torch_load)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--dir", type=pathlib.Path, default=None, help="where to write (default: a temporary dir)")
    args = parser.parse_args()
    directory = pathlib.Path(tempfile.mkdtemp(dir=args.dir))
    try:
        by_rank = run_world(compare, args.world, args.params, directory, timeout=3600)
        sizes = {
            "shardopt": sum(f.stat().st_size for f in (directory / "sharded").iterdir()),
            "torch.save": (directory / "consolidated.pt").stat().st_size,
        }
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    numel = sum(p.numel() for p in make_model(args.params).parameters())
    lines = [
        f"AdamW checkpoint of {numel:,} fp32 parameters, N={args.world} gloo ranks on loopback "
        f"({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}).",
        "",
        "| method | save s | save peak MB/rank (max) | load s | load peak MB/rank (max) | on disk MB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method in ("shardopt", "torch.save"):
        cells = []
        for operation in ("save", "load"):
            seconds = max(rank[f"{method} {operation}"][0] for rank in by_rank)
            peak = max(rank[f"{method} {operation}"][1] for rank in by_rank)
            cells += [f"{seconds:.2f}", f"{peak / 2**20:.0f}"]
        lines.append(f"| {method} | {' | '.join(cells)} | {sizes[method] / 2**20:.0f} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "checkpoint_io.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
