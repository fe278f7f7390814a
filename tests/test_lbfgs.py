"""ShardedLBFGS against single-process torch.optim.LBFGS on the mean loss, at world sizes 1, 2 and 3.

The reference's closure returns the mean over the ranks' losses, so its objective is the global
objective the sharded closures (each rank's own data) add up to. The Gram-matrix recursion rounds
differently from torch's sequential loop: float64 runs are compared to 1e-9, float32 ones to 1e-4.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.lbfgs import _strong_wolfe

import shardopt
from shardopt.slices.history import History, two_loop
from shardopt.slices.optimizer import ShardedLBFGS
from shardopt.slices.search import strong_wolfe

from .common import assert_trajectories_close, batch, flat_params, make_model
from .world import run_world

WORLD_SIZES = [1, 2, 3]
WOLFE = "strong_wolfe"
TOLERANCES = {torch.float64: {"rtol": 1e-9, "atol": 1e-9}, torch.float32: {"rtol": 1e-4, "atol": 1e-4}}
# The state's scalars (al, ro, H_diag) and gradients near convergence amplify rounding differences:
# at 20+ iterations in float64 al differs by ~1e-9 relative while the parameters agree to 1e-15.
STATE_TOLERANCES = {torch.float64: {"rtol": 1e-7, "atol": 1e-9}, torch.float32: {"rtol": 1e-3, "atol": 1e-4}}

# (label, keywords, dtype, steps)
CASES: list[tuple[str, dict[str, Any], torch.dtype, int]] = [
    ("fixed-step", {"history_size": 3, "max_iter": 5}, torch.float64, 4),
    ("strong-wolfe", {"history_size": 3, "max_iter": 7, "line_search_fn": "strong_wolfe"}, torch.float64, 3),
    ("defaults-wolfe", {"line_search_fn": "strong_wolfe"}, torch.float64, 2),
    (
        "max-eval",
        {"history_size": 4, "max_iter": 10, "max_eval": 6, "line_search_fn": "strong_wolfe"},
        torch.float64,
        3,
    ),
    ("tensor-lr", {"lr": torch.tensor(0.5), "history_size": 2, "max_iter": 4}, torch.float64, 3),
    ("tolerance-grad", {"tolerance_grad": 0.1, "max_iter": 50, "line_search_fn": "strong_wolfe"}, torch.float64, 2),
    ("tolerance-change", {"tolerance_change": 0.03, "max_iter": 50, "history_size": 5}, torch.float64, 1),
    ("optimal-at-once", {"tolerance_grad": 1e3}, torch.float64, 2),
    ("fixed-step-fp32", {"history_size": 3, "max_iter": 5}, torch.float32, 3),
    ("strong-wolfe-fp32", {"history_size": 3, "max_iter": 7, "line_search_fn": "strong_wolfe"}, torch.float32, 2),
    # No iteration: one closure call per step, nothing moves, the state holds None (torch accepts max_iter <= 0).
    ("no-iterations", {"max_iter": 0}, torch.float64, 2),
    ("negative-max-iter", {"max_iter": -1, "line_search_fn": "strong_wolfe"}, torch.float64, 1),
]


def _loss(model: nn.Module, rank: int, step: int, dtype: torch.dtype) -> torch.Tensor:
    x, y = batch(rank, step)
    return nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype))


def _model(dtype: torch.dtype) -> nn.Module:
    return make_model().to(dtype)


def _run(
    optimizer: torch.optim.Optimizer, model: nn.Module, ranks: list[int], dtype: torch.dtype, steps: range
) -> dict[str, Any]:
    """``steps`` LBFGS steps whose closure is the mean loss over ``ranks``' data: parameters, returned
    losses and closure calls after each step."""
    out: dict[str, Any] = {"params": [], "losses": [], "calls": []}
    for step in steps:
        calls = 0

        def closure(step: int = step) -> torch.Tensor:
            nonlocal calls
            calls += 1
            optimizer.zero_grad()
            loss = sum(_loss(model, rank, step, dtype) for rank in ranks) / len(ranks)
            loss.backward()
            return loss

        out["losses"].append(float(optimizer.step(closure).detach()))
        out["params"].append(flat_params(model))
        out["calls"].append(calls)
    return out


def _reference(kwargs: dict[str, Any], dtype: torch.dtype, steps: int, world_size: int) -> dict[str, Any]:
    model = _model(dtype)
    optimizer = torch.optim.LBFGS(model.parameters(), **kwargs)
    out = _run(optimizer, model, list(range(world_size)), dtype, range(steps))
    out["state_dict"] = optimizer.state_dict()
    return out


def _cases_world(cases: list[tuple[str, dict[str, Any], torch.dtype, int]]) -> list[dict[str, Any]]:
    import torch.distributed as dist

    rank, results = dist.get_rank(), []
    for _, kwargs, dtype, steps in cases:
        model = _model(dtype)
        optimizer = ShardedLBFGS(model.parameters(), **kwargs)
        out = _run(optimizer, model, [rank], dtype, range(steps))
        out["state_dict"] = optimizer.state_dict()
        results.append(out)
    return results


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_parity_with_torch(world_size: int) -> None:
    per_rank = run_world(_cases_world, world_size, CASES)
    for index, (label, kwargs, dtype, steps) in enumerate(CASES):
        reference = _reference(kwargs, dtype, steps, world_size)
        tolerance = TOLERANCES[dtype]
        for rank, results in enumerate(per_rank):
            ours, where = results[index], f"{label} N={world_size} rank {rank}"
            assert ours["calls"] == reference["calls"], f"{where}: closure calls per step"
            assert_trajectories_close(ours["params"], reference["params"], where, **tolerance)
            torch.testing.assert_close(ours["losses"], reference["losses"], **tolerance, msg=f"{where}: losses")
            assert_state_dicts_equal(ours["state_dict"], reference["state_dict"], where, **STATE_TOLERANCES[dtype])


def assert_state_dicts_equal(ours: dict[str, Any], reference: dict[str, Any], where: str, **tolerance: float) -> None:
    """Same groups and keys in the same order; the same Python types (t and H_diag are ints, floats or
    tensors, as torch leaves them; al holds None past the history); values close."""
    ours_groups = [
        {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in g.items()} for g in ours["param_groups"]
    ]
    groups = [
        {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in g.items()} for g in reference["param_groups"]
    ]
    assert ours_groups == groups, where
    assert ours["state"].keys() == reference["state"].keys(), where
    for index, entry in reference["state"].items():
        assert list(ours["state"][index]) == list(entry), f"{where}: state keys"
        for key, value in entry.items():
            _assert_close(ours["state"][index][key], value, f"{where}: state {key!r}", tolerance)


def _assert_close(mine: Any, value: Any, where: str, tolerance: dict[str, float]) -> None:
    assert type(mine) is type(value), f"{where} is a {type(mine).__name__}, torch's a {type(value).__name__}"
    if isinstance(value, list):
        assert len(mine) == len(value), where
        for i, (a, b) in enumerate(zip(mine, value)):
            _assert_close(a, b, f"{where}[{i}]", tolerance)
    elif isinstance(value, torch.Tensor):
        assert (mine.dtype, mine.shape, mine.device) == (value.dtype, value.shape, value.device), where
        torch.testing.assert_close(mine, value, **tolerance, msg=lambda m: f"{where}\n{m}")
    elif isinstance(value, float):
        assert mine == pytest.approx(value, rel=tolerance["rtol"], abs=tolerance["atol"]), where
    else:
        assert mine == value, where


# ---------------------------------------------------------------------- resharding


def _resume_world(state_dict: dict[str, Any] | None, params: torch.Tensor | None, kwargs: dict[str, Any], steps: range):
    import torch.distributed as dist

    model = _model(torch.float64)
    if params is not None:
        torch.nn.utils.vector_to_parameters(params, model.parameters())
    optimizer = ShardedLBFGS(model.parameters(), **kwargs)
    if state_dict is not None:
        optimizer.load_state_dict(state_dict)
    out = _run(optimizer, model, [dist.get_rank()], torch.float64, steps)
    out["state_dict"] = optimizer.state_dict()
    return out


def test_state_dict_round_trip_through_torch_across_world_sizes() -> None:
    """N=2 for 2 steps -> plain torch.optim.LBFGS for 1 step (3 ranks' data) -> N=3 for 2 steps, which
    must continue the single-process trajectory on the 3 ranks' data (history wrapped on the way)."""
    kwargs = {"history_size": 3, "max_iter": 4, "line_search_fn": "strong_wolfe"}
    reference_model = _model(torch.float64)
    reference = torch.optim.LBFGS(reference_model.parameters(), **kwargs)
    _run(reference, reference_model, [0, 1], torch.float64, range(2))
    expected_after_two = copy.deepcopy(reference.state_dict())
    continued = _run(reference, reference_model, [0, 1, 2], torch.float64, range(2, 5))

    first = run_world(_resume_world, 2, None, None, kwargs, range(2))[0]
    assert_state_dicts_equal(
        first["state_dict"], expected_after_two, "N=2 after 2 steps", **STATE_TOLERANCES[torch.float64]
    )

    plain_model = _model(torch.float64)
    torch.nn.utils.vector_to_parameters(first["params"][-1], plain_model.parameters())
    plain = torch.optim.LBFGS(plain_model.parameters(), **kwargs)
    plain.load_state_dict(first["state_dict"])
    middle = _run(plain, plain_model, [0, 1, 2], torch.float64, range(2, 3))

    last = run_world(_resume_world, 3, plain.state_dict(), middle["params"][-1], kwargs, range(3, 5))
    for rank, out in enumerate(last):
        where = f"N=3 rank {rank} resumed"
        assert out["calls"] == continued["calls"][1:], where
        assert_trajectories_close(out["params"], continued["params"][1:], where, **STATE_TOLERANCES[torch.float64])
        assert_state_dicts_equal(out["state_dict"], reference.state_dict(), where, **STATE_TOLERANCES[torch.float64])


# ---------------------------------------------------------------------- memory


def _memory_world(history_size: int) -> dict[str, int]:
    import torch.distributed as dist

    model = nn.Linear(64, 64)  # 4160 parameters: the slices dwarf the scalars and Gram matrices
    optimizer = ShardedLBFGS(model.parameters(), history_size=history_size, max_iter=8)
    generator = torch.Generator().manual_seed(dist.get_rank())
    x, y = torch.randn(16, 64, generator=generator), torch.randn(16, 64, generator=generator)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    stats = optimizer.memory_stats()
    stats["pairs"] = len(optimizer.state_dict()["state"][0]["old_dirs"])
    return stats


def _state_bytes(state: dict[str, Any]) -> int:
    tensors = [t for value in state.values() for t in (value if isinstance(value, list) else [value])]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("world_size", [2, 3])
def test_history_memory_per_rank_is_a_share_of_torchs(world_size: int) -> None:
    history_size, numel = 5, 64 * 64 + 64
    for stats in run_world(_memory_world, world_size, history_size):
        assert stats["pairs"] == history_size  # the history is full: 2 * 5 + 2 vectors
        vectors = (2 * stats["pairs"] + 2) * numel * 4  # what torch keeps: d, prev_flat_grad, s and y
        assert stats["param_bytes"] == stats["grad_bytes"] == numel * 4
        share = vectors / world_size
        assert share <= stats["state_bytes"] <= share * 1.01 + 1024, stats


# ---------------------------------------------------------------------- the pure parts


def _torch_two_loop(dirs: list[torch.Tensor], stps: list[torch.Tensor], g: torch.Tensor, h_diag: torch.Tensor):
    """torch's loop, copied from torch/optim/lbfgs.py."""
    ro = [1.0 / y.dot(s) for y, s in zip(dirs, stps)]
    al = [None] * len(dirs)
    q = g.neg()
    for i in range(len(dirs) - 1, -1, -1):
        al[i] = stps[i].dot(q) * ro[i]
        q.add_(dirs[i], alpha=-al[i])
    d = r = torch.mul(q, h_diag)
    for i in range(len(dirs)):
        be_i = dirs[i].dot(r) * ro[i]
        r.add_(stps[i], alpha=al[i] - be_i)
    return d, al


@pytest.mark.parametrize("pairs", [0, 1, 3, 7])
def test_gram_recursion_matches_torchs_loop(pairs: int) -> None:
    """History.update's incremental Gram matrices (history of 4, so 7 pairs wrap) and two_loop give
    torch's direction and al, on random vectors in a world of one (partial sums are the sums)."""
    generator = torch.Generator().manual_seed(pairs)
    n, history_size = 50, 4
    history = History([], [], [], torch.float64)
    h_diag: torch.Tensor | float = 1
    for _ in range(pairs + 1):
        g = torch.randn(n, generator=generator, dtype=torch.float64)
        s = torch.randn(n, generator=generator, dtype=torch.float64)
        y = s + 0.3 * torch.randn(n, generator=generator, dtype=torch.float64)  # y.s > 0
        if len(history.dirs) < pairs:
            sg, yg, new_h = history.update(y, s, history.partials(y, s, g), history_size)
            h_diag = new_h if new_h is not None else h_diag
    sg = torch.stack([v.dot(g) for v in history.stps]) if history.stps else torch.zeros(0, dtype=torch.float64)
    yg = torch.stack([v.dot(g) for v in history.dirs]) if history.dirs else torch.zeros(0, dtype=torch.float64)
    assert len(history.dirs) == min(pairs, history_size)
    if history.dirs:
        stps, dirs = torch.stack(history.stps), torch.stack(history.dirs)
        torch.testing.assert_close(history.sy, stps @ dirs.T, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(history.yy, dirs @ dirs.T, rtol=1e-12, atol=1e-12)
    ro = torch.stack(history.ro) if history.ro else torch.zeros(0, dtype=torch.float64)
    al, y_coefficients, s_coefficients = two_loop(history.sy, history.yy, sg, yg, ro, h_diag)
    d = history.direction(g, h_diag, y_coefficients, s_coefficients)
    expected_d, expected_al = _torch_two_loop(history.dirs, history.stps, g, h_diag)
    torch.testing.assert_close(d, expected_d, rtol=1e-10, atol=1e-10)
    if pairs:
        torch.testing.assert_close(al, torch.stack(expected_al), rtol=1e-10, atol=1e-10)


def test_history_keeps_no_pair_with_small_curvature() -> None:
    history = History([], [], [], torch.float64)
    s = torch.ones(3, dtype=torch.float64)
    y = torch.tensor([1e-12, 0.0, 0.0], dtype=torch.float64)  # y.s = 1e-12 <= 1e-10: torch skips it
    sg, yg, h_diag = history.update(y, s, history.partials(y, s, s), 3)
    assert h_diag is None and not history.dirs and sg.numel() == yg.numel() == 0


@pytest.mark.parametrize("start", [1.0, 0.01, 30.0])
def test_strong_wolfe_port_matches_torch(start: float) -> None:
    """On a Rosenbrock-like function in one process: the same step, loss, gradient and evaluations."""

    def value_and_grad(x: torch.Tensor) -> tuple[float, torch.Tensor]:
        x = x.detach().requires_grad_()
        f = (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()
        f.backward()
        return float(f), x.grad

    x = torch.tensor([-1.2, 1.0, 0.5, -0.3], dtype=torch.float64)
    f, g = value_and_grad(x)
    d = -g
    gtd = g.dot(d)

    def torch_obj(x: torch.Tensor, t: Any, d: torch.Tensor) -> tuple[float, torch.Tensor]:
        return value_and_grad(x + t * d)

    def our_obj(x: torch.Tensor, t: Any, d: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        f_new, g_new = value_and_grad(x + t * d)
        return f_new, g_new, g_new.dot(d)

    expected = _strong_wolfe(torch_obj, x, start, d, f, g, gtd)
    ours = strong_wolfe(our_obj, x, start, d, f, g, gtd)
    assert ours[0] == expected[0] and ours[3] == expected[3] and float(ours[2]) == float(expected[2])
    torch.testing.assert_close(ours[1], expected[1], rtol=0, atol=0)


# ---------------------------------------------------------------------- API and bad input


def test_dispatch_and_alias() -> None:
    model = make_model()
    assert shardopt.LBFGS is ShardedLBFGS
    for optimizer_class in (torch.optim.LBFGS, "lbfgs", "LBFGS"):
        optimizer = shardopt.ShardedOptimizer(model.parameters(), optimizer_class, lr=0.5, history_size=7)
        assert isinstance(optimizer, ShardedLBFGS)
        assert optimizer.defaults == torch.optim.LBFGS(model.parameters(), lr=0.5, history_size=7).defaults
        assert (optimizer.rank, optimizer.world_size) == (0, 1)


def test_bad_input_raises_torchs_errors() -> None:
    model = make_model()
    for cls in (torch.optim.LBFGS, ShardedLBFGS):
        with pytest.raises(TypeError, match="missing 1 required positional argument: 'closure'"):
            cls(model.parameters()).step()
        groups = [{"params": [model.scale]}, {"params": [model.out.bias]}]
        with pytest.raises(ValueError, match=r"LBFGS doesn't support per-parameter options \(parameter groups\)"):
            cls(groups)
        with pytest.raises(ValueError, match="Invalid learning rate: -1"):
            cls(model.parameters(), lr=-1)
        with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
            cls(model.parameters(), lr=torch.tensor([1.0, 2.0]))
        optimizer = cls(model.parameters(), line_search_fn="backtracking")
        calls: list[int] = []

        def closure(optimizer: torch.optim.Optimizer = optimizer, calls: list[int] = calls) -> torch.Tensor:
            calls.append(1)
            optimizer.zero_grad()
            loss = _loss(model, 0, 0, torch.float32)
            loss.backward()
            return loss

        with pytest.raises(RuntimeError, match="only 'strong_wolfe' is supported"):
            optimizer.step(closure)
        assert len(calls) == 1, cls  # as torch: the closure ran once before the error


def _closure(optimizer: torch.optim.Optimizer, model: nn.Module) -> Any:
    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = _loss(model, 0, 0, torch.float32)
        loss.backward()
        return loss

    return closure


def test_other_bad_values_behave_as_torchs() -> None:
    """torch does not validate max_iter or history_size: None fails at construction, 0 history at the
    second iteration; shardopt fails alike."""
    model = make_model()
    for cls in (torch.optim.LBFGS, ShardedLBFGS):
        with pytest.raises(TypeError, match="unsupported operand type"):
            cls(model.parameters(), max_iter=None)
        optimizer = cls(model.parameters(), history_size=0)
        with pytest.raises(IndexError, match="pop from empty list"):
            optimizer.step(_closure(optimizer, model))


def test_a_state_without_iterations_loads_both_ways_and_training_goes_on() -> None:
    """After max_iter=0 steps every vector of the state is None: torch's state loads into ShardedLBFGS
    and ShardedLBFGS's into torch, and with max_iter raised both continue alike."""
    runs = {}
    for first, second in ((torch.optim.LBFGS, ShardedLBFGS), (ShardedLBFGS, torch.optim.LBFGS)):
        model = _model(torch.float64)
        before = first(model.parameters(), max_iter=0)
        _run(before, model, [0, 1], torch.float64, range(2))
        after = second(model.parameters())
        after.load_state_dict(before.state_dict())
        after.param_groups[0]["max_iter"] = 3  # the loaded group says 0
        runs[second] = _run(after, model, [0, 1], torch.float64, range(2, 4))
        runs[second]["state_dict"] = after.state_dict()
    ours, theirs = runs[ShardedLBFGS], runs[torch.optim.LBFGS]
    assert ours["calls"] == theirs["calls"]
    assert_trajectories_close(ours["params"], theirs["params"], "resumed", **TOLERANCES[torch.float64])
    assert_state_dicts_equal(ours["state_dict"], theirs["state_dict"], "resumed", **STATE_TOLERANCES[torch.float64])


def test_grad_scaler_and_clipping_are_refused_clearly() -> None:
    """torch's GradScaler refuses closures, which every LBFGS step needs; clipping has no place in it."""
    model = make_model()
    optimizer = ShardedLBFGS(model.parameters())
    for scaler in (shardopt.GradScaler("cpu"), torch.amp.GradScaler("cpu")):
        scaler.scale(_loss(model, 0, 0, torch.float32)).backward()
        with pytest.raises(TypeError, match="a GradScaler cannot drive LBFGS: its step\\(\\) re-evaluates the closure"):
            scaler.step(optimizer, _closure(optimizer, model))
    assert not optimizer.shard_state, "nothing ran"
    with pytest.raises(RuntimeError, match="clip_grad_norm_ is not supported for LBFGS"):
        optimizer.clip_grad_norm_(1.0)
    optimizer.step(_closure(optimizer, model))  # and it still steps without a scaler
    assert optimizer.shard_state


def test_load_rejects_another_models_state() -> None:
    model = make_model()
    other = torch.optim.LBFGS([torch.nn.Parameter(torch.zeros(2)) for _ in range(5)])  # as many, smaller

    def closure() -> torch.Tensor:
        other.zero_grad()
        loss = sum((p - 1).pow(2).sum() for p in other.param_groups[0]["params"])
        loss.backward()
        return loss

    other.step(closure)
    optimizer = ShardedLBFGS(model.parameters())
    with pytest.raises(ValueError, match="has 10 elements but the parameters have 61"):
        optimizer.load_state_dict(other.state_dict())
    assert not optimizer.shard_state
