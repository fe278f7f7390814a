"""Sharded save and load: every rank writes and reads only the state it owns, at any world size.

Both are collective, in three phases each rank passes together::

    save: check and encode everything (agree) -> DCP writes each rank's part into
          <path>.partial-<token> (agree) -> rank 0 writes the manifest and marker and
          renames the directory into place (agree)
    load: read the manifest and DCP metadata, check them against the model and optimizer,
          stage the tensors to read (agree) -> DCP reads into the staged tensors (agree)
          -> install them

Each "agree" makes a failure on any rank an error on every rank, and nothing of the
model or optimizer changes before the last phase.
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException

from .. import fingerprint
from .. import state_dict as state_format
from ..buffer import ShardedBuffer
from ..comm import Comm
from ..layout import Piece
from ..optimizer import ShardedOptimizer
from . import manifest as manifests
from .chunks import LoadPlanner, SavePlanner, ShardChunks
from .encoding import Encoder, decode, restore_device, tensor_keys
from .errors import CheckpointError, agree
from .storage import (
    MANIFEST,
    SafeReader,
    check_target,
    partial_path,
    publish,
    read_manifest,
    tensor_metadata,
    write_file,
)

# Without a process group DCP warns on every call that it saves or loads in one process; that is
# what a world of one means here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

DCP_ERRORS = (Exception, CheckpointException)  # DCP's exception is a BaseException


# ---------------------------------------------------------------------- save


@dataclass
class _SaveJob:
    """What one save writes: the DCP entries of this rank, and the manifest (rank 0 writes it)."""

    entries: dict[str, Any]
    manifest: str

    def snapshot(self) -> _SaveJob:
        """A copy on the CPU that training may not change while a background thread writes it."""

        def copy(tensor: Tensor) -> Tensor:
            return tensor.detach().to("cpu", copy=True)

        entries = {
            key: ShardChunks(value.numel, {o: copy(t) for o, t in value.chunks.items()})
            if isinstance(value, ShardChunks)
            else copy(value)
            for key, value in self.entries.items()
        }
        return _SaveJob(entries, self.manifest)


def save(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: ShardedOptimizer,
    scheduler: Any = None,
    extra: dict[str, Any] | None = None,
    async_save: bool = False,
) -> Future[None] | None:
    """Save the model, the optimizer's sharded state, the scheduler and ``extra`` to directory ``path``.

    Collective: every rank calls it, and writes only its own shard of the optimizer state (the
    model's state, the same on every rank, is spread over the ranks and written once). ``path``
    is replaced only once the new checkpoint is complete. ``extra`` and the scheduler's state
    may hold tensors, numbers, strings, bools, None and lists, tuples and dicts of them.

    With ``async_save`` the state is copied to CPU memory now and written by a background
    thread while training goes on; the returned future completes when the checkpoint is in
    place (its ``result()`` raises CheckpointError where the save failed).
    """
    path = pathlib.Path(os.fspath(path))
    comm = _settle(optimizer)
    job, error = None, None
    try:
        job = _prepare_save(path, model, optimizer, scheduler, extra)
    except Exception as caught:
        error = caught
    agree(comm, error, f"saving {path}")
    staging = partial_path(path, _agree_token(comm))
    if not async_save:
        _write(job, staging, path, comm)
        return None
    writer = _writer_of(optimizer)
    return writer.executor.submit(_write, job.snapshot(), staging, path, writer.comm)


def _settle(optimizer: Any) -> Comm:
    """What a save or load starts with: an optimizer this format describes, its earlier background
    saves finished (saves and loads keep their order) and its parameter gathers done; its Comm.

    The format describes element ranges of flat buffers: the element-wise algorithms' state.
    Adafactor and Muon keep whole tensors' state on owner ranks, SparseAdam rows, LBFGS a history.
    """
    if not isinstance(optimizer, ShardedOptimizer):
        raise CheckpointError(
            f"sharded checkpoints of {type(optimizer).__name__} are not supported yet; use optimizer.state_dict() "
            "(torch.optim's format) with torch.save, and optimizer.load_state_dict() to resume"
        )
    _wait_for_pending(optimizer)
    optimizer.finish_param_gather()
    return optimizer._comm


def _prepare_save(
    path: pathlib.Path, model: nn.Module, optimizer: ShardedOptimizer, scheduler: Any, extra: dict[str, Any] | None
) -> _SaveJob:
    check_target(path)
    if extra is not None and not isinstance(extra, dict):
        raise CheckpointError(f"extra must be a dict, got {type(extra).__name__}")
    names = manifests.parameter_names(model, optimizer)
    model_state = manifests.model_state(model)
    encoder = Encoder()
    groups = state_format.pack(optimizer.param_groups, {})["param_groups"]
    encoded = {
        "param_groups": encoder.encode(groups, "optimizer.param_groups"),
        "scheduler": None if scheduler is None else encoder.encode(scheduler.state_dict(), "scheduler.state_dict()"),
        "extra": encoder.encode(extra or {}, "extra"),
    }
    manifest = manifests.build(model_state, optimizer, names, encoded)
    entries: dict[str, Any] = {manifests.model_key(key): value.detach() for key, value in model_state.items()}
    entries.update(_optimizer_entries(optimizer, names))
    if optimizer.rank == 0:  # the manifest's tensors, like the manifest, come from rank 0
        entries.update(encoder.tensors)
    return _SaveJob(entries, json.dumps(manifest, indent=1))


def _optimizer_entries(optimizer: ShardedOptimizer, names: list[list[str]]) -> dict[str, Any]:
    """This rank's DCP entries of optimizer state: its pieces of the element-wise state, and
    the scalar state (the same on every rank)."""
    entries: dict[str, Any] = {}
    for buffer in optimizer._buffers:
        pieces: dict[int, dict[int, slice]] = {}
        for piece in buffer.pieces:
            pieces.setdefault(piece.slot, {})[piece.in_param.start] = piece.in_shard.slice
        for position, slot in enumerate(buffer.layout.slots):
            if not buffer.initialized[position]:
                continue
            name = names[buffer.group_index][slot.index]
            for state_name, values in buffer.scalars.items():
                value = torch.tensor(values[position], dtype=optimizer._scalar_dtype)
                entries[manifests.state_key(name, state_name)] = value
            if slot.span.size == 0:  # nothing to store, and DCP cannot index a tensor no rank writes
                continue
            for state_name, shard in buffer.state.items():
                chunks = {offset: shard[where] for offset, where in pieces.get(position, {}).items()}
                entries[manifests.state_key(name, state_name)] = ShardChunks(slot.span.size, chunks)
        if buffer.master is None:
            continue
        for position, slot in enumerate(buffer.layout.slots):
            if slot.span.size:
                chunks = {offset: buffer.master[where] for offset, where in pieces.get(position, {}).items()}
                name = names[buffer.group_index][slot.index]
                entries[manifests.state_key(name, manifests.MASTER)] = ShardChunks(slot.span.size, chunks)
    return entries


def _agree_token(comm: Comm) -> int:
    """A random name for this save's staging directory, drawn by rank 0 and told to every rank."""
    token = torch.tensor([secrets.randbits(62)], dtype=torch.int64, device=comm.device)
    comm.broadcast_(token, "the broadcast of the checkpoint's staging name").wait()
    return int(token.item())


def _write(job: _SaveJob, staging: pathlib.Path, path: pathlib.Path, comm: Comm) -> None:
    error = None
    try:
        dcp.save(
            job.entries,
            storage_writer=dcp.FileSystemWriter(staging),
            planner=SavePlanner(),
            process_group=comm.group,
            no_dist=comm.group is None,
        )
    except DCP_ERRORS as caught:
        error = caught
    agree(comm, error, f"writing {staging}")
    if comm.rank == 0:
        try:
            write_file(staging / MANIFEST, job.manifest)
            publish(staging, path)
        except Exception as caught:
            error = caught
    agree(comm, error, f"publishing {path}")


@dataclass
class _AsyncWriter:
    """A background thread that writes an optimizer's checkpoints one after another, and a
    process group of its own, so its collectives never interleave with training's."""

    comm: Comm
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardopt-checkpoint")
    )


_WRITERS: weakref.WeakKeyDictionary[ShardedOptimizer, _AsyncWriter] = weakref.WeakKeyDictionary()


def _writer_of(optimizer: ShardedOptimizer) -> _AsyncWriter:
    """Collective the first time (it creates the process group)."""
    if optimizer not in _WRITERS:
        comm = optimizer._comm
        group = None
        if comm.group is not None:
            ranks = dist.get_process_group_ranks(comm.group)
            group = dist.new_group(ranks, backend="gloo", use_local_synchronization=True)
        _WRITERS[optimizer] = _AsyncWriter(Comm(group, comm.timeout))
    return _WRITERS[optimizer]


def _wait_for_pending(optimizer: ShardedOptimizer) -> None:
    """Let this optimizer's background saves finish first, so that saves and loads keep their order."""
    writer = _WRITERS.get(optimizer)
    if writer is not None:
        writer.executor.submit(lambda: None).result()


# ---------------------------------------------------------------------- load


@dataclass
class _Restore:
    """What a load reads (``entries``, filled in place by DCP) and where each part goes after."""

    manifest: dict[str, Any]
    reader: SafeReader
    entries: dict[str, Any] = field(default_factory=dict)
    model_state: dict[str, Tensor] = field(default_factory=dict)
    # Per buffer: its new state shards and, per slot, the scalar state read (None: no state).
    buffers: list[tuple[ShardedBuffer, dict[str, Tensor], list[dict[str, Tensor] | None]]] = field(default_factory=list)
    # Per buffer with master weights: the master shard read, and the pieces of it the checkpoint held.
    masters: list[tuple[ShardedBuffer, Tensor, list[Piece]]] = field(default_factory=list)

    def decoded(self, name: str) -> Any:
        return decode(self.manifest[name], lambda key, device: restore_device(self.entries[key], device))


def load(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: ShardedOptimizer,
    scheduler: Any = None,
) -> dict[str, Any]:
    """Load a checkpoint :func:`save` wrote, at any world size; returns its ``extra``.

    Collective. Each rank reads only the model state and its own shard of the optimizer
    state; parameters, optimizer state, param groups and the scheduler (if given) are
    restored. A checkpoint that is incomplete, corrupt or of another model raises
    CheckpointError on every rank, leaving the model and optimizer as they were.
    """
    path = pathlib.Path(os.fspath(path))
    comm = _settle(optimizer)
    restore, error = None, None
    try:
        restore = _prepare_load(path, model, optimizer, scheduler)
    except Exception as caught:
        error = caught
    agree(comm, error, f"loading {path}")
    try:
        dcp.load(
            restore.entries,
            storage_reader=restore.reader,
            planner=LoadPlanner(),
            process_group=comm.group,
            no_dist=comm.group is None,
        )
    except DCP_ERRORS as caught:
        error = caught
    agree(comm, error, f"reading {path}")
    _check_same_checkpoint(restore, comm, path)
    return _install(restore, model, optimizer, scheduler)


def _check_same_checkpoint(restore: _Restore, comm: Comm, path: pathlib.Path) -> None:
    """Collective: every rank read the same checkpoint. Ranks given different ones (two saves of
    one run have the same manifest) would install a mix; their manifests and scalars (step
    counts, scalar buffers), which every rank reads whole, tell them apart."""
    scalars = [t.item() for t in restore.entries.values() if isinstance(t, Tensor) and t.ndim == 0]
    read = fingerprint.stable_hash((json.dumps(restore.manifest, sort_keys=True), scalars))
    fingerprint.check(comm, [(f"the checkpoint loaded ({path})", read)], "checkpoint.load")


def _prepare_load(path: pathlib.Path, model: nn.Module, optimizer: ShardedOptimizer, scheduler: Any) -> _Restore:
    manifest = read_manifest(path)
    names = manifests.parameter_names(model, optimizer)
    current_model = manifests.model_state(model)
    manifests.check(manifest, current_model, optimizer, names, path)
    if scheduler is not None and manifest["scheduler"] is None:
        raise CheckpointError(f"{path} holds no scheduler state; load it without scheduler=")
    restore = _Restore(manifest, SafeReader(path))
    metadata = restore.reader.read_metadata()

    def expect(key: str, size: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> torch.Size:
        """The saved size of tensor ``key``, checked against what is expected of it."""
        saved = tensor_metadata(metadata, key, path)
        if size is not None and (tuple(saved.size), saved.properties.dtype) != (tuple(size), dtype):
            raise CheckpointError(
                f"{path}: {key!r} is {saved.properties.dtype} of shape {tuple(saved.size)} in the DCP metadata but "
                f"{dtype} of shape {tuple(size)} is expected: the checkpoint is corrupt"
            )
        return saved.size

    for key, value in current_model.items():
        expect(manifests.model_key(key), value.shape, value.dtype)
        restore.model_state[key] = restore.entries[manifests.model_key(key)] = torch.empty_like(value)
    for name in ("param_groups", "scheduler", "extra"):
        for key in tensor_keys(manifest[name]):
            restore.entries[key] = torch.empty(expect(key), dtype=metadata.state_dict_metadata[key].properties.dtype)
    groups = _groups(restore, optimizer, lambda key, device: restore.entries[key])
    starts = manifests.group_starts(optimizer.param_groups)
    algorithm = optimizer._algorithm
    for buffer in optimizer._buffers:
        group = groups[buffer.group_index]
        scalar_names, tensor_names = list(algorithm.scalar_state(group)), list(algorithm.tensor_state(group))
        shards = {name: torch.zeros_like(buffer.master_shard) for name in tensor_names}
        scalars: list[dict[str, Tensor] | None] = [None] * len(buffer.params)
        pieces: dict[int, list[Piece]] = {}
        for piece in buffer.pieces:
            pieces.setdefault(piece.slot, []).append(piece)
        for position, slot in enumerate(buffer.layout.slots):
            record = manifest["params"][starts[buffer.group_index] + slot.index]
            if not record["scalar_state"] and not record["tensor_state"]:
                continue
            if (record["scalar_state"], record["tensor_state"]) != (scalar_names, tensor_names):
                saved = record["scalar_state"] + record["tensor_state"]
                raise CheckpointError(
                    f"{path}: the state of parameter {record['name']!r} is {saved} but "
                    f"{algorithm.torch_class.__name__} with the checkpoint's keywords keeps "
                    f"{scalar_names + tensor_names}: the checkpoint is corrupt"
                )
            scalars[position] = {}
            for name in scalar_names:
                key = manifests.state_key(record["name"], name)
                expect(key, (), optimizer._scalar_dtype)
                scalars[position][name] = restore.entries[key] = torch.zeros((), dtype=optimizer._scalar_dtype)
            if slot.span.size == 0:
                continue
            for name in tensor_names:
                key = manifests.state_key(record["name"], name)
                expect(key, (slot.span.size,), buffer.master_shard.dtype)
                chunks = {p.in_param.start: shards[name][p.in_shard.slice] for p in pieces.get(position, [])}
                restore.entries[key] = ShardChunks(slot.span.size, chunks)
        restore.buffers.append((buffer, shards, scalars))
        if buffer.master is not None:
            _stage_master(restore, buffer, pieces, starts, expect)
    return restore


def _stage_master(
    restore: _Restore, buffer: ShardedBuffer, pieces: dict[int, list[Piece]], starts: list[int], expect: Any
) -> None:
    """Stage the read of ``buffer``'s master shard, for the parameters the checkpoint has master weights of
    (a checkpoint of a run without them leaves the master weights to come from the loaded parameters)."""
    master, saved = torch.zeros_like(buffer.master), []
    for position, slot in enumerate(buffer.layout.slots):
        record = restore.manifest["params"][starts[buffer.group_index] + slot.index]
        if not record.get("master") or slot.span.size == 0:
            continue
        key = manifests.state_key(record["name"], manifests.MASTER)
        expect(key, (slot.span.size,), master.dtype)
        restore.entries[key] = ShardChunks(
            slot.span.size, {p.in_param.start: master[p.in_shard.slice] for p in pieces.get(position, [])}
        )
        saved += pieces.get(position, [])
    restore.masters.append((buffer, master, saved))


def _groups(restore: _Restore, optimizer: ShardedOptimizer, tensor: Any) -> list[dict[str, Any]]:
    """The optimizer's param groups with the checkpoint's hyper-parameters, checked as
    ``load_state_dict`` checks them."""
    saved = decode(restore.manifest["param_groups"], tensor)
    groups, _, _ = state_format.unpack({"state": {}, "param_groups": saved}, optimizer.param_groups, optimizer.defaults)
    for g, group in enumerate(groups):
        optimizer._check_group(group, g)
    return groups


def _install(restore: _Restore, model: nn.Module, optimizer: ShardedOptimizer, scheduler: Any) -> dict[str, Any]:
    """The last phase: everything was read and checked; put it in place."""
    optimizer.param_groups[:] = _groups(
        restore, optimizer, lambda key, device: restore_device(restore.entries[key], device)
    )
    for buffer, shards, scalars in restore.buffers:
        state_format.install_buffer_state(buffer, shards, scalars)
    # Parameters are views of the flat buffers: load_state_dict copies into them.
    model.load_state_dict(restore.model_state)
    for buffer in optimizer._buffers:
        buffer.reset_master()
    for buffer, master, saved in restore.masters:
        for piece in saved:
            buffer.master[piece.in_shard.slice] = master[piece.in_shard.slice]
    if scheduler is not None:
        scheduler.load_state_dict(restore.decoded("scheduler"))
    return restore.decoded("extra")
