"""Checkpoint loading never executes pickled code (see test_checkpoint) and never follows a path
from the checkpoint's metadata out of its directory."""

from __future__ import annotations

import dataclasses
import pathlib
import pickle

import pytest

import shardopt
from shardopt import checkpoint
from shardopt.checkpoint import CheckpointError
from tests.common import flat_params, make_model


@pytest.mark.parametrize("escape", ["../outside.distcp", "/etc/passwd", "sub/dir.distcp"])
def test_metadata_paths_never_leave_the_checkpoint_directory(tmp_path: pathlib.Path, escape: str) -> None:
    model = make_model()
    checkpoint.save(tmp_path / "ckpt", model=model, optimizer=shardopt.Adam(model.parameters(), lr=1e-2))
    (tmp_path / "outside.distcp").write_bytes(b"\0" * 10_000)  # something to read, were it followed
    metadata_file = tmp_path / "ckpt" / ".metadata"
    # The test's own file: plain pickle is fine here; the loader reads it with its allow-list.
    metadata = pickle.loads(metadata_file.read_bytes())
    for key, info in metadata.storage_data.items():
        metadata.storage_data[key] = dataclasses.replace(info, relative_path=escape)
    metadata_file.write_bytes(pickle.dumps(metadata))
    fresh = make_model(seed=1)
    before = flat_params(fresh)
    with pytest.raises(CheckpointError, match="points outside the checkpoint"):
        checkpoint.load(tmp_path / "ckpt", model=fresh, optimizer=shardopt.Adam(fresh.parameters(), lr=1e-2))
    assert flat_params(fresh).equal(before)
