"""shardopt inside Lightning Fabric (``strategy="ddp"`` on CPU), swapping only the optimizer line.

Fabric wraps the model in DDP and the optimizer in a wrapper that takes its class and forwards
attribute reads, so shardopt's methods run with the wrapper as ``self``: whatever they keep
between ``clip_grad_norm_`` and ``step()`` must land on the optimizer itself. Each run goes through
Fabric's own calls (``fabric.backward``, ``fabric.clip_gradients``, ``fabric.no_backward_sync``,
``fabric.save`` / ``fabric.load``) and is compared with Fabric driving plain torch.optim: losses,
returned norms and parameters to fp32 parity bounds; shardopt's own ``clip_grad_norm_``, called
on Fabric's wrapper, is compared with torch's over the parameters.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import torch

from tests.common import flat_params, loss_of, make_model
from tests.frameworks import SETTINGS, WORLD, compare_with_torch, make_optimizer, torchrun_environment

STEPS = 4
MAX_NORM = 0.05
# (how the gradients are clipped, micro-batches per step)
SCENARIOS = {
    "clip_gradients": ("fabric", 1),
    "accumulate": ("fabric", 2),
    "own clip_grad_norm_": ("optimizer", 1),
}


def _fabric() -> Any:
    """Fabric over the process group the world already has, as under torchrun."""
    from lightning.fabric import Fabric

    torchrun_environment()
    fabric = Fabric(accelerator="cpu", devices=WORLD, strategy="ddp")
    fabric.launch()
    return fabric


def _run(fabric: Any, setting: str, sharded: bool, scenario: str, directory: pathlib.Path) -> dict[str, Any]:
    clip, micro = SCENARIOS[scenario]
    model = make_model()
    wrapped, optimizer = fabric.setup(model, make_optimizer(model.parameters(), setting, sharded))
    losses, norms, trajectory = [], [], []
    for step in range(STEPS):
        for index in range(micro):
            with fabric.no_backward_sync(wrapped, enabled=index < micro - 1):
                loss = loss_of(wrapped, fabric.global_rank, micro * step + index)
                fabric.backward(loss)
            losses.append(float(loss))
        if clip == "fabric":
            norm = fabric.clip_gradients(wrapped, optimizer, max_norm=MAX_NORM)
        elif sharded:
            norm = optimizer.clip_grad_norm_(MAX_NORM)
        else:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        norms.append(float(norm))
        optimizer.step()
        optimizer.zero_grad()
        trajectory.append(flat_params(model))
    path = directory / f"{setting}-{sharded}-{scenario}.ckpt"
    fabric.save(path, {"model": wrapped, "optimizer": optimizer})
    # A new model and optimizer loaded from it take one more step as the first ones would have.
    fresh = make_model()
    fresh_wrapped, again = fabric.setup(fresh, make_optimizer(fresh.parameters(), setting, sharded))
    fabric.load(path, {"model": fresh_wrapped, "optimizer": again})
    resumed = []
    for target, target_model, target_optimizer in ((resumed, fresh_wrapped, again), (trajectory, wrapped, optimizer)):
        fabric.backward(loss_of(target_model, fabric.global_rank, 100))
        target_optimizer.step()
        target_optimizer.zero_grad()
        target.append(flat_params(target_model))
    return {"losses": losses, "norms": norms, "trajectory": trajectory, "resumed": resumed[-1]}


def fabric_runs(setting: str, sharded: bool, directory: pathlib.Path) -> dict[str, Any]:
    fabric = _fabric()
    return {scenario: _run(fabric, setting, sharded, scenario, directory) for scenario in SCENARIOS}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_fabric_trains_shardopt_as_torch_optim(setting: str, tmp_path: pathlib.Path) -> None:
    ours, _ = compare_with_torch(fabric_runs, setting, tmp_path, list(SCENARIOS))
    for rank, mine in enumerate(ours):
        for scenario in SCENARIOS:
            label = f"{setting} {scenario} rank {rank}"
            # Loaded by fabric.load, the new optimizer steps exactly as the one that was saved.
            assert torch.equal(mine[scenario]["resumed"], mine[scenario]["trajectory"][-1]), label
