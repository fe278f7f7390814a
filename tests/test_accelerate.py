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

import os
import pathlib
from typing import Any

import pytest
import torch

import shardopt
from tests.common import flat_params, loss_of, make_model
from tests.world import run_world

WORLD = 2
STEPS = 4
MAX_NORM = 0.05
ALGORITHMS = {
    "AdamW": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    "SGD": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
}


def _accelerator(accumulation: int) -> Any:
    """Accelerate's multi-CPU state over the process group the world already has."""
    import torch.distributed as dist
    from accelerate import Accelerator

    os.environ.update(
        {
            "RANK": str(dist.get_rank()),
            "LOCAL_RANK": str(dist.get_rank()),
            "WORLD_SIZE": str(dist.get_world_size()),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "0",
        }
    )
    return Accelerator(cpu=True, gradient_accumulation_steps=accumulation)


def _optimizer(model: torch.nn.Module, algorithm: str, sharded: bool) -> torch.optim.Optimizer:
    torch_class, kwargs = ALGORITHMS[algorithm]
    if sharded:
        return shardopt.ShardedOptimizer(model.parameters(), torch_class, **kwargs)
    return torch_class(model.parameters(), **kwargs)


def _steps(accelerator: Any, model: Any, optimizer: Any, steps: range, micro: int) -> dict[str, list[Any]]:
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
                optimizer.step()
                optimizer.zero_grad()
            losses.append(float(loss))
        trajectory.append(flat_params(accelerator.unwrap_model(model)))
    return {"losses": losses, "norms": norms, "trajectory": trajectory}


def accelerate_runs(algorithm: str, sharded: bool, directory: pathlib.Path) -> dict[str, Any]:
    results = {}
    for micro in (1, 2):
        accelerator = _accelerator(micro)
        model = make_model()
        optimizer = _optimizer(model, algorithm, sharded)
        model, optimizer = accelerator.prepare(model, optimizer)
        results[f"accumulate {micro}"] = _steps(accelerator, model, optimizer, range(STEPS), micro)
    # save_state after two steps, two more; then a new model and optimizer resumed by load_state.
    accelerator = _accelerator(1)
    model = make_model()
    model, optimizer = accelerator.prepare(model, _optimizer(model, algorithm, sharded))
    _steps(accelerator, model, optimizer, range(2), 1)
    checkpoint = directory / f"{algorithm}-{sharded}"
    accelerator.save_state(str(checkpoint))
    results["uninterrupted"] = _steps(accelerator, model, optimizer, range(2, STEPS), 1)
    accelerator = _accelerator(1)  # as a new process would: nothing of the first run but its files
    model = make_model()
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(0.5)  # load_state must bring the weights back
    model, optimizer = accelerator.prepare(model, _optimizer(model, algorithm, sharded))
    accelerator.load_state(str(checkpoint))
    results["resumed"] = _steps(accelerator, model, optimizer, range(2, STEPS), 1)
    results["files"] = sorted(path.name for path in checkpoint.iterdir())
    return results


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_accelerate_trains_shardopt_as_torch_optim(algorithm: str, tmp_path: pathlib.Path) -> None:
    ours = run_world(accelerate_runs, WORLD, algorithm, True, tmp_path, fresh=True)
    reference = run_world(accelerate_runs, WORLD, algorithm, False, tmp_path, fresh=True)
    for rank, (mine, theirs) in enumerate(zip(ours, reference)):
        for run in ("accumulate 1", "accumulate 2", "uninterrupted", "resumed"):
            label = f"{algorithm} {run} rank {rank}"
            assert mine[run]["losses"] == pytest.approx(theirs[run]["losses"], rel=1e-5, abs=1e-6), label
            assert mine[run]["norms"] == pytest.approx(theirs[run]["norms"], rel=1e-5, abs=1e-6), label
            for step, (a, b) in enumerate(zip(mine[run]["trajectory"], theirs[run]["trajectory"], strict=True)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{label} step {step}")
        # Resumed from save_state's files, the run continues the uninterrupted one exactly.
        resumed, uninterrupted = mine["resumed"], mine["uninterrupted"]
        assert resumed["losses"] == uninterrupted["losses"] and resumed["norms"] == uninterrupted["norms"]
        assert all(torch.equal(a, b) for a, b in zip(resumed["trajectory"], uninterrupted["trajectory"], strict=True))
        assert mine["files"] == theirs["files"]  # the same checkpoint layout as torch.optim's
