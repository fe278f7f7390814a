"""Sharded save and load: every rank writes and reads only the state it owns, at any world size.

Both are collective, in three phases each rank passes together::

    save: check and encode everything (agree) -> DCP writes each rank's part into
          <path>.partial-<token> (agree) -> rank 0 writes the manifest and marker and
          renames the directory into place (agree)
    load: read the manifest and DCP metadata, check them against the model and optimizers,
          stage the tensors to read (agree) -> DCP reads into the staged tensors (agree)
          -> install them

Each "agree" makes a failure on any rank an error on every rank, and nothing of the
model or optimizers changes before the last phase. ``optimizer=`` is one optimizer or a
list of them (``scheduler=`` likewise); how each one's state is sharded is its :class:`Part`'s
business (part.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
import shutil
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException

from ..collectives import fingerprint
from ..collectives.comm import Comm
from ..elements.optimizer import ElementOptimizer
from . import manifest as manifests
from .background import AsyncWriter
from .by_elements import ElementPart
from .by_owner import OwnerPart
from .by_rows import RowPart
from .by_slices import SlicePart
from .chunks import LoadPlanner, SavePlanner, ShardChunks
from .encoding import TENSOR_PREFIX, Encoder, decode, restore_device, tensor_keys
from .errors import CheckpointError, agree
from .part import Part, Staging, listed
from .storage import (
    MANIFEST,
    REPLACED,
    SafeReader,
    check_target,
    leftovers,
    out_of_space,
    partial_path,
    pinned,
    publish,
    through_links,
    write_file,
)

# Without a process group DCP warns on every call that it saves or loads in one process; that is
# what a world of one means here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

DCP_ERRORS = (Exception, CheckpointException)  # DCP's exception is a BaseException
# Reads of a checkpoint that a save replaced meanwhile (storage.Pinned): the next read finds the new one.
READ_ATTEMPTS = 3
PARTS: tuple[type[Part], ...] = (ElementPart, OwnerPart, RowPart, SlicePart)

#: ``optimizer=``: one optimizer, or a list or tuple of them (``scheduler=``: one per optimizer).
Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer]


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

    def bytes_of(self, world_size: int) -> int:
        """About how many bytes this rank writes: its chunks, and its share of the whole tensors."""
        total = 0
        for value in self.entries.values():
            if isinstance(value, ShardChunks):
                total += sum(t.numel() * t.element_size() for t in value.chunks.values())
            else:
                total += value.numel() * value.element_size() // world_size
        return total + len(self.manifest)


def save(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: Optimizers,
    scheduler: Any = None,
    extra: dict[str, Any] | None = None,
    async_save: bool = False,
) -> Future[None] | None:
    """Save the model, the optimizers' sharded state, the schedulers and ``extra`` to directory ``path``.

    Collective: every rank calls it, and writes only the optimizer state it holds (the model's
    state, the same on every rank, is spread over the ranks and written once). ``optimizer`` is
    one shardopt optimizer or a list/tuple of them (Muon + AdamW), ``scheduler`` one, a list of
    one per optimizer (None where one has none), or None. ``path`` is replaced only once the
    new checkpoint is complete. ``extra`` and the schedulers' state may hold tensors, numbers,
    strings, bools, None and lists, tuples and dicts of them.

    With ``async_save`` the state is copied to CPU memory now and written by a background
    thread while training goes on; the returned future completes when the checkpoint is in
    place (its ``result()`` raises CheckpointError where the save failed).
    """
    path = through_links(pathlib.Path(os.fspath(path)))
    optimizers, schedulers = listed(optimizer, scheduler)
    with _settled(optimizers, "checkpoint.save") as (comm, parts):
        for part in parts:
            part.exchange()
        job, error = None, None
        try:
            job = _prepare_save(path, model, parts, schedulers, extra, comm)
        except Exception as caught:
            error = caught
        agree(comm, error, f"saving {path}")
        staging = partial_path(path, _agree_token(comm))
        if not async_save:
            _write(job, staging, path, comm)
            return None
        snapshot = job.snapshot()
        return _writer_of(optimizers[0]).submit(str(path), lambda comm: _write(snapshot, staging, path, comm))


@contextlib.contextmanager
def _settled(optimizers: list[Any], call: str) -> Iterator[tuple[Comm, list[Part]]]:
    """The block holds a save or load (``call``): it starts with optimizers this format describes,
    on one process group, their earlier background saves finished (saves and loads keep their
    order), their parameter gathers done, and every rank found in this call after as many step()
    calls; it gets the group's Comm and each optimizer's Part, and each optimizer leaves the call
    with it, whether it returns or raises."""
    parts = []
    for position, optimizer in enumerate(optimizers):
        kind = next((kind for kind in PARTS if isinstance(optimizer, kind.serves)), None)
        if kind is None:
            where = "optimizer=" if len(optimizers) == 1 else f"optimizer=[...][{position}]"
            raise CheckpointError(
                f"{where} is a {type(optimizer).__module__}.{type(optimizer).__qualname__}, whose state sharded "
                "checkpoints cannot hold: pass a shardopt.ShardedOptimizer; save another optimizer's state_dict() "
                "with torch.save"
            )
        parts.append(kind(optimizer, position))
    comm = optimizers[0].comm
    for position, optimizer in enumerate(optimizers):
        if (optimizer.comm.rank, optimizer.comm.world_size) != (comm.rank, comm.world_size):
            raise CheckpointError(
                f"optimizer {position} runs on a process group other than optimizer 0's (rank "
                f"{optimizer.comm.rank} of {optimizer.comm.world_size} vs {comm.rank} of {comm.world_size}); "
                "the optimizers of one checkpoint must share their process group"
            )
    with contextlib.ExitStack() as calls:
        for optimizer in optimizers:
            _wait_for_pending(optimizer)
            if isinstance(optimizer, ElementOptimizer):
                optimizer.finish_param_gather()
            calls.enter_context(optimizer.comm.call(call, agree=True))
        yield comm, parts


def _prepare_save(
    path: pathlib.Path,
    model: nn.Module,
    parts: list[Part],
    schedulers: list[Any],
    extra: dict[str, Any] | None,
    comm: Comm,
) -> _SaveJob:
    check_target(path)
    if extra is not None and not isinstance(extra, dict):
        raise CheckpointError(f"extra must be a dict, got {type(extra).__name__}")
    model_state = manifests.model_state(model)
    encoder = Encoder()
    entries: dict[str, Any] = {manifests.model_key(key): value.detach() for key, value in model_state.items()}
    records = []
    for part, scheduler in zip(parts, schedulers):
        names = manifests.parameter_names(model, part.optimizer)
        records.append(part.record(names, encoder, scheduler))
        entries.update(part.entries(names))
    manifest = manifests.build(model_state, comm.world_size, records, encoder.encode(extra or {}, "extra"))
    if comm.rank == 0:  # the manifest's tensors, like the manifest, come from rank 0
        entries.update(encoder.tensors)
    return _SaveJob(entries, json.dumps(manifest, indent=1))


def _dcp(
    comm: Comm,
    what: str,
    call: Callable[..., Any],
    entries: dict[str, Any],
    explain: Callable[[BaseException], BaseException] = lambda error: error,
    **io: Any,
) -> None:
    """Collective: DCP's ``save`` or ``load`` (``call``) of ``entries`` with storage and planner
    ``io`` on ``comm``'s group; where it failed on any rank, every rank raises CheckpointError
    saying it failed at ``what`` (with the message ``explain`` gives the lowest failing rank's error)."""
    error = None
    try:
        call(entries, process_group=comm.group, no_dist=comm.group is None, **io)
    except DCP_ERRORS as caught:
        error = explain(caught)
    agree(comm, error, what)


def _agree_token(comm: Comm) -> int:
    """A random name for this save's staging directory, drawn by rank 0 and told to every rank."""
    token = torch.tensor([secrets.randbits(62)], dtype=torch.int64, device=comm.device)
    comm.broadcast_(token, "the broadcast of the checkpoint's staging name").wait()
    return int(token.item())


def _write(job: _SaveJob, staging: pathlib.Path, path: pathlib.Path, comm: Comm) -> None:
    """Collective: write ``job`` into ``staging`` and publish it at ``path``. Where that fails, every rank
    raises, and what the save wrote is removed, so that a failed save (a full disk) leaves no staging
    directory to fill the disk for the next one."""
    try:
        _dcp(
            comm,
            f"writing {staging}",
            dcp.save,
            job.entries,
            explain=lambda error: _out_of_space(error, staging, job.bytes_of(comm.world_size), comm.rank),
            storage_writer=dcp.FileSystemWriter(staging),
            planner=SavePlanner(),
        )
        error = None
        if comm.rank == 0:
            try:
                write_file(staging / MANIFEST, job.manifest)
                publish(staging, path)
            except Exception as caught:
                error = caught
        agree(comm, error, f"publishing {path}")
    except Exception as failed:  # a CheckpointError; or, in the background, the process group destroyed under it
        shutil.rmtree(staging, ignore_errors=True)  # on every rank: staging may be on each node's own disk
        if isinstance(failed, CheckpointError):
            raise CheckpointError(f"{failed}{leftovers(path, staging)}") from failed
        raise


def _out_of_space(error: BaseException, staging: pathlib.Path, needed: int, rank: int) -> BaseException:
    """``error``, or where the disk is full (DCP then says e.g. "unexpected pos 704 vs 598"), a
    CheckpointError saying so."""
    message = out_of_space(staging, rank, needed)
    return error if message is None else CheckpointError(message)


_WRITERS: weakref.WeakKeyDictionary[Any, AsyncWriter] = weakref.WeakKeyDictionary()


def _writer_of(optimizer: Any) -> AsyncWriter:
    """Collective the first time (it creates the process group)."""
    if optimizer not in _WRITERS:
        _WRITERS[optimizer] = AsyncWriter.over(optimizer.comm)
    return _WRITERS[optimizer]


def _wait_for_pending(optimizer: Any) -> None:
    """Let this optimizer's background saves finish first, so that saves and loads keep their order."""
    writer = _WRITERS.get(optimizer)
    if writer is not None:
        writer.wait()


# ---------------------------------------------------------------------- load


@dataclass
class _Restore:
    """What a load reads (``staging.entries``, filled in place by DCP) and where the model's part goes."""

    manifest: dict[str, Any]
    reader: SafeReader
    staging: Staging
    model_state: dict[str, Tensor] = field(default_factory=dict)

    def tensor(self, key: str, device: str) -> Tensor:
        """A tensor of the manifest, as read, on the device it was saved from."""
        return restore_device(self.staging.entries[key], device)


def load(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: Optimizers,
    scheduler: Any = None,
) -> dict[str, Any]:
    """Load a checkpoint :func:`save` wrote, at any world size; returns its ``extra``.

    Collective. Each rank reads only the model state and the optimizer state it will hold;
    parameters, optimizer state, param groups and the schedulers (if given) are restored.
    ``optimizer`` and ``scheduler`` are given as to :func:`save`: the same optimizers, in the
    same order. A checkpoint that is incomplete, corrupt, of another model or of other
    algorithms raises CheckpointError on every rank, leaving the model and optimizers as they were.
    """
    path = pathlib.Path(os.fspath(path))
    optimizers, schedulers = listed(optimizer, scheduler)
    with _settled(optimizers, "checkpoint.load") as (comm, parts):
        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                restore = _read(path, model, parts, schedulers, comm)
                break
            except CheckpointError as error:
                # The message is the lowest failing rank's on every rank: all retry, or none does.
                if REPLACED not in str(error) or attempt == READ_ATTEMPTS:
                    raise
        return _install(restore, model, parts, schedulers)


def _read(path: pathlib.Path, model: nn.Module, parts: list[Part], schedulers: list[Any], comm: Comm) -> _Restore:
    """Collective: read and check the checkpoint at ``path`` (one directory, held open), changing nothing."""
    with pinned(path) as held:
        restore, error = None, None
        try:
            restore = _prepare_load(held.directory, model, parts, schedulers)
        except Exception as caught:
            error = held.named(caught)
        agree(comm, error, f"loading {path}")
        _dcp(
            comm,
            f"reading {path}",
            dcp.load,
            restore.staging.entries,
            explain=held.named,
            storage_reader=restore.reader,
            planner=LoadPlanner(),
        )
        _check_same_checkpoint(restore, comm, path)
        return restore


def _check_same_checkpoint(restore: _Restore, comm: Comm, path: pathlib.Path) -> None:
    """Collective: every rank read the same checkpoint. Ranks given different ones (two saves of
    one run have the same manifest) would install a mix; their manifests and scalars (step
    counts, scalar buffers), which every rank reads whole, tell them apart."""
    scalars = [t.item() for t in restore.staging.entries.values() if isinstance(t, Tensor) and t.ndim == 0]
    read = fingerprint.stable_hash((json.dumps(restore.manifest, sort_keys=True), scalars))
    fingerprint.check(comm, [(f"the checkpoint loaded ({path})", read)], "checkpoint.load")


def _prepare_load(path: pathlib.Path, model: nn.Module, parts: list[Part], schedulers: list[Any]) -> _Restore:
    manifest = manifests.read(path)
    current_model = manifests.model_state(model)
    names = [manifests.parameter_names(model, part.optimizer) for part in parts]
    fits = [(part.algorithm, part.optimizer.param_groups, n) for part, n in zip(parts, names)]
    manifests.check(manifest, current_model, fits, path)
    records = manifest["optimizers"]
    for position, (record, scheduler) in enumerate(zip(records, schedulers)):
        if scheduler is not None and record["scheduler"] is None:
            where = "" if len(records) == 1 else f" for optimizer {position}"
            raise CheckpointError(f"{path} holds no scheduler state{where}; load it without that scheduler=")
    reader = SafeReader(path)
    restore = _Restore(manifest, reader, Staging(path, reader.read_metadata()))
    staging = restore.staging
    for key, value in current_model.items():
        restore.model_state[key] = staging.read(manifests.model_key(key), torch.empty_like(value))
    for key in tensor_keys(manifests.encoded_values(manifest)):
        if key.startswith(TENSOR_PREFIX):  # every rank reads the manifest's own tensors
            size, dtype = staging.saved(key)
            # Zeros, not empty: the hyper-parameters are checked (a tensor lr >= 0) before they are read.
            staging.entries[key] = torch.zeros(size, dtype=dtype)
    for part, record in zip(parts, records):
        part.stage(record, part.groups(record, lambda key, device: staging.entries[key]), staging)
    return restore


def _install(restore: _Restore, model: nn.Module, parts: list[Part], schedulers: list[Any]) -> dict[str, Any]:
    """The last phase: everything was read and checked; put it in place."""
    model.load_state_dict(restore.model_state)
    records = restore.manifest["optimizers"]
    for part, record in zip(parts, records):
        part.install(part.groups(record, restore.tensor), restore.tensor)
    for scheduler, record in zip(schedulers, records):
        if scheduler is not None:
            scheduler.load_state_dict(decode(record["scheduler"], restore.tensor))
    return decode(restore.manifest["extra"], restore.tensor)
