"""A checkpoint on disk: its files, how a save becomes visible, and how one is read safely.

A checkpoint is a directory::

    path/
        .metadata            DCP's index of every tensor chunk (pickled by DCP)
        __<rank>_<n>.distcp  the chunks each rank wrote
        shardopt.json        our manifest: hyper-parameters, model fingerprint, scheduler, extra
        COMPLETE             written last: the save finished

Ranks write into a sibling ``<path>.partial-<token>`` that rank 0 renames into place once
the marker is there, so ``path`` is always either the previous checkpoint or the new one
(where the filesystem cannot swap two directories atomically, it is missing for the moment
between two renames, and load's error then names the siblings), and an interrupted save is
a ``.partial-`` directory without a marker.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import json
import os
import pathlib
import pickle
import shutil
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.futures import Future

from .errors import CheckpointError, describe

MANIFEST = "shardopt.json"
MARKER = "COMPLETE"
DCP_METADATA = ".metadata"
PARTIAL = ".partial-"
REPLACED = "was replaced by a newer checkpoint while it was read"


def partial_path(path: pathlib.Path, token: int) -> pathlib.Path:
    return path.with_name(f"{path.name}{PARTIAL}{token:016x}")


def partial_siblings(path: pathlib.Path) -> list[pathlib.Path]:
    """Directories interrupted saves to ``path`` left behind."""
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name + PARTIAL))


def through_links(path: pathlib.Path) -> pathlib.Path:
    """Where a save to ``path`` goes: what a symlink at ``path`` names (the save replaces that
    directory, as writing through a link to a file replaces the file), else ``path``. The staging
    directory is then the target's sibling, on its filesystem, and the link is never moved or deleted."""
    return path.resolve() if path.is_symlink() else path


def leftovers(path: pathlib.Path, but: pathlib.Path) -> str:
    """What earlier interrupted saves to ``path`` left (other than ``but``), and how to reclaim it."""
    found = [p for p in partial_siblings(path) if p != but]
    if not found:
        return ""
    size = sum(f.stat().st_size for p in found for f in p.rglob("*") if f.is_file())
    names = ", ".join(p.name for p in found)
    return f"; interrupted saves left {names} next to it ({size / 2**20:.1f} MB): delete them"


def out_of_space(directory: pathlib.Path, rank: int, needed: int) -> str | None:
    """The message of a write that failed for want of space: the filesystem of ``directory`` has less
    free space than the ``needed`` bytes this rank writes; None where it has enough (another failure)."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return None
    if free >= needed:
        return None
    written = sorted(directory.glob(f"__{rank}_*"))  # DCP's names for this rank's files
    file = written[-1] if written else directory
    return (
        f"no space left on device while writing {file} (needed about {max(needed / 2**20, 0.1):.1f} MB, "
        f"{free / 2**20:.1f} MB free): free some space or save elsewhere"
    )


def check_target(path: pathlib.Path) -> None:
    """Refuse to replace anything at ``path`` but a complete checkpoint."""
    if path.exists() and not (path / MARKER).is_file():
        raise CheckpointError(
            f"{path} exists and is not a complete shardopt checkpoint (no {MARKER} marker in it); "
            "save refuses to replace it: choose another path or remove it"
        )


def write_file(path: pathlib.Path, text: str) -> None:
    """Write ``text`` to ``path`` and flush it to the disk."""
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def _fsync_directory(path: pathlib.Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def publish(staging: pathlib.Path, path: pathlib.Path) -> None:
    """Mark the fully written ``staging`` complete and move it to ``path``, replacing what is there.

    ``path`` holds the previous checkpoint until one atomic rename: an exchange of the two
    directories where the filesystem offers one (Linux ``renameat2``), else a rename of the
    old aside (to ``<staging>-old``) followed by a rename of the new.
    """
    write_file(staging / MARKER, "")
    _fsync_directory(staging)
    if not path.exists():
        os.rename(staging, path)
    elif _exchange(staging, path):
        # The old checkpoint is now at ``staging``: unmark it before deleting, so a crash
        # midway leaves a directory recognisably incomplete.
        (staging / MARKER).unlink()
        shutil.rmtree(staging)
    else:
        # Between these renames ``path`` is missing; both siblings are complete checkpoints.
        old = staging.with_name(staging.name + "-old")
        os.rename(path, old)
        os.rename(staging, path)
        (old / MARKER).unlink()
        shutil.rmtree(old)
    _fsync_directory(path.parent)


def is_complete(path: pathlib.Path) -> bool:
    """Whether ``path`` holds a checkpoint whose save completed (its marker is written last)."""
    return (path / MARKER).is_file()


class Pinned:
    """The directory ``path`` names, held open while a checkpoint is read from it (on Linux, through
    ``/proc/self/fd/<n>``): a save that publishes a newer checkpoint at ``path`` meanwhile cannot make
    the read a mix of the two. The old directory's files it deletes are then missing: an error, which
    says so. Where /proc is not there (not Linux), ``path`` itself is read."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path, self.directory = path, path
        self._descriptor: int | None = None
        try:
            self._descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:  # missing, or not a directory: read_manifest says so
            return
        held = pathlib.Path(f"/proc/self/fd/{self._descriptor}")
        if held.is_dir():
            self.directory = held

    def named(self, error: BaseException) -> CheckpointError:
        """``error`` as a CheckpointError that names ``path`` rather than the held directory, and says
        where a newer checkpoint replaced it during the read."""
        message = describe(error).replace(str(self.directory), str(self.path))
        if self._descriptor is not None and self._replaced():
            message = f"{self.path} {REPLACED} ({message}); load it again"
        return CheckpointError(message)

    def _replaced(self) -> bool:
        assert self._descriptor is not None
        held = os.fstat(self._descriptor)
        try:
            now = os.stat(self.path)
        except OSError:
            return True
        return (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino)

    def close(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None


@contextlib.contextmanager
def pinned(path: pathlib.Path) -> Iterator[Pinned]:
    """The block reads the checkpoint at ``path`` from ``.directory`` of what it gets (:class:`Pinned`)."""
    held = Pinned(path)
    try:
        yield held
    finally:
        held.close()


def read_manifest(path: pathlib.Path) -> dict[str, Any]:
    """The manifest of the complete checkpoint at ``path``; CheckpointError if there is none."""
    if not path.is_dir():
        partials = partial_siblings(path)
        hint = f"; interrupted saves left {', '.join(p.name for p in partials)}" if partials else ""
        raise CheckpointError(f"{path} is not a checkpoint directory (it does not exist or is a file){hint}")
    if not (path / MARKER).is_file():
        raise CheckpointError(
            f"{path} is an incomplete checkpoint: it has no {MARKER} marker, so the save that wrote it was "
            "interrupted or failed; load the previous checkpoint and delete this directory"
        )
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{manifest_path} cannot be read as JSON ({error}): the checkpoint is corrupt") from error
    if not isinstance(manifest, dict) or manifest.get("format") != "shardopt.checkpoint":
        raise CheckpointError(f"{manifest_path} is not a shardopt checkpoint manifest")
    return manifest


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata, and nothing else: only the classes it is made of."""

    ALLOWED = {
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    } | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # a lookup of torch.strided & co by name
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
    }

    def __init__(self, file: Any, path: pathlib.Path) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        # dtypes pickle as attributes of torch ("torch.float32").
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(
            f"{self._path} asks to unpickle {module}.{name}, which DCP metadata never contains; "
            "refusing to load it (the file is corrupt or was crafted to run code)"
        )


class SafeReader(FileSystemReader):
    """DCP's file reader with its metadata unpickled by an allow-list and each file's errors
    named; reading the metadata also checks that every file it points to is whole."""

    def __init__(self, path: pathlib.Path) -> None:
        super().__init__(path)
        self._metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            self._metadata = self._load_metadata()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata

    def _load_metadata(self) -> Metadata:
        path = pathlib.Path(self.path) / DCP_METADATA
        try:
            with open(path, "rb") as file:
                metadata = _MetadataUnpickler(file, path).load()
        except CheckpointError:
            raise
        except Exception as error:
            raise CheckpointError(f"{path} cannot be read ({type(error).__name__}: {error}): it is corrupt") from error
        if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
            raise CheckpointError(f"{path} does not hold DCP checkpoint metadata: it is corrupt")
        if metadata.storage_meta is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        self._check_files(metadata.storage_data.values())
        return metadata

    def _check_files(self, infos: Iterable[_StorageInfo]) -> None:
        """Every data file exists and reaches past the last byte the metadata puts in it."""
        ends: dict[str, int] = {}
        for info in infos:
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
        for relative, end in sorted(ends.items()):
            file = pathlib.Path(self.path) / relative
            if file.parent != pathlib.Path(self.path):
                raise CheckpointError(f"{self.path}/{DCP_METADATA} points outside the checkpoint, to {relative!r}")
            if not file.is_file():
                raise CheckpointError(f"{file} is missing: the checkpoint is incomplete or was partly deleted")
            size = file.stat().st_size
            if size < end:
                raise CheckpointError(
                    f"{file} is truncated: it has {size} bytes but the checkpoint's metadata needs {end}"
                )

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        # One file at a time, so that a failure names the file.
        by_file: dict[str, list[Any]] = {}
        for item in plan.items:
            by_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for relative, items in by_file.items():
            try:
                super().read_data(dataclasses.replace(plan, items=items), planner).wait()
            except CheckpointError:
                raise
            except pickle.UnpicklingError as error:
                # torch.load's own message here advises weights_only=False: not for a corrupt file.
                raise CheckpointError(
                    f"{pathlib.Path(self.path) / relative} is corrupt: its bytes are not the tensors the "
                    "checkpoint's metadata describes"
                ) from error
            except Exception as error:
                first_line = str(error).strip().split("\n")[0]
                raise CheckpointError(
                    f"{pathlib.Path(self.path) / relative} is corrupt or unreadable: reading it failed "
                    f"({type(error).__name__}: {first_line})"
                ) from error
        done: Future[None] = Future()
        done.set_result(None)
        return done


def tensor_metadata(metadata: Metadata, key: str, where: pathlib.Path) -> TensorStorageMetadata:
    """The saved size and dtype of tensor ``key``; CheckpointError if it is absent or not a tensor."""
    found = metadata.state_dict_metadata.get(key)
    if not isinstance(found, TensorStorageMetadata):
        problem = "is missing" if found is None else "is not stored as a tensor"
        raise CheckpointError(f"{where}: {key!r} {problem} in the checkpoint's DCP metadata: it is corrupt")
    return found
