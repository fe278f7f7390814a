"""Low-precision parameters with fp32 master weights: parity with torch.optim on an fp32 copy.

The contract (issue 5): a bfloat16/float16 model trained by shardopt with master weights equals
torch.optim run on an fp32 copy of the model fed the same mean gradients, then cast. Each step
of the reference therefore rounds its fp32 weights to the low-precision model the ranks hold,
computes every rank's gradient on it, and feeds torch.optim their mean.
"""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import pytest
import torch
from torch import nn

import shardopt
from shardopt import checkpoint
from tests.common import batch, make_model
from tests.world import run_world

STEPS = 4
# (name, optimizer, its keywords, shardopt options, parameter dtype)
CASES = [
    ("adamw-bf16", "AdamW", {"lr": 1e-2, "weight_decay": 0.1}, {}, torch.bfloat16),
    ("adamw-bf16-fp32-reduce", "AdamW", {"lr": 1e-2}, {"reduce_dtype": torch.float32}, torch.bfloat16),
    (
        "adamw-bf16-stage1-fp32-reduce",
        "AdamW",
        {"lr": 1e-2},
        {"stage": 1, "reduce_dtype": torch.float32},
        torch.bfloat16,
    ),
    ("nadam-fp16-fp32-reduce", "NAdam", {"lr": 1e-2}, {"reduce_dtype": torch.float32}, torch.float16),
    ("sgd-bf16-stage1", "SGD", {"lr": 0.1, "momentum": 0.9}, {"stage": 1}, torch.bfloat16),
    (
        "rmsprop-bf16-buckets",
        "RMSprop",
        {"lr": 1e-2},
        {"bucket_cap_mb": 1e-5, "reduce_dtype": torch.float32},
        torch.bfloat16,
    ),
]


def low_loss(model: nn.Module, dtype: torch.dtype, rank: int, step: int) -> torch.Tensor:
    x, y = batch(rank, step)
    return nn.functional.mse_loss(model(x.to(dtype)).float(), y)


def low_model(dtype: torch.dtype) -> nn.Module:
    return make_model().to(dtype)


def sharded_run(case: tuple) -> dict[str, Any]:
    import torch.distributed as dist

    _, name, kwargs, options, dtype = case
    rank = dist.get_rank()
    model = low_model(dtype)
    optimizer = getattr(shardopt, name)(model.parameters(), **kwargs, **options)
    params, masters = [], []
    for step in range(STEPS):
        optimizer.zero_grad()
        low_loss(model, dtype, rank, step).backward()
        optimizer.step()
        params.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone())
    state = optimizer.state_dict()
    masters = torch.cat([state["master_params"][i].reshape(-1) for i in range(len(state["master_params"]))])
    return {"params": params, "master": masters, "state": state, "stats": optimizer.memory_stats()}


def reference(case: tuple, world_size: int) -> dict[str, Any]:
    """torch.optim on an fp32 copy of the low-precision model, fed the mean of the ranks' gradients."""
    _, name, kwargs, options, dtype = case
    reduce_dtype = options.get("reduce_dtype", dtype)
    master = low_model(dtype).float()
    optimizer = getattr(torch.optim, name)(master.parameters(), **kwargs)
    params = []
    for step in range(STEPS):
        low = copy.deepcopy(master).to(dtype)
        total = [torch.zeros_like(p, dtype=reduce_dtype) for p in master.parameters()]
        for rank in range(world_size):
            low.zero_grad()
            low_loss(low, dtype, rank, step).backward()
            for acc, p in zip(total, low.parameters()):
                acc += p.grad.to(reduce_dtype)
        for acc, p in zip(total, master.parameters()):
            p.grad = (acc / world_size).float()
        optimizer.step()
        params.append(torch.cat([p.detach().to(dtype).reshape(-1) for p in master.parameters()]))
    return {"params": params, "master": torch.cat([p.detach().reshape(-1) for p in master.parameters()])}


def all_cases() -> list[dict[str, Any]]:
    return [sharded_run(case) for case in CASES]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_master_weights_equal_torch_on_an_fp32_copy(world_size: int) -> None:
    per_rank = run_world(all_cases, world_size)
    for index, case in enumerate(CASES):
        label, _, _, options, dtype = case
        expected = reference(case, world_size)
        # Summing in the parameters' dtype rounds in an order of gloo's choosing beyond two ranks.
        exact = options.get("reduce_dtype") == torch.float32 or world_size <= 2
        tolerance = {"rtol": 1e-5, "atol": 1e-6} if exact else {"rtol": 1e-2, "atol": 1e-3}
        for rank, results in enumerate(per_rank):
            ours = results[index]
            where = f"{label} N={world_size} rank {rank}"
            torch.testing.assert_close(ours["master"], expected["master"], **tolerance, msg=where)
            for step, (mine, theirs) in enumerate(zip(ours["params"], expected["params"], strict=True)):
                assert mine.dtype == dtype, where
                # The parameters are the master weights rounded: equal, or one rounding apart where
                # the masters differ in the last fp32 bits.
                torch.testing.assert_close(
                    mine.float(),
                    theirs.float(),
                    rtol=0 if exact else 1e-2,
                    atol=0 if exact else 1e-2,
                    msg=f"{where} step {step}",
                )
            for entry in ours["state"]["state"].values():
                for key, value in entry.items():
                    if key != "step":
                        assert value.dtype == torch.float32, f"{where}: state {key} is {value.dtype}"


def memory_run() -> list[dict[str, int]]:
    import torch.distributed as dist

    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).to(torch.bfloat16)
    stats = []
    for stage in (1, 2):
        optimizer = shardopt.AdamW(model.parameters(), lr=1e-3, stage=stage)
        optimizer.zero_grad()
        model(torch.randn(8, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(rank))).sum().backward()
        optimizer.step()
        stats.append(optimizer.memory_stats())
    return stats


@pytest.mark.parametrize("world_size", [2, 3])
def test_memory_stats_match_the_arithmetic(world_size: int) -> None:
    """bf16 AdamW: 2 bytes of parameters, 2/N of gradients (stage 2; 2 at stage 1), 4/N of master
    weights and 8/N of moments per parameter, up to the padding that aligns each rank's shard."""
    numel = 2 * (64 * 64 + 64)
    for stage1, stage2 in run_world(memory_run, world_size):
        assert stage1["param_bytes"] == stage2["param_bytes"] == 2 * numel
        padded = stage1["grad_bytes"] // 2
        assert numel <= padded < numel + 64 * world_size
        shard = padded // world_size
        assert stage2 == {**stage2, "grad_bytes": 2 * shard, "master_bytes": 4 * shard, "state_bytes": 8 * shard}
        assert stage1 == {**stage1, "grad_bytes": 2 * padded, "master_bytes": 4 * shard, "state_bytes": 8 * shard}
        # Stage 1 reduces in place; the updated parameters pass through one staging buffer of the bucket.
        assert stage1["staging_bytes"] == 2 * padded


def without_master_run() -> list[torch.Tensor]:
    import torch.distributed as dist

    rank = dist.get_rank()
    model = low_model(torch.bfloat16)
    optimizer = shardopt.Adam(model.parameters(), lr=1e-2, master_weights=False)
    for step in range(STEPS):
        optimizer.zero_grad()
        low_loss(model, torch.bfloat16, rank, step).backward()
        optimizer.step()
    state = optimizer.state_dict()
    assert "master_params" not in state and optimizer.memory_stats()["master_bytes"] == 0
    return [p.detach().clone() for p in model.parameters()] + [state["state"][0]["exp_avg"]]


def test_without_master_weights_the_update_is_torchs_in_the_parameters_dtype() -> None:
    model = low_model(torch.bfloat16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)  # shardopt runs the same kernel
    for step in range(STEPS):
        grads = []
        for rank in range(2):
            model.zero_grad()
            low_loss(model, torch.bfloat16, rank, step).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, first, second in zip(model.parameters(), *grads):
            p.grad = (first + second) / 2  # a bf16 sum of two, as gloo reduces it
        optimizer.step()
    expected = [p.detach() for p in model.parameters()] + [optimizer.state_dict()["state"][0]["exp_avg"]]
    for ours in run_world(without_master_run, 2):
        assert ours[-1].dtype == torch.bfloat16
        for mine, theirs in zip(ours, expected, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def resume_run(directory: pathlib.Path, phase: str) -> list[torch.Tensor]:
    """ "full": 2 * STEPS steps. "save": STEPS steps, then a state dict and a checkpoint. "load ...":
    either of them, then the last STEPS steps. Every rank trains on the same data, so that the mean
    gradient (reduced in fp32, exactly) is the same at every world size."""
    import torch.distributed as dist

    dtype = torch.bfloat16
    model = low_model(dtype)
    optimizer = shardopt.AdamW(model.parameters(), lr=1e-2, reduce_dtype=torch.float32)
    steps = {"full": range(2 * STEPS), "save": range(STEPS)}.get(phase, range(STEPS, 2 * STEPS))
    if phase == "load state_dict":
        model.load_state_dict(torch.load(directory / "model.pt"))
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt"))
    elif phase == "load checkpoint":
        checkpoint.load(directory / "checkpoint", model=model, optimizer=optimizer)
    for step in steps:
        optimizer.zero_grad()
        low_loss(model, dtype, 0, step).backward()
        optimizer.step()
    final = optimizer.state_dict()
    if phase == "save":
        if dist.get_rank() == 0:
            torch.save(model.state_dict(), directory / "model.pt")
            torch.save(final, directory / "optimizer.pt")
        checkpoint.save(directory / "checkpoint", model=model, optimizer=optimizer)
    return [torch.cat([p.detach().reshape(-1) for p in model.parameters()])] + list(final["master_params"].values())


def test_state_dict_and_checkpoint_carry_the_master_weights_across_world_sizes(tmp_path: pathlib.Path) -> None:
    run_world(resume_run, 2, tmp_path, "save")
    saved = torch.load(tmp_path / "optimizer.pt")
    assert saved["master_params"].keys() == saved["state"].keys()
    # torch.optim on the fp32 copy takes the same dict (it ignores "master_params").
    fp32 = low_model(torch.bfloat16).float()
    torch.optim.AdamW(fp32.parameters(), lr=1e-2).load_state_dict(saved)
    uninterrupted = run_world(resume_run, 2, tmp_path, "full")[0]
    for phase in ("load state_dict", "load checkpoint"):
        for world_size in (1, 3):
            resumed = run_world(resume_run, world_size, tmp_path, phase)[0]
            for mine, theirs in zip(resumed, uninterrupted, strict=True):
                torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=f"{phase} at N={world_size}")


@pytest.mark.parametrize(
    ("keyword", "value", "message"),
    [
        ("master_weights", "yes", "master_weights must be None (default: True), True or False"),
        ("reduce_dtype", torch.int32, "reduce_dtype must be None (the parameters' dtype) or one of"),
        ("reduce_dtype", "float32", "reduce_dtype must be None (the parameters' dtype) or one of"),
    ],
)
def test_bad_precision_keywords_name_the_keyword(keyword: str, value: Any, message: str) -> None:
    model = low_model(torch.bfloat16)
    with pytest.raises(TypeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        shardopt.AdamW(model.parameters(), lr=1e-2, **{keyword: value})


def test_changed_parameters_need_refresh_master_weights() -> None:
    """A parameter set in place outside step() is overwritten by the next step unless the master
    weights are refreshed from it (one process: no communication either way)."""
    model = low_model(torch.bfloat16)
    optimizer = shardopt.SGD(model.parameters(), lr=0.0)
    with torch.no_grad():
        model.scale.fill_(2.0)
    optimizer.refresh_master_weights()
    low_loss(model, torch.bfloat16, 0, 0).backward()
    optimizer.step()
    assert torch.equal(model.scale.detach(), torch.full((3,), 2.0, dtype=torch.bfloat16))
