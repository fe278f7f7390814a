"""``OwnedOptimizer``'s state in a checkpoint (Adafactor, Muon): whole tensors, each written by its owner.

A parameter's state tensors are stored with their own shapes (Adafactor's row and column
statistics are not the parameter's), written by the rank that owns the parameter and read,
at any world size, by its new owner alone. Every rank reads the 0-d entries (``step``), so
that all can check they read the same checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..owner.optimizer import OwnedOptimizer
from ..shared import torch_state
from .part import Part, Staging, TensorLookup


class OwnerPart(Part):
    serves = (OwnedOptimizer,)

    def exchange(self) -> None:
        self._has_state = self.optimizer.has_state()

    def _template(self, param: Tensor) -> dict[str, Tensor]:
        return torch_state.initial_state(self.optimizer.torch_class, param)

    def describe(self, params: list[dict[str, Any]]) -> None:
        for number, param in self.numbered():
            if not self._has_state[number]:
                continue
            template = self._template(param)
            record = params[number]
            record["scalar_state"] = [name for name, value in template.items() if value.dim() == 0]
            record["tensor_state"] = [name for name, value in template.items() if value.dim() != 0]
            shapes = {name: list(value.shape) for name, value in template.items() if value.shape != param.shape}
            if shapes:
                record["state_shapes"] = shapes

    def entries(self, names: list[list[str]]) -> dict[str, Any]:
        flat_names = [name for group in names for name in group]
        state = self.optimizer.owned_state
        return {
            self.key(flat_names[number], name): value.detach()
            for number, param in self.numbered()
            for name, value in state.get(param, {}).items()
        }

    def stage(self, record: dict[str, Any], groups: list[dict[str, Any]], staging: Staging) -> None:
        """The new owner of each parameter stages its state; every rank its 0-d entries."""
        self._read: dict[Tensor, dict[str, Tensor]] = {}
        for param, saved in self.saved_state(record, staging, lambda param: list(self._template(param))):
            mine = self.optimizer.owner_of(param) == self.optimizer.rank
            entry = {
                name: staging.read(self.key(saved["name"], name), torch.zeros_like(value))
                for name, value in self._template(param).items()
                if mine or value.dim() == 0
            }
            if mine:
                self._read[param] = entry

    def install(self, groups: list[dict[str, Any]], tensor: TensorLookup) -> None:
        self.optimizer.restore_state(groups, self._read)
