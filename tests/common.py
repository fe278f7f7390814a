"""The model, data and single-process reference every distributed test compares against."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


class TinyNet(nn.Module):
    """Tensor sizes 35, 5, 15, 3 and 3: 61 elements, no size a multiple of 2, 3 or 4."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(7, 5)
        self.out = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x))) * self.scale


def make_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank- and step-dependent data: every rank sees different samples."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 7, generator=generator), torch.randn(4, 3, generator=generator)


def loss_of(model: nn.Module, rank: int, step: int) -> torch.Tensor:
    x, y = batch(rank, step)
    return nn.functional.mse_loss(model(x), y)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def set_mean_grads(model: nn.Module, world_size: int, step: int, scale: float = 1) -> None:
    """Give every parameter the mean over ``world_size`` ranks' gradients (times ``scale``), as if all-reduced."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for rank in range(world_size):
        model.zero_grad(set_to_none=True)
        loss_of(model, rank, step).backward()
        for acc, p in zip(total, params):
            acc += p.grad
    for acc, p in zip(total, params):
        p.grad = acc / world_size if scale == 1 else acc / world_size * scale


def reference_run(
    optimizer_class: type[torch.optim.Optimizer],
    kwargs: dict[str, Any],
    world_size: int,
    steps: int,
    make_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    grad_scale: float = 1,
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Single-process torch.optim fed the mean gradient: parameters after every step, final state_dict."""
    model = make_model()
    optimizer = optimizer_class(model.parameters(), **kwargs)
    scheduler = make_scheduler(optimizer) if make_scheduler else None
    trajectory = []
    for step in range(steps):
        set_mean_grads(model, world_size, step, grad_scale)
        optimizer.step()
        if scheduler is not None:
            step_scheduler(scheduler)
        trajectory.append(flat_params(model))
    return trajectory, optimizer.state_dict()


def step_scheduler(scheduler: Any) -> None:
    """ReduceLROnPlateau takes a metric: a constant one, so that it sees a plateau."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(1.0)
    else:
        scheduler.step()


def assert_trajectories_close(
    ours: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], label: str, rtol: float = 1e-5, atol: float = 1e-6
) -> None:
    for step, (a, b) in enumerate(zip(ours, reference, strict=True)):
        difference = (a - b).abs().max().item()
        torch.testing.assert_close(
            a, b, rtol=rtol, atol=atol, msg=lambda m, s=step, d=difference: f"{label} step {s}: max |diff| {d:.3g}\n{m}"
        )


def assert_state_dicts_equal(
    ours: dict[str, Any], reference: dict[str, Any], label: str, rtol: float = 1e-5, atol: float = 1e-6
) -> None:
    """Same param_groups, same parameters with state, same keys, values close."""
    assert _comparable_groups(ours["param_groups"]) == _comparable_groups(reference["param_groups"]), label
    assert ours["state"].keys() == reference["state"].keys(), f"{label}: parameters with state differ"
    for index, entry in reference["state"].items():
        assert list(ours["state"][index]) == list(entry), f"{label}: state keys of parameter {index}"
        for key, value in entry.items():
            mine = ours["state"][index][key]
            assert mine.dtype == value.dtype and mine.shape == value.shape, f"{label}: {key} of {index}"
            torch.testing.assert_close(
                mine, value, rtol=rtol, atol=atol, msg=lambda m, k=key, i=index: f"{label}: state {k} of {i}\n{m}"
            )


def _comparable_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups with tensor hyper-parameters (lr=tensor(...)) turned into floats, so == compares values."""
    return [{k: v.item() if isinstance(v, torch.Tensor) else v for k, v in group.items()} for group in groups]


def assert_identical(ours: Any, reference: Any, path: str = "state_dict") -> None:
    """Same structure, same keys, bit-identical tensors (dtype and shape included), equal other values."""
    if isinstance(reference, torch.Tensor):
        assert isinstance(ours, torch.Tensor), path
        assert ours.dtype == reference.dtype and ours.shape == reference.shape, path
        assert torch.equal(ours, reference), path
    elif isinstance(reference, dict):
        assert isinstance(ours, dict) and list(ours) == list(reference), path
        for key, value in reference.items():
            assert_identical(ours[key], value, f"{path}[{key!r}]")
    elif isinstance(reference, (list, tuple)):
        assert type(ours) is type(reference) and len(ours) == len(reference), path
        for index, (mine, value) in enumerate(zip(ours, reference)):
            assert_identical(mine, value, f"{path}[{index}]")
    else:
        assert ours == reference, path
