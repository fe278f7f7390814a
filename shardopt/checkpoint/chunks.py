"""This rank's chunks of a 1-D tensor, and the DCP planners that save and load them.

A parameter's element-wise optimizer state is checkpointed as one 1-D tensor of the
parameter's numel; each rank holds only the pieces its shard covers, at their offsets
in the parameter. DCP asks objects that are not plain tensors for their write items,
their chunk list and a chunk's tensor (the duck-typed protocol DTensor implements:
``__create_write_items__``, ``__create_chunk_list__``, ``__get_tensor_shard__``), so
saving writes only the owned pieces and loading, at any world size, reads only the
elements of the pieces a rank will own, wherever the saving ranks cut them.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import Tensor
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import ReadItem, TensorWriteData, WriteItem, WriteItemType

from .errors import CheckpointError


class ShardChunks:
    """Some chunks of a 1-D tensor of ``numel`` elements: ``{offset: 1-D tensor}``.

    On save the tensors are what is written; on load they are where the elements read
    go (views into the state shard being filled).
    """

    def __init__(self, numel: int, chunks: dict[int, Tensor]) -> None:
        for offset, chunk in chunks.items():
            if chunk.dim() != 1 or not 0 <= offset <= offset + chunk.numel() <= numel:
                raise ValueError(f"chunk at {offset} of {chunk.numel()} elements is outside [0, {numel})")
        self.numel = numel
        self.chunks = chunks

    def size(self) -> torch.Size:
        # DCP's load planner compares this with the saved tensor's size.
        return torch.Size([self.numel])

    def _chunk(self, offset: int, tensor: Tensor) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(offsets=torch.Size([offset]), sizes=torch.Size([tensor.numel()]))

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [
            WriteItem(
                index=MetadataIndex(fqn, [offset]),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=self._chunk(offset, tensor),
                    properties=TensorProperties.create_from_tensor(tensor),
                    size=self.size(),
                ),
            )
            for offset, tensor in self.chunks.items()
        ]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [self._chunk(offset, tensor) for offset, tensor in self.chunks.items()]

    def __get_tensor_shard__(self, index: MetadataIndex) -> Tensor:
        return self.chunks[index.offset[0]]


def _lookup(state_dict: dict[str, Any], index: MetadataIndex) -> Any:
    obj = state_dict.get(index.fqn)
    # DCP's own lookup hands only torch.Tensor instances their chunk by offset.
    if isinstance(obj, ShardChunks):
        return obj.__get_tensor_shard__(index)
    return None


class SavePlanner(DefaultSavePlanner):
    """DCP's default save planner, which also finds the chunks of a :class:`ShardChunks`."""

    def lookup_object(self, index: MetadataIndex) -> Any:
        found = _lookup(self.state_dict, index)
        return found if found is not None else super().lookup_object(index)


class LoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, which also fills :class:`ShardChunks` and never unpickles.

    DCP loads a non-tensor entry with ``torch.load(weights_only=False)``; shardopt
    checkpoints hold tensors only, so such an entry is refused instead.
    """

    def set_up_planner(self, state_dict: dict[str, Any], metadata: Any = None, is_coordinator: bool = False) -> None:
        # DCP's set-up (materialising meta tensors) replaces objects it does not know with None:
        # keep ours out of its way. They sit at the top level, where flattening keeps their keys.
        chunks = {key: value for key, value in state_dict.items() if isinstance(value, ShardChunks)}
        super().set_up_planner(state_dict, metadata, is_coordinator)
        state_dict.update(chunks)
        self.state_dict.update(chunks)

    def lookup_tensor(self, index: MetadataIndex) -> Tensor:
        found = _lookup(self.state_dict, index)
        return found if found is not None else super().lookup_tensor(index)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise CheckpointError(
            f"the checkpoint stores {read_item.storage_index.fqn!r} as a pickled object; shardopt checkpoints "
            "hold tensors only and never unpickle objects"
        )
