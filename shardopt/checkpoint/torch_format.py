"""To and from torch's own formats: a checkpoint consolidated into one ``torch.save`` file that
plain torch.optim loads, and a sharded run started from such a file or any torch.optim
state dict."""

from __future__ import annotations

import math
import os
import pathlib
import pickle
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from .. import state_dict as state_format
from ..optimizer import ShardedOptimizer
from . import manifest as manifests
from .chunks import LoadPlanner
from .encoding import decode, tensor_keys
from .errors import CheckpointError
from .storage import SafeReader, read_manifest, tensor_metadata


def consolidate(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The whole checkpoint at ``path``, in one process and in torch's formats::

        {"model": model.state_dict(), "optimizer": torch.optim's state_dict(),
         "scheduler": scheduler.state_dict() or None, "extra": {...}}

    Needs no process group; holds the full optimizer state in memory.
    """
    path = pathlib.Path(os.fspath(path))
    manifest = read_manifest(path)
    reader = SafeReader(path)
    metadata = reader.read_metadata()
    keys = [manifests.model_key(key) for key, _, _ in manifest["model"]]
    for record in manifest["params"]:
        for name in record["scalar_state"]:
            keys.append(manifests.state_key(record["name"], name))
        if math.prod(record["shape"]) == 0:
            continue  # element-wise state of no elements: nothing was written
        for name in record["tensor_state"] + ([manifests.MASTER] if record.get("master") else []):
            keys.append(manifests.state_key(record["name"], name))
    for name in ("param_groups", "scheduler", "extra"):
        keys.extend(tensor_keys(manifest[name]))
    tensors = {}
    for key in keys:
        saved = tensor_metadata(metadata, key, path)
        tensors[key] = torch.empty(saved.size, dtype=saved.properties.dtype)
    dcp.load(tensors, storage_reader=reader, planner=LoadPlanner(), no_dist=True)

    state, masters = {}, {}
    for number, record in enumerate(manifest["params"]):
        if record.get("master"):
            master = tensors.get(manifests.state_key(record["name"], manifests.MASTER))
            masters[number] = (torch.zeros(0) if master is None else master).view(record["shape"])
        if not record["scalar_state"] and not record["tensor_state"]:
            continue
        entry = {name: tensors[manifests.state_key(record["name"], name)] for name in record["scalar_state"]}
        for name in record["tensor_state"]:
            flat = tensors.get(manifests.state_key(record["name"], name))
            if flat is None:  # a parameter of no elements
                flat = torch.zeros(0, dtype=getattr(torch, record["dtype"]))
            entry[name] = flat.view(record["shape"])
        state[number] = entry

    def tensor(key: str, device: str) -> torch.Tensor:
        return tensors[key]

    optimizer = {"state": state, "param_groups": decode(manifest["param_groups"], tensor)}
    if masters:
        optimizer[state_format.MASTER_KEY] = masters
    return {
        "model": {key: tensors[manifests.model_key(key)] for key, _, _ in manifest["model"]},
        "optimizer": optimizer,
        "scheduler": decode(manifest["scheduler"], tensor),
        "extra": decode(manifest["extra"], tensor),
    }


def export(path: str | os.PathLike[str], output: str | os.PathLike[str]) -> None:
    """Write :func:`consolidate`'s dict to the ``torch.save`` file ``output`` (replaced atomically)."""
    output = pathlib.Path(os.fspath(output))
    consolidated = consolidate(path)
    staging = output.with_name(f"{output.name}.partial-{os.getpid()}")
    torch.save(consolidated, staging)
    os.replace(staging, output)


def load_torch(
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    optimizer: ShardedOptimizer,
    model: nn.Module | None = None,
    scheduler: Any = None,
) -> dict[str, Any]:
    """Start a sharded run from torch's formats; returns the ``extra`` dict (empty if none).

    ``source`` is a file :func:`export` wrote (or any ``torch.save`` file of such a dict), or a
    dict: the same, or a plain torch.optim ``state_dict()``. A file is read with
    ``weights_only=True``. Collective, like ``optimizer.load_state_dict``: every rank calls it.
    Everything is checked before anything changes.
    """
    if isinstance(source, Mapping):
        bundle, where = source, "the state dict given"
    else:
        where = os.fspath(source)
        try:
            bundle = torch.load(where, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise CheckpointError(
                f"{where} is not a torch.save file of tensors and plain containers: torch.load(weights_only=True) "
                "refuses it (it is corrupt, or holds other objects, which load_torch never unpickles)"
            ) from error
        except Exception as error:
            first_line = str(error).strip().split("\n")[0]
            raise CheckpointError(f"{where} cannot be read as a torch.save file ({first_line})") from error
    if isinstance(bundle, Mapping) and {"state", "param_groups"} <= bundle.keys():
        bundle = {"optimizer": bundle}
    if not isinstance(bundle, Mapping) or "optimizer" not in bundle:
        raise CheckpointError(
            f"{where} is neither a torch.optim state dict nor an exported checkpoint (a dict with 'optimizer')"
        )
    model_state = bundle.get("model")
    if model is not None:
        if model_state is None:
            raise CheckpointError(f"{where} holds no model state; call load_torch without model=")
        _check_model_state(model, model_state, where)
    if scheduler is not None and bundle.get("scheduler") is None:
        raise CheckpointError(f"{where} holds no scheduler state; call load_torch without scheduler=")
    try:
        optimizer.load_state_dict(bundle["optimizer"])
    except ValueError as error:
        raise CheckpointError(f"{where}: {error}") from error
    if model is not None:
        optimizer.finish_param_gather()
        model.load_state_dict(model_state)
        if state_format.MASTER_KEY not in bundle["optimizer"]:
            optimizer.refresh_master_weights()
    if scheduler is not None:
        scheduler.load_state_dict(bundle["scheduler"])
    return dict(bundle.get("extra") or {})


def _check_model_state(model: nn.Module, state: Mapping[str, Any], where: str) -> None:
    current = model.state_dict()
    missing, unexpected = sorted(current.keys() - state.keys()), sorted(state.keys() - current.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{where} belongs to a different model: it lacks {missing[:5]} and has {unexpected[:5]}, "
            "which the model lacks"
        )
    for key, value in current.items():
        saved = state[key]
        if not isinstance(saved, torch.Tensor) or saved.shape != value.shape:
            shape = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise CheckpointError(
                f"{where} belongs to a different model: {key} is {shape} there but {tuple(value.shape)} in the model"
            )
