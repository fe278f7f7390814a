"""The manifest: what a checkpoint holds, in JSON, and whether it fits a model and optimizers.

It names every tensor of the checkpoint's DCP index by what it belongs to:

* ``model.<state_dict key>``: the model's state, whole (replicated; DCP writes it once);
* ``optim.state.<parameter name>.<state name>``: a parameter's optimizer state, the
  element-wise kind as one 1-D tensor of the parameter's numel, written in pieces by
  the ranks that own them, the scalar kind (``step``) as a 0-d tensor; the optimizer
  at position k > 0 of several uses ``optim.<k>.state.`` instead;
* ``shardopt.tensor.<n>``: tensors among the hyper-parameters, scheduler state or ``extra``.

Each optimizer's record holds its algorithm, param groups, scheduler state and one record
per parameter (name, shape, dtype, the names of its state); LBFGS's adds its state entry in
torch's format (``"state"``, vectors by reference) and its history's Gram matrices
(``"gram"``). Parameters are named by ``model.named_parameters()``, so a checkpoint loads
into any optimizer over the same model, whatever its world size or layout. Version 1 held
one optimizer's record at the top level; version 2 a list of them under ``"optimizers"``.
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch
from torch import Tensor, nn

from ..shared import groups as group_names
from . import schema
from .errors import CheckpointError
from .storage import MANIFEST, read_manifest

FORMAT = "shardopt.checkpoint"
VERSION = 2
#: The fields of an optimizer's record, at the top level of a version-1 manifest.
RECORD_FIELDS = ("optimizer", "params", "param_groups", "scheduler")


def model_key(key: str) -> str:
    return f"model.{key}"


#: The state name a parameter's fp32 master weights are stored under (``master_weights``).
MASTER = "master_param"


def state_key(param_name: str, state_name: str, position: int = 0) -> str:
    prefix = "optim" if position == 0 else f"optim.{position}"
    return f"{prefix}.state.{param_name}.{state_name}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parameter_names(model: nn.Module, optimizer: Any) -> list[list[str]]:
    """The model's name of every parameter of every optimizer group."""
    by_id = {id(param): name for name, param in model.named_parameters()}
    names = []
    for g, group in enumerate(optimizer.param_groups):
        names.append([])
        for i, param in enumerate(group["params"]):
            if id(param) not in by_id:
                raise CheckpointError(
                    f"{group_names.describe(group, g, i)} is not a parameter of the model given; "
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


def param_records(param_groups: list[dict[str, Any]], names: list[list[str]]) -> list[dict[str, Any]]:
    """One record per parameter, in torch.optim's numbering, with no state yet."""
    return [
        {
            "name": names[g][i],
            "shape": list(param.shape),
            "dtype": _dtype_name(param.dtype),
            "scalar_state": [],
            "tensor_state": [],
        }
        for g, group in enumerate(param_groups)
        for i, param in enumerate(group["params"])
    ]


def build(
    model_state: dict[str, Tensor], world_size: int, optimizers: list[dict[str, Any]], extra: Any
) -> dict[str, Any]:
    """The manifest of a save: the optimizers' records and the JSON of ``extra``."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "world_size": world_size,
        "model": [[key, list(value.shape), _dtype_name(value.dtype)] for key, value in model_state.items()],
        "optimizers": optimizers,
        "extra": extra,
    }


def read(path: pathlib.Path) -> dict[str, Any]:
    """The manifest of the complete checkpoint at ``path``, every field checked (schema.py), in
    version 2's form."""
    manifest = read_manifest(path)
    schema.check(manifest, path / MANIFEST)
    return upgraded(manifest)


def upgraded(manifest: dict[str, Any]) -> dict[str, Any]:
    """A version-1 manifest (one optimizer) in version 2's form; other versions as they are."""
    if manifest.get("version") != 1:
        return manifest
    record = {name: manifest[name] for name in RECORD_FIELDS}
    rest = {key: value for key, value in manifest.items() if key not in RECORD_FIELDS}
    return {**rest, "version": VERSION, "optimizers": [record]}


def encoded_values(manifest: dict[str, Any]) -> list[Any]:
    """Every value of the manifest the Encoder wrote (JSON that may refer to tensors), in one list."""
    values = [manifest["extra"]]
    for record in manifest["optimizers"]:
        values += [record["param_groups"], record["scheduler"], record.get("state"), record.get("gram")]
    return values


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
    optimizers: list[tuple[str, list[dict[str, Any]], list[list[str]]]],
    path: pathlib.Path,
) -> None:
    """Raise CheckpointError naming the first way the checkpoint at ``path`` does not fit.

    ``optimizers``: per position, the algorithm's torch.optim class name, the param groups and
    the parameters' names.
    """
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has shardopt checkpoint format version {manifest.get('version')!r}; this shardopt reads {VERSION}"
        )
    _check_model(manifest, model_state, path)
    saved = manifest["optimizers"]
    if len(saved) != len(optimizers):
        raise CheckpointError(
            f"{path} holds the state of {len(saved)} optimizer(s) ({', '.join(r['optimizer'] for r in saved)}) but "
            f"{len(optimizers)} were given (optimizer=): pass them all, in the order they were saved"
        )
    for position, (record, (algorithm, param_groups, names)) in enumerate(zip(saved, optimizers)):
        where = "" if len(optimizers) == 1 else f" at position {position} of optimizer="
        _check_optimizer(record, algorithm, param_groups, names, f"{path}", where)
        schema.check_hyper_parameters(record["param_groups"], param_groups, path / MANIFEST, f"optimizers[{position}].")


def _check_model(manifest: dict[str, Any], model_state: dict[str, Tensor], path: pathlib.Path) -> None:
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


def _check_optimizer(
    record: dict[str, Any],
    algorithm: str,
    param_groups: list[dict[str, Any]],
    names: list[list[str]],
    path: str,
    where: str,
) -> None:
    if record["optimizer"] != algorithm:
        raise CheckpointError(f"{path} holds {record['optimizer']} state{where} but the optimizer runs {algorithm}")
    saved_counts = [len(group["params"]) for group in record["param_groups"]]
    current_counts = [len(group["params"]) for group in param_groups]
    if saved_counts != current_counts:
        raise CheckpointError(
            f"{path} has param groups of {saved_counts} parameters{where} but the optimizer's have "
            f"{current_counts}: it belongs to a different optimizer setup"
        )
    records = iter(record["params"])
    for g, group in enumerate(param_groups):
        for i, param in enumerate(group["params"]):
            saved = next(records)
            current = (names[g][i], list(param.shape), _dtype_name(param.dtype))
            if (saved["name"], saved["shape"], saved["dtype"]) != current:
                raise CheckpointError(
                    f"{path} belongs to a different model: {group_names.describe(group, g, i)}{where} is "
                    f"{current[0]!r} ({current[2]}, shape {tuple(current[1])}) but the checkpoint has "
                    f"{saved['name']!r} ({saved['dtype']}, shape {tuple(saved['shape'])}) there"
                )
