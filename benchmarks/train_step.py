"""One training step against the peers: DDP, ZeroRedundancyOptimizer, FSDP2, DeepSpeed ZeRO-1/2, shardopt.

    python -m benchmarks.train_step [--params 100e6] [--world 2] [--steps 12] [--warmup 3]

For each contender, starts a fresh world of --world ranks under torchrun (rendezvous on
127.0.0.1, gloo on loopback on CPU, NCCL when there is a GPU per rank), trains the same
model (blocks of LayerNorm -> Linear -> GELU -> Linear with a residual, fp32, sized to
--params) with AdamW(lr=1e-3, weight_decay=0.01) on the same per-rank batches, and
reports per rank: the median wall time of forward + backward + optimizer step, the peak
memory, the optimizer state, and the bytes each step puts on the wire. Each contender runs
in its own processes, so no contender's memory counts towards another's peak, and --rounds
times (default 2: forward, then reverse order), each row its fastest round (see run_all).

Prints a Markdown table and writes it to benchmarks/results/train_step.md, with a bar chart
in benchmarks/results/train_step.png. Under the table: whether every loss is finite and
whether shardopt ends with DDP + torch.optim.AdamW's parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.train_step_rank import CONTENDERS, count_params, model_width

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
MB = 1e6
REFERENCE = "ddp"
# The rows that must end with the reference's parameters: the same math on the same data.
PARITY = ("shardopt1", "shardopt2", "shardopt2-overlap")
# torch.optim's fp32 parity tolerance per step (shared/DESIGN.md), times the number of steps.
RTOL_PER_STEP, ATOL_PER_STEP = 1e-5, 1e-6


@dataclass
class Outcome:
    """One contender's run: each rank's measurements, or why there are none."""

    name: str
    ranks: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    max_param_diff: float | None = None
    params_close: bool | None = None

    @property
    def label(self) -> str:
        return CONTENDERS[self.name].label

    @property
    def step_ms(self) -> float:
        # A step lasts until its slowest rank is done.
        per_step = [max(steps) for steps in zip(*(rank["step_seconds"] for rank in self.ranks))]
        return 1e3 * statistics.median(per_step)

    def busiest(self, key: str) -> float:
        return max(rank[key] for rank in self.ranks)

    @property
    def wire_bytes(self) -> float:
        return max(rank["counted_wire_bytes"] + rank["analytic_wire_bytes"] for rank in self.ranks)

    @property
    def losses_finite(self) -> bool:
        return all(all(map(_finite, rank["losses"])) for rank in self.ranks)


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


# ---------------------------------------------------------------- running


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=100e6, help="model size in parameters (about)")
    parser.add_argument("--world", type=int, default=2, help="ranks per contender")
    parser.add_argument("--steps", type=int, default=12, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--depth", type=int, default=12, help="blocks; the width follows from --params")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per rank per step")
    parser.add_argument("--seq-len", type=int, default=16, help="tokens per sequence")
    parser.add_argument("--threads", type=int, help="intra-op threads per rank (default: the CPUs split between ranks)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma-separated, of {list(CONTENDERS)}")
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds per contender (DeepSpeed's first run builds an op)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="runs of every contender, in forward then reverse order; each row is its fastest round",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where train_step.md and train_step.png go")
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // args.world)
    args.contenders = [name.strip() for name in args.contenders.split(",") if name.strip()]
    unknown = sorted(set(args.contenders) - set(CONTENDERS))
    if unknown:
        parser.error(f"unknown contenders {unknown}; choose from {list(CONTENDERS)}")
    if REFERENCE not in args.contenders:
        args.contenders.insert(0, REFERENCE)  # the ratio column and the parity check need it
    return args


def use_cuda(world: int) -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= world


def torchrun_command(name: str, args: argparse.Namespace, outdir: Path) -> list[str]:
    """torchrun in this interpreter, rendezvous on an ephemeral port of 127.0.0.1 only."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={args.world}",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:0",
        f"--rdzv-id=train-step-{name}-{os.getpid()}",
        "--local-addr=127.0.0.1",
        "--max-restarts=0",
        "-m",
        "benchmarks.train_step_rank",
        f"--contender={name}",
        f"--outdir={outdir}",
        f"--params={args.params}",
        f"--depth={args.depth}",
        f"--batch-size={args.batch_size}",
        f"--seq-len={args.seq_len}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--threads={args.threads}",
    ]


def rank_environment(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own connections stay on loopback too
    # torchrun would set 1 thread per rank; split the cores between the ranks instead.
    env["OMP_NUM_THREADS"] = str(args.threads)
    if not use_cuda(args.world):
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def launch(name: str, args: argparse.Namespace, outdir: Path) -> Outcome:
    """Run one contender's world; its ranks' results, or the first error a rank raised."""
    log = outdir / f"{name}.log"
    started = time.monotonic()
    print(f"[train_step] {name}: {CONTENDERS[name].label} ...", file=sys.stderr, flush=True)
    with log.open("w") as sink:
        process = subprocess.Popen(
            torchrun_command(name, args, outdir),
            cwd=ROOT,
            env=rank_environment(args),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        try:
            returncode: int | str = process.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            returncode = f"timed out after {args.timeout:g} s"
        finally:
            stop(process)
    print(f"[train_step] {name}: done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    paths = [outdir / f"{name}.rank{rank}.json" for rank in range(args.world)]
    if returncode == 0 and all(path.exists() for path in paths):
        return Outcome(name, ranks=[json.loads(path.read_text()) for path in paths])
    return Outcome(name, error=failure_reason(log.read_text(errors="replace"), returncode))


def stop(process: subprocess.Popen[bytes]) -> None:
    """End a torchrun that is still running, ranks included.

    torchrun starts each rank in a session of its own, so only torchrun can end them: SIGTERM
    makes it stop its ranks before it exits; SIGKILL only if it does not within a minute.
    """
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def failure_reason(log: str, returncode: int | str) -> str:
    """Why a run has no results: the timeout, else the first exception a rank printed (the root
    cause; torchrun's own comes last)."""
    if isinstance(returncode, str):
        return returncode
    pattern = re.compile(r"^(?:\[rank\d+\]:\s*)?((?:[\w.]+)(?:Error|Exception|Interrupt)\b.*)$")
    for line in log.splitlines():
        match = pattern.match(line.strip())
        if match and "ChildFailedError" not in line:
            return match.group(1)[:300]
    return f"exit status {returncode}; no exception in the log"


def compare_params(outcome: Outcome, reference: torch.Tensor | None, outdir: Path, total_steps: int) -> None:
    """Max |difference| from the reference's final parameters, and whether it is within tolerance."""
    path = outdir / f"{outcome.name}.params.pt"
    if reference is None or not path.exists():
        return
    params = torch.load(path)
    path.unlink()  # up to 400 MB each at the default size: do not keep them around
    if params.shape != reference.shape:
        outcome.max_param_diff, outcome.params_close = float("inf"), False
        return
    diff = (params - reference).abs()
    outcome.max_param_diff = float(diff.max())
    bound = ATOL_PER_STEP * total_steps + RTOL_PER_STEP * total_steps * reference.abs()
    outcome.params_close = bool((diff <= bound).all())


def run_all(args: argparse.Namespace) -> list[Outcome]:
    """Every contender, ``args.rounds`` times, in forward and reverse order by turns; per contender,
    its fastest round.

    Order matters on this machine: a contender right after DeepSpeed ZeRO-2 ran 12-19% slower than
    the same contender first (shardopt stage 1 1918 -> 2289 ms, stage 2 1521 -> 1708 in one run), so
    a single pass in a fixed order favours whoever runs early. The parity check runs in the first
    round, where the reference runs first; every round trains the same steps on the same data.
    """
    best: dict[str, Outcome] = {}
    with tempfile.TemporaryDirectory(prefix="train_step.") as tmp:
        outdir = Path(tmp)
        reference = None
        for round_ in range(args.rounds):
            order = args.contenders if round_ % 2 == 0 else args.contenders[::-1]
            for name in order:
                outcome = launch(name, args, outdir)
                if round_ == 0:
                    if name == REFERENCE and (outdir / f"{name}.params.pt").exists():
                        reference = torch.load(outdir / f"{name}.params.pt")
                    compare_params(outcome, reference, outdir, args.warmup + args.steps)
                else:
                    (outdir / f"{name}.params.pt").unlink(missing_ok=True)
                    outcome.max_param_diff, outcome.params_close = best[name].max_param_diff, best[name].params_close
                if outcome.error:
                    print(f"[train_step] {name} failed: {outcome.error}", file=sys.stderr, flush=True)
                kept = best.get(name)
                if kept is None or kept.error or (not outcome.error and outcome.step_ms < kept.step_ms):
                    best[name] = outcome
    return [best[name] for name in dict.fromkeys(args.contenders)]


# ---------------------------------------------------------------- reporting


def machine_line(args: argparse.Namespace) -> str:
    width = model_width(args.params, args.depth)
    if use_cuda(args.world):
        device = f"{torch.cuda.get_device_name(0)}, backend nccl"
    else:
        device = f"CPU, backend gloo, {args.threads} thread(s) per rank"
    load = f", load average at start {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (
        f"{platform.platform()}, {os.cpu_count()} CPUs{load}; torch {torch.__version__}; {device}; "
        f"world {args.world}; {count_params(width, args.depth):,} fp32 parameters "
        f"({args.depth} blocks of width {width}); {args.batch_size}x{args.seq_len} tokens per rank per step; "
        f"AdamW lr 1e-3 wd 0.01; median of {args.steps} steps after {args.warmup} warm-up; the fastest of "
        f"{args.rounds} round(s), contenders in forward then reverse order."
    )


def wire_cell(outcome: Outcome) -> str:
    note = CONTENDERS[outcome.name].wire_note
    value = f"{outcome.wire_bytes / MB:.1f}"
    return value if note == "counted" else f"{value} ({note})"


def table_rows(outcomes: list[Outcome]) -> list[str]:
    reference = next((o for o in outcomes if o.name == REFERENCE and not o.error), None)
    rows = []
    for outcome in outcomes:
        if outcome.error:
            rows.append(f"| {outcome.label} | did not run: {outcome.error.replace('|', '/')} | - | - | - | - |")
            continue
        ratio = f"{outcome.step_ms / reference.step_ms:.2f}" if reference else "-"
        rows.append(
            f"| {outcome.label} | {outcome.step_ms:.1f} | {ratio} | {outcome.busiest('peak_bytes') / MB:.1f} | "
            f"{outcome.busiest('state_bytes') / MB:.1f} | {wire_cell(outcome)} |"
        )
    return rows


def sanity_lines(outcomes: list[Outcome], total_steps: int) -> list[str]:
    ran = [o for o in outcomes if not o.error]
    not_finite = [o.label for o in ran if not o.losses_finite]
    lines = [
        f"- Loss finite after the timed steps: {'yes' if not not_finite else 'no: ' + ', '.join(not_finite)}"
        f" ({len(ran)} of {len(outcomes)} contenders ran)."
    ]
    parity = []
    for outcome in ran:
        if outcome.name in PARITY:
            if outcome.params_close is None:
                parity.append(f"{outcome.label}: not compared (no reference)")
            elif outcome.params_close:
                parity.append(f"{outcome.label}: yes (max diff {outcome.max_param_diff:.2e})")
            else:
                parity.append(f"{outcome.label}: no, max diff {outcome.max_param_diff:.2e}")
    lines.append(
        f"- Same parameters as DDP + AdamW(fused) after {total_steps} steps (fp32, rtol {RTOL_PER_STEP:g} / "
        f"atol {ATOL_PER_STEP:g} per step): " + ("; ".join(parity) or "no shardopt row ran") + "."
    )
    others = [
        f"{o.label} {o.max_param_diff:.1e}"
        for o in ran
        if o.name not in PARITY and o.name != REFERENCE and o.max_param_diff is not None
    ]
    if others:
        lines.append("- For reference, max parameter difference from DDP of the others: " + "; ".join(others) + ".")
    return lines


def wire_lines(outcomes: list[Outcome]) -> list[str]:
    """What each contender's wire column is made of: the collectives of its last timed step on rank 0."""
    lines = []
    for outcome in outcomes:
        if outcome.error:
            continue
        rank = outcome.ranks[0]
        calls = ", ".join(
            f"{name} x{count} ({rank['payload_bytes'][name] / MB:.1f} MB)"
            for name, count in sorted(rank["calls"].items())
        )
        parts = [f"counted: {calls or 'none'}"]
        if rank["analytic_wire_bytes"]:
            parts.append(f"analytic: {rank['analytic_wire_bytes'] / MB:.1f} MB for the C++ gradient all-reduce")
        lines.append(f"- {outcome.label}: " + "; ".join(parts) + ".")
    return lines


def report(args: argparse.Namespace, outcomes: list[Outcome]) -> str:
    memory_how = next((o.ranks[0]["memory_how"] for o in outcomes if not o.error), "-")
    lines = [
        "# One training step per contender",
        "",
        machine_line(args),
        "",
        "| contender | step ms (median) | x DDP + AdamW(fused) | peak MB/rank | optimizer state MB/rank | "
        "wire MB/step/rank |",
        "| --- | --- | --- | --- | --- | --- |",
        *table_rows(outcomes),
        "",
        *sanity_lines(outcomes, args.warmup + args.steps),
        "",
        "Step: zero_grad + forward + backward + optimizer step, steps back to back (no barrier between them, "
        "which would absorb work left in flight), each timed from the end of the one before on its rank; a step "
        "lasts as long as its slowest rank's. MB = 10^6 bytes; per rank = the busiest rank. Peak: increase over "
        f"the rank's memory before the model was built ({memory_how}). Wire: bytes each rank sends per step "
        "on a ring (all-reduce 2(N-1)/N x size, reduce-scatter / all-gather / broadcast / reduce (N-1)/N x "
        "full size; a point-to-point send its payload), from the torch.distributed Python collectives and "
        "sends each step called; (analytic): DDP's "
        "reducer all-reduces every gradient from C++, which is computed as 2(N-1)/N x gradient bytes. "
        "Collectives of the last timed step on rank 0:",
        "",
        *wire_lines(outcomes),
    ]
    return "\n".join(lines) + "\n"


def plot(outcomes: list[Outcome], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [o for o in outcomes if not o.error]
    labels = [o.label for o in ran]
    positions = range(len(ran))
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(13, 0.55 * len(ran) + 2.2))
    time_axis.barh(positions, [o.step_ms for o in ran], color="tab:blue")
    time_axis.set_yticks(list(positions), labels)
    time_axis.invert_yaxis()
    time_axis.set_xlabel("step time, ms (median)")
    height = 0.4
    memory_axis.barh(
        [p - height / 2 for p in positions], [o.busiest("peak_bytes") / MB for o in ran], height, label="peak"
    )
    memory_axis.barh(
        [p + height / 2 for p in positions],
        [o.busiest("state_bytes") / MB for o in ran],
        height,
        label="optimizer state",
    )
    memory_axis.set_yticks(list(positions), [""] * len(ran))
    memory_axis.invert_yaxis()
    memory_axis.set_xlabel("MB per rank")
    memory_axis.legend(loc="lower right")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    outcomes = run_all(args)
    text = report(args, outcomes)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_step.md").write_text(text)
    width = model_width(args.params, args.depth)
    title = (
        f"{count_params(width, args.depth):,} fp32 params, world {args.world}, torch {torch.__version__}, "
        f"{'nccl' if use_cuda(args.world) else 'gloo'}"
    )
    plot(outcomes, args.out / "train_step.png", title)
    print(f"written to {args.out / 'train_step.md'} and {args.out / 'train_step.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
