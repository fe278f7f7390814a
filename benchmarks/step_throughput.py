"""Optimizer update throughput: shardopt against torch.optim, and against the memory roofline.

    python -m benchmarks.step_throughput [--numel 50e6] [--tensors 2000] [--repeats 7]

For every sharded algorithm, on one process and the same total parameters:
- torch.optim's for-loop, foreach and (Adam, AdamW, SGD, Adagrad) fused implementations
  over ``--tensors`` parameters;
- shardopt at N=1: the update of one flat shard (``update``), and the whole ``step()``
  with its gradient flattening (``step``);
- shardopt at N=2: each rank's update of its half, timed inside a real 2-rank gloo world;
- the memory roofline: the bytes the update must move per parameter (read parameter,
  gradient and state; write parameter and state) over an in-place STREAM-style
  bandwidth measured in the same run.
Prints a Markdown table and writes it, with a PNG chart, under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import shardopt
from shardopt import kernels
from shardopt.algorithms import ALGORITHMS
from tests.world import run_world

RESULTS = pathlib.Path(__file__).parent / "results"
KEYWORDS: dict[str, dict[str, Any]] = {"SGD": {"momentum": 0.9}}  # SGD without momentum has no state
NATIVE_FUSED = ("Adam", "AdamW", "SGD", "Adagrad")


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    return interleaved_medians([fn], repeats, warmup)[0]


def interleaved_medians(fns: list[Callable[[], Any]], repeats: int, warmup: int = 2) -> list[float]:
    """Median seconds of each function, timed in turns: each round runs every function once, so a
    change in the machine's load (other processes, frequency) falls on all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, seconds in zip(fns, times):
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
    return [statistics.median(seconds) for seconds in times]


class Stream:
    """STREAM-style probes over ``numel`` fp32 elements, in place, for bytes per second.

    An optimizer writes every tensor it reads in place, so the probes do too: an
    out-of-place triad also pays for write-allocate traffic that it does not count,
    and would understate the bandwidth an in-place update can reach. The best probe wins.
    """

    def __init__(self, numel: int) -> None:
        self.numel = numel
        self.a, self.b, self.c = (torch.rand(numel) for _ in range(3))

    def probes(self) -> list[tuple[int, Callable[[], Any]]]:
        """(bytes moved, function) of each probe."""
        a, b, c = self.a, self.b, self.c
        return [
            (3 * 4 * self.numel, lambda: a.add_(b, alpha=0.5)),
            (4 * 4 * self.numel, lambda: a.addcmul_(b, c, value=0.5)),
        ]

    def bandwidth_beside(self, fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
        """(median seconds of ``fn``, bandwidth in bytes per second) with the probes timed in
        turns with ``fn``: the roofline each update is held to is the machine's at that moment."""
        probes = self.probes()
        seconds = interleaved_medians([fn] + [probe for _, probe in probes], repeats)
        return seconds[0], max(moved / s for (moved, _), s in zip(probes, seconds[1:]))


def bytes_per_element(optimizer: torch.optim.Optimizer) -> int:
    """What one update must move per parameter element: read param, grad and every
    element-wise state tensor; write param and state back."""
    state = next(iter(optimizer.state_dict()["state"].values()), {})
    tensors = sum(1 for value in state.values() if value.dim() > 0)
    return 4 * (2 + 1 + 2 * tensors)


def make_params(numel: int, tensors: int) -> list[torch.nn.Parameter]:
    size = numel // tensors
    return [torch.nn.Parameter(torch.randn(size)) for _ in range(tensors)]


def time_torch(torch_class: type, params: list[torch.nn.Parameter], impl: str, repeats: int) -> float:
    options = {"foreach": impl == "foreach"} if impl != "fused" else {"fused": True}
    optimizer = torch_class(params, lr=1e-4, **KEYWORDS.get(torch_class.__name__, {}), **options)
    for p in params:
        p.grad = torch.randn_like(p)
    return median_seconds(optimizer.step, repeats)


def time_shardopt(
    torch_class: type, params: list[torch.nn.Parameter], repeats: int, stream: Stream
) -> tuple[float, float, int, float]:
    """(update seconds, step seconds, bytes per element, bandwidth beside the update) at N=1."""
    optimizer = shardopt.ShardedOptimizer(params, torch_class, lr=1e-4, **KEYWORDS.get(torch_class.__name__, {}))
    grads = [torch.randn_like(p) for p in params]

    def step() -> None:
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()

    step_seconds = median_seconds(step, repeats)
    update_seconds, bandwidth = stream.bandwidth_beside(lambda: time_update(optimizer), repeats)
    return update_seconds, step_seconds, bytes_per_element(optimizer), bandwidth


def time_update(optimizer: shardopt.ShardedOptimizer) -> None:
    """The update alone: every buffer's shard, as step() runs it, without the collectives."""
    works = []
    for buffer in optimizer._buffers:
        grad = buffer.grad_shard if buffer.grad_shard is not None else torch.zeros_like(buffer.param_shard)
        works += optimizer._plan(buffer, grad, torch.ones(len(buffer.params), dtype=torch.bool))
    optimizer._run(works)


def per_rank_update(numel: int, tensors: int, repeats: int) -> dict[str, tuple[float, float]]:
    """On each rank of a world: seconds of this rank's update, per algorithm, (all ranks updating at
    once, ranks taking turns). At once, the ranks of one machine share its memory bandwidth, which
    ranks on separate GPUs do not; taking turns shows the work each rank is left with."""
    import torch.distributed as dist

    torch.manual_seed(0)
    result = {}
    for torch_class in ALGORITHMS:
        params = make_params(numel, tensors)
        optimizer = shardopt.ShardedOptimizer(params, torch_class, lr=1e-4, **KEYWORDS.get(torch_class.__name__, {}))
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        together = median_seconds(lambda o=optimizer: time_update(o), repeats)
        for turn in range(dist.get_world_size()):
            dist.barrier()
            if turn == dist.get_rank():
                alone = median_seconds(lambda o=optimizer: time_update(o), repeats)
        dist.barrier()
        result[torch_class.__name__] = (together, alone)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=float, default=50e6)
    parser.add_argument("--tensors", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--name", default="step_throughput", help="results file name, without extension")
    args = parser.parse_args()
    numel, threads = int(args.numel), torch.get_num_threads()
    stream = Stream(numel)
    bandwidths = []
    # Each rank of the N=2 world runs with half of this process's threads, as two ranks share the machine.
    per_rank = [run_world(per_rank_update, n, numel, args.tensors, args.repeats, timeout=3600) for n in (1, 2)]
    rows = []
    for torch_class in ALGORITHMS:
        name = torch_class.__name__
        impls = ["forloop", "foreach"] + (["fused"] if name in NATIVE_FUSED else [])
        torch_seconds = {
            impl: time_torch(torch_class, make_params(numel, args.tensors), impl, args.repeats) for impl in impls
        }
        params = make_params(numel, args.tensors)
        update, step, moved, bandwidth = time_shardopt(torch_class, params, args.repeats, stream)
        bandwidths.append(bandwidth)
        n1 = per_rank[0][0][name][0]
        n2, n2_alone = (max(rank[name][i] for rank in per_rank[1]) for i in (0, 1))
        best = min(torch_seconds.values())
        rows.append(
            {
                "algorithm": name,
                **{f"torch {impl} (ms)": 1e3 * s for impl, s in torch_seconds.items()},
                "shardopt update (ms)": 1e3 * update,
                "shardopt step (ms)": 1e3 * step,
                "update speed-up vs best torch": best / update,
                "STREAM beside it (GB/s)": bandwidth / 1e9,
                "roofline (ms)": 1e3 * moved * numel / bandwidth,
                "% of roofline": 100 * (moved * numel / bandwidth) / update,
                "N=2/N=1 update per rank (1 thread)": n2 / n1,
                "N=2/N=1, ranks taking turns": n2_alone / n1,
            }
        )
    columns = list(dict.fromkeys(key for row in rows for key in row))
    header = (
        f"{numel:,} fp32 parameters in {args.tensors} tensors; {platform.machine()}, {os.cpu_count()} cores, "
        f"{threads} torch threads, torch {torch.__version__}; in-place STREAM bandwidth "
        f"{min(bandwidths) / 1e9:.1f}-{max(bandwidths) / 1e9:.1f} GB/s, "
        "timed in turns with each update; "
        f"shardopt path: {'compiled where not native' if os.environ.get(kernels.COMPILE_ENV) != '0' else 'eager'}."
    )
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        cells = [row.get(c, "") for c in columns]
        lines.append("| " + " | ".join(f"{c:.2f}" if isinstance(c, float) else str(c) for c in cells) + " |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(table + "\n")
    plot(rows, RESULTS / f"{args.name}.png")


def plot(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["algorithm"] for row in rows]
    series = ["torch forloop (ms)", "torch foreach (ms)", "torch fused (ms)", "shardopt update (ms)", "roofline (ms)"]
    figure, axis = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(series)
    for i, name in enumerate(series):
        values = [row.get(name, 0.0) for row in rows]
        axis.bar([x + i * width for x in range(len(rows))], values, width, label=name.replace(" (ms)", ""))
    axis.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], names, rotation=30)
    axis.set_ylabel("ms per update")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)


if __name__ == "__main__":
    main()
