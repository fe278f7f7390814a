"""The model changed after the optimizer was built, as frameworks and users do: the optimizer follows.

Accelerate's ``prepare()`` and HF Trainer move the model (``model.to(device)`` copies even on CPU for
``cpu:0``); users cast it, rebind ``param.data``, load weights, add parametrizations, change the
memory format. torch.optim holds the ``Parameter`` objects and reads whatever they hold at each step;
so must shardopt. Each run below makes the change on 2 gloo ranks and is compared with single-process
torch.optim on the mean gradient making the same change at the same step (fp32 parity bounds), or,
where torch.optim has no counterpart (fp32 master weights of a bf16 model), with a shardopt optimizer
built after the change, which must agree exactly.
"""

from __future__ import annotations

import gc
import pathlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import shardopt
from shardopt import checkpoint
from tests.common import assert_trajectories_close, batch, flat_params, make_model
from tests.world import run_world

WORLD = 2
STEPS = 4


class TinyConv(nn.Module):
    """A conv weight (4-D: channels_last applies) ahead of a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 2)
        self.head = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def conv_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 3, 3, 3, generator=generator), torch.randn(4, 3, generator=generator)


def make(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return TinyConv() if kind == "conv" else make_model()


def loss(model: nn.Module, kind: str, rank: int, step: int) -> torch.Tensor:
    x, y = conv_batch(rank, step) if kind == "conv" else batch(rank, step)
    dtype = next(p for p in model.parameters() if p.dim() > 1).dtype  # a weight's: the input's
    return nn.functional.mse_loss(model(x.to(dtype)).float(), y)


class Same(nn.Module):
    """A parametrization that leaves the weight as it is, with a right inverse that copies it: the
    parametrized module trains as before, on new storage."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.clone()


def to_copy(model: nn.Module) -> None:
    model.to("cpu:0")  # what Accelerate's multi-CPU prepare() does: a copy of every parameter


def rebind(model: nn.Module) -> None:
    for param in model.parameters():
        param.data = param.data.clone()


def through_vector(model: nn.Module) -> None:
    params = list(model.parameters())
    nn.utils.vector_to_parameters(nn.utils.parameters_to_vector(params) * 1.0, params)


def parametrized(model: nn.Module) -> None:
    parametrize.register_parametrization(model.hidden if hasattr(model, "hidden") else model.head, "weight", Same())


def channels_last(model: nn.Module) -> None:
    model.to(memory_format=torch.channels_last)


def double(model: nn.Module) -> None:
    model.double()


CHANGES: dict[str, Callable[[nn.Module], None]] = {
    "to-cpu:0": to_copy,
    "param.data=": rebind,
    "vector_to_parameters": through_vector,
    "register_parametrization": parametrized,
    "channels_last": channels_last,
    "double": double,
}
ALGORITHMS = [(torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}), (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})]


def model_kind(change: str) -> str:
    return "conv" if change == "channels_last" else "tiny"


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    kind: str,
    change: Callable[[nn.Module], None],
    at: int,
    ranks: list[int],
) -> list[torch.Tensor]:
    """STEPS steps of the mean loss over ``ranks``' batches (one rank: its own), ``change`` before step ``at``."""
    trajectory = []
    for step in range(STEPS):
        if step == at:
            change(model)
            if not isinstance(optimizer, shardopt.ElementOptimizer) and step:
                # torch.optim keeps state in the old dtype and then fails (Adam) or mixes dtypes (SGD);
                # its load_state_dict casts state to the parameters', which is what shardopt follows.
                optimizer.load_state_dict(optimizer.state_dict())
        optimizer.zero_grad()
        sum(loss(model, kind, rank, step) for rank in ranks).div(len(ranks)).backward()
        optimizer.step()
        trajectory.append(flat_params(model).double())
    return trajectory


def changed_run(torch_class: type, kwargs: dict[str, Any], change: str, at: int, stage: int) -> list[torch.Tensor]:
    import torch.distributed as dist

    kind = model_kind(change)
    model = make(kind)
    optimizer = shardopt.ShardedOptimizer(model.parameters(), torch_class, stage=stage, **kwargs)
    trajectory = train(model, optimizer, kind, CHANGES[change], at, [dist.get_rank()])
    for param in model.parameters():
        assert param.dtype == trajectory[-1].dtype or change != "double"
    if change == "channels_last":
        assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    return trajectory


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("at", [0, 2], ids=["before-first-step", "after-two-steps"])
@pytest.mark.parametrize("change", sorted(CHANGES))
@pytest.mark.parametrize(("torch_class", "kwargs"), ALGORITHMS, ids=[c.__name__ for c, _ in ALGORITHMS])
def test_training_follows_a_changed_model(
    torch_class: type, kwargs: dict[str, Any], change: str, at: int, stage: int
) -> None:
    kind = model_kind(change)
    model = make(kind)
    reference = train(model, torch_class(model.parameters(), **kwargs), kind, CHANGES[change], at, list(range(WORLD)))
    for rank, trajectory in enumerate(run_world(changed_run, WORLD, torch_class, kwargs, change, at, stage)):
        assert_trajectories_close(trajectory, reference, f"{torch_class.__name__} {change} at {at} rank {rank}")


def state_strides_run() -> list[tuple[int, ...]]:
    model = make("conv").to(memory_format=torch.channels_last)
    optimizer = shardopt.AdamW(model.parameters(), lr=1e-2)
    loss(model, "conv", 0, 0).backward()
    optimizer.step()
    state = optimizer.state_dict()["state"][0]
    return [state["exp_avg"].stride(), state["exp_avg_sq"].stride(), model.conv.weight.stride()]


def test_a_channels_last_weight_keeps_its_format_and_its_state_has_it_too() -> None:
    model = make("conv").to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss(model, "conv", 0, 0).backward()
    optimizer.step()
    expected = [optimizer.state[model.conv.weight][name].stride() for name in ("exp_avg", "exp_avg_sq")]
    for strides in run_world(state_strides_run, WORLD):
        assert strides == expected + [model.conv.weight.stride()]


# ---------------------------------------------------------------- low precision: against a fresh optimizer


def to_bf16(model: nn.Module) -> None:
    model.to(torch.bfloat16)


def to_float(model: nn.Module) -> None:
    model.float()


def reload_halved(model: nn.Module) -> None:
    """An in-place ``load_state_dict``: the parameters' values change, their storage does not."""
    model.load_state_dict({name: value * 0.5 for name, value in model.state_dict().items()})


PRECISION_CHANGES = {
    "to(bfloat16)": (torch.float32, to_bf16, 0),
    "float() of bf16": (torch.bfloat16, to_float, 0),
    "load_state_dict into bf16": (torch.bfloat16, reload_halved, 2),
}


def precision_run(change: str, built_after: bool) -> list[torch.Tensor]:
    import torch.distributed as dist

    dtype, apply, at = PRECISION_CHANGES[change]
    model = make("tiny").to(dtype)
    # SGD without momentum has no state: an optimizer built after the change is where this one must be.
    optimizer = shardopt.SGD(model.parameters(), lr=0.1)
    trajectory = []
    for step in range(STEPS):
        if step == at:
            apply(model)
            if built_after:
                del optimizer
                gc.collect()  # its backward hooks go with it
                optimizer = shardopt.SGD(model.parameters(), lr=0.1)
        optimizer.zero_grad()
        loss(model, "tiny", dist.get_rank(), step).backward()
        optimizer.step()
        trajectory.append(flat_params(model).double())
    return trajectory


@pytest.mark.parametrize("change", sorted(PRECISION_CHANGES))
def test_master_weights_follow_a_cast_or_a_load(change: str) -> None:
    followed = run_world(precision_run, WORLD, change, False)
    built_after = run_world(precision_run, WORLD, change, True)
    for ours, fresh in zip(followed, built_after):
        for step, (a, b) in enumerate(zip(ours, fresh)):
            assert torch.equal(a, b), f"{change}: step {step} differs from an optimizer built after the change"


# ---------------------------------------------------------------- what cannot be followed


def unfollowable_run(change: str) -> str:
    import torch.distributed as dist

    model = make("tiny")
    optimizer = shardopt.AdamW(model.parameters(), lr=1e-2)
    loss(model, "tiny", dist.get_rank(), 0).backward()
    optimizer.step()
    if change == "reshape":
        model.scale.data = torch.ones(1)  # still broadcasts in forward: the gradient has the new shape
    else:
        model.scale.data = model.scale.data.double()  # one parameter cast: its bucket holds two dtypes
    optimizer.zero_grad()
    loss(model, "tiny", dist.get_rank(), 1).backward()
    before = flat_params(model)
    with pytest.raises(RuntimeError) as error:
        optimizer.step()
    assert torch.equal(flat_params(model), before)  # nothing was updated
    return str(error.value)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ("reshape", "parameter 0 of param group 0 changed shape from (3,) to (1,)"),
        ("partial cast", "parameter 1 of param group 0 is torch.float32 on cpu while another parameter of its buffer"),
    ],
)
def test_a_change_that_cannot_be_followed_is_an_error_on_every_rank(change: str, says: str) -> None:
    for message in run_world(unfollowable_run, WORLD, change):
        assert says in message
        assert "build the optimizer" in message or "build a new one" in message


# ---------------------------------------------------------------- checkpoints of a channels_last weight


def channels_last_checkpoint_run(directory: pathlib.Path) -> dict[str, Any]:
    import torch.distributed as dist

    model = make("conv").to(memory_format=torch.channels_last)
    optimizer = shardopt.AdamW(model.parameters(), lr=1e-2)
    for step in range(2):
        optimizer.zero_grad()
        loss(model, "conv", dist.get_rank(), step).backward()
        optimizer.step()
    checkpoint.save(directory / "checkpoint", model=model, optimizer=optimizer)
    contiguous = make("conv")
    with pytest.raises(checkpoint.CheckpointError) as refused:
        checkpoint.load(directory / "checkpoint", model=contiguous, optimizer=shardopt.AdamW(contiguous.parameters()))
    again = make("conv").to(memory_format=torch.channels_last)
    loaded = shardopt.AdamW(again.parameters(), lr=1e-2)
    checkpoint.load(directory / "checkpoint", model=again, optimizer=loaded)
    return {
        "state": optimizer.state_dict()["state"],
        "loaded": loaded.state_dict()["state"],
        "refused": str(refused.value),
    }


def test_a_channels_last_weight_checkpoints_and_exports_in_its_own_layout(tmp_path: pathlib.Path) -> None:
    """Its state is stored in its memory order: loaded into the same layout it is exact, exported it is
    torch.optim's tensors (strides included), and a model built contiguous refuses it by name."""
    for result in run_world(channels_last_checkpoint_run, WORLD, tmp_path):
        assert "parameter 'conv.weight' was channels_last" in result["refused"], result["refused"]
        assert "model.to(memory_format=...)" in result["refused"]
        exported = checkpoint.consolidate(tmp_path / "checkpoint")["optimizer"]["state"]
        for number, entry in result["state"].items():
            for name, value in entry.items():
                assert torch.equal(result["loaded"][number][name], value), (number, name)
                assert torch.equal(exported[number][name], value), (number, name)
                assert exported[number][name].stride() == value.stride(), (number, name)
