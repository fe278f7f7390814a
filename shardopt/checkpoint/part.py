"""One optimizer in a checkpoint: its manifest record, the DCP entries this rank writes, what it reads back.

A checkpoint holds one optimizer or several (Muon + AdamW, SparseAdam + AdamW: two in one job),
each at a position; position 0 keeps the keys a single optimizer has always had. Each way of
sharding state has its subclass of :class:`Part`, which save and load drive alike:

* ``by_elements``: element ranges of flat buffers (``ElementOptimizer``, the element-wise algorithms);
* ``by_owner``: whole tensors on owner ranks (``OwnedOptimizer``: Adafactor, Muon);
* ``by_rows``: row ranges of each parameter (``SparseRowOptimizer``: SparseAdam);
* ``by_slices``: slices of one flat vector of all parameters (``ShardedLBFGS``).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.distributed.checkpoint.metadata import Metadata

from ..shared import state_format
from . import manifest as manifests
from .chunks import ShardChunks
from .encoding import Encoder, decode
from .errors import CheckpointError
from .storage import tensor_metadata

#: ``tensor(key, device)``: a tensor the manifest refers to, as read.
TensorLookup = Callable[[str, str], Tensor]


class Staging:
    """What a load reads: the DCP entries to fill (``entries``), each checked against the checkpoint's metadata."""

    def __init__(self, path: pathlib.Path, metadata: Metadata) -> None:
        self.path, self.metadata = path, metadata
        self.entries: dict[str, Any] = {}

    def saved(self, key: str) -> tuple[torch.Size, torch.dtype]:
        """The saved size and dtype of tensor ``key``; CheckpointError if the checkpoint lacks it."""
        found = tensor_metadata(self.metadata, key, self.path)
        return found.size, found.properties.dtype

    def read(self, key: str, target: Any, size: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> Any:
        """Read tensor ``key`` into ``target`` (a tensor, or :class:`ShardChunks` of ``size`` and ``dtype``)."""
        expected = (tuple(target.shape), target.dtype) if size is None else (tuple(size), dtype)
        saved_size, saved_dtype = self.saved(key)
        if (tuple(saved_size), saved_dtype) != expected:
            raise CheckpointError(
                f"{self.path}: {key!r} is {saved_dtype} of shape {tuple(saved_size)} in the DCP metadata but "
                f"{expected[1]} of shape {expected[0]} is expected: the checkpoint is corrupt"
            )
        self.entries[key] = target
        return target


class Part:
    """One optimizer at ``position`` of a checkpoint. Subclasses say how its state is sharded."""

    #: The ``optimizer`` argument types this part describes (set by each subclass).
    serves: tuple[type, ...] = ()

    def __init__(self, optimizer: Any, position: int) -> None:
        self.optimizer, self.position = optimizer, position

    @property
    def algorithm(self) -> str:
        """The torch.optim class name the manifest records and loads check."""
        return self.optimizer.torch_class.__name__

    def key(self, param_name: str, state_name: str) -> str:
        return manifests.state_key(param_name, state_name, self.position)

    def numbered(self) -> Iterator[tuple[int, Tensor]]:
        """(torch.optim's number, parameter) across the groups, in order."""
        params = [param for group in self.optimizer.param_groups for param in group["params"]]
        return enumerate(params)

    # ------------------------------------------------------------------ save

    def exchange(self) -> None:
        """Collective, before a save is prepared: what every rank must know to describe the state."""

    def record(self, names: list[list[str]], encoder: Encoder, scheduler: Any) -> dict[str, Any]:
        """This optimizer's manifest record (the same on every rank)."""
        params = manifests.param_records(self.optimizer.param_groups, names)
        self.describe(params)
        at = "" if self.position == 0 else f"[{self.position}]"
        groups = state_format.pack(self.optimizer.param_groups, {})["param_groups"]
        record = {
            "optimizer": self.algorithm,
            "params": params,
            "param_groups": encoder.encode(groups, f"optimizer{at}.param_groups"),
            "scheduler": None
            if scheduler is None
            else encoder.encode(scheduler.state_dict(), f"scheduler{at}.state_dict()"),
        }
        state = self.encoded_state(names, encoder)
        if state is not None:
            record["state"] = state
        return record

    def describe(self, params: list[dict[str, Any]]) -> None:
        """Fill the records (in torch.optim's numbering) with the state each parameter has."""

    def encoded_state(self, names: list[list[str]], encoder: Encoder) -> Any:
        """State kept in the manifest as torch.optim's entries (tensors by reference), or None."""
        return None

    def entries(self, names: list[list[str]]) -> dict[str, Any]:
        """This rank's DCP entries of optimizer state: only what it holds."""
        raise NotImplementedError

    # ------------------------------------------------------------------ load

    def groups(self, record: dict[str, Any], tensor: TensorLookup) -> list[dict[str, Any]]:
        """The optimizer's param groups with the checkpoint's hyper-parameters, checked as
        ``load_state_dict`` checks them."""
        saved = decode(record["param_groups"], tensor)
        optimizer = self.optimizer
        groups, _, _ = state_format.unpack(
            {"state": {}, "param_groups": saved}, optimizer.param_groups, optimizer.defaults
        )
        for g, group in enumerate(groups):
            self.check_group(group, g)
        return groups

    def check_group(self, group: dict[str, Any], g: int) -> None:
        self.optimizer.check_group(group, g)

    def stage(self, record: dict[str, Any], groups: list[dict[str, Any]], staging: Staging) -> None:
        """Check the saved state against this optimizer and stage the reads of what this rank will hold."""
        raise NotImplementedError

    def install(self, groups: list[dict[str, Any]], tensor: TensorLookup) -> None:
        """The last phase of a load (after the model's): make what was read this optimizer's state."""
        raise NotImplementedError

    def saved_state(
        self, record: dict[str, Any], staging: Staging, expected: Callable[[Tensor], list[str]]
    ) -> Iterator[tuple[Tensor, dict[str, Any]]]:
        """Each parameter the checkpoint holds state of, with its record, once the state's names are
        found to be ``expected(param)``: those this optimizer keeps."""
        for number, param in self.numbered():
            saved = record["params"][number]
            names = saved["scalar_state"] + saved["tensor_state"]
            if names and names != expected(param):
                raise self.corrupt(staging.path, saved, names, expected(param))
            if names:
                yield param, saved

    def corrupt(
        self, path: pathlib.Path, record: dict[str, Any], saved: list[str], expected: list[str]
    ) -> CheckpointError:
        return CheckpointError(
            f"{path}: the state of parameter {record['name']!r} is {saved} in the checkpoint but {self.algorithm} with "
            f"the checkpoint's keywords keeps {expected}: the checkpoint is corrupt"
        )


def chunk_of(numel: int, start: int, piece: Tensor) -> ShardChunks:
    """The 1-D tensor of ``numel`` elements of which this rank holds ``piece`` (flattened) at ``start``."""
    flat = piece.reshape(-1)
    return ShardChunks(numel, {start: flat} if flat.numel() else {})


def listed(optimizer: Any, scheduler: Any) -> tuple[list[Any], list[Any]]:
    """``optimizer=`` and ``scheduler=`` as lists of the same length: one of each, or lists/tuples."""
    optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    if not optimizers:
        raise CheckpointError("optimizer= is an empty list; pass an optimizer or a list of them")
    for position, optimizer in enumerate(optimizers):
        first = next(i for i, other in enumerate(optimizers) if other is optimizer)
        if first != position:
            raise CheckpointError(
                f"optimizer= lists the same {type(optimizer).__name__} at positions {first} and {position}; "
                "list each optimizer once"
            )
    if scheduler is None:
        return optimizers, [None] * len(optimizers)
    if isinstance(scheduler, (list, tuple)):
        if len(scheduler) != len(optimizers):
            raise CheckpointError(
                f"scheduler= has {len(scheduler)} entries but optimizer= has {len(optimizers)}: pass one scheduler "
                "(or None) per optimizer, in the same order"
            )
        return optimizers, list(scheduler)
    if len(optimizers) > 1:
        raise CheckpointError(
            f"scheduler= is one scheduler but optimizer= has {len(optimizers)} optimizers: pass a list of "
            f"{len(optimizers)} (None for an optimizer without one), in the optimizers' order"
        )
    return optimizers, [scheduler]
