"""Shard state <-> torch.optim's consolidated ``state_dict`` format.

torch.optim numbers parameters across groups in order and keys their state by that
number; each entry holds 0-d scalar tensors (``step``, ...) and tensors of the
parameter's shape. Consolidating gathers each element-wise state buffer from the
shards; loading cuts each rank's shard back out of the full tensors, so a dict
from any world size (or from plain torch.optim) loads at any other.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .algorithms import Algorithm
from .buffer import ShardedBuffer
from .comm import Comm
from .memory_order import flattened, shaped

StateEntry = dict[str, Any]

#: The key of a state dict's fp32 master weights (``master_weights``), next to "state" and
#: "param_groups": torch.optim ignores it, shardopt restores the weights from it exactly.
MASTER_KEY = "master_params"


def gather_buffer_state(buffer: ShardedBuffer, comm: Comm, scalar_dtype: torch.dtype) -> dict[int, StateEntry]:
    """Collective: the state of every parameter of ``buffer`` that has state, keyed by slot."""
    full: dict[str, Tensor] = {}
    for name, shard in buffer.state.items():
        full[name] = torch.empty(buffer.layout.numel, dtype=shard.dtype, device=shard.device)
        comm.all_gather(full[name], shard, f"the all-gather of optimizer state {name!r}").wait()
    entries = {}
    for position, slot in enumerate(buffer.layout.slots):
        if not buffer.initialized[position]:
            continue
        entry: StateEntry = {
            name: torch.tensor(values[position], dtype=scalar_dtype) for name, values in buffer.scalars.items()
        }
        for name, tensor in full.items():
            entry[name] = shaped(tensor[slot.span.slice], slot.shape, buffer.orders[position]).clone()
        entries[position] = entry
    return entries


def gather_master(buffer: ShardedBuffer, comm: Comm) -> dict[int, Tensor]:
    """Collective: the full fp32 master weights of ``buffer``'s parameters, keyed by slot."""
    master = buffer.master
    full = torch.empty(buffer.layout.numel, dtype=master.dtype, device=master.device)
    comm.all_gather(full, master, "the all-gather of the master weights").wait()
    return {
        position: shaped(full[slot.span.slice], slot.shape, order).clone()
        for position, (slot, order) in enumerate(zip(buffer.layout.slots, buffer.orders))
    }


def check_master(master: Any, param: Tensor, where: str) -> None:
    if not isinstance(master, Tensor) or master.shape != param.shape or not master.is_floating_point():
        shape = tuple(master.shape) if isinstance(master, Tensor) else type(master).__name__
        raise ValueError(
            f"loaded master weights of {where} are {shape} but the parameter has shape {tuple(param.shape)}: "
            "the state dict belongs to a different model"
        )


def load_master(buffer: ShardedBuffer, masters: list[Tensor | None]) -> None:
    """Cut this rank's master shard out of ``masters`` (one per slot); None: from the parameter."""
    buffer.reset_master()
    if buffer.master is None:
        return
    for piece in buffer.pieces:
        saved = masters[piece.slot]
        if saved is not None:
            source = flattened(saved, buffer.orders[piece.slot])
            buffer.master[piece.in_shard.slice].copy_(source[piece.in_param.slice])


def initial_entry(
    algorithm: Algorithm, group: Mapping[str, Any], param: Tensor, scalar_dtype: torch.dtype
) -> StateEntry:
    """The state torch creates for ``param`` before its first step (algorithms with eager state)."""
    entry: StateEntry = {
        name: torch.tensor(value, dtype=scalar_dtype) for name, value in algorithm.scalar_state(group).items()
    }
    for name in algorithm.tensor_state(group):
        entry[name] = torch.empty_like(param).fill_(algorithm.initial_value(name, group))
    return entry


def pack(
    param_groups: list[dict[str, Any]],
    states: Mapping[Tensor, StateEntry],
    masters: Mapping[Tensor, Tensor] | None = None,
) -> dict[str, Any]:
    """torch.optim's format: parameters numbered across groups in order (and master weights, if any)."""
    packed_groups, packed_state, packed_masters = [], {}, {}
    masters = masters or {}
    index = 0
    for group in param_groups:
        packed = {key: value for key, value in group.items() if key != "params"}
        packed["params"] = list(range(index, index + len(group["params"])))
        for number, param in zip(packed["params"], group["params"]):
            if param in states:
                packed_state[number] = states[param]
            if param in masters:
                packed_masters[number] = masters[param]
        index += len(group["params"])
        packed_groups.append(packed)
    packed_dict = {"state": packed_state, "param_groups": packed_groups}
    if packed_masters:
        packed_dict[MASTER_KEY] = packed_masters
    return packed_dict


def unpack(
    state_dict: Mapping[str, Any], param_groups: list[dict[str, Any]], defaults: Mapping[str, Any]
) -> tuple[list[dict[str, Any]], dict[Tensor, StateEntry], dict[Tensor, Any]]:
    """The new param groups, the per-parameter state and master weights a torch.optim-format dict holds.

    The groups keep this optimizer's parameters and take the saved hyper-parameters,
    as torch.optim's load_state_dict does; keys an older dict lacks take the defaults.
    """
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= state_dict.keys():
        raise ValueError(
            "load_state_dict expects a dict with 'state' and 'param_groups' (what state_dict() returns), "
            f"got {type(state_dict).__name__}"
            + (f" with keys {sorted(state_dict)}" if isinstance(state_dict, Mapping) else "")
        )
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(
            f"loaded state dict has {len(saved_groups)} parameter groups but the optimizer has "
            f"{len(param_groups)}: it belongs to a different model or optimizer setup"
        )
    new_groups, states, masters = [], {}, {}
    saved_state = state_dict["state"]
    saved_masters = state_dict.get(MASTER_KEY) or {}
    for g, (group, saved) in enumerate(zip(param_groups, saved_groups)):
        if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), (list, tuple)):
            raise ValueError(
                f"loaded state dict's parameter group {g} has no 'params' list (got {type(saved).__name__}"
                f"{' with keys ' + str(sorted(saved)) if isinstance(saved, Mapping) else ''}): load what "
                "state_dict() returns"
            )
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"loaded state dict's parameter group {g} has {len(saved['params'])} parameters but the "
                f"optimizer's has {len(group['params'])}: it belongs to a different model"
            )
        new_group = copy.deepcopy({key: value for key, value in saved.items() if key != "params"})
        for key, value in defaults.items():
            new_group.setdefault(key, value)
        new_group["params"] = group["params"]
        if "param_names" in group and "param_names" not in saved:
            new_group["param_names"] = group["param_names"]
        for number, param in zip(saved["params"], group["params"]):
            if saved_state.get(number):
                states[param] = saved_state[number]
            if number in saved_masters:
                masters[param] = saved_masters[number]
        new_groups.append(new_group)
    return new_groups, states, masters


def check_entry(
    entry: Mapping[str, Any], param: Tensor, algorithm: Algorithm, group: Mapping[str, Any], where: str
) -> None:
    """Raise ValueError naming ``where`` if ``entry`` is not state ``algorithm`` can resume from."""
    for name in algorithm.scalar_state(group):
        if name not in entry:
            raise ValueError(f"loaded optimizer state of {where} lacks {name!r}: it was not saved by this algorithm")
        value = entry[name]
        # Checked here, not when installed: by then the param groups are replaced.
        if isinstance(value, bool) or not (
            isinstance(value, (int, float)) or (isinstance(value, Tensor) and value.numel() == 1)
        ):
            raise ValueError(
                f"loaded optimizer state {name!r} of {where} is {value!r}; a number or a one-element tensor is expected"
            )
    for name in algorithm.tensor_state(group):
        tensor = entry.get(name)
        if not isinstance(tensor, Tensor):
            raise ValueError(
                f"loaded optimizer state of {where} lacks the tensor {name!r}: it was not saved by this "
                "algorithm with these keywords"
            )
        if tensor.shape != param.shape:
            raise ValueError(
                f"loaded optimizer state {name!r} of {where} has shape {tuple(tensor.shape)} but the parameter "
                f"has shape {tuple(param.shape)}: the state dict belongs to a different model"
            )


def load_buffer_state(buffer: ShardedBuffer, entries: list[StateEntry | None], names: tuple[str, ...]) -> None:
    """Replace ``buffer``'s state with this rank's shard of ``entries`` (one per slot, None: no state)."""
    state = {name: buffer.new_shard() for name in names}
    for piece in buffer.pieces:
        entry = entries[piece.slot]
        if entry is not None:
            for name, tensor in state.items():
                source = flattened(entry[name], buffer.orders[piece.slot])
                tensor[piece.in_shard.slice].copy_(source[piece.in_param.slice])
    install_buffer_state(buffer, state, entries)


def install_buffer_state(buffer: ShardedBuffer, state: dict[str, Tensor], entries: list[StateEntry | None]) -> None:
    """Make ``state`` (this rank's shards) ``buffer``'s state, with the scalar state of ``entries``."""
    buffer.state = state
    for name, values in buffer.scalars.items():
        for position, entry in enumerate(entries):
            values[position] = float(entry[name]) if entry is not None else 0.0
    buffer.initialized = [entry is not None for entry in entries]
    buffer.uniform = len({(i, *(v[k] for v in buffer.scalars.values())) for k, i in enumerate(buffer.initialized)}) <= 1
