"""Param groups as torch.optim has them: several groups with their own keywords, frozen
parameters, named parameters, and add_param_group in the middle of training."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

import shardopt
from tests.common import (
    assert_state_dicts_equal,
    assert_trajectories_close,
    flat_params,
    loss_of,
    make_model,
    reference_run,
    set_mean_grads,
)
from tests.world import run_world

STEPS = 6
ADD_AT = 3  # the step before which the "scale" parameter's group is added
ALGORITHMS = [
    (torch.optim.AdamW, {"lr": 1e-2}),
    (torch.optim.Adagrad, {"lr": 1e-1}),
    (torch.optim.SGD, {"lr": 1e-1, "momentum": 0.9}),
]


def groups_of(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Two groups with their own keywords; the bias of the hidden layer is frozen."""
    model.hidden.bias.requires_grad_(False)
    return [
        {"params": [model.hidden.weight, model.hidden.bias], "weight_decay": 0.2},
        {"params": [model.out.weight, model.out.bias], "lr": 3e-2},
    ]


def train(optimizer_factory: Any, model: torch.nn.Module, rank: int | None, world_size: int) -> list[torch.Tensor]:
    """STEPS steps; the "scale" parameter joins through add_param_group before step ADD_AT."""
    model.scale.requires_grad_(False)
    optimizer = optimizer_factory(groups_of(model))
    trajectory = []
    for step in range(STEPS):
        if step == ADD_AT:
            model.scale.requires_grad_(True)
            optimizer.add_param_group({"params": [model.scale], "lr": 5e-3})
        if rank is None:
            set_mean_grads(model, world_size, step)
        else:
            optimizer.zero_grad()
            loss_of(model, rank, step).backward()
        optimizer.step()
        trajectory.append(flat_params(model))
    return trajectory, optimizer.state_dict()


def sharded(cases: list) -> list[Any]:
    import torch.distributed as dist

    results = []
    for optimizer_class, kwargs in cases:

        def factory(groups: list, cls: type = optimizer_class, kw: dict = kwargs) -> shardopt.ShardedOptimizer:
            return shardopt.ShardedOptimizer(groups, cls, **kw)

        results.append(train(factory, make_model(), dist.get_rank(), dist.get_world_size()))
    return results


@functools.cache
def sharded_results(world_size: int) -> list[Any]:
    return run_world(sharded, world_size, ALGORITHMS)[0]


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize(("index", "case"), list(enumerate(ALGORITHMS)), ids=[c[0].__name__ for c in ALGORITHMS])
def test_groups_frozen_parameters_and_added_group_follow_torch(index: int, case: tuple, world_size: int) -> None:
    optimizer_class, kwargs = case
    trajectory, state = sharded_results(world_size)[index]

    def factory(groups: list) -> torch.optim.Optimizer:
        return optimizer_class(groups, **kwargs)

    reference, reference_state = train(factory, make_model(), None, world_size)
    label = f"{optimizer_class.__name__} N={world_size}"
    assert_trajectories_close(trajectory, reference, label)
    assert_state_dicts_equal(state, reference_state, label)


def test_named_parameters_give_groups_param_names() -> None:
    model = make_model()
    optimizer = shardopt.Adam(model.named_parameters(), lr=1e-3)
    reference = torch.optim.Adam(make_model().named_parameters(), lr=1e-3)
    assert optimizer.param_groups[0]["param_names"] == [name for name, _ in model.named_parameters()]
    assert_state_dicts_equal(optimizer.state_dict(), reference.state_dict(), "named", rtol=0, atol=0)


def test_groups_hold_the_users_parameters_in_order() -> None:
    model = make_model()
    params = list(model.parameters())
    optimizer = shardopt.SGD([{"params": params[2:]}, {"params": params[:2], "lr": 0.5}], lr=0.1)
    assert [p for g in optimizer.param_groups for p in g["params"]] == params[2:] + params[:2]
    assert all(a is b for a, b in zip(optimizer.param_groups[0]["params"], params[2:]))
    assert optimizer.param_groups[1]["lr"] == 0.5 and optimizer.param_groups[0]["lr"] == 0.1


def test_param_group_edits_take_effect_at_the_next_step() -> None:
    model, reference_model = make_model(), make_model()
    # Stage 1 keeps p.grad after backward, which set_mean_grads reads.
    optimizer = shardopt.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99), stage=1)
    reference = torch.optim.Adam(reference_model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    for step in range(4):
        for m, o in ((model, optimizer), (reference_model, reference)):
            set_mean_grads(m, 1, step)
            o.param_groups[0].update(lr=1e-2 * (step + 1), betas=(0.8, 0.9 + 0.02 * step), weight_decay=0.1 * step)
            o.step()
        torch.testing.assert_close(flat_params(model), flat_params(reference_model), rtol=1e-5, atol=1e-6)


def edited_by_hand() -> dict[str, str]:
    """Per algorithm: what backward or step() raised after a parameter was appended to param_groups[0]["params"] by
    hand (torch.optim would train it; shardopt laid out the group when it was added)."""
    import torch.distributed as dist

    rank, found = dist.get_rank(), {}
    for algorithm in ("AdamW", "Adafactor"):
        model = make_model()
        optimizer = shardopt.ShardedOptimizer(list(model.parameters())[:-1], algorithm, lr=1e-2)
        optimizer.param_groups[0]["params"].append(model.scale)
        try:
            loss_of(model, rank, 0).backward()  # Adafactor agrees at the end of backward: it raises there
            optimizer.step()
            found[algorithm] = "no error"
        except RuntimeError as error:
            found[algorithm] = str(error)
    return found


def test_parameters_added_to_a_group_by_hand_are_an_error_on_every_rank() -> None:
    for rank, found in enumerate(run_world(edited_by_hand, 2)):
        for algorithm, message in found.items():
            assert "changed by hand" in message and "5 tensors where 4 were laid out" in message, (algorithm, rank)
            assert "add_param_group" in message and "on 2 rank(s)" in message, (algorithm, rank)


def under_fsdp() -> dict[str, str]:
    """Per algorithm, what shardopt raised over FSDP's parameters: built over what ``fully_shard`` made,
    and built first with its param groups switched to them afterwards (as Accelerate's FSDP2 does)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    rank, found = dist.get_rank(), {}
    for algorithm in ("AdamW", "Adafactor", "LBFGS"):
        model = make_model()
        try:
            shardopt.ShardedOptimizer(fully_shard(model).parameters(), algorithm, lr=1e-2)
            found[f"{algorithm} built over"] = "no error"
        except TypeError as error:
            found[f"{algorithm} built over"] = str(error)
    for algorithm in ("AdamW", "Adafactor"):
        model = make_model()
        optimizer = shardopt.ShardedOptimizer(model.parameters(), algorithm, lr=1e-2)
        old = [id(p) for p in model.parameters()]
        new = dict(zip(old, fully_shard(model).parameters()))
        optimizer.param_groups[0]["params"] = [new[id(p)] for p in optimizer.param_groups[0]["params"]]
        try:
            loss_of(model, rank, 0).backward()
            optimizer.step()
            found[f"{algorithm} switched to"] = "no error"
        except RuntimeError as error:
            found[f"{algorithm} switched to"] = str(error)
    return found


def test_parameters_fsdp_shards_are_refused_on_every_rank() -> None:
    # shardopt's shards of a DTensor's local piece would be a wrong update with no error.
    for rank, found in enumerate(run_world(under_fsdp, 2, fresh=True)):
        assert len(found) == 5
        for how, message in found.items():
            assert "DTensor" in message and "use torch.optim with FSDP" in message, (how, rank, message)


def two_over_one_model() -> dict[str, Any]:
    """Per algorithm, with two shardopt optimizers built over the same parameters: what the first one's
    step() raised, and the parameters after three steps of the second (which took them) alone."""
    import torch.distributed as dist

    rank, found = dist.get_rank(), {}
    for algorithm in ("AdamW", "Adafactor"):
        model = make_model()
        keywords = {"lr": 1e-2, **({"stage": 2} if algorithm == "AdamW" else {})}  # stage 2 takes p.grad away
        first = shardopt.ShardedOptimizer(model.parameters(), algorithm, **keywords)
        second = shardopt.ShardedOptimizer(model.parameters(), algorithm, **keywords)
        loss_of(model, rank, 0).backward()
        try:
            first.step()
            found[algorithm] = "no error"
        except RuntimeError as error:
            found[algorithm] = str(error)
        for step in range(3):
            if step:
                loss_of(model, rank, step).backward()
            second.step()
            second.zero_grad()
        found[f"{algorithm} trajectory"] = flat_params(model)
    return found


def test_a_second_optimizer_over_the_same_parameters_retires_the_first_on_every_rank() -> None:
    """Before, both hooked the gradients and neither trained, without an error. Now the newer one trains
    them exactly as torch.optim would (rebuilding an optimizer keeps working), and any collective call
    of the older one raises, on every rank, naming the fix."""
    for found in run_world(two_over_one_model, 2):
        for algorithm, torch_class in (("AdamW", torch.optim.AdamW), ("Adafactor", torch.optim.Adafactor)):
            message = found[algorithm]
            assert message.startswith("shardopt: this "), message
            assert "no longer trains its parameter 0 of param group 0" in message, message
            assert "Optimizer created after it took that parameter" in message, message
            trajectory, _ = reference_run(torch_class, {"lr": 1e-2}, 2, 3)
            torch.testing.assert_close(found[f"{algorithm} trajectory"], trajectory[-1], rtol=1e-5, atol=1e-6)
