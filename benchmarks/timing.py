"""Timing helpers of the benchmarks: functions timed in turns, as medians or best runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    return interleaved_medians([fn], repeats, warmup)[0]


def interleaved_seconds(fns: list[Callable[[], Any]], repeats: int, warmup: int = 2) -> list[list[float]]:
    """Seconds of each run of each function, timed in turns: each round runs every function once,
    so a change in the machine's load (other processes, frequency) falls on all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, seconds in zip(fns, times):
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
    return times


def interleaved_medians(fns: list[Callable[[], Any]], repeats: int, warmup: int = 2) -> list[float]:
    """Median seconds of each function, timed in turns."""
    return [statistics.median(seconds) for seconds in interleaved_seconds(fns, repeats, warmup)]


def best_seconds(fns: list[Callable[[], Any]], repeats: int, warmup: int = 2) -> list[float]:
    """Best (shortest) seconds of each function, timed in turns.

    For the ratios of memory-bound kernels, as STREAM reports its best time: on this VM the noise
    only ever adds time, and how much depends on what ran just before (a 39 ms update took 37 ms
    after 500 ms of busy cores, 50-110 ms after 300 ms idle, and 44-74 ms right after one of
    torch's slow for-loop steps), so each ratio is timed in rounds of its own pair only, and the
    best run of each is the one the machine disturbed least."""
    return [min(seconds) for seconds in interleaved_seconds(fns, repeats, warmup)]
