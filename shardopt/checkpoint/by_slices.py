"""``ShardedLBFGS``'s state in a checkpoint: slices of one flat vector of all parameters.

torch's LBFGS keeps all its state under the first parameter: vectors of the flat parameter
vector's length (``d``, ``prev_flat_grad``, each history pair in ``old_dirs``/``old_stps``),
of which each rank holds one slice, and numbers, the same on every rank (``n_iter``, ``t``,
``ro``, ``H_diag``, ...). The entry goes into the manifest in torch's key order, each vector
replaced by a reference to its DCP tensor (1-D, of the flat length), which every rank writes
its slice of and reads, at any world size, its new slice of. The history's Gram matrices (m x m,
the same on every rank) go into the manifest too, under ``"gram"``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..slices.optimizer import VECTOR_LISTS, VECTORS, ShardedLBFGS
from .encoding import TENSOR_PREFIX, Encoder, Stored, decode, tensor_keys
from .part import Part, Staging, TensorLookup, chunk_of


class SlicePart(Part):
    serves = (ShardedLBFGS,)

    def _references(self, first_name: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """This rank's state entry with each vector replaced by a reference to its DCP key, and the
        vectors (this rank's slices) by key; an empty entry where there is no state yet."""
        first = self.optimizer.param_groups[0]["params"][0]
        entry = self.optimizer.shard_state.get(first) or {}
        references: dict[str, Any] = {}
        vectors: dict[str, Tensor] = {}

        def reference(key: str, vector: Tensor) -> Stored:
            vectors[key] = vector
            return Stored(key, str(vector.device))

        for name, value in entry.items():
            if name in VECTORS and value is not None:  # None: no iteration has run
                references[name] = reference(self.key(first_name, name), value)
            elif name in VECTOR_LISTS and value is not None:
                references[name] = [reference(self.key(first_name, f"{name}.{i}"), v) for i, v in enumerate(value)]
            else:
                references[name] = value
        return references, vectors

    def record(self, names: list[list[str]], encoder: Encoder, scheduler: Any) -> dict[str, Any]:
        record = super().record(names, encoder, scheduler)
        # Rebuilt on load to rounding only: saved, a resumed run takes the uninterrupted run's numbers.
        gram = self.optimizer.gram()
        if gram is not None:
            record["gram"] = encoder.encode(list(gram), "the LBFGS history's Gram matrices")
        return record

    def encoded_state(self, names: list[list[str]], encoder: Encoder) -> Any:
        references, _ = self._references(names[0][0])
        return encoder.encode({0: references}, "the LBFGS state") if references else None

    def entries(self, names: list[list[str]]) -> dict[str, Any]:
        flat = self.optimizer.flat
        _, vectors = self._references(names[0][0])
        return {key: chunk_of(flat.numel, flat.start, v[: flat.stop - flat.start]) for key, v in vectors.items()}

    def check_group(self, group: dict[str, Any], g: int) -> None:
        """Nothing beyond the count of groups and parameters: torch's LBFGS checks no more on load."""

    def stage(self, record: dict[str, Any], groups: list[dict[str, Any]], staging: Staging) -> None:
        """Stage this rank's slice of every vector the saved entry refers to (the numbers in it are
        the manifest's, which every rank reads)."""
        self._encoded, self._gram = record.get("state"), record.get("gram")
        self._slices: dict[str, Tensor] = {}
        flat = self.optimizer.flat
        for key in tensor_keys(self._encoded):
            if key.startswith(TENSOR_PREFIX):
                continue
            piece = torch.zeros(flat.length, dtype=flat.dtype, device=flat.device)  # padded, as the slices are
            staging.read(
                key, chunk_of(flat.numel, flat.start, piece[: flat.stop - flat.start]), (flat.numel,), flat.dtype
            )
            self._slices[key] = piece

    def install(self, groups: list[dict[str, Any]], tensor: TensorLookup) -> None:
        def lookup(key: str, device: str) -> Tensor:
            return self._slices[key] if key in self._slices else tensor(key, device)

        loaded = decode(self._encoded, lookup)[0] if self._encoded is not None else {}
        gram = tuple(decode(self._gram, tensor)) if self._gram is not None else None
        self.optimizer.restore_state(groups, loaded, gram)
