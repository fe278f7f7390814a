"""Bad input: every mistake raises the right exception type with a message naming the culprit,
and a failed call leaves the optimizer as it was.

Single-process (a world of one) unless a test says otherwise; the disagreements that only
exist between ranks (a sparse or stray gradient on one rank, a closure returning a loss on
some ranks only) run on one 2-rank gloo world.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import pathlib
import re
import shutil
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import shardopt
from shardopt import ShardedOptimizer, algorithms, checkpoint
from shardopt.checkpoint import CheckpointError
from shardopt.checkpoint.__main__ import main as checkpoint_cli
from shardopt.shared import base
from tests.common import assert_identical, flat_params, loss_of, make_model
from tests.world import run_world

SUPPORTED = (
    "ASGD, Adadelta, Adafactor, Adagrad, Adam, AdamW, Adamax, LBFGS, Muon, NAdam, RAdam, RMSprop, Rprop, SGD, "
    "SparseAdam"
)
# torch warns (and shardopt then raises) when a group holds a parameter twice.
IGNORE_DUPLICATE_WARNING = pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate")


def params() -> list[nn.Parameter]:
    return list(make_model().parameters())


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, rank: int = 0) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss_of(model, rank, step).backward()
    optimizer.step()


def snapshot_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The param groups as they are now: a copy of each dict and of its parameter list."""
    return [{**group, "params": list(group["params"])} for group in optimizer.param_groups]


def assert_groups_unchanged(optimizer: torch.optim.Optimizer, snapshot: list[dict[str, Any]]) -> None:
    assert len(optimizer.param_groups) == len(snapshot)
    for g, (group, before) in enumerate(zip(optimizer.param_groups, snapshot)):
        assert list(group) == list(before), f"keys of param group {g}"
        assert len(group["params"]) == len(before["params"]), f"parameters of param group {g}"
        for i, (param, original) in enumerate(zip(group["params"], before["params"])):
            assert param is original, f"parameter {i} of param group {g} was replaced"
        for key in before:
            if key != "params":
                assert_identical(group[key], before[key], f"param group {g}[{key!r}]")


# ---------------------------------------------------------------- optimizer_class


@pytest.mark.parametrize(
    ("optimizer_class", "error", "match"),
    [
        ("adamz", ValueError, rf"optimizer_class 'adamz' is not a torch.optim algorithm; choose one of: {SUPPORTED}"),
        (nn.Linear, TypeError, rf"algorithm class or its name, got Linear; choose one of: {SUPPORTED}"),
    ],
    ids=["unknown-name", "not-an-optimizer"],
)
def test_bad_optimizer_class(optimizer_class: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ShardedOptimizer(params(), optimizer_class)


@pytest.mark.parametrize("name", ["AdamW", "adamw", "ADAMW"])
def test_optimizer_name_is_case_insensitive(name: str) -> None:
    model = make_model()
    optimizer = ShardedOptimizer(model.parameters(), name, lr=0.01)
    assert optimizer.defaults == torch.optim.AdamW(params(), lr=0.01).defaults
    train_step(model, optimizer, 0)
    assert list(optimizer.state_dict()["state"][0]) == ["step", "exp_avg", "exp_avg_sq"]


def _params_for(torch_class: type[torch.optim.Optimizer]) -> list[nn.Parameter]:
    if torch_class is torch.optim.SparseAdam:
        return list(nn.Embedding(5, 3, sparse=True).parameters())
    return [nn.Parameter(torch.randn(4, 4))]  # 2-D: Muon takes nothing else


@pytest.mark.parametrize("torch_class", algorithms.EVERY, ids=lambda cls: cls.__name__)
def test_every_algorithm_is_a_sharded_optimizer(torch_class: type[torch.optim.Optimizer]) -> None:
    # Integrations and users test one class, whichever scheme shards the algorithm.
    by_name = ShardedOptimizer(_params_for(torch_class), torch_class.__name__.lower())
    by_class = ShardedOptimizer(_params_for(torch_class), torch_class)
    alias = getattr(shardopt, torch_class.__name__)(_params_for(torch_class))
    for optimizer in (by_name, by_class, alias):
        assert isinstance(optimizer, ShardedOptimizer) and isinstance(optimizer, torch.optim.Optimizer)
        assert type(by_name) is type(by_class) and isinstance(alias, type(by_name))
        assert optimizer.defaults == torch_class(_params_for(torch_class)).defaults
        assert sorted(optimizer.memory_stats()) == sorted(base.MEMORY_KEYS)


@pytest.mark.parametrize("torch_class", algorithms.EVERY, ids=lambda cls: cls.__name__)
def test_every_scheme_refuses_a_set_of_parameters(torch_class: type[torch.optim.Optimizer]) -> None:
    # torch.optim takes a set, but its order differs between processes: ranks would shard different layouts.
    with pytest.raises(TypeError, match="ordered collections"):
        ShardedOptimizer(set(_params_for(torch_class)), torch_class)


@pytest.mark.parametrize(
    ("scheme", "optimizer_class", "match"),
    [
        (shardopt.OwnedOptimizer, torch.optim.Adam, "OwnedOptimizer shards Adafactor, Muon, not Adam"),
        (shardopt.SparseRowOptimizer, "adamw", "SparseRowOptimizer shards SparseAdam, not AdamW"),
        (shardopt.ElementOptimizer, "muon", "ElementOptimizer shards .*, not Muon.*which picks OwnedOptimizer"),
    ],
)
def test_a_scheme_given_an_algorithm_it_does_not_shard_names_the_one_that_does(
    scheme: type, optimizer_class: Any, match: str
) -> None:
    with pytest.raises(TypeError, match=match):
        scheme(_params_for(torch.optim.Adam), optimizer_class)


# ---------------------------------------------------------------- algorithm keywords


@pytest.mark.parametrize(
    ("optimizer_class", "kwargs", "error", "match"),
    [
        (
            "adam",
            {"betaz": (0.9, 0.99)},
            TypeError,
            r"unexpected keyword argument 'betaz'; Adam takes: lr, betas, eps, weight_decay, amsgrad",
        ),
        ("sgd", {"lr": 0.1, "momentun": 0.9}, TypeError, r"'momentun'; SGD takes: lr, momentum, dampening"),
        ("adam", {"capturable": True}, NotImplementedError, r"capturable=True is not supported .*param group 0"),
        ("adam", {"differentiable": True}, NotImplementedError, r"differentiable=True is not supported"),
        ("sgd", {"lr": 0.1, "differentiable": True}, NotImplementedError, r"differentiable=True is not supported"),
    ],
    ids=["unexpected-keyword", "misspelt-sgd-keyword", "capturable", "differentiable", "sgd-differentiable"],
)
def test_bad_algorithm_keyword(
    optimizer_class: str, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        ShardedOptimizer(params(), optimizer_class, **kwargs)


def test_unexpected_keyword_through_alias() -> None:
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'betaz'; AdamW takes: lr, betas"):
        shardopt.AdamW(params(), betaz=(0.9, 0.99))


@pytest.mark.parametrize(
    ("optimizer_class", "kwargs", "message"),
    [
        (torch.optim.Adam, {"lr": -1}, "Invalid learning rate: -1"),
        (torch.optim.SGD, {"lr": 0.1, "nesterov": True}, "Nesterov momentum requires a momentum and zero dampening"),
        (torch.optim.Adam, {"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0: 1.0"),
        (torch.optim.RMSprop, {"alpha": -0.5}, "Invalid alpha value: -0.5"),
    ],
    ids=["lr", "nesterov", "betas", "rmsprop-alpha"],
)
def test_torch_validation_message_passes_through(
    optimizer_class: type[torch.optim.Optimizer], kwargs: dict[str, Any], message: str
) -> None:
    exact = f"^{re.escape(message)}$"
    with pytest.raises(ValueError, match=exact):
        optimizer_class(params(), **kwargs)  # the message is torch's own
    with pytest.raises(ValueError, match=exact):
        ShardedOptimizer(params(), optimizer_class, **kwargs)


# ---------------------------------------------------------------- shardopt's own keywords


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"stage": 3}, ValueError, r"stage must be 1 .* or 2 .*, got 3"),
        ({"grad_reduction": "avg"}, ValueError, r"grad_reduction must be 'mean', 'sum' or None .*, got 'avg'"),
        ({"timeout": "10"}, TypeError, r"timeout must be seconds \(a number\) or a timedelta, got str"),
        ({"timeout": 0}, ValueError, r"timeout must be a finite positive number of seconds, got 0.0"),
        ({"timeout": -5}, ValueError, r"timeout must be a finite positive number of seconds, got -5.0"),
        ({"timeout": math.nan}, ValueError, r"timeout must be a finite positive number of seconds, got nan"),
        ({"timeout": True}, TypeError, r"timeout must be seconds \(a number\) or a timedelta, got bool"),
        ({"bucket_cap_mb": 0}, ValueError, r"bucket_cap_mb must be a finite positive number of MiB, got 0"),
        ({"bucket_cap_mb": -1.5}, ValueError, r"bucket_cap_mb must be a finite positive number of MiB, got -1.5"),
        ({"overlap_param_gather": "yes"}, TypeError, r"overlap_param_gather must be True or False, got 'yes'"),
    ],
    ids=[
        "stage",
        "grad_reduction",
        "timeout-str",
        "timeout-zero",
        "timeout-negative",
        "timeout-nan",
        "timeout-bool",
        "bucket-zero",
        "bucket-neg",
        "overlap",
    ],
)
def test_bad_sharding_option(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ShardedOptimizer(params(), "adam", **kwargs)


def test_fused_must_be_none_or_a_bool_where_shardopt_owns_it() -> None:
    # RMSprop has no native fused kernel: ``fused`` is shardopt's keyword (compile or not), not torch's.
    with pytest.raises(ValueError, match=r"fused must be None \(choose\), True or False, got 'yes'"):
        ShardedOptimizer(params(), "rmsprop", fused="yes")


def test_boolean_stage_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"stage must be 1 .* or 2 .*, got True"):
        ShardedOptimizer(params(), "adam", stage=True)


@pytest.mark.parametrize(
    "kwargs",
    [{"timeout": math.inf}, {"bucket_cap_mb": math.inf}, {"bucket_cap_mb": math.nan}],
    ids=["timeout-inf", "bucket-inf", "bucket-nan"],
)
def test_non_finite_sharding_option_works_or_is_named(kwargs: dict[str, Any]) -> None:
    """Either the value is accepted (inf: no limit) or the error names the keyword."""
    (keyword,) = kwargs
    model = make_model()
    try:
        optimizer = ShardedOptimizer(model.parameters(), "adam", **kwargs)
    except (TypeError, ValueError) as error:
        assert keyword in str(error), f"{type(error).__name__}: {error}"
        return
    train_step(model, optimizer, 0)


# ---------------------------------------------------------------- params


def _duplicate_in_group() -> list[Any]:
    weight = make_model().hidden.weight
    return [weight, weight]


def _shared_between_groups() -> list[Any]:
    model = make_model()
    return [{"params": [model.hidden.weight, model.hidden.bias]}, {"params": [model.out.weight, model.hidden.bias]}]


def _two_devices() -> list[Any]:
    return [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3, device="meta"))]


@pytest.mark.parametrize(
    ("make_params", "error", "match"),
    [
        (lambda: make_model().hidden.weight, TypeError, r"iterable of Tensors or dicts, but got torch.FloatTensor"),
        (list, ValueError, r"optimizer got an empty parameter list"),
        (lambda: set(params()), TypeError, r"ordered collections"),
        (lambda: [{"params": set(params())}], TypeError, r"ordered collections"),
        pytest.param(
            _duplicate_in_group,
            ValueError,
            r"parameter 1 of param group 0 appears twice",
            marks=IGNORE_DUPLICATE_WARNING,
        ),
        (_shared_between_groups, ValueError, r"some parameters appear in more than one parameter group"),
        (lambda: [torch.zeros(3, requires_grad=True) * 2], ValueError, r"non-leaf"),
        (lambda: [torch.zeros(3, dtype=torch.int64)], TypeError, r"parameter 0 of param group 0 has dtype torch.int64"),
        (lambda: [torch.zeros(3, dtype=torch.complex64)], TypeError, r"has dtype torch.complex64"),
        (_two_devices, ValueError, r"more than one device \(cpu, meta\), first differing at parameter 1"),
    ],
    ids=[
        "bare-tensor",
        "empty-list",
        "set",
        "set-in-group",
        "duplicate-in-group",
        "shared-between-groups",
        "non-leaf",
        "integer",
        "complex",
        "two-devices",
    ],
)
def test_bad_params(make_params: Callable[[], Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ShardedOptimizer(make_params(), "adam")


def _new_param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.linspace(-1, 1, math.prod(shape)).reshape(shape))


def _twice(model: nn.Module) -> dict[str, Any]:
    extra = _new_param(2)
    return {"params": [extra, extra]}


@pytest.mark.parametrize(
    ("make_group", "error", "match"),
    [
        pytest.param(_twice, ValueError, r"parameter 1 of param group 1 appears twice", marks=IGNORE_DUPLICATE_WARNING),
        (
            lambda model: {"params": [_new_param(2), model.hidden.weight]},
            ValueError,
            r"some parameters appear in more than one parameter group",
        ),
        (lambda model: {"params": [_new_param(2) * 2]}, ValueError, r"non-leaf"),
        (
            lambda model: {"params": [_new_param(2), torch.zeros(2, dtype=torch.int32)]},
            TypeError,
            r"parameter 1 of param group 1 has dtype torch.int32",
        ),
        (
            lambda model: {"params": [nn.Parameter(torch.zeros(2, device="meta"))]},
            ValueError,
            r"more than one device \(cpu, meta\), first differing at parameter 0 of param group 1",
        ),
        (
            lambda model: {"params": [_new_param(2)], "capturable": True},
            NotImplementedError,
            r"capturable=True is not supported .*param group 1",
        ),
        (lambda model: {"params": {_new_param(2)}}, TypeError, r"ordered collections"),
        (lambda model: {"params": [("extra", _new_param(2))]}, ValueError, r"with/without names"),
    ],
    ids=["duplicate", "in-group-0", "non-leaf", "integer", "meta-device", "capturable", "set", "named-among-unnamed"],
)
def test_failed_add_param_group_leaves_optimizer_unchanged(
    make_group: Callable[[nn.Module], dict[str, Any]], error: type[Exception], match: str
) -> None:
    model, twin = make_model(), make_model()
    optimizer = ShardedOptimizer(model.parameters(), "adam", lr=0.01)
    reference = ShardedOptimizer(twin.parameters(), "adam", lr=0.01)
    for optimizer_, model_ in ((optimizer, model), (reference, twin)):
        train_step(model_, optimizer_, 0)
    groups, state, memory = snapshot_groups(optimizer), optimizer.state_dict(), optimizer.memory_stats()

    with pytest.raises(error, match=match):
        optimizer.add_param_group(make_group(model))

    assert_groups_unchanged(optimizer, groups)
    assert_identical(optimizer.state_dict(), state)
    assert optimizer.memory_stats() == memory
    # It still steps exactly as an optimizer that never saw the bad group ...
    for optimizer_, model_ in ((optimizer, model), (reference, twin)):
        train_step(model_, optimizer_, 1)
    assert torch.equal(flat_params(model), flat_params(twin))
    assert_identical(optimizer.state_dict(), reference.state_dict())
    # ... and a good group added now is group 1, and trains.
    extra = _new_param(2)
    optimizer.add_param_group({"params": [extra], "lr": 0.5})
    assert len(optimizer.param_groups) == 2 and optimizer.param_groups[1]["params"][0] is extra
    extra.grad = torch.ones(2)
    before = extra.detach().clone()
    optimizer.step()
    torch.testing.assert_close(extra.detach(), before - 0.5)  # Adam's first step: lr * sign(grad)


# ---------------------------------------------------------------- named parameters


def test_named_parameters_give_param_names() -> None:
    model = make_model()
    names = [name for name, _ in model.named_parameters()]
    optimizer = ShardedOptimizer(model.named_parameters(), "adamw", lr=0.01)
    reference = torch.optim.AdamW(make_model().named_parameters(), lr=0.01)
    assert optimizer.param_groups[0]["param_names"] == names
    assert all(p is q for p, q in zip(optimizer.param_groups[0]["params"], model.parameters()))
    train_step(model, optimizer, 0)
    saved = optimizer.state_dict()
    assert saved["param_groups"] == reference.state_dict()["param_groups"]
    assert saved["param_groups"][0]["param_names"] == names


@IGNORE_DUPLICATE_WARNING
def test_duplicate_named_parameter_is_named() -> None:
    named = list(make_model().named_parameters())
    with pytest.raises(ValueError, match=r"parameter 5 \('hidden.weight'\) of param group 0 appears twice"):
        ShardedOptimizer(named + [named[1]], "adam")


@IGNORE_DUPLICATE_WARNING
def test_duplicate_named_parameter_in_added_group_is_named() -> None:
    model = make_model()
    named = list(model.named_parameters())
    optimizer = ShardedOptimizer(named[:3], "adam")
    with pytest.raises(ValueError, match=r"parameter 2 \('out.weight'\) of param group 1 appears twice"):
        optimizer.add_param_group({"params": [named[3], named[4], named[3]]})
    assert len(optimizer.param_groups) == 1


# ---------------------------------------------------------------- load_state_dict

LOAD_LR = 0.5  # every bad dict below also carries another lr, so a partial load would show


def _grouped(model: nn.Module) -> list[dict[str, Any]]:
    """Two groups: (scale, hidden.weight, hidden.bias) and (out.weight, out.bias), by name."""
    named = list(model.named_parameters())
    return [{"params": named[:3], "lr": 0.01}, {"params": named[3:], "lr": 0.02}]


def _trained() -> tuple[nn.Module, ShardedOptimizer]:
    model = make_model()
    optimizer = ShardedOptimizer(_grouped(model), "adam")
    for step in range(2):
        train_step(model, optimizer, step)
    return model, optimizer


def _other_model_state_dict() -> dict[str, Any]:
    """torch.optim.Adam's state for a model of as many tensors, whose Linear layers are narrower."""
    model = make_model()
    model.hidden, model.out = nn.Linear(7, 4), nn.Linear(4, 3)
    optimizer = torch.optim.Adam(
        [{"params": group["params"], "lr": LOAD_LR} for group in _grouped(model)]  # named tuples
    )
    loss_of(model, 0, 0).backward()
    optimizer.step()
    return optimizer.state_dict()


def _with_lr(state_dict: dict[str, Any]) -> dict[str, Any]:
    for group in state_dict["param_groups"]:
        group["lr"] = LOAD_LR
    return state_dict


def _drop(number: int, key: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def corrupt(state_dict: dict[str, Any]) -> dict[str, Any]:
        del state_dict["state"][number][key]
        return state_dict

    return corrupt


def _set(number: int, key: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def corrupt(state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict["state"][number][key] = value
        return state_dict

    return corrupt


def _move_param_to_group_0(state_dict: dict[str, Any]) -> dict[str, Any]:
    groups = state_dict["param_groups"]
    groups[0]["params"].append(groups[1]["params"].pop(0))
    return state_dict


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda sd: list(sd.items()), r"expects a dict with 'state' and 'param_groups' .*, got list"),
        (lambda sd: {"state": sd["state"]}, r"got dict with keys \['state'\]"),
        (lambda sd: {"param_groups": sd["param_groups"]}, r"got dict with keys \['param_groups'\]"),
        (
            lambda sd: {**sd, "param_groups": sd["param_groups"][:1]},
            r"loaded state dict has 1 parameter groups but the optimizer has 2",
        ),
        (
            lambda sd: {**sd, "param_groups": sd["param_groups"] + sd["param_groups"][:1]},
            r"loaded state dict has 3 parameter groups but the optimizer has 2",
        ),
        (_move_param_to_group_0, r"parameter group 0 has 4 parameters but the optimizer's has 3"),
        (
            lambda sd: _other_model_state_dict(),
            r"state 'exp_avg' of parameter 1 \('hidden.weight'\) of param group 0 has shape \(4, 7\) "
            r"but the parameter has shape \(5, 7\)",
        ),
        (
            _drop(3, "exp_avg_sq"),
            r"state of parameter 0 \('out.weight'\) of param group 1 lacks the tensor 'exp_avg_sq'",
        ),
        (_drop(4, "step"), r"state of parameter 1 \('out.bias'\) of param group 1 lacks 'step'"),
        (
            _set(0, "step", "three"),
            r"state 'step' of parameter 0 \('scale'\) of param group 0 is 'three'; a number or a one-element",
        ),
        (
            _set(2, "step", torch.ones(2)),
            r"state 'step' of parameter 2 \('hidden.bias'\) of param group 0 is tensor\(\[1., 1.\]\); a number",
        ),
        (
            lambda sd: {**sd, "param_groups": [sd["param_groups"][0], {"lr": 0.1}]},
            r"parameter group 1 has no 'params' list \(got dict with keys \['lr'\]\): load what state_dict",
        ),
    ],
    ids=[
        "not-a-dict",
        "no-param_groups",
        "no-state",
        "too-few-groups",
        "too-many-groups",
        "group-of-another-size",
        "state-of-another-shape",
        "lacks-exp_avg_sq",
        "lacks-step",
        "step-not-a-number",
        "step-of-two-elements",
        "group-without-params",
    ],
)
def test_failed_load_state_dict_leaves_optimizer_unchanged(
    corrupt: Callable[[dict[str, Any]], Any], match: str
) -> None:
    model, optimizer = _trained()
    twin, reference = _trained()
    groups, state, weights = snapshot_groups(optimizer), optimizer.state_dict(), flat_params(model)
    bad = corrupt(_with_lr(copy.deepcopy(state)))

    with pytest.raises(ValueError, match=match):
        optimizer.load_state_dict(bad)

    assert_groups_unchanged(optimizer, groups)
    assert_identical(optimizer.state_dict(), state)
    assert_identical(flat_params(model), weights)
    for step in (2, 3):
        train_step(model, optimizer, step)
        train_step(twin, reference, step)
    assert torch.equal(flat_params(model), flat_params(twin))
    assert_identical(optimizer.state_dict(), reference.state_dict())


def test_load_state_dict_control() -> None:
    """The uncorrupted dict the failure cases start from loads: their errors come from the corruption."""
    _, optimizer = _trained()
    _, source = _trained()
    optimizer.load_state_dict(_with_lr(source.state_dict()))
    assert [group["lr"] for group in optimizer.param_groups] == [LOAD_LR, LOAD_LR]
    assert_identical(optimizer.state_dict(), _with_lr(source.state_dict()))


# ---------------------------------------------------------------- checkpoint.save and checkpoint.load


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A complete checkpoint of the two-group Adam run of two steps, without a scheduler."""
    model, optimizer = _trained()
    path = tmp_path_factory.mktemp("checkpoint") / "good"
    checkpoint.save(path, model=model, optimizer=optimizer)
    return path


def _target(name: str = "adam", model: nn.Module | None = None) -> tuple[nn.Module, ShardedOptimizer]:
    """What a load goes into: another run (other weights, one step), so that a partial load would show."""
    model = model or make_model(seed=1)
    optimizer = ShardedOptimizer(_grouped(model), name)
    train_step(model, optimizer, 5)
    return model, optimizer


def _copy(good: pathlib.Path, directory: pathlib.Path, damage: Callable[[pathlib.Path], Any]) -> pathlib.Path:
    copy = directory / "damaged"
    shutil.copytree(good, copy)
    damage(copy)
    return copy


def _truncate(path: pathlib.Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _wider() -> nn.Module:
    model = make_model(seed=1)
    model.hidden, model.out = nn.Linear(7, 6), nn.Linear(6, 3)
    return model


# Per case: (checkpoint path, model, optimizer, other keywords of load) from the good checkpoint and a directory.
LoadCase = Callable[[pathlib.Path, pathlib.Path], tuple[pathlib.Path, nn.Module, Any, dict[str, Any]]]
LOAD_CASES: dict[str, tuple[LoadCase, str]] = {
    "missing": (lambda good, tmp: (tmp / "nope", *_target(), {}), r"nope is not a checkpoint directory"),
    "incomplete": (
        lambda good, tmp: (_copy(good, tmp, lambda c: (c / "COMPLETE").unlink()), *_target(), {}),
        r"damaged is an incomplete checkpoint: it has no COMPLETE marker",
    ),
    "truncated": (
        lambda good, tmp: (_copy(good, tmp, lambda c: _truncate(c / "__0_0.distcp")), *_target(), {}),
        r"__0_0\.distcp is truncated",
    ),
    "scheduler-not-saved": (
        lambda good, tmp: (good, *(target := _target()), {"scheduler": torch.optim.lr_scheduler.StepLR(target[1], 1)}),
        r"good holds no scheduler state; load it without that scheduler=",
    ),
    "other-algorithm": (lambda good, tmp: (good, *_target("sgd"), {}), r"holds Adam state but the optimizer runs SGD"),
    "other-model": (
        lambda good, tmp: (good, *_target(model=_wider()), {}),
        r"belongs to a different model: model\.hidden\.weight is float32 of shape \(5, 7\)",
    ),
    "model-of-another-optimizer": (
        lambda good, tmp: (good, make_model(seed=2), _target()[1], {}),
        r"parameter 0 \('scale'\) of param group 0 is not a parameter of the model given",
    ),
    "torch-optimizer": (
        lambda good, tmp: (good, model := make_model(seed=1), torch.optim.Adam(model.parameters()), {}),
        r"optimizer= is a torch\.optim\.adam\.Adam, whose state sharded checkpoints cannot hold",
    ),
}


def _weights(model: nn.Module, optimizer: Any) -> torch.Tensor:
    """The model's parameters and the optimizer's (the same tensors, unless a case gives another model)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return torch.cat([flat_params(model), *(p.detach().reshape(-1) for p in params)])


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_failed_checkpoint_load_leaves_model_and_optimizer_unchanged(
    case: str, good_checkpoint: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    make, match = LOAD_CASES[case]
    path, model, optimizer, kwargs = make(good_checkpoint, tmp_path)
    groups, state, weights = snapshot_groups(optimizer), optimizer.state_dict(), _weights(model, optimizer)

    with pytest.raises(CheckpointError, match=match):
        checkpoint.load(path, model=model, optimizer=optimizer, **kwargs)

    assert_groups_unchanged(optimizer, groups)
    assert_identical(optimizer.state_dict(), state)
    assert_identical(_weights(model, optimizer), weights)


def test_checkpoint_load_control(good_checkpoint: pathlib.Path) -> None:
    """The good checkpoint the failure cases start from loads: their errors come from the damage."""
    model, optimizer = _target()
    checkpoint.load(good_checkpoint, model=model, optimizer=optimizer)
    trained_model, trained = _trained()
    assert_identical(optimizer.state_dict(), trained.state_dict())
    assert_identical(flat_params(model), flat_params(trained_model))


@pytest.mark.parametrize(
    ("keywords", "match"),
    [
        (lambda model, optimizer: {"extra": [1]}, r"extra must be a dict, got list"),
        (
            lambda model, optimizer: {"optimizer": torch.optim.Adam(model.parameters())},
            r"optimizer= is a torch\.optim\.adam\.Adam, whose state sharded checkpoints cannot hold",
        ),
        (
            lambda model, optimizer: {"model": make_model(seed=2)},
            r"parameter 0 \('scale'\) of param group 0 is not a parameter of the model given",
        ),
        (
            lambda model, optimizer: {"scheduler": [None, None]},
            r"scheduler= has 2 entries but optimizer= has 1: pass one scheduler \(or None\) per optimizer",
        ),
        (
            lambda model, optimizer: {"optimizer": [optimizer, optimizer]},
            r"optimizer= lists the same ElementOptimizer at positions 0 and 1; list each optimizer once",
        ),
    ],
    ids=[
        "extra-not-a-dict",
        "torch-optimizer",
        "model-of-another-optimizer",
        "schedulers-per-optimizer",
        "same-optimizer-twice",
    ],
)
def test_failed_checkpoint_save_writes_nothing(
    keywords: Callable[[nn.Module, Any], dict[str, Any]], match: str, tmp_path: pathlib.Path
) -> None:
    model, optimizer = _trained()
    with pytest.raises(CheckpointError, match=match):
        checkpoint.save(tmp_path / "new", **{"model": model, "optimizer": optimizer, **keywords(model, optimizer)})
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_save_never_replaces_what_is_not_a_checkpoint(tmp_path: pathlib.Path) -> None:
    model, optimizer = _trained()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"notes\.txt exists and is not a complete shardopt checkpoint"):
        checkpoint.save(tmp_path / "notes.txt", model=model, optimizer=optimizer)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- python -m shardopt.checkpoint


def test_checkpoint_cli_export_of_a_missing_directory_fails_naming_it(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert checkpoint_cli(["export", str(tmp_path / "nope"), str(tmp_path / "out.pt")]) == 1
    assert "nope is not a checkpoint directory" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["explode"], "argument command: invalid choice: 'explode'"),
        (["export", "only-the-directory"], "the following arguments are required: output"),
    ],
    ids=["unknown-command", "missing-output"],
)
def test_checkpoint_cli_usage_errors_exit_2_naming_the_argument(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_status:
        checkpoint_cli(argv)
    assert exit_status.value.code == 2
    assert says in capsys.readouterr().err


# ---------------------------------------------------------------- disagreements between ranks


def _step_error(optimizer: ShardedOptimizer, closure: Callable[[], Any] | None = None) -> tuple[str, str]:
    try:
        optimizer.step(closure)
    except Exception as error:
        return type(error).__name__, str(error)
    return "no error", ""


def _recover(model: nn.Module, optimizer: ShardedOptimizer, rank: int) -> torch.Tensor:
    """After the error every rank can still step together: the parameters they end with."""
    train_step(model, optimizer, 1, rank)
    return flat_params(model)


def rank_disagreements() -> dict[str, tuple[str, str, torch.Tensor]]:
    """On each rank: per scenario, the error step() raised (type name, message) and the parameters after recovery."""
    import torch.distributed as dist

    rank = dist.get_rank()
    results = {}

    # (a) a sparse gradient on rank 0 only, written after backward (which stage 2 has already reduced).
    model = make_model()
    optimizer = ShardedOptimizer(model.named_parameters(), "adam", lr=0.01)
    loss_of(model, rank, 0).backward()
    if rank == 0:
        model.out.weight.grad = torch.ones_like(model.out.weight).to_sparse()
    results["sparse"] = (*_step_error(optimizer), _recover(model, optimizer, rank))

    # (b) a closure that returns the loss on rank 0 and None on rank 1.
    model = make_model()
    optimizer = ShardedOptimizer(model.named_parameters(), "adam", lr=0.01)

    def closure() -> torch.Tensor | None:
        optimizer.zero_grad()
        loss = loss_of(model, rank, 0)
        loss.backward()
        return loss if rank == 0 else None

    results["closure"] = (*_step_error(optimizer, closure), _recover(model, optimizer, rank))

    # (b') a closure that returns a vector of per-sample losses on rank 1, not the loss.
    model = make_model()
    optimizer = ShardedOptimizer(model.named_parameters(), "adam", lr=0.01)

    def vector_closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_of(model, rank, 0)
        loss.backward()
        return loss.detach() if rank == 0 else loss.detach().repeat(4)

    results["closure-vector"] = (*_step_error(optimizer, vector_closure), _recover(model, optimizer, rank))

    # (c) a parameter frozen at construction that later gets a gradient on rank 1 only.
    model = make_model()
    model.hidden.bias.requires_grad_(False)
    optimizer = ShardedOptimizer(model.named_parameters(), "adam", lr=0.01)
    loss_of(model, rank, 0).backward()
    if rank == 1:
        model.hidden.bias.grad = torch.ones_like(model.hidden.bias)
    results["stray"] = (*_step_error(optimizer), _recover(model, optimizer, rank))
    return results


@functools.cache
def disagreement_results() -> list[dict[str, tuple[str, str, torch.Tensor]]]:
    return run_world(rank_disagreements, 2)


@pytest.mark.parametrize(
    ("scenario", "error", "match"),
    [
        ("sparse", "RuntimeError", r"parameter 3 \('out.weight'\) of param group 0 has a sparse gradient"),
        ("closure", "RuntimeError", r"the closure returned a loss on 1 of 2 ranks"),
        (
            "closure-vector",
            "TypeError",
            r"the closure returned a loss that is not a number on 1 of 2 ranks.*return the loss: a Python number",
        ),
        (
            "stray",
            "RuntimeError",
            r"parameter 2 \('hidden.bias'\) of param group 0 has a gradient but did not require grad",
        ),
    ],
)
def test_every_rank_raises_on_a_disagreement(scenario: str, error: str, match: str) -> None:
    per_rank = [results[scenario] for results in disagreement_results()]
    for rank, (kind, message, _) in enumerate(per_rank):
        assert kind == error, f"rank {rank} raised {kind}: {message}"
        assert re.search(match, message), f"rank {rank}: {message!r} does not match {match!r}"
    assert torch.equal(per_rank[0][2], per_rank[1][2]), "the ranks' parameters differ after recovering"
