"""The element scheme's state in torch.optim's format: each buffer's shards of state and master
weights gathered into per-parameter entries, and this rank's shards cut back out of them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..algorithms import Algorithm
from ..collectives.comm import Comm
from ..shared.groups import describe
from ..shared.state_format import StateEntry
from .buffer import ShardedBuffer
from .memory_order import flattened, shaped


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


def gather_state(
    buffers: list[ShardedBuffer], comm: Comm, scalar_dtype: torch.dtype
) -> tuple[dict[Tensor, StateEntry], dict[Tensor, Tensor]]:
    """Collective: the state, and the fp32 master weights, of every parameter of ``buffers`` that has them."""
    states: dict[Tensor, StateEntry] = {}
    masters: dict[Tensor, Tensor] = {}
    for buffer in buffers:
        for slot, entry in gather_buffer_state(buffer, comm, scalar_dtype).items():
            states[buffer.params[slot]] = entry
        if buffer.master is not None:
            for slot, master in gather_master(buffer, comm).items():
                masters[buffer.params[slot]] = master
    return states, masters


def check_loaded(
    group: Mapping[str, Any],
    g: int,
    states: Mapping[Tensor, StateEntry],
    masters: Mapping[Tensor, Any],
    algorithm: Algorithm,
) -> None:
    """Raise ValueError naming the first parameter of param group ``g`` whose loaded state or master
    weights this algorithm cannot resume from."""
    for i, param in enumerate(group["params"]):
        where = describe(group, g, i)
        if param in states:
            check_entry(states[param], param, algorithm, group, where)
        if param in masters:
            check_master(masters[param], param, where)


def install_state(
    buffers: list[ShardedBuffer],
    param_groups: list[dict[str, Any]],
    states: Mapping[Tensor, StateEntry],
    masters: Mapping[Tensor, Tensor],
    algorithm: Algorithm,
) -> None:
    """Make this rank's shards of ``states`` and ``masters`` (checked) every buffer's state."""
    for buffer in buffers:
        group = param_groups[buffer.group_index]
        load_buffer_state(buffer, [states.get(param) for param in buffer.params], algorithm.tensor_state(group))
        load_master(buffer, [masters.get(param) for param in buffer.params])
