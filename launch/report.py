"""What a run leaves behind: run.json (the numbers) and run.png (the loss curve and the bytes per rank)."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node

import matplotlib.pyplot as plt

MEMORY_KINDS = ("state_bytes", "master_bytes", "grad_bytes", "staging_bytes")


def write_json(out: pathlib.Path, record: dict[str, Any]) -> pathlib.Path:
    path = out / "run.json"
    path.write_text(json.dumps(record, indent=1))
    return path


def write_plot(out: pathlib.Path, record: dict[str, Any]) -> pathlib.Path:
    figure, (curve, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    _loss_curves(curve, record)
    _memory_bars(bars, record)
    figure.tight_layout()
    path = out / "run.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _loss_curves(axes: Any, record: dict[str, Any]) -> None:
    config = record["config"]
    optimizers = " + ".join(record["optimizers"])  # muon + adamw, sparseadam + adamw: one bar of their bytes
    axes.plot(record["loss"], label=f"shardopt {optimizers} (stage {config['stage']})")
    if record.get("torch_loss"):
        # Dashed and on top: where the curves coincide the sharded one shows through the gaps.
        difference = record["max_abs_loss_difference"]
        axes.plot(record["torch_loss"], "--", label=f"torch.optim (max |difference| {difference:.1e})")
    axes.set(xlabel="step", ylabel="loss (mean over ranks)", title=f"{record['parameters']:,} parameters")
    axes.legend()


def _memory_bars(axes: Any, record: dict[str, Any]) -> None:
    """Per rank, the sharded bytes stacked by kind, next to what unsharded torch.optim holds on every rank
    (the sums over the job's optimizers)."""
    ranks = range(len(record["memory"]))
    width = 0.4
    for offset, label, per_rank in (
        (-width / 2, "sharded", record["memory"]),
        (width / 2, "unsharded", [record["unsharded"]] * len(record["memory"])),
    ):
        bottom = [0.0] * len(per_rank)
        for kind in MEMORY_KINDS:
            heights = [stats.get(kind, 0) / 2**20 for stats in per_rank]
            if not any(heights):  # no master weights in fp32, no staging buffers at stage 1 or unsharded
                continue
            axes.bar(
                [r + offset for r in ranks],
                heights,
                width,
                bottom=bottom,
                label=f"{label}: {kind.removesuffix('_bytes')}",
                hatch="//" if label == "unsharded" else None,
                color=f"C{MEMORY_KINDS.index(kind)}",
                alpha=0.5 if label == "unsharded" else 1.0,
            )
            bottom = [b + h for b, h in zip(bottom, heights)]
    axes.set_xticks(list(ranks), [f"rank {r}" for r in ranks])
    axes.set(ylabel="MiB", title="optimizer memory per rank")
    axes.set_ylim(top=axes.get_ylim()[1] * 1.4)  # room for the legend above the bars
    axes.legend(fontsize="small", ncols=2, loc="upper center")
