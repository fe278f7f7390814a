"""Percent of the memory roofline each algorithm's shard update reaches.

    python -m benchmarks.roofline [--numel 50e6] [--tensors 2000] [--repeats 7]

For every sharded algorithm, at N=1: the bytes one update must move per parameter (read the
parameter, its gradient and every element-wise state tensor; write the parameter and the state)
over an in-place STREAM-style bandwidth measured beside it, against shardopt's update of the same
parameters; the update and the probes timed in turns, best of ``--repeats`` each, as STREAM
reports its best time (see :func:`benchmarks.timing.best_seconds`). Prints a Markdown table and
writes it, with a PNG chart, under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.report import markdown, publish
from benchmarks.timing import best_seconds
from benchmarks.updates import shardopt_steps
from shardopt.algorithms import ALGORITHMS

RESULTS = pathlib.Path(__file__).parent / "results"


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


@dataclass(frozen=True)
class Roofline:
    """An update of ``numel`` parameters that must move ``bytes_per_param`` each, timed beside the probes."""

    numel: int
    bytes_per_param: int
    bandwidth: float  # bytes per second, the best probe's best run
    update: float  # seconds, the update's best run

    @property
    def seconds(self) -> float:
        """The least time the update could take at that bandwidth."""
        return self.bytes_per_param * self.numel / self.bandwidth

    @property
    def percent(self) -> float:
        return 100 * self.seconds / self.update


def measure(update: Callable[[], Any], bytes_per_param: int, stream: Stream, repeats: int) -> Roofline:
    """``update`` and ``stream``'s probes timed in turns of their own, best of ``repeats`` each."""
    probes = stream.probes()
    seconds = best_seconds([update, *(probe for _, probe in probes)], repeats)
    bandwidth = max(moved / s for (moved, _), s in zip(probes, seconds[1:]))
    return Roofline(stream.numel, bytes_per_param, bandwidth, seconds[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=float, default=50e6)
    parser.add_argument("--tensors", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    numel = int(args.numel)
    stream = Stream(numel)
    rows = []
    for torch_class in ALGORITHMS:
        update, _, moved = shardopt_steps(torch_class, numel, args.tensors)
        roofline = measure(update, moved, stream, args.repeats)
        del update
        rows.append(
            {
                "algorithm": torch_class.__name__,
                "bytes per parameter": moved,
                "STREAM beside it (GB/s)": roofline.bandwidth / 1e9,
                "roofline (ms)": 1e3 * roofline.seconds,
                "shardopt update (ms)": 1e3 * roofline.update,
                "% of roofline": roofline.percent,
            }
        )
    header = (
        f"{numel:,} fp32 parameters in {args.tensors} tensors, N=1; {platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; best of {args.repeats}, the update "
        "and the STREAM probes in turns."
    )
    publish(markdown(header, rows), RESULTS / "roofline.md")
    plot(rows, RESULTS / "roofline.png")


def plot(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(10, 4))
    axis.bar([row["algorithm"] for row in rows], [row["% of roofline"] for row in rows])
    axis.axhline(100, color="black", linewidth=0.8)
    axis.axhline(80, color="grey", linestyle="--", linewidth=0.8, label="target: 80%")
    axis.set_ylabel("% of the memory roofline")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)


if __name__ == "__main__":
    main()
