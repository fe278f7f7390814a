"""Which gradients a step uses: None on every rank, None on some ranks, written into .grad directly,
several buffers and dtypes, stage 1 vs stage 2 gradient handling, closures."""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import pytest
import torch

import shardopt
from shardopt.elements.taken_grad import TakenGrad
from tests.common import assert_state_dicts_equal, assert_trajectories_close
from tests.world import run_world

STEPS = 8
SHAPES = ((7, 5), (5,), (13,), (3, 3))
DTYPES = (torch.float32, torch.float32, torch.float64, torch.float32)
ALGORITHMS = [
    (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.1}),
    (torch.optim.AdamW, {"lr": 1e-2}),
    (torch.optim.Adamax, {"lr": 1e-2}),
    (torch.optim.NAdam, {"lr": 1e-2}),
    (torch.optim.RAdam, {"lr": 1e-2}),
    (torch.optim.Adagrad, {"lr": 1e-1, "lr_decay": 0.1}),
    (torch.optim.Adadelta, {"weight_decay": 0.1}),
    (torch.optim.RMSprop, {"lr": 1e-2, "centered": True, "momentum": 0.5}),
    (torch.optim.Rprop, {"lr": 1e-2}),
    (torch.optim.SGD, {"lr": 1e-1, "momentum": 0.9, "dampening": 0.3}),
    (torch.optim.ASGD, {"lr": 5e-2, "t0": 2}),
]
# Small buckets put every parameter in a buffer of its own; the float64 one always is.
LAYOUTS = {"one-bucket": {}, "many-buckets": {"bucket_cap_mb": 1e-4}, "stage1": {"stage": 1}}


def make_params() -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=generator, dtype=d)) for s, d in zip(SHAPES, DTYPES)]


def grad_for(rank: int, step: int, index: int) -> torch.Tensor | None:
    """Parameter 2 has no gradient anywhere for three steps, then on rank 0 only, then everywhere;
    parameter 3 has none anywhere at steps 4 and 5 (its step count must fall behind)."""
    if index == 2 and (step < 3 or (step < 6 and rank != 0)):
        return None
    if index == 3 and step in (4, 5):
        return None
    generator = torch.Generator().manual_seed(10_000 * step + 100 * rank + index)
    return torch.randn(SHAPES[index], generator=generator, dtype=DTYPES[index])


def sharded_run(cases: list[tuple[type, dict[str, Any]]], options: dict[str, Any]) -> list[Any]:
    import torch.distributed as dist

    rank = dist.get_rank()
    results = []
    for optimizer_class, kwargs in cases:
        params = make_params()
        optimizer = shardopt.ShardedOptimizer(params, optimizer_class, **options, **kwargs)
        trajectory = []
        for step in range(STEPS):
            optimizer.zero_grad()
            for index, param in enumerate(params):
                param.grad = grad_for(rank, step, index)  # written directly, not by backward()
            optimizer.step()
            trajectory.append(torch.cat([p.detach().double().reshape(-1) for p in params]))
        results.append((trajectory, optimizer.state_dict()))
    return results


def reference_run(optimizer_class: type, kwargs: dict[str, Any], world_size: int) -> tuple[list, dict]:
    params = make_params()
    optimizer = optimizer_class(params, **kwargs)
    trajectory = []
    for step in range(STEPS):
        for index, param in enumerate(params):
            grads = [g for r in range(world_size) if (g := grad_for(r, step, index)) is not None]
            param.grad = sum(grads) / world_size if grads else None
        optimizer.step()
        trajectory.append(torch.cat([p.detach().double().reshape(-1) for p in params]))
    return trajectory, optimizer.state_dict()


@functools.cache
def results(world_size: int, layout: str) -> list[Any]:
    return run_world(sharded_run, world_size, ALGORITHMS, LAYOUTS[layout])[0]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize(("index", "case"), list(enumerate(ALGORITHMS)), ids=[c[0].__name__ for c in ALGORITHMS])
def test_missing_gradients_follow_torch(index: int, case: tuple, world_size: int, layout: str) -> None:
    optimizer_class, kwargs = case
    trajectory, state = results(world_size, layout)[index]
    reference, reference_state = reference_run(optimizer_class, kwargs, world_size)
    label = f"{optimizer_class.__name__} N={world_size} {layout}"
    assert_trajectories_close(trajectory, reference, label)
    assert_state_dicts_equal(state, reference_state, label)
    if not optimizer_class.__name__ == "Adagrad":  # Adagrad creates its state up front
        assert 2 in reference_state["state"]  # parameter 2 has stepped by now...
    untouched = trajectory[2][35 + 5 : 35 + 5 + 13]  # ...but not in the first three steps
    assert torch.equal(untouched, make_params()[2].detach().double().reshape(-1))


def gradient_handling(stage: int) -> dict[str, Any]:
    """What p.grad holds after step() at each stage, and what memory_stats() says of it."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    params = make_params()
    optimizer = shardopt.SGD(params, lr=0.1, stage=stage)
    for index, param in enumerate(params):
        param.grad = grad_for(rank, 6, index)
    optimizer.step()
    expected = [sum(grad_for(r, 6, i) for r in range(world)) / world for i in range(len(params))]
    return {
        "grads": [None if isinstance(p.grad, TakenGrad) else p.grad for p in params],
        "taken": [isinstance(p.grad, TakenGrad) for p in params],
        "expected": expected,
        "stats": optimizer.memory_stats(),
        "shard": optimizer.buffers[0].layout.shard_numel,
    }


@pytest.mark.parametrize("stage", [1, 2])
def test_stage_decides_what_p_grad_holds_after_step(stage: int) -> None:
    result = run_world(gradient_handling, 2, stage)[1]
    if stage == 1:  # the mean gradient, as under DDP
        for grad, expected in zip(result["grads"], result["expected"]):
            torch.testing.assert_close(grad, expected)
    else:  # taken: this rank keeps only its shard of the reduced gradient; p.grad holds no values
        assert all(result["taken"])
    float32_numel = sum(torch.Size(s).numel() for s, d in zip(SHAPES, DTYPES) if d == torch.float32)
    if stage == 1:
        assert result["stats"]["grad_bytes"] >= float32_numel * 4
    else:
        assert result["stats"]["grad_bytes"] < float32_numel * 4


def closure_run() -> dict[str, Any]:
    import torch.distributed as dist

    rank = dist.get_rank()
    params = make_params()
    optimizer = shardopt.SGD(params, lr=0.1)
    calls = []

    def closure() -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        optimizer.zero_grad()
        loss = (params[0] * (rank + 1)).sum()
        loss.backward()
        return loss

    before = params[0].detach().clone()
    loss = optimizer.step(closure)
    return {"loss": loss, "calls": calls, "before": before, "after": params[0].detach().clone()}


def test_closure_runs_once_per_rank_with_grad_and_returns_mean_loss() -> None:
    world = 3
    per_rank = run_world(closure_run, world)
    total = per_rank[0]["before"].sum()
    expected_loss = sum(total * (r + 1) for r in range(world)) / world
    expected_grad = sum(r + 1 for r in range(world)) / world
    for result in per_rank:
        assert result["calls"] == [True]
        torch.testing.assert_close(result["loss"], expected_loss)
        torch.testing.assert_close(result["after"], result["before"] - 0.1 * expected_grad)


def test_closure_in_a_world_of_one_returns_its_own_loss() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = shardopt.Adam([param], lr=0.1)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (param**2).sum()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert loss.item() == 3.0
    assert optimizer.state_dict()["state"][0]["step"].item() == 1.0


def accumulate_without_zeroing(stage: int) -> list[torch.Tensor]:
    """Two backward passes per step into the same .grad (zero_grad(set_to_none=False) between steps)."""
    import torch.distributed as dist

    from tests.common import flat_params, loss_of, make_model

    rank = dist.get_rank()
    model = make_model()
    optimizer = shardopt.Adam(model.parameters(), lr=1e-2, stage=stage)
    trajectory = []
    for step in range(4):
        optimizer.zero_grad(set_to_none=False)
        loss_of(model, rank, 2 * step).backward()
        loss_of(model, rank, 2 * step + 1).backward()
        optimizer.step()
        trajectory.append(flat_params(model))
    return trajectory


@pytest.mark.parametrize("stage", [1, 2])
def test_gradients_accumulated_in_place_across_backward_passes(stage: int) -> None:
    from tests.common import flat_params, loss_of, make_model

    world = 2
    trajectory = run_world(accumulate_without_zeroing, world, stage)[0]
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    reference = []
    for step in range(4):
        total = [torch.zeros_like(p) for p in model.parameters()]
        for rank in range(world):
            model.zero_grad()
            (loss_of(model, rank, 2 * step) + loss_of(model, rank, 2 * step + 1)).backward()
            total = [t + p.grad for t, p in zip(total, model.parameters())]
        for t, p in zip(total, model.parameters()):
            p.grad = t / world
        optimizer.step()
        reference.append(flat_params(model))
    assert_trajectories_close(trajectory, reference, f"accumulation stage {stage}")


def stuck_peer(directory: pathlib.Path) -> dict[str, Any]:
    """Rank 1 never calls step(): rank 0's step must raise within its timeout, naming the collective
    and the rank that did not answer."""
    import time

    import torch.distributed as dist

    params = make_params()
    optimizer = shardopt.SGD(params, lr=0.1, timeout=2)
    done = directory / "rank 0 is done"
    if dist.get_rank() == 1:
        while not done.exists():  # alive, calling nothing, until rank 0 has come out of step()
            time.sleep(0.1)
        return {}
    for index, param in enumerate(params):
        param.grad = grad_for(0, 0, index)
    started = time.monotonic()
    try:
        optimizer.step()
        outcome = {"error": None}
    except RuntimeError as error:
        outcome = {"error": str(error), "seconds": time.monotonic() - started}
    done.touch()
    return outcome


def test_a_peer_that_never_steps_is_an_error_within_the_timeout(tmp_path: pathlib.Path) -> None:
    # fresh: rank 0's timed-out reduce-scatter stays pending, so these ranks are out of step for good.
    result = run_world(stuck_peer, 2, tmp_path, fresh=True)[0]
    assert result["error"] is not None
    assert (
        "the agreement on gradients and loss at the start of step() (step() call 1) on rank 0 of 2 did not "
        "complete (the timeout is 2 s): rank 1 did not answer: the last call rank 1 entered is the optimizer's "
        "construction" in result["error"]
    )
    assert result["seconds"] < 10


def partial_loss(model: torch.nn.Module, rank: int, step: int) -> torch.Tensor:
    """Rank 1 leaves ``scale`` out of its graph at odd steps: its hook never fires there."""
    from tests.common import batch

    x, y = batch(rank, step)
    out = model.out(torch.tanh(model.hidden(x)))
    if not (rank == 1 and step % 2):
        out = out * model.scale
    return torch.nn.functional.mse_loss(out, y)


def backward_with_unused(options: dict[str, Any]) -> tuple[list[torch.Tensor], list[list[bool]]]:
    import torch.distributed as dist

    from tests.common import flat_params, make_model

    rank = dist.get_rank()
    model = make_model()
    optimizer = shardopt.Adam(model.parameters(), lr=1e-2, **options)
    trajectory, released = [], []
    for step in range(6):
        optimizer.zero_grad()
        partial_loss(model, rank, step).backward()
        released.append([p.grad is None or isinstance(p.grad, TakenGrad) for p in model.parameters()])
        optimizer.step()
        trajectory.append(flat_params(model))
    return trajectory, released


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("layout", ["one-bucket", "many-buckets"])
def test_parameters_unused_on_some_ranks_in_backward(layout: str, stage: int) -> None:
    """Backward's hooks reduce the buckets; a bucket with a parameter unused on one rank is launched
    when backward ends (stage 1) or at step() (stage 2) there, in the same order, and the result is
    torch.optim's on the mean gradient."""
    from tests.common import flat_params, make_model

    per_rank = run_world(backward_with_unused, 2, {**LAYOUTS[layout], "stage": stage})
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    reference = []
    for step in range(6):
        total = [torch.zeros_like(p) for p in model.parameters()]
        for rank in range(2):
            model.zero_grad()
            partial_loss(model, rank, step).backward()
            total = [t + (p.grad if p.grad is not None else 0) for t, p in zip(total, model.parameters())]
        for t, p in zip(total, model.parameters()):
            p.grad = t / 2
        optimizer.step()
        reference.append(flat_params(model))
    for trajectory, _ in per_rank:
        assert_trajectories_close(trajectory, reference, f"unused parameters, {layout}, stage {stage}")
    if stage == 1:
        # As under DDP (find_unused_parameters=True): every parameter used on some rank has the mean
        # gradient in p.grad when backward returns, on every rank, the one left out of the graph too.
        assert per_rank[0][1] == per_rank[1][1] == [[False] * 5] * 6
        return
    # Each gradient is copied into its bucket's staging buffer and taken as backward produces it, so
    # after backward no p.grad holds values on either rank (a TakenGrad, or None where none came), even
    # where a bucket waits for step() (rank 1 at odd steps: ``scale``, the first parameter and so last in
    # the launch order, gets no gradient there).
    assert per_rank[0][1] == per_rank[1][1] == [[True] * 5] * 6
