"""``ElementOptimizer``'s state in a checkpoint: element ranges of flat buffers.

Each parameter's element-wise state is one 1-D tensor of its numel, of which each rank writes
the pieces its shard covers (and reads, at any world size, the pieces its new shard covers);
scalar state (``step``) is a 0-d tensor, the same on every rank. With fp32 master weights,
those are stored the same way, under the state name ``master_param``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..elements.buffer import ShardedBuffer
from ..elements.layout import Piece
from ..elements.optimizer import ElementOptimizer
from ..elements.state import install_buffer_state
from . import manifest as manifests
from .chunks import ShardChunks
from .errors import CheckpointError
from .part import Part, Staging, TensorLookup


class ElementPart(Part):
    serves = (ElementOptimizer,)

    def describe(self, params: list[dict[str, Any]]) -> None:
        starts = manifests.group_starts(self.optimizer.param_groups)
        for buffer in self.optimizer.buffers:
            for position, slot in enumerate(buffer.layout.slots):
                record = params[starts[buffer.group_index] + slot.index]
                record["master"] = buffer.master is not None
                if buffer.orders[position] is not None:  # 1-D state in this memory order (channels_last)
                    record["order"] = list(buffer.orders[position])
                if buffer.initialized[position]:
                    record["scalar_state"] = list(buffer.scalars)
                    record["tensor_state"] = list(buffer.state)

    def entries(self, names: list[list[str]]) -> dict[str, Any]:
        """This rank's pieces of the element-wise state and master weights, and the scalar state."""
        entries: dict[str, Any] = {}
        for buffer in self.optimizer.buffers:
            pieces = _pieces_by_slot(buffer)
            for position, slot in enumerate(buffer.layout.slots):
                name, mine = names[buffer.group_index][slot.index], pieces.get(position, [])
                if buffer.initialized[position]:
                    for state_name, values in buffer.scalars.items():
                        value = torch.tensor(values[position], dtype=self.optimizer.scalar_dtype)
                        entries[self.key(name, state_name)] = value
                if slot.span.size == 0:  # nothing to store, and DCP cannot index a tensor no rank writes
                    continue
                if buffer.initialized[position]:
                    for state_name, shard in buffer.state.items():
                        entries[self.key(name, state_name)] = _chunks(slot.span.size, shard, mine)
                if buffer.master is not None:
                    entries[self.key(name, manifests.MASTER)] = _chunks(slot.span.size, buffer.master, mine)
        return entries

    def stage(self, record: dict[str, Any], groups: list[dict[str, Any]], staging: Staging) -> None:
        """Stage new state shards (and master shards) for this rank's pieces of every buffer."""
        optimizer = self.optimizer
        starts = manifests.group_starts(optimizer.param_groups)
        algorithm = optimizer.algorithm
        # Per buffer: its new state shards and, per slot, the scalar state read (None: no state).
        self._buffers: list[tuple[ShardedBuffer, dict[str, Tensor], list[dict[str, Tensor] | None]]] = []
        # Per buffer with master weights: the master shard read, and the pieces of it the checkpoint held.
        self._masters: list[tuple[ShardedBuffer, Tensor, list[Piece]]] = []
        for buffer in optimizer.buffers:
            group = groups[buffer.group_index]
            scalar_names, tensor_names = list(algorithm.scalar_state(group)), list(algorithm.tensor_state(group))
            shards = {name: buffer.new_shard() for name in tensor_names}
            scalars: list[dict[str, Tensor] | None] = [None] * len(buffer.params)
            master = None if buffer.master is None else torch.zeros_like(buffer.master)
            saved_master: list[Piece] = []
            pieces = _pieces_by_slot(buffer)
            for position, slot in enumerate(buffer.layout.slots):
                saved = record["params"][starts[buffer.group_index] + slot.index]
                if saved["tensor_state"] or saved.get("master"):
                    _check_order(staging.path, saved, buffer.orders[position])
                mine, size = pieces.get(position, []), slot.span.size
                if saved.get("master") and master is not None and size:
                    key = self.key(saved["name"], manifests.MASTER)
                    staging.read(key, _chunks(size, master, mine), (size,), master.dtype)
                    saved_master += mine
                if not saved["scalar_state"] and not saved["tensor_state"]:
                    continue
                if (saved["scalar_state"], saved["tensor_state"]) != (scalar_names, tensor_names):
                    raise self.corrupt(
                        staging.path, saved, saved["scalar_state"] + saved["tensor_state"], scalar_names + tensor_names
                    )
                scalars[position] = {
                    name: staging.read(self.key(saved["name"], name), torch.zeros((), dtype=optimizer.scalar_dtype))
                    for name in scalar_names
                }
                if size == 0:
                    continue
                for name in tensor_names:
                    key = self.key(saved["name"], name)
                    staging.read(key, _chunks(size, shards[name], mine), (size,), buffer.weights_dtype)
            self._buffers.append((buffer, shards, scalars))
            if master is not None:
                # A checkpoint of a run without master weights leaves them to come from the loaded parameters.
                self._masters.append((buffer, master, saved_master))

    def install(self, groups: list[dict[str, Any]], tensor: TensorLookup) -> None:
        self.optimizer.param_groups[:] = groups
        for buffer, shards, scalars in self._buffers:
            install_buffer_state(buffer, shards, scalars)
        # The model is loaded: the master weights start from its parameters.
        for buffer in self.optimizer.buffers:
            buffer.reset_master()
        for buffer, master, saved in self._masters:
            for piece in saved:
                buffer.master[piece.in_shard.slice] = master[piece.in_shard.slice]


def _pieces_by_slot(buffer: ShardedBuffer) -> dict[int, list[Piece]]:
    pieces: dict[int, list[Piece]] = {}
    for piece in buffer.pieces:
        pieces.setdefault(piece.slot, []).append(piece)
    return pieces


def _chunks(size: int, shard: Tensor, pieces: list[Piece]) -> ShardChunks:
    """The ``pieces`` of a parameter's 1-D state of ``size`` elements, as held in this rank's ``shard``."""
    return ShardChunks(size, {p.in_param.start: shard[p.in_shard.slice] for p in pieces})


def _check_order(path: Any, saved: dict[str, Any], order: tuple[int, ...] | None) -> None:
    """A parameter's state is stored in the memory order the parameter had (channels_last: N, H, W, C);
    loaded into one of another memory format, its elements would land permuted."""
    if (tuple(saved["order"]) if saved.get("order") else None) != order:
        kind = {True: "channels_last (or another permuted memory format)", False: "contiguous"}
        raise CheckpointError(
            f"{path}: parameter {saved['name']!r} was {kind[bool(saved.get('order'))]} when saved but is "
            f"{kind[order is not None]} now; give the model the memory format it had when saved "
            "(model.to(memory_format=...)) before building the optimizer, then load"
        )
