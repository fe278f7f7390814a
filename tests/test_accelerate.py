"""shardopt inside Hugging Face Accelerate, swapping only the optimizer line.

``Accelerator(cpu=True)`` on 2 gloo ranks (its multi-CPU state: ``prepare()`` moves the model and wraps
it in DDP after the optimizer was built), through Accelerate's own calls: ``accelerator.backward``,
``accelerator.clip_grad_norm_`` over ``model.parameters()``, ``accelerator.accumulate``, and
``save_state`` / ``load_state`` with their defaults (safetensors weights). Each run is compared with
the same loop driving plain torch.optim: the per-step losses, the norms the clip returns and the
parameters, to fp32 parity bounds (only the order the ranks' gradients are summed in differs); a run
resumed from ``save_state`` must continue the uninterrupted one exactly.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import torch

from tests.common import flat_params, loss_of, make_model
from tests.frameworks import SETTINGS, compare_with_torch, make_optimizer, torchrun_environment

STEPS = 4
MAX_NORM = 0.05


def _accelerator(accumulation: int) -> Any:
    """Accelerate's multi-CPU state over the process group the world already has."""
    from accelerate import Accelerator

    torchrun_environment()
    return Accelerator(cpu=True, gradient_accumulation_steps=accumulation)


def _steps(accelerator: Any, model: Any, opt: Any, steps: range, micro: int) -> dict[str, list[Any]]:
    """Optimizer steps of ``micro`` micro-batches each, clipped through Accelerate when it syncs."""
    rank = accelerator.process_index
    losses, norms, trajectory = [], [], []
    for step in steps:
        for index in range(micro):
            with accelerator.accumulate(model):
                loss = loss_of(model, rank, micro * step + index)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    norms.append(float(accelerator.clip_grad_norm_(model.parameters(), MAX_NORM)))
                opt.step()
                opt.zero_grad()
            losses.append(float(loss))
        trajectory.append(flat_params(accelerator.unwrap_model(model)))
    return {"losses": losses, "norms": norms, "trajectory": trajectory}


def accelerate_runs(setting: str, sharded: bool, directory: pathlib.Path) -> dict[str, Any]:
    results = {}
    for micro in (1, 2):
        accelerator = _accelerator(micro)
        model = make_model()
        optimizer = make_optimizer(model.parameters(), setting, sharded)
        model, optimizer = accelerator.prepare(model, optimizer)
        results[f"accumulate {micro}"] = _steps(accelerator, model, optimizer, range(STEPS), micro)
    # save_state after two steps, two more; then a new model and optimizer resumed by load_state.
    accelerator = _accelerator(1)
    model = make_model()
    model, optimizer = accelerator.prepare(model, make_optimizer(model.parameters(), setting, sharded))
    _steps(accelerator, model, optimizer, range(2), 1)
    checkpoint = directory / f"{setting}-{sharded}"
    accelerator.save_state(str(checkpoint))
    results["uninterrupted"] = _steps(accelerator, model, optimizer, range(2, STEPS), 1)
    accelerator = _accelerator(1)  # as a new process would: nothing of the first run but its files
    model = make_model()
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(0.5)  # load_state must bring the weights back
    model, optimizer = accelerator.prepare(model, make_optimizer(model.parameters(), setting, sharded))
    accelerator.load_state(str(checkpoint))
    results["resumed"] = _steps(accelerator, model, optimizer, range(2, STEPS), 1)
    results["files"] = sorted(path.name for path in checkpoint.iterdir())
    return results


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_accelerate_trains_shardopt_as_torch_optim(setting: str, tmp_path: pathlib.Path) -> None:
    names = ("accumulate 1", "accumulate 2", "uninterrupted", "resumed")
    ours, reference = compare_with_torch(accelerate_runs, setting, tmp_path, names)
    for mine, theirs in zip(ours, reference):
        # Resumed from save_state's files, the run continues the uninterrupted one exactly.
        resumed, uninterrupted = mine["resumed"], mine["uninterrupted"]
        assert resumed["losses"] == uninterrupted["losses"] and resumed["norms"] == uninterrupted["norms"]
        assert all(torch.equal(a, b) for a, b in zip(resumed["trajectory"], uninterrupted["trajectory"], strict=True))
        assert mine["files"] == theirs["files"]  # the same checkpoint layout as torch.optim's
