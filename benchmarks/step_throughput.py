"""Optimizer update throughput: shardopt against torch.optim, and against the memory roofline.

    python -m benchmarks.step_throughput [--numel 50e6] [--tensors 2000] [--repeats 7]

For every sharded algorithm, on one process and the same total parameters:
- torch.optim's for-loop, foreach and (Adam, AdamW, SGD, Adagrad) fused implementations
  over ``--tensors`` parameters;
- shardopt at N=1: the update of one flat shard (``update``), and the whole ``step()``
  with its gradient flattening (``step``);
- shardopt at N=2: each rank's update of its half, timed inside a real 2-rank gloo world, ranks
  taking turns, against the same rank's update of all the parameters (N=1) in the same turns; and
  with both ranks updating at once (they then share the machine's memory bandwidth);
- the memory roofline: the bytes the update must move per parameter (read parameter,
  gradient and state; write parameter and state) over an in-place STREAM-style
  bandwidth measured in the same run.
Every contender of a row is timed in turns (medians); the ratios the targets are about (speed-up
against torch's fastest, percent of the roofline, N=2/N=1) come from rounds of their own pairs,
best of ``--repeats``, as STREAM reports its best time (see :func:`benchmarks.timing.best_seconds`),
the speed-up in both allocation orders (:func:`head_to_head`).
Prints a Markdown table and writes it, with a PNG chart, under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import platform
import statistics
from typing import Any

import torch

import shardopt
from benchmarks import roofline
from benchmarks.report import markdown, publish
from benchmarks.timing import best_seconds, interleaved_medians
from benchmarks.updates import KEYWORDS, make_params, shardopt_steps, time_update, torch_step
from shardopt.algorithms import ALGORITHMS
from shardopt.elements import kernels
from tests.world import run_world

RESULTS = pathlib.Path(__file__).parent / "results"
NATIVE_FUSED = ("Adam", "AdamW", "SGD", "Adagrad")


def per_rank_update(numel: int, tensors: int, repeats: int) -> dict[str, tuple[float, float, float]]:
    """On each rank of a world: best seconds of this rank's update, per algorithm: (all ranks
    updating at once; ranks taking turns; in the same turns, this rank updating all the parameters alone).

    At once, the ranks of one machine share its memory bandwidth, which ranks on separate GPUs do
    not; taking turns shows the work each rank is left with. The update of all parameters (a world
    of one, on a group of this rank alone) is timed in turns with the shard's, in the same process
    with the same threads, so that a change in the machine's load falls on both alike."""
    import torch.distributed as dist

    torch.manual_seed(0)
    rank, world = dist.get_rank(), dist.get_world_size()
    alone_groups = [dist.new_group([r]) for r in range(world)]
    result = {}
    for torch_class in ALGORITHMS:
        keywords = {"lr": 1e-4, **KEYWORDS.get(torch_class.__name__, {})}
        params, whole_params = make_params(numel, tensors), make_params(numel, tensors)
        optimizer = shardopt.ShardedOptimizer(params, torch_class, **keywords)
        whole = shardopt.ShardedOptimizer(whole_params, torch_class, process_group=alone_groups[rank], **keywords)
        for p in params + whole_params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        whole.step()
        together = best_seconds([lambda o=optimizer: time_update(o)], repeats)[0]
        for turn in range(world):
            dist.barrier()
            if turn == rank:
                alone, whole_alone = best_seconds(
                    [lambda o=optimizer: time_update(o), lambda o=whole: time_update(o)], repeats
                )
        dist.barrier()
        result[torch_class.__name__] = (together, alone, whole_alone)
        del optimizer, whole, params, whole_params
    return result


def head_to_head(
    torch_class: type, numel: int, tensors: int, impl: str, torch_first: list[float], repeats: int
) -> float:
    """shardopt's update against torch's ``impl``, in rounds of their own, best of ``repeats``: the
    geometric mean of the speed-up with torch's tensors allocated first (``torch_first``: seconds of
    shardopt's, torch's) and, on fresh fixtures, with shardopt's allocated first. Two runs of one
    kernel over the same bytes (torch's fused ones) differ with the order alone: 0.96-0.99x one
    way, 1.00-1.03x the other (Adam and SGD over 8 tensors of 6.25M elements, three trials each)."""
    update, _, _ = shardopt_steps(torch_class, numel, tensors)
    torch_update = torch_step(torch_class, numel, tensors, impl)
    ours_first = best_seconds([update, torch_update], repeats)
    return math.sqrt(torch_first[1] / torch_first[0] * ours_first[1] / ours_first[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=float, default=50e6)
    parser.add_argument("--tensors", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--name", default="step_throughput", help="results file name, without extension")
    args = parser.parse_args()
    numel, threads = int(args.numel), torch.get_num_threads()
    stream = roofline.Stream(numel)
    bandwidths = []
    # Each rank of the world runs with one thread, as two ranks share the machine's two cores.
    per_rank = run_world(per_rank_update, 2, numel, args.tensors, args.repeats, timeout=3600)
    rows = []
    for torch_class in ALGORITHMS:
        name = torch_class.__name__
        impls = ["forloop", "foreach"] + (["fused"] if name in NATIVE_FUSED else [])
        # Every contender of a row is timed in turns, so that a change in the machine's load falls
        # on all of them alike; each ratio then in rounds of its own pair (best_seconds).
        torch_steps = {impl: torch_step(torch_class, numel, args.tensors, impl) for impl in impls}
        update_fn, step_fn, moved = shardopt_steps(torch_class, numel, args.tensors)
        seconds = interleaved_medians([*torch_steps.values(), update_fn, step_fn], args.repeats)
        torch_seconds = dict(zip(torch_steps, seconds))
        update, step = seconds[len(impls)], seconds[len(impls) + 1]
        fastest = min(torch_seconds, key=torch_seconds.__getitem__)
        torch_first = best_seconds([update_fn, torch_steps[fastest]], args.repeats)
        beside_stream = roofline.measure(update_fn, moved, stream, args.repeats)
        del torch_steps, update_fn, step_fn
        speed_up = head_to_head(torch_class, numel, args.tensors, fastest, torch_first, args.repeats)
        bandwidths.append(beside_stream.bandwidth)
        n2 = max(rank[name][0] for rank in per_rank)
        # Each rank's shard against its own update of everything, timed in the same turns.
        in_turns = max(rank[name][1] / rank[name][2] for rank in per_rank)
        n1 = statistics.median(rank[name][2] for rank in per_rank)
        rows.append(
            {
                "algorithm": name,
                **{f"torch {impl} (ms)": 1e3 * s for impl, s in torch_seconds.items()},
                "shardopt update (ms)": 1e3 * update,
                "shardopt step (ms)": 1e3 * step,
                "update speed-up vs best torch, head to head": speed_up,
                "STREAM beside it (GB/s)": beside_stream.bandwidth / 1e9,
                "roofline (ms)": 1e3 * beside_stream.seconds,
                "update beside STREAM (ms)": 1e3 * beside_stream.update,
                "% of roofline": beside_stream.percent,
                "N=2/N=1 per rank, in turns (1 thread)": in_turns,
                "N=2/N=1, both ranks at once": n2 / n1,
            }
        )
    header = (
        f"{numel:,} fp32 parameters in {args.tensors} tensors; {platform.machine()}, {os.cpu_count()} cores, "
        f"{threads} torch threads, torch {torch.__version__}; in-place STREAM bandwidth "
        f"{min(bandwidths) / 1e9:.1f}-{max(bandwidths) / 1e9:.1f} GB/s; "
        f"ms columns: medians of {args.repeats}, all of a row's contenders in turns; ratios: best of "
        f"{args.repeats}, each pair in turns of its own; "
        f"shardopt path: {'compiled where not native' if os.environ.get(kernels.COMPILE_ENV) != '0' else 'eager'}."
    )
    publish(markdown(header, rows), RESULTS / f"{args.name}.md")
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
