"""shardopt.elements.kernels: torch's native fused kernels and the compiled update against the eager one."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor
from torch._dynamo.utils import counters

from shardopt.algorithms import ALGORITHMS, Algorithm, Group, Slices
from shardopt.algorithms.adam import Adam
from shardopt.algorithms.rprop import Rprop
from shardopt.elements import kernels
from tests.cases import CASES, case_id

STEPS = 10
RTOL, ATOL = 1e-5, 1e-6
# Two slices of different lengths, the second starting off any vector boundary, as the
# coordinator cuts a shard where parameters' scalar state differs.
BOUNDS = (0, 389, 1000)
NATIVE_CASES = [case for case in CASES if ALGORITHMS[case[0]].native_fused is not None]

Update = Callable[[Algorithm, Tensor, Tensor, dict[str, Tensor], dict[str, Tensor], Group, bool], None]


def eager(algorithm: Algorithm, *args: Any) -> None:
    algorithm.update(*args)


def native(
    algorithm: Algorithm,
    param: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    scalars: dict[str, Tensor],
    group: Group,
    fresh: bool,
) -> None:
    algorithm.coefficients(scalars, group, fresh)
    assert kernels.run_native(algorithm, Slices([param], [grad], [state]), scalars, group, fresh), "native did not run"


def compiled(
    algorithm: Algorithm,
    param: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    scalars: dict[str, Tensor],
    group: Group,
    fresh: bool,
) -> None:
    coefficients = algorithm.coefficients(scalars, group, fresh)
    assert kernels.run_compiled(algorithm, Slices([param], [grad], [state]), coefficients, group), "compiling failed"


def one_slice(fused: bool | None) -> Update:
    """``kernels.update`` of a single slice, in the signature :class:`Run` calls."""

    def update(algorithm: Algorithm, param: Tensor, grad: Tensor, state: dict[str, Tensor], *rest: Any) -> None:
        kernels.update(algorithm, Slices([param], [grad], [state]), *rest, fused)

    return update


def make_group(cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> Group:
    return cls([torch.zeros(1, requires_grad=True)], **kwargs).param_groups[0]


class Run:
    """One flat parameter with its state, updated slice by slice, as the coordinator does."""

    def __init__(
        self,
        algorithm: Algorithm,
        group: Group,
        update: Update,
        bounds: tuple[int, ...] = BOUNDS,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.algorithm, self.group, self.update = algorithm, group, update
        self.generator = torch.Generator().manual_seed(0)
        self.param = torch.randn(bounds[-1], generator=self.generator, dtype=dtype)
        self.state = {
            name: torch.full_like(self.param, algorithm.initial_value(name, group))
            for name in algorithm.tensor_state(group)
        }
        self.slices = [slice(start, stop) for start, stop in itertools.pairwise(bounds)]
        self.scalars = [
            {name: torch.tensor(value) for name, value in algorithm.scalar_state(group).items()} for _ in self.slices
        ]
        self.steps = 0

    def step(self) -> None:
        grad = torch.randn(self.param.shape, generator=self.generator, dtype=self.param.dtype)
        before = grad.clone()
        for part, scalars in zip(self.slices, self.scalars, strict=True):
            state = {name: tensor[part] for name, tensor in self.state.items()}
            self.update(self.algorithm, self.param[part], grad[part], state, scalars, self.group, self.steps == 0)
        assert torch.equal(grad, before), "the gradient was written"
        self.steps += 1


def assert_runs_agree(
    cls: type[torch.optim.Optimizer],
    kwargs: dict[str, Any],
    update: Update,
    rtol: float = RTOL,
    atol: float = ATOL,
    dtype: torch.dtype = torch.float32,
) -> None:
    """``update`` and the eager update step side by side: parameters close at every step,
    state close at the end, the per-parameter scalars equal to the bit."""
    label = case_id(cls, kwargs)
    algorithm, group = ALGORITHMS[cls], make_group(cls, kwargs)
    ours, reference = Run(algorithm, group, update, dtype=dtype), Run(algorithm, group, eager, dtype=dtype)
    for step in range(1, STEPS + 1):
        ours.step()
        reference.step()
        torch.testing.assert_close(
            ours.param, reference.param, rtol=rtol, atol=atol, msg=lambda m, s=step: f"{label} step {s}: {m}"
        )
    for name, tensor in reference.state.items():
        torch.testing.assert_close(
            ours.state[name], tensor, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{label} state {n}: {m}"
        )
    for mine, theirs in zip(ours.scalars, reference.scalars, strict=True):
        for name, value in theirs.items():
            assert torch.equal(mine[name], value), f"{label}: scalar {name} {mine[name]} != eager's {value}"


def graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize(("cls", "kwargs"), NATIVE_CASES, ids=[case_id(*case) for case in NATIVE_CASES])
def test_native_fused_matches_eager(cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> None:
    assert_runs_agree(cls, kwargs, native)


# Every case, though only the static flags make a new graph: the others reuse one compiled before.
@pytest.mark.parametrize(("cls", "kwargs"), CASES, ids=[case_id(*case) for case in CASES])
def test_compiled_matches_eager(cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> None:
    assert_runs_agree(cls, kwargs, compiled)


def test_compiled_float64_keeps_float64_coefficients() -> None:
    assert_runs_agree(torch.optim.Adam, {"lr": 1e-2}, compiled, rtol=1e-12, atol=1e-14, dtype=torch.float64)


def test_new_hyperparameters_and_steps_do_not_recompile() -> None:
    algorithm, group = ALGORITHMS[torch.optim.Adam], make_group(torch.optim.Adam, {})
    ours, reference = Run(algorithm, group, compiled), Run(algorithm, group, eager)
    before = graphs_compiled()
    for lr, betas, eps in [
        (1e-3, (0.9, 0.999), 1e-8),
        (2e-2, (0.9, 0.999), 1e-8),
        (torch.tensor(5e-3), (0.8, 0.99), 1e-8),
        (5e-3, (0.85, 0.9), 1e-3),
        (1e-1, (0.95, 0.999), 1e-6),
    ]:
        group.update(lr=lr, betas=betas, eps=eps)
        ours.step()
        reference.step()
        # Inputs baked into the graph as constants would show here, without a recompile.
        torch.testing.assert_close(ours.param, reference.param, rtol=RTOL, atol=ATOL)
    assert graphs_compiled() - before <= 1, "a new lr, betas, eps or step recompiled"


def test_slice_lengths_share_one_graph() -> None:
    algorithm, group = ALGORITHMS[torch.optim.Rprop], make_group(torch.optim.Rprop, {})
    before = graphs_compiled()
    for bounds in [(0, 1000), (0, 389, 1000), (0, 7, 4103)]:
        ours, reference = Run(algorithm, group, compiled, bounds), Run(algorithm, group, eager, bounds)
        ours.step()
        reference.step()
        torch.testing.assert_close(ours.param, reference.param, rtol=RTOL, atol=ATOL)
    assert graphs_compiled() - before <= 1, "a new slice length recompiled"


@pytest.fixture
def paths(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths kernels.update took, in order: "native", "compiled" (each only when it ran)."""
    taken: list[str] = []

    def spy(name: str, run: Callable[..., bool]) -> Callable[..., bool]:
        def wrapper(*args: Any) -> bool:
            ran = run(*args)
            if ran:
                taken.append(name)
            return ran

        return wrapper

    monkeypatch.setattr(kernels, "run_native", spy("native", kernels.run_native))
    monkeypatch.setattr(kernels, "run_compiled", spy("compiled", kernels.run_compiled))
    return taken


@pytest.mark.parametrize(
    ("cls", "numel", "fused", "path"),
    [
        (torch.optim.Adam, 100, False, "eager"),
        (torch.optim.Adam, 100, None, "native"),
        (torch.optim.Adam, 100, True, "native"),
        (torch.optim.Rprop, 100, False, "eager"),
        (torch.optim.Rprop, 100, None, "eager"),
        (torch.optim.Rprop, kernels.COMPILE_THRESHOLD, None, "compiled"),
        (torch.optim.Rprop, 100, True, "compiled"),
        # One element would need a graph of its own.
        (torch.optim.Rprop, 1, True, "eager"),
    ],
)
def test_update_chooses(
    paths: list[str], cls: type[torch.optim.Optimizer], numel: int, fused: bool | None, path: str
) -> None:
    algorithm, group = ALGORITHMS[cls], make_group(cls, {})
    chosen = Run(algorithm, group, one_slice(fused), (0, numel))
    reference = Run(algorithm, group, eager, (0, numel))
    for _ in range(2):
        chosen.step()
        reference.step()
    assert paths == ([] if path == "eager" else [path, path])
    if path == "eager":
        assert torch.equal(chosen.param, reference.param)
    torch.testing.assert_close(chosen.param, reference.param, rtol=RTOL, atol=ATOL)


def _warnings_of(run: Callable[[], None]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [str(w.message) for w in caught if str(w.message).startswith("shardopt")]


def _steps(run: Run, count: int) -> Callable[[], None]:
    def steps() -> None:
        for _ in range(count):
            run.step()

    return steps


def test_fused_without_compiling_runs_eagerly_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.COMPILE_ENV, "0")
    kernels._warn_once.cache_clear()
    algorithm, group = ALGORITHMS[torch.optim.Rprop], make_group(torch.optim.Rprop, {})
    fused = Run(algorithm, group, one_slice(True))
    reference = Run(algorithm, group, eager)
    messages = _warnings_of(_steps(fused, 3))
    _steps(reference, 3)()
    assert len(messages) == 1 and kernels.COMPILE_ENV in messages[0], messages
    assert torch.equal(fused.param, reference.param)

    # Not asked for (fused=None), compiling is silently off.
    auto = Run(algorithm, group, one_slice(None), (0, kernels.COMPILE_THRESHOLD))
    assert _warnings_of(_steps(auto, 1)) == []


class Untraceable(Rprop):
    """Rprop with a branch on a tensor's value, which torch.compile(fullgraph=True) refuses."""

    def elementwise(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], coefficients: Any, group: Any) -> None:
        if grad.sum().item() > 1e30:
            grad = grad.clone()
        super().elementwise(param, grad, state, coefficients, group)


class NoNativeHere(Adam):
    """Adam whose native kernel refuses this device, as torch's do where they have no kernel."""

    def native_fused(self, *args: Any) -> None:
        raise NotImplementedError("no fused kernel for this backend")


@pytest.mark.parametrize(
    ("algorithm", "fused", "reason"),
    [(Untraceable(), True, "compiling Rprop's update failed"), (NoNativeHere(), None, "fused Adam kernel")],
    ids=["compile-fails", "native-refuses"],
)
def test_failing_path_falls_back_to_eager_with_one_warning(algorithm: Algorithm, fused: bool, reason: str) -> None:
    kernels._warn_once.cache_clear()
    group = make_group(algorithm.torch_class, {})
    ours = Run(algorithm, group, one_slice(fused))
    reference = Run(algorithm, group, eager)
    messages = _warnings_of(_steps(ours, 3))
    _steps(reference, 3)()
    assert len(messages) == 1 and reason in messages[0], messages
    assert torch.equal(ours.param, reference.param)


@pytest.mark.parametrize("fused", [False, None, True])
@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.NAdam])
def test_empty_slice_still_advances_the_scalars(cls: type[torch.optim.Optimizer], fused: bool | None) -> None:
    algorithm, group = ALGORITHMS[cls], make_group(cls, {})
    run = Run(algorithm, group, one_slice(fused), (0, 0))
    reference = Run(algorithm, group, eager, (0, 0))
    for _ in range(3):
        run.step()
        reference.step()
    assert run.scalars[0]["step"] == 3
    for name, value in reference.scalars[0].items():
        assert torch.equal(run.scalars[0][name], value), name


@pytest.mark.parametrize("fused", [False, None, True])
@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.NAdam])
def test_slices_sharing_scalars_update_in_one_call_as_one_call_each(
    cls: type[torch.optim.Optimizer], fused: bool | None
) -> None:
    """kernels.update over several slices (one native or compiled kernel call, as step() batches
    buckets) equals updating each slice on its own from the same scalars."""
    algorithm, group = ALGORITHMS[cls], make_group(cls, {"weight_decay": 0.1})
    generator = torch.Generator().manual_seed(3)
    sizes = (389, 611, 0)
    params = [torch.randn(n, generator=generator) for n in sizes]
    grads = [torch.randn(n, generator=generator) for n in sizes]
    states = [{name: torch.rand(n, generator=generator) for name in algorithm.tensor_state(group)} for n in sizes]
    copies = [(p.clone(), {k: v.clone() for k, v in s.items()}) for p, s in zip(params, states)]
    scalars = {name: torch.tensor(value) for name, value in algorithm.scalar_state(group).items()}
    batched_scalars = {k: v.clone() for k, v in scalars.items()}
    kernels.update(algorithm, Slices(params, grads, states), batched_scalars, group, True, fused)
    for (param, state), grad in zip(copies, grads):
        one_slice(fused)(algorithm, param, grad, state, {k: v.clone() for k, v in scalars.items()}, group, True)
    for (param, state), batched, batched_state in zip(copies, params, states):
        assert torch.equal(batched, param)
        for name, tensor in state.items():
            assert torch.equal(batched_state[name], tensor), name


@pytest.mark.parametrize("count", range(20))
def test_batches_take_the_largest_power_of_two_that_fits(count: int) -> None:
    runs = kernels.batches(list(range(count)))
    assert [item for run in runs for item in run] == list(range(count))
    sizes = [len(run) for run in runs]
    assert sizes == sorted(sizes, reverse=True) and all(size in (1, 2, 4, kernels.BATCH) for size in sizes), sizes
    # Below BATCH, one run per binary digit of what is left: at most one of each size.
    rest = sizes[sizes.count(kernels.BATCH) :]
    assert len(rest) == len(set(rest)) and sum(rest) == count % kernels.BATCH, sizes


def test_slices_compile_together_where_they_hold_enough_elements_in_all(paths: list[str]) -> None:
    """fused=None compiles slices each below COMPILE_THRESHOLD when together they reach it (at N
    ranks a bucket's shard is 1/N of it), in one call; new lengths of the same number of slices,
    equal or not, reuse its graph."""
    algorithm, group = ALGORITHMS[torch.optim.Rprop], make_group(torch.optim.Rprop, {})
    half = kernels.COMPILE_THRESHOLD // 2
    generator = torch.Generator().manual_seed(5)
    before = graphs_compiled()
    for sizes in [(half, half), (half + 5, half - 3)]:
        params = [torch.randn(n, generator=generator) for n in sizes]
        grads = [torch.randn(n, generator=generator) for n in sizes]
        states = [
            {name: torch.full((n,), algorithm.initial_value(name, group)) for name in algorithm.tensor_state(group)}
            for n in sizes
        ]
        references = [(p.clone(), {k: v.clone() for k, v in state.items()}) for p, state in zip(params, states)]
        scalars = {name: torch.tensor(value) for name, value in algorithm.scalar_state(group).items()}
        kernels.update(algorithm, Slices(params, grads, states), scalars, group, True, None)
        for (param, state), grad, ours in zip(references, grads, params):
            eager(
                algorithm,
                param,
                grad,
                state,
                {name: torch.tensor(value) for name, value in algorithm.scalar_state(group).items()},
                group,
                True,
            )
            torch.testing.assert_close(ours, param, rtol=RTOL, atol=ATOL)
    assert paths == ["compiled", "compiled"]
    assert graphs_compiled() - before <= 1, "new slice lengths recompiled"
