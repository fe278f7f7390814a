"""``SparseRowOptimizer``'s state in a checkpoint (SparseAdam): row ranges of each parameter.

A contiguous range of rows is a contiguous range of the parameter's flattened elements, so
SparseAdam's ``exp_avg`` and ``exp_avg_sq`` are stored as element-wise state is: one 1-D
tensor of the parameter's numel, each rank writing the elements of its rows and reading, at
any world size, those of its new rows. ``step`` (the same on every rank) is a 0-d int64.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..rows.optimizer import STATE_NAMES, SparseRowOptimizer
from .part import Part, Staging, TensorLookup, chunk_of

SCALARS = ["step"]


class RowPart(Part):
    serves = (SparseRowOptimizer,)

    def describe(self, params: list[dict[str, Any]]) -> None:
        for number, param in self.numbered():
            if self.optimizer.shard_state.get(param):
                params[number]["scalar_state"] = list(SCALARS)
                params[number]["tensor_state"] = list(STATE_NAMES)

    def _rows(self, param: Tensor, rows: Tensor) -> Any:
        """``rows`` (this rank's rows of a state tensor of ``param``) as chunks of the flat tensor."""
        start = self.optimizer.rows_of(param).start
        return chunk_of(param.numel(), start * math.prod(param.shape[1:]), rows)

    def entries(self, names: list[list[str]]) -> dict[str, Any]:
        flat_names = [name for group in names for name in group]
        entries: dict[str, Any] = {}
        for number, param in self.numbered():
            state = self.optimizer.shard_state.get(param)
            if not state:
                continue
            entries[self.key(flat_names[number], "step")] = torch.tensor(state["step"], dtype=torch.int64)
            if param.numel():  # DCP cannot index a tensor no rank writes
                for name in STATE_NAMES:
                    entries[self.key(flat_names[number], name)] = self._rows(param, state[name])
        return entries

    def stage(self, record: dict[str, Any], groups: list[dict[str, Any]], staging: Staging) -> None:
        """Every rank stages the rows it owns now, whichever ranks wrote them."""
        self._read: dict[Tensor, dict[str, Any]] = {}
        for param, saved in self.saved_state(record, staging, lambda param: SCALARS + list(STATE_NAMES)):
            step = staging.read(self.key(saved["name"], "step"), torch.zeros((), dtype=torch.int64))
            entry: dict[str, Any] = {"step": step}
            rows = self.optimizer.rows_of(param)
            for name in STATE_NAMES:
                entry[name] = param.new_zeros(len(rows), *param.shape[1:])
                if param.numel():
                    key = self.key(saved["name"], name)
                    staging.read(key, self._rows(param, entry[name]), (param.numel(),), param.dtype)
            self._read[param] = entry

    def install(self, groups: list[dict[str, Any]], tensor: TensorLookup) -> None:
        mine = {param: {**entry, "step": int(entry["step"])} for param, entry in self._read.items()}
        self.optimizer.restore_state(groups, mine)
