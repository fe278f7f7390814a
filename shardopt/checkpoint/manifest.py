"""The manifest: what a checkpoint holds, in JSON, and whether it fits a model and optimizer.

It names every tensor of the checkpoint's DCP index by what it belongs to:

* ``model.<state_dict key>``: the model's state, whole (replicated; DCP writes it once);
* ``optim.state.<parameter name>.<state name>``: a parameter's optimizer state, the
  element-wise kind as one 1-D tensor of the parameter's numel, written in pieces by
  the ranks that own them, the scalar kind (``step``) as a 0-d tensor;
* ``shardopt.tensor.<n>``: tensors among the hyper-parameters, scheduler state or ``extra``.

Parameters are named by ``model.named_parameters()``, so a checkpoint loads into any
optimizer over the same model, whatever its world size or layout.
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch
from torch import Tensor, nn

from ..optimizer import ShardedOptimizer
from .errors import CheckpointError

FORMAT = "shardopt.checkpoint"
VERSION = 1


def model_key(key: str) -> str:
    return f"model.{key}"


#: The state name a parameter's fp32 master weights are stored under (``master_weights``).
MASTER = "master_param"


def state_key(param_name: str, state_name: str) -> str:
    return f"optim.state.{param_name}.{state_name}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parameter_names(model: nn.Module, optimizer: ShardedOptimizer) -> list[list[str]]:
    """The model's name of every parameter of every optimizer group."""
    by_id = {id(param): name for name, param in model.named_parameters()}
    names = []
    for g, group in enumerate(optimizer.param_groups):
        names.append([])
        for i, param in enumerate(group["params"]):
            if id(param) not in by_id:
                raise CheckpointError(
                    f"{optimizer._describe(group, g, i)} is not a parameter of the model given; "
                    "pass the model whose parameters the optimizer trains"
                )
            names[g].append(by_id[id(param)])
    return names


def model_state(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()``, whose every entry must be a tensor."""
    state = model.state_dict()
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(
                f"model.state_dict()[{key!r}] is a {type(value).__name__}; checkpoints hold tensors only"
            )
    return state


def build(
    model_state: dict[str, Tensor],
    optimizer: ShardedOptimizer,
    names: list[list[str]],
    encoded: dict[str, Any],
) -> dict[str, Any]:
    """The manifest of a save; ``encoded`` holds the JSON of param_groups, scheduler and extra."""
    params = [
        {
            "name": names[g][i],
            "shape": list(param.shape),
            "dtype": _dtype_name(param.dtype),
            "scalar_state": [],
            "tensor_state": [],
        }
        for g, group in enumerate(optimizer.param_groups)
        for i, param in enumerate(group["params"])
    ]
    starts = group_starts(optimizer.param_groups)
    for buffer in optimizer._buffers:
        for position, slot in enumerate(buffer.layout.slots):
            record = params[starts[buffer.group_index] + slot.index]
            record["master"] = buffer.master is not None
            if buffer.initialized[position]:
                record["scalar_state"] = list(buffer.scalars)
                record["tensor_state"] = list(buffer.state)
    return {
        "format": FORMAT,
        "version": VERSION,
        "world_size": optimizer.world_size,
        "optimizer": optimizer._algorithm.torch_class.__name__,
        "model": [[key, list(value.shape), _dtype_name(value.dtype)] for key, value in model_state.items()],
        "params": params,
        **encoded,
    }


def group_starts(param_groups: list[dict[str, Any]]) -> list[int]:
    """torch.optim's number of each group's first parameter."""
    starts, total = [], 0
    for group in param_groups:
        starts.append(total)
        total += len(group["params"])
    return starts


def check(
    manifest: dict[str, Any],
    model_state: dict[str, Tensor],
    optimizer: ShardedOptimizer,
    names: list[list[str]],
    path: pathlib.Path,
) -> None:
    """Raise CheckpointError naming the first way the checkpoint at ``path`` does not fit."""
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has shardopt checkpoint format version {manifest.get('version')!r}; this shardopt reads {VERSION}"
        )
    algorithm = optimizer._algorithm.torch_class.__name__
    if manifest["optimizer"] != algorithm:
        raise CheckpointError(f"{path} holds {manifest['optimizer']} state but the optimizer runs {algorithm}")
    saved_model = {key: (shape, dtype) for key, shape, dtype in manifest["model"]}
    current_model = {key: (list(value.shape), _dtype_name(value.dtype)) for key, value in model_state.items()}
    missing, unexpected = sorted(current_model.keys() - saved_model), sorted(saved_model.keys() - current_model)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} belongs to a different model: the model has {missing[:5]} that the checkpoint lacks, "
            f"the checkpoint has {unexpected[:5]} that the model lacks"
        )
    for key, (shape, dtype) in current_model.items():
        if saved_model[key] != (shape, dtype):
            raise CheckpointError(
                f"{path} belongs to a different model: model.{key} is {saved_model[key][1]} of shape "
                f"{tuple(saved_model[key][0])} in the checkpoint but {dtype} of shape {tuple(shape)} in the model"
            )
    saved_counts = [len(group["params"]) for group in manifest["param_groups"]]
    current_counts = [len(group["params"]) for group in optimizer.param_groups]
    if saved_counts != current_counts:
        raise CheckpointError(
            f"{path} has param groups of {saved_counts} parameters but the optimizer's have {current_counts}: "
            "it belongs to a different optimizer setup"
        )
    records = iter(manifest["params"])
    for g, group in enumerate(optimizer.param_groups):
        for i, param in enumerate(group["params"]):
            record = next(records)
            current = (names[g][i], list(param.shape), _dtype_name(param.dtype))
            saved = (record["name"], record["shape"], record["dtype"])
            if saved != current:
                raise CheckpointError(
                    f"{path} belongs to a different model: {optimizer._describe(group, g, i)} is {current[0]!r} "
                    f"({current[2]}, shape {tuple(current[1])}) but the checkpoint has {saved[0]!r} "
                    f"({saved[2]}, shape {tuple(saved[1])}) there"
                )
