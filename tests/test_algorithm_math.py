"""Each algorithm's flat-slice math against torch.optim's own step, in one process."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from torch import Tensor

from shardopt.algorithms import ALGORITHMS, Algorithm, Group
from tests.cases import CASES, case_id

SHAPES = ((7, 5), (5,), (3, 3))
STEPS = 10
RTOL, ATOL = 1e-5, 1e-6
# An element inside the (5,) parameter, which spans elements 35..39 of the flat tensor.
SPLIT = 37
NUMEL = sum(torch.Size(shape).numel() for shape in SHAPES)


def _make_params(seed: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


def _unflatten(flat: Tensor) -> list[Tensor]:
    sizes = [torch.Size(shape).numel() for shape in SHAPES]
    return [part.view(shape) for part, shape in zip(flat.split(sizes), SHAPES, strict=True)]


class FlatRun:
    """Our side: one flat tensor for all parameters, updated one slice at a time as the coordinator does."""

    def __init__(self, algorithm: Algorithm, group: Group, params: list[Tensor], bounds: list[int]) -> None:
        self.algorithm, self.group = algorithm, group
        self.param = torch.cat([p.detach().reshape(-1) for p in params])
        self.slices = [slice(start, stop) for start, stop in itertools.pairwise(bounds)]
        self.scalars = [
            {name: torch.tensor(value, dtype=torch.float32) for name, value in algorithm.scalar_state(group).items()}
            for _ in self.slices
        ]
        self.state: dict[str, Tensor] | None = None
        self.steps = 0
        if algorithm.eager_state:
            self._create_state()

    def _create_state(self) -> None:
        self.state = {
            name: torch.full_like(self.param, self.algorithm.initial_value(name, self.group))
            for name in self.algorithm.tensor_state(self.group)
        }

    def step(self, grad: Tensor) -> None:
        if self.state is None:
            self._create_state()
        assert self.state is not None
        for part, scalars in zip(self.slices, self.scalars, strict=True):
            state = {name: tensor[part] for name, tensor in self.state.items()}
            self.algorithm.update(self.param[part], grad[part], state, scalars, self.group, self.steps == 0)
        self.steps += 1


def _run(cls: type[torch.optim.Optimizer], kwargs: dict[str, Any], bounds: list[int]) -> FlatRun:
    """Step torch and our flat slices side by side, checking params every step and all state at the end."""
    label = case_id(cls, kwargs)
    algorithm = ALGORITHMS[cls]
    ref_params = [p.requires_grad_() for p in _make_params(0)]
    ref = cls(ref_params, **kwargs)
    ours = FlatRun(algorithm, ref.param_groups[0], _make_params(0), bounds)
    generator = torch.Generator().manual_seed(1)

    for step in range(1, STEPS + 1):
        grads = [torch.randn(shape, generator=generator) for shape in SHAPES]
        for p, g in zip(ref_params, grads, strict=True):
            p.grad = g.clone()
        ref.step()
        flat_grad = torch.cat([g.reshape(-1) for g in grads])
        ours.step(flat_grad)
        assert torch.equal(flat_grad, torch.cat([g.reshape(-1) for g in grads])), f"{label}: grad was written"
        for i, (mine, theirs) in enumerate(zip(_unflatten(ours.param), ref_params, strict=True)):
            torch.testing.assert_close(
                mine,
                theirs.detach(),
                rtol=RTOL,
                atol=ATOL,
                msg=lambda m, i=i, step=step: f"{label} step {step} param {i}: {m}",
            )

    assert ours.state is not None
    per_param_state = {name: _unflatten(tensor) for name, tensor in ours.state.items()}
    for i, p in enumerate(ref_params):
        theirs = ref.state[p]
        names = [*algorithm.scalar_state(ref.param_groups[0]), *algorithm.tensor_state(ref.param_groups[0])]
        assert names == list(theirs), f"{label}: state keys {names} != torch's {list(theirs)}"
        for name, tensors in per_param_state.items():
            torch.testing.assert_close(
                tensors[i],
                theirs[name],
                rtol=RTOL,
                atol=ATOL,
                msg=lambda m, n=name: f"{label} state {n}: {m}",
            )
        for scalars in ours.scalars:
            for name, value in scalars.items():
                # torch keeps these as float32 0-d tensors too, so they must agree to the bit.
                assert torch.equal(value, theirs[name]), f"{label} param {i}: {name} {value} != torch's {theirs[name]}"
    return ours


@pytest.mark.parametrize(("cls", "kwargs"), CASES, ids=[case_id(*case) for case in CASES])
def test_flat_update_matches_torch(cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> None:
    _run(cls, kwargs, [0, NUMEL])


@pytest.mark.parametrize(("cls", "kwargs"), CASES, ids=[case_id(*case) for case in CASES])
def test_parameter_split_across_two_slices_matches_torch(
    cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]
) -> None:
    # The coordinator hands the two halves of a parameter that spans two ranks to separate updates.
    whole, split = _run(cls, kwargs, [0, NUMEL]), _run(cls, kwargs, [0, SPLIT, NUMEL])
    label = case_id(cls, kwargs)
    assert torch.equal(whole.param, split.param), f"{label}: params differ when split"
    assert whole.state is not None and split.state is not None
    for name, tensor in whole.state.items():
        assert torch.equal(tensor, split.state[name]), f"{label}: state {name} differs when split"
    for name, value in whole.scalars[0].items():
        for half in split.scalars:
            assert torch.equal(half[name], value), f"{label}: scalar {name} differs when split"
