"""The Python cost of ``step()``: how it grows with the number of parameters and of buckets.

    python -m benchmarks.step_overhead [--repeats 30]

One process (a world of one, so no communication), AdamW over P parameters of 16 elements
each (so the arithmetic is negligible and what is left is bookkeeping), P from 100 to 20,000.
For each P: torch.optim's fused AdamW ``step()`` over the P tensors, and shardopt's ``step()``
after a real backward (gradients arrive through the hooks) with one bucket and with one
bucket per 100 parameters. Prints a Markdown table and writes it under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import time

import torch

import shardopt
from benchmarks.report import markdown, publish
from benchmarks.timing import median_seconds

RESULTS = pathlib.Path(__file__).parent / "results"
COUNTS = (100, 1_000, 5_000, 20_000)
ELEMENTS = 16


def make(count: int) -> tuple[list[torch.nn.Parameter], torch.Tensor]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(ELEMENTS)) for _ in range(count)], torch.randn(ELEMENTS)


def backward(params: list[torch.nn.Parameter], x: torch.Tensor) -> None:
    # One op for all parameters keeps the autograd graph cheap next to the hooks we time.
    torch.stack(params).mul(x).sum().backward()


def time_torch(count: int, repeats: int) -> float:
    params, x = make(count)
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    backward(params, x)
    return median_seconds(optimizer.step, repeats)


def time_shardopt(count: int, per_bucket: int | None, repeats: int) -> tuple[float, float, int]:
    """(step seconds, backward seconds, buckets) for shardopt at N=1, gradients from a real backward."""
    params, x = make(count)
    cap = per_bucket * ELEMENTS * 4 / 2**20 if per_bucket else 1024
    optimizer = shardopt.AdamW(params, lr=1e-3, bucket_cap_mb=cap, fused=True)
    steps, backwards = [], []

    def one() -> None:
        start = time.perf_counter()
        backward(params, x)
        middle = time.perf_counter()
        optimizer.step()
        backwards.append(middle - start)
        steps.append(time.perf_counter() - middle)

    median_seconds(one, repeats)
    return statistics.median(steps), statistics.median(backwards), len(optimizer.buffers)


def time_plain_backward(count: int, repeats: int) -> float:
    params, x = make(count)

    def one() -> None:
        for p in params:
            p.grad = None
        backward(params, x)

    return median_seconds(one, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    rows = []
    for count in COUNTS:
        torch_step = time_torch(count, args.repeats)
        plain = time_plain_backward(count, args.repeats)
        one_step, one_backward, _ = time_shardopt(count, None, args.repeats)
        many_step, many_backward, buckets = time_shardopt(count, 100, args.repeats)
        rows.append(
            {
                "parameters": count,
                "torch fused step (ms)": 1e3 * torch_step,
                "shardopt step, 1 bucket (ms)": 1e3 * one_step,
                "shardopt step, P/100 buckets (ms)": 1e3 * many_step,
                "shardopt step per parameter, 1 bucket (us)": 1e6 * one_step / count,
                "backward alone (ms)": 1e3 * plain,
                "backward + hooks, 1 bucket (ms)": 1e3 * one_backward,
                "backward + hooks, P/100 buckets (ms)": 1e3 * many_backward,
                "buckets (P/100)": buckets,
            }
        )
    header = (
        f"AdamW over P parameters of {ELEMENTS} fp32 elements, one process (N=1); {platform.machine()}, "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
        f"median of {args.repeats}."
    )
    publish(markdown(header, rows, digits=3), RESULTS / "step_overhead.md")


if __name__ == "__main__":
    main()
