"""ShardedAveragedModel: torch.optim.swa_utils.AveragedModel's EMA and SWA, kept as shards.

One gloo world per world size runs every distributed case (parity for each averaging case and
optimizer option, swapped(), resuming at another world size, torch's own swa_utils on a
BatchNorm model); the tests compare its results with single-process torch fed the mean
gradient. Bad input runs in this process, on a world of one.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn, update_bn

import shardopt
from shardopt import ShardedAveragedModel
from tests.common import assert_trajectories_close, batch, flat_params, loss_of, make_model, set_mean_grads
from tests.world import run_world

STEPS = 6
RESUME_AFTER = 2  # checkpoints are taken after this step (0-based): three steps in
# name: (ShardedAveragedModel keywords, the 0-based steps after which an average is taken).
# With every=None the test calls update_parameters() itself after those steps.
CASES: dict[str, tuple[dict[str, Any], list[int]]] = {
    "ema": ({"decay": 0.8}, list(range(STEPS))),
    "swa": ({}, list(range(STEPS))),
    "swa-start-every": ({"start_after": 1, "every": 2}, [2, 4]),  # steps t=3 and t=5, counting from 1
    "ema-manual": ({"decay": 0.5, "every": None}, [0, 3, 4]),
}
OPTIONS: dict[str, dict[str, Any]] = {
    "stage2": {"stage": 2},
    "stage1": {"stage": 1},
    "many-buckets": {"bucket_cap_mb": 1e-5},
    "overlap": {"overlap_param_gather": True},
}
WORLD_SIZES = [1, 2, 3]
SWA_START = 2  # the BatchNorm recipe: plain steps 0-1, then SWALR and averaging from step 2 on

Record = tuple[int, dict[str, torch.Tensor] | None]  # n_averaged and the averaged model's state after a step


def make_optimizer(model: nn.Module, **options: Any) -> shardopt.ShardedOptimizer:
    return shardopt.Adam(model.parameters(), lr=1e-2, **options)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    average: ShardedAveragedModel,
    case: str,
    steps: range,
    grads: Callable[[int], None],
) -> list[Record]:
    """``steps`` optimizer steps (averaging by hook, or by hand where every=None); records after each."""
    kwargs, averaged_after = CASES[case]
    records = []
    for step in steps:
        optimizer.zero_grad()
        grads(step)
        optimizer.step()
        if kwargs.get("every", 1) is None and step in averaged_after:
            average.update_parameters()
        records.append((average.n_averaged, average.model_state_dict() if average.n_averaged else None))
    return records


def local_grads(model: nn.Module, rank: int) -> Callable[[int], None]:
    return lambda step: loss_of(model, rank, step).backward()


def mean_grads(model: nn.Module, world_size: int) -> Callable[[int], None]:
    return lambda step: set_mean_grads(model, world_size, step)


class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(7, 6)
        self.norm = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.norm(self.hidden(x))))


def make_batchnorm_net() -> BatchNormNet:
    torch.manual_seed(0)
    return BatchNormNet()


def bn_loader() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(8, 7, generator=generator) for _ in range(3)]


def swa_recipe(model: nn.Module, optimizer: torch.optim.Optimizer, grads: Callable[[int], None]) -> AveragedModel:
    """torch's documented SWA recipe, unchanged: AveragedModel, SWALR from SWA_START on, update_bn at the end."""
    swa_model = AveragedModel(model)
    scheduler = SWALR(optimizer, swa_lr=0.01, anneal_epochs=2)
    for step in range(STEPS):
        optimizer.zero_grad()
        grads(step)
        optimizer.step()
        if step >= SWA_START:
            swa_model.update_parameters(model)
            scheduler.step()
    update_bn(bn_loader(), swa_model)
    return swa_model


def clone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in state.items()}


# ---------------------------------------------------------------------- the world


def averaging_world(checkpoints_from_one_process: dict[str, dict[str, Any]]) -> dict[str, Any]:
    import torch.distributed as dist

    rank = dist.get_rank()
    results: dict[str, Any] = {}
    for case, (kwargs, _) in CASES.items():
        for option, options in OPTIONS.items():
            model = make_model()
            optimizer = make_optimizer(model, **options)
            average = ShardedAveragedModel(model, optimizer, **kwargs)
            grads = local_grads(model, rank)
            records = train(model, optimizer, average, case, range(RESUME_AFTER + 1), grads)
            if option == "stage2":
                optimizer.finish_param_gather()
                results["checkpoint", case] = {
                    "model": clone_state(model.state_dict()),
                    "optimizer": optimizer.state_dict(),
                    "average": average.state_dict(),
                }
            records += train(model, optimizer, average, case, range(RESUME_AFTER + 1, STEPS), grads)
            # Straight after the last step: with overlap_param_gather its gathers are still in flight.
            with average.swapped() as swapped_model:
                inside = flat_params(swapped_model)
            optimizer.finish_param_gather()
            after = flat_params(model)
            with pytest.raises(KeyError), average.swapped():
                raise KeyError("an exception inside the block")
            restored = torch.equal(flat_params(model), after)
            results["parity", case, option] = {
                "records": records,
                "state_dict": average.state_dict(),
                "inside": inside,
                "after": after,
                "restored_after_exception": restored,
                "memory": (average.memory_bytes(), _padded_bytes(optimizer)),
            }
    # Resume from a checkpoint one process wrote (a world of one): the rest of the run here.
    for case, checkpoint in checkpoints_from_one_process.items():
        model = make_model()
        optimizer = make_optimizer(model)
        average = ShardedAveragedModel(model, optimizer, **CASES[case][0])
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        average.load_state_dict(checkpoint["average"])
        records = train(model, optimizer, average, case, range(RESUME_AFTER + 1, STEPS), local_grads(model, rank))
        results["resumed", case] = {"records": records, "steps": average.state_dict()["steps"]}
    # torch's AveragedModel, SWALR and update_bn on a BatchNorm model a ShardedOptimizer trains.
    model = make_batchnorm_net()
    optimizer = shardopt.SGD(model.parameters(), lr=0.05, momentum=0.9)
    average = ShardedAveragedModel(model, optimizer, start_after=SWA_START)
    swa_model = swa_recipe(model, optimizer, local_grads(model, rank))
    buffers_before = clone_state(dict(model.named_buffers()))
    with average.swapped():
        update_bn(bn_loader(), model)
        ours = clone_state(model.state_dict())
    buffers_after = dict(model.named_buffers())
    results["batchnorm"] = {
        "swa_model": clone_state(swa_model.module.state_dict()),
        "ours": ours,
        "exported": average.model_state_dict(),
        "buffers_restored": all(torch.equal(buffers_after[k], v) for k, v in buffers_before.items()),
    }
    return results


# ---------------------------------------------------------------------- references


def reference(case: str, world_size: int) -> tuple[list[Record], list[torch.Tensor]]:
    """torch.optim.Adam fed the mean gradient and AveragedModel updated after the same steps."""
    kwargs, averaged_after = CASES[case]
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    decay = kwargs.get("decay")
    averaged = AveragedModel(model) if decay is None else AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    records, trajectory = [], []
    for step in range(STEPS):
        set_mean_grads(model, world_size, step)
        optimizer.step()
        if step in averaged_after:
            averaged.update_parameters(model)
        n = int(averaged.n_averaged)
        records.append((n, clone_state(averaged.module.state_dict()) if n else None))
        trajectory.append(flat_params(model))
    return records, trajectory


def checkpoint_from_one_process(case: str, world_size: int) -> dict[str, Any]:
    """A world of one (no process group), fed the mean of ``world_size`` ranks' gradients, three steps in."""
    model = make_model()
    optimizer = make_optimizer(model, stage=1)  # stage 1 keeps the .grad that set_mean_grads writes
    average = ShardedAveragedModel(model, optimizer, **CASES[case][0])
    train(model, optimizer, average, case, range(RESUME_AFTER + 1), mean_grads(model, world_size))
    return {
        "model": clone_state(model.state_dict()),
        "optimizer": optimizer.state_dict(),
        "average": average.state_dict(),
    }


@functools.cache
def world(world_size: int) -> list[dict[str, Any]]:
    checkpoints = {case: checkpoint_from_one_process(case, world_size) for case in CASES}
    return run_world(averaging_world, world_size, checkpoints)


def steps_seen(case: str) -> int:
    """The steps the averager counted by the end: all of them, unless it has no step hook (every=None)."""
    return 0 if CASES[case][0].get("every", 1) is None else STEPS


def assert_records_close(ours: list[Record], expected: list[Record], label: str) -> None:
    assert len(ours) == len(expected), label
    for step, ((n, state), (n_expected, state_expected)) in enumerate(zip(ours, expected)):
        assert n == n_expected, f"{label} step {step}: n_averaged {n}, AveragedModel's {n_expected}"
        if state_expected is None:
            assert state is None, f"{label} step {step}"
            continue
        assert list(state) == list(state_expected), f"{label} step {step}: keys"
        for key, value in state_expected.items():
            assert state[key].dtype == value.dtype, f"{label} step {step}: {key}"
            torch.testing.assert_close(
                state[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key, s=step: f"{label} step {s} {k}\n{m}"
            )


# ---------------------------------------------------------------------- tests


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_averages_equal_torch_averaged_model(world_size: int) -> None:
    per_rank = world(world_size)
    for case in CASES:
        expected, trajectory = reference(case, world_size)
        for option in OPTIONS:
            label = f"{case} {option} N={world_size}"
            for rank, results in enumerate(per_rank):
                result = results["parity", case, option]
                assert_records_close(result["records"], expected, f"{label} rank {rank}")
                # Averaging leaves training alone: the weights after the run are torch.optim's.
                assert_trajectories_close([result["after"]], trajectory[-1:], label)
                state = result["state_dict"]
                assert state["steps"] == steps_seen(case), label
                assert_records_close([(state["n_averaged"], state["averaged"])], expected[-1:], f"{label} state_dict")
                average_bytes, param_bytes = result["memory"]
                assert average_bytes * world_size == param_bytes, f"{label}: 1/N of the (padded) parameters' bytes"


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_swapped_holds_the_average_and_restores_the_training_weights(world_size: int) -> None:
    for case in CASES:
        expected, _ = reference(case, world_size)
        average = flat_params_of(expected[-1][1])
        for option in OPTIONS:
            label = f"{case} {option} N={world_size}"
            for results in world(world_size):
                result = results["parity", case, option]
                assert_trajectories_close([result["inside"]], [average], f"{label} inside swapped()")
                assert result["restored_after_exception"], label
                assert not torch.allclose(result["inside"], result["after"]), f"{label}: nothing was swapped"


def flat_params_of(state: dict[str, torch.Tensor] | None) -> torch.Tensor:
    assert state is not None
    model = make_model()
    model.load_state_dict(state)
    return flat_params(model)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_state_dict_resumes_at_another_world_size(world_size: int) -> None:
    per_rank = world(world_size)
    for case in CASES:
        expected, _ = reference(case, world_size)
        # Written by one process, resumed by world_size ranks.
        for results in per_rank:
            resumed = results["resumed", case]
            assert_records_close(resumed["records"], expected[RESUME_AFTER + 1 :], f"{case} 1 -> {world_size} ranks")
            assert resumed["steps"] == steps_seen(case), case
        # Written by world_size ranks, resumed by one process.
        checkpoint = per_rank[0]["checkpoint", case]
        model = make_model()
        optimizer = make_optimizer(model, stage=1)
        average = ShardedAveragedModel(model, optimizer, **CASES[case][0])
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        average.load_state_dict(checkpoint["average"])
        records = train(model, optimizer, average, case, range(RESUME_AFTER + 1, STEPS), mean_grads(model, world_size))
        assert_records_close(records, expected[RESUME_AFTER + 1 :], f"{case} {world_size} ranks -> 1")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_averaged_model_swalr_and_update_bn_work_unchanged(world_size: int) -> None:
    model = make_batchnorm_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    expected = swa_recipe(model, optimizer, mean_grads(model, world_size)).module.state_dict()
    parameters = {name for name, _ in model.named_parameters()}
    for results in world(world_size):
        result = results["batchnorm"]
        label = f"BatchNorm SWA recipe N={world_size}"
        assert_records_close([(1, result["swa_model"])], [(1, expected)], f"{label}: AveragedModel")
        assert_records_close([(1, result["ours"])], [(1, expected)], f"{label}: swapped() + update_bn")
        assert result["buffers_restored"], f"{label}: swapped() puts training's BatchNorm statistics back"
        # Exported parameters are the average; buffers are the model's own (training's statistics).
        for key in parameters:
            torch.testing.assert_close(result["exported"][key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


# ---------------------------------------------------------------------- a world of one


def trained(steps: int = 2, **kwargs: Any) -> tuple[nn.Module, shardopt.ShardedOptimizer, ShardedAveragedModel]:
    model = make_model()
    optimizer = make_optimizer(model, stage=1)
    average = ShardedAveragedModel(model, optimizer, **kwargs)
    for step in range(steps):
        optimizer.zero_grad()
        loss_of(model, 0, step).backward()
        optimizer.step()
    return model, optimizer, average


def test_unfreezing_a_layer_midway_keeps_parity() -> None:
    """add_param_group mid-run: the new parameters' average starts from the value they kept while frozen."""

    def run(
        make: Callable[[list[nn.Parameter]], torch.optim.Optimizer], averaging: Callable[[nn.Module, Any], Any]
    ) -> dict[str, torch.Tensor]:
        model = make_model()
        model.out.requires_grad_(False)
        optimizer = make([p for p in model.parameters() if p.requires_grad])
        average = averaging(model, optimizer)
        for step in range(5):
            if step == 2:
                model.out.requires_grad_(True)
                optimizer.add_param_group({"params": list(model.out.parameters())})
            set_mean_grads(model, 2, step)
            optimizer.step()
            if isinstance(average, AveragedModel):
                average.update_parameters(model)
        return average.module.state_dict() if isinstance(average, AveragedModel) else average.model_state_dict()

    ema = get_ema_multi_avg_fn(0.7)
    expected = run(lambda p: torch.optim.Adam(p, lr=1e-2), lambda m, _: AveragedModel(m, multi_avg_fn=ema))
    ours = run(lambda p: shardopt.Adam(p, lr=1e-2, stage=1), lambda m, o: ShardedAveragedModel(m, o, decay=0.7))
    assert_records_close([(1, ours)], [(1, expected)], "unfreezing midway")


def test_low_precision_model_averages_its_master_weights() -> None:
    """bf16 parameters: the average is kept in the master shard's fp32, exported in bf16."""
    model = make_model().to(torch.bfloat16)
    optimizer = shardopt.Adam(model.parameters(), lr=1e-2, stage=1)
    average = ShardedAveragedModel(model, optimizer, decay=0.9)
    for step in range(3):
        optimizer.zero_grad()
        x, y = (t.to(torch.bfloat16) for t in batch(0, step))
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    state = average.state_dict()["averaged"]
    exported = average.model_state_dict()
    for name, tensor in state.items():
        assert tensor.dtype == torch.float32, name
        assert exported[name].dtype == torch.bfloat16 and torch.equal(exported[name], tensor.to(torch.bfloat16))
    assert average.memory_bytes() == _padded_bytes(optimizer) * 2


def test_a_skipped_step_is_neither_counted_nor_averaged() -> None:
    model = make_model()
    optimizer = shardopt.SGD(model.parameters(), lr=0.1, skip_nonfinite=True)
    average = ShardedAveragedModel(model, optimizer, decay=0.5)
    for poisoned in (False, True, False):
        optimizer.zero_grad()
        (loss_of(model, 0, 0) * (math.inf if poisoned else 1.0)).backward()
        optimizer.step()
    assert optimizer.skipped_steps == 1 and average.n_averaged == 2


def test_swapped_blocks_steps_and_updates_and_restores_exactly() -> None:
    model, optimizer, average = trained()
    before = flat_params(model)
    with average.swapped():
        with pytest.raises(RuntimeError, match=r"optimizer.step\(\) inside swapped\(\)"):
            optimizer.step()
        with pytest.raises(RuntimeError, match=r"update_parameters\(\) inside swapped\(\)"):
            average.update_parameters()
        with pytest.raises(RuntimeError, match="do not nest"), average.swapped():
            pass
        assert not torch.equal(flat_params(model), before)
    assert torch.equal(flat_params(model), before)
    optimizer.step()  # and steps again after the block


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"decay": -0.1}, ValueError, r"Invalid decay value -0.1 provided. Please provide a value in \[0,1\]"),
        ({"decay": 1.5}, ValueError, "Invalid decay value 1.5"),
        ({"decay": float("nan")}, ValueError, "Invalid decay value nan"),
        ({"decay": True}, TypeError, r"decay must be a number in \[0, 1\] \(EMA\) or None \(SWA\), got True"),
        ({"decay": "0.9"}, TypeError, "decay must be a number"),
        ({"start_after": -1}, ValueError, "start_after must be an int >= 0 .* got -1"),
        ({"start_after": 1.5}, ValueError, "start_after must be an int >= 0 .* got 1.5"),
        ({"every": 0}, ValueError, "every must be an int >= 1 .* got 0"),
        ({"every": 2.5}, ValueError, "every must be an int >= 1 .* got 2.5"),
        ({"every": True}, ValueError, "every must be an int >= 1 .* got True"),
        ({"every": None, "start_after": 3}, ValueError, "start_after=3 needs every="),
    ],
)
def test_bad_keywords_raise_naming_the_keyword(kwargs: dict[str, Any], error: type, message: str) -> None:
    model = make_model()
    with pytest.raises(error, match=message):
        ShardedAveragedModel(model, make_optimizer(model), **kwargs)


def test_wrong_model_or_optimizer_raises() -> None:
    model = make_model()
    optimizer = make_optimizer(model)
    with pytest.raises(ValueError, match="of param group 0 is not a parameter of `model`; pass the model whose"):
        ShardedAveragedModel(make_model(), optimizer)
    with pytest.raises(TypeError, match=r"model must be the torch\.nn\.Module the optimizer trains, got list"):
        ShardedAveragedModel(list(model.parameters()), optimizer)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"use torch\.optim\.swa_utils\.AveragedModel"):
        ShardedAveragedModel(model, torch.optim.SGD(model.parameters(), lr=0.1))  # type: ignore[arg-type]


def test_before_any_average_exports_refuse_but_state_dict_works() -> None:
    _, _, average = trained(steps=2, start_after=5)
    with pytest.raises(RuntimeError, match=re.escape("model_state_dict() needs an average")):
        average.model_state_dict()
    with pytest.raises(RuntimeError, match=re.escape("swapped() needs an average")), average.swapped():
        pass
    assert average.state_dict() == {"n_averaged": 0, "steps": 2, "averaged": {}}
    assert average.memory_bytes() == 0


def test_bad_state_dicts_raise_and_change_nothing() -> None:
    _, _, average = trained()
    good = average.state_dict()
    wrong_shape = {**good, "averaged": {**good["averaged"], "hidden.weight": torch.zeros(4, 7)}}
    renamed = {**good, "averaged": {("x." + k): v for k, v in good["averaged"].items()}}
    for bad, message in [
        ([1, 2], "expects what ShardedAveragedModel.state_dict.. returns"),
        ({"n_averaged": 1}, r"with keys \['n_averaged'\]"),
        ({**good, "n_averaged": -1}, "loaded 'n_averaged' must be an int >= 0, got -1"),
        ({**good, "n_averaged": 0}, "n_averaged=0 but holds averages"),
        (wrong_shape, r"average of 'hidden.weight' has shape \(4, 7\) but the parameter has shape \(5, 7\)"),
        (renamed, "no average of parameter 'scale'; 'x.scale' is not a parameter this optimizer trains"),
    ]:
        with pytest.raises(ValueError, match=message):
            average.load_state_dict(bad)  # type: ignore[arg-type]
        after = average.state_dict()
        assert after["n_averaged"] == good["n_averaged"]
        assert all(torch.equal(after["averaged"][k], v) for k, v in good["averaged"].items())


def _padded_bytes(optimizer: shardopt.ShardedOptimizer) -> int:
    """The bytes of the parameters' flat buffers, each padded to split into equal shards."""
    return sum(buffer.layout.numel * buffer.dtype.itemsize for buffer in optimizer.buffers)
