"""To and from torch's own formats: a checkpoint consolidated into one ``torch.save`` file that
plain torch.optim loads, and a sharded run started from such a file or any torch.optim
state dict."""

from __future__ import annotations

import math
import os
import pathlib
import pickle
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from ..elements.memory_order import shaped
from ..elements.optimizer import ElementOptimizer
from ..shared import state_format
from . import manifest as manifests
from .chunks import LoadPlanner
from .encoding import decode, tensor_keys
from .errors import CheckpointError
from .part import Staging, listed
from .storage import SafeReader, pinned


def consolidate(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The whole checkpoint at ``path``, in one process and in torch's formats::

        {"model": model.state_dict(), "optimizer": torch.optim's state_dict(),
         "scheduler": scheduler.state_dict() or None, "extra": {...}}

    For a checkpoint of several optimizers, ``"optimizer"`` and ``"scheduler"`` are lists, one
    entry per optimizer in the order they were saved. Needs no process group; holds the full
    optimizer state in memory.
    """
    with pinned(pathlib.Path(os.fspath(path))) as held:
        try:
            return _read_whole(held.directory)
        except CheckpointError as error:
            raise held.named(error) from error


def _read_whole(path: pathlib.Path) -> dict[str, Any]:
    manifest = manifests.read(path)
    reader = SafeReader(path)
    staging = Staging(path, reader.read_metadata())
    keys = [manifests.model_key(key) for key, _, _ in manifest["model"]]
    for position, record in enumerate(manifest["optimizers"]):
        for param in record["params"]:
            for name in param["scalar_state"]:
                keys.append(manifests.state_key(param["name"], name, position))
            if math.prod(param["shape"]) == 0:
                continue  # state of no elements: nothing was written
            for name in param["tensor_state"] + ([manifests.MASTER] if param.get("master") else []):
                keys.append(manifests.state_key(param["name"], name, position))
    keys += tensor_keys(manifests.encoded_values(manifest))
    for key in keys:
        size, dtype = staging.saved(key)
        staging.entries[key] = torch.empty(size, dtype=dtype)
    dcp.load(staging.entries, storage_reader=reader, planner=LoadPlanner(), no_dist=True)
    tensors = staging.entries

    def tensor(key: str, device: str) -> torch.Tensor:
        return tensors[key]

    records = manifest["optimizers"]
    optimizers = [_torch_state(record, position, tensors, tensor) for position, record in enumerate(records)]
    schedulers = [decode(record["scheduler"], tensor) for record in records]
    several = len(records) > 1
    return {
        "model": {key: tensors[manifests.model_key(key)] for key, _, _ in manifest["model"]},
        "optimizer": optimizers if several else optimizers[0],
        "scheduler": schedulers if several else schedulers[0],
        "extra": decode(manifest["extra"], tensor),
    }


def _torch_state(
    record: dict[str, Any], position: int, tensors: dict[str, Any], tensor: Callable[[str, str], torch.Tensor]
) -> dict[str, Any]:
    """One optimizer's record and tensors as torch.optim's ``state_dict()``."""
    state, masters = {}, {}
    for number, param in enumerate(record["params"]):

        def read(name: str, param: dict[str, Any] = param) -> Any:
            return tensors.get(manifests.state_key(param["name"], name, position))

        # Element-wise state is stored in the parameter's memory order: the tensors get its layout back.
        order = tuple(param["order"]) if param.get("order") else None
        if param.get("master"):
            master = read(manifests.MASTER)
            masters[number] = shaped(torch.zeros(0) if master is None else master, tuple(param["shape"]), order)
        if not param["scalar_state"] and not param["tensor_state"]:
            continue
        # int64 scalars are Python ints in torch's state (SparseAdam's step).
        entry = {name: _python_int(read(name)) for name in param["scalar_state"]}
        for name in param["tensor_state"]:
            flat = read(name)
            if flat is None:  # a parameter of no elements
                flat = torch.zeros(0, dtype=getattr(torch, param["dtype"]))
            if name in param.get("state_shapes", {}):  # whole-tensor state of its own shape (Adafactor)
                entry[name] = flat.view(param["state_shapes"][name])
            else:
                entry[name] = shaped(flat, tuple(param["shape"]), order)
        state[number] = entry
    if record.get("state"):  # state kept whole in the manifest (LBFGS), its vectors by reference
        state.update(decode(record["state"], tensor))
    optimizer = {"state": state, "param_groups": decode(record["param_groups"], tensor)}
    if masters:
        optimizer[state_format.MASTER_KEY] = masters
    return optimizer


def _python_int(value: torch.Tensor) -> Any:
    return int(value) if value.dtype == torch.int64 else value


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
    optimizer: Any,
    model: nn.Module | None = None,
    scheduler: Any = None,
) -> dict[str, Any]:
    """Start a sharded run from torch's formats; returns the ``extra`` dict (empty if none).

    ``source`` is a file :func:`export` wrote (or any ``torch.save`` file of such a dict), or a
    dict: the same, or a plain torch.optim ``state_dict()``. A file is read with
    ``weights_only=True``. ``optimizer`` and ``scheduler`` are one each or lists, as for
    :func:`save` (the file then holds lists, as :func:`export` writes them). Collective, like
    ``optimizer.load_state_dict``: every rank calls it. Everything is checked before anything
    changes (with several optimizers, those loaded before one that refuses its state get their
    own back).
    """
    optimizers, schedulers = listed(optimizer, scheduler)
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
    states, saved_schedulers = _per_optimizer(bundle, len(optimizers), where)
    model_state = bundle.get("model")
    if model is not None:
        if model_state is None:
            raise CheckpointError(f"{where} holds no model state; call load_torch without model=")
        _check_model_state(model, model_state, where)
    for position, (mine, saved) in enumerate(zip(schedulers, saved_schedulers)):
        if mine is not None and saved is None:
            at = "" if len(schedulers) == 1 else f" for optimizer {position}"
            raise CheckpointError(f"{where} holds no scheduler state{at}; call load_torch without that scheduler=")
    previous = [earlier.state_dict() for earlier in optimizers[:-1]]  # to undo loads before a refusal
    for position, (target, state) in enumerate(zip(optimizers, states)):
        try:
            target.load_state_dict(state)
        except ValueError as error:
            for earlier, saved in zip(optimizers[:position], previous):
                earlier.load_state_dict(saved)
            at = "" if len(optimizers) == 1 else f" (optimizer {position})"
            raise CheckpointError(f"{where}{at}: {error}") from error
    sharded = [(target, state) for target, state in zip(optimizers, states) if isinstance(target, ElementOptimizer)]
    if model is not None:
        for target, _ in sharded:
            target.finish_param_gather()
        model.load_state_dict(model_state)
        for target, state in sharded:
            if state_format.MASTER_KEY not in state:
                target.refresh_master_weights()
    for mine, saved in zip(schedulers, saved_schedulers):
        if mine is not None:
            mine.load_state_dict(saved)
    return dict(bundle.get("extra") or {})


def _per_optimizer(bundle: Mapping[str, Any], count: int, where: str) -> tuple[list[Any], list[Any]]:
    """The optimizer states and scheduler states of ``bundle``, one of each per optimizer."""
    states, schedulers = bundle["optimizer"], bundle.get("scheduler")
    if count == 1 and not isinstance(states, (list, tuple)):
        return [states], [schedulers]
    states = list(states) if isinstance(states, (list, tuple)) else [states]
    if len(states) != count:
        raise CheckpointError(
            f"{where} holds the state of {len(states)} optimizer(s) but {count} were given (optimizer=): pass "
            "them all, in the order they were saved"
        )
    return states, list(schedulers) if isinstance(schedulers, (list, tuple)) else [None] * count


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
