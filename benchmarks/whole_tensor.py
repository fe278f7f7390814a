"""Muon's Newton-Schulz work divided across ranks, and LBFGS's history bytes per rank.

    python -m benchmarks.whole_tensor [--matrices 8] [--width 256] [--steps 5]

Spawns real gloo worlds on loopback at N = 1, 2, 4 (one thread per rank). Muon: each rank runs
Newton-Schulz only for the matrices it owns; the table gives the busiest rank's CPU time in
torch's update per step (thread CPU time, so that ranks sharing the machine's cores do not
inflate it) and the wall time of a whole step. LBFGS: the busiest rank's state bytes against
torch.optim.LBFGS's after the history is full. Writes benchmarks/results/whole_tensor.md and .png.
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import shardopt
from tests.world import run_world

WORLD_SIZES = (1, 2, 4)
HISTORY = 10
LBFGS_KEYWORDS = {"history_size": HISTORY, "max_iter": 2 * HISTORY, "tolerance_grad": 0.0, "tolerance_change": 0.0}


def muon_rank(matrices: int, width: int, steps: int) -> dict[str, float]:
    """This rank's CPU seconds in torch's Muon update, and wall seconds of step(), per step."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(width, width) / width**0.5) for _ in range(matrices)]
    optimizer = shardopt.Muon(params, lr=0.02)
    inner, spent = optimizer._inner, [0.0]
    update = inner.step

    def timed_update() -> None:
        started = time.thread_time()
        update()
        spent[0] += time.thread_time() - started

    inner.step = timed_update  # the owner's update alone: Newton-Schulz and the momentum
    wall = 0.0
    for step in range(steps + 1):
        for p in params:
            p.grad = torch.randn_like(p)
        started = time.perf_counter()
        optimizer.step()
        if step == 0:  # warm-up
            spent[0] = 0.0
        else:
            wall += time.perf_counter() - started
    return {"update_cpu_s": spent[0] / steps, "step_wall_s": wall / steps}


def fit_lbfgs(lbfgs: Callable[..., Any], numel: int) -> tuple[Any, nn.Module]:
    """One step of ``lbfgs`` (torch's or ours) on a least-squares fit of ``numel`` weights: every rank fits
    the same data, and no tolerance stops it early, so that every world runs the same iterations and
    the history fills to HISTORY pairs."""
    torch.manual_seed(0)
    model = nn.Linear(numel // 8, 8, bias=False)
    x, y = torch.randn(64, numel // 8), torch.randn(64, 8)
    optimizer = lbfgs(model.parameters(), **LBFGS_KEYWORDS)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return optimizer, model


def lbfgs_rank(numel: int) -> dict[str, int]:
    return fit_lbfgs(shardopt.LBFGS, numel)[0].memory_stats()


def torch_lbfgs_bytes(numel: int) -> int:
    optimizer, model = fit_lbfgs(torch.optim.LBFGS, numel)
    tensors: list[Any] = []
    for value in optimizer.state[model.weight].values():
        tensors += value if isinstance(value, list) else [value]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrices", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lbfgs-numel", type=int, default=1_000_000)
    args = parser.parse_args()
    muon = {n: run_world(muon_rank, n, args.matrices, args.width, args.steps, timeout=900) for n in WORLD_SIZES}
    lbfgs = {n: run_world(lbfgs_rank, n, args.lbfgs_numel, timeout=900) for n in WORLD_SIZES}
    unsharded = torch_lbfgs_bytes(args.lbfgs_numel)
    base = max(rank["update_cpu_s"] for rank in muon[1])
    lines = [
        f"Muon: {args.matrices} matrices of {args.width}x{args.width}; LBFGS: {args.lbfgs_numel:,} parameters, "
        f"history_size={HISTORY} ({platform.machine()}, {torch.get_num_threads()} threads here, one per rank; "
        f"torch {torch.__version__}).",
        "",
        "| N | Muon update CPU s/step, busiest rank (x of N=1) | Muon step wall s | "
        "LBFGS state MB, busiest rank (x of torch.optim) |",
        "| --- | --- | --- | --- |",
    ]
    for n in WORLD_SIZES:
        busiest = max(rank["update_cpu_s"] for rank in muon[n])
        wall = max(rank["step_wall_s"] for rank in muon[n])
        state = max(rank["state_bytes"] for rank in lbfgs[n])
        lines.append(
            f"| {n} | {busiest:.4f} ({busiest / base:.2f}) | {wall:.4f} | {state / 1e6:.2f} ({state / unsharded:.3f}) |"
        )
    lines.append(f"\ntorch.optim.LBFGS state: {unsharded / 1e6:.2f} MB on every rank.")
    table = "\n".join(lines)
    print(table)
    results = pathlib.Path(__file__).parent / "results"
    (results / "whole_tensor.md").write_text(table + "\n")
    plot(muon, lbfgs, unsharded, base, results / "whole_tensor.png")
    print(f"\nwritten to {results / 'whole_tensor.md'} and .png")


def plot(muon: dict, lbfgs: dict, unsharded: int, base: float, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(WORLD_SIZES, [max(r["update_cpu_s"] for r in muon[n]) / base for n in WORLD_SIZES], "o-", label="ours")
    left.plot(WORLD_SIZES, [1 / n for n in WORLD_SIZES], "k--", label="1/N")
    left.set(title="Muon Newton-Schulz work, busiest rank", xlabel="ranks", ylabel="x of one rank")
    right.plot(WORLD_SIZES, [max(r["state_bytes"] for r in lbfgs[n]) / unsharded for n in WORLD_SIZES], "o-")
    right.plot(WORLD_SIZES, [1 / n for n in WORLD_SIZES], "k--")
    right.set(title="LBFGS state, busiest rank", xlabel="ranks", ylabel="x of torch.optim")
    left.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=100)


if __name__ == "__main__":
    main()
