"""``OwnedOptimizer``: the coordinator of the algorithms that need whole tensors (Adafactor, Muon).

Adafactor's row/column statistics and Muon's Newton-Schulz iteration read a whole tensor, so
they are sharded by tensors (as ZeroRedundancyOptimizer and torchtitan's distributed Muon do):
each parameter has one owner rank (``ownership.assign_owners``, balancing the update work), which
alone keeps its state and runs torch's own update on it. One step, on every rank::

    closure (if any) -> agree: which parameters have a gradient on any rank, the mean loss
    -> all-reduce the gradients (one flat buffer per dtype) -> the mean gradient in every p.grad
       (these two at the end of backward, as DDP reduces, unless DDP did)
    -> this rank's torch optimizer updates the parameters it owns
    -> all-gather the updated parameters from their owners (one flat buffer per dtype)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import algorithms
from ..collectives import packed
from ..shared import groups, state_format, torch_state
from ..shared.base import dense_bytes
from ..shared.whole_gradients import Reduced, WholeGradientOptimizer
from .assign import assign_owners, update_cost


class OwnedOptimizer(WholeGradientOptimizer):
    """``torch.optim.Adafactor`` or ``torch.optim.Muon`` with each parameter's state on one owner rank.

    Args:
        params: tensors, ``named_parameters()``, or param-group dicts, as torch.optim takes them.
        optimizer_class: ``torch.optim.Adafactor`` or ``torch.optim.Muon``, or its name (``"muon"``).
        process_group: the data-parallel group; None means the default group, or a world of one
            when torch.distributed is not initialised.
        grad_reduction: ``"mean"`` or ``"sum"`` of the ranks' gradients, or None when they are
            already reduced (under DDP).
        timeout: seconds (or a timedelta) any collective of ours may wait before raising.
        **kwargs: the algorithm's keywords, with torch.optim's names, defaults and validation.

    When ``backward()`` returns, every ``p.grad`` holds the reduced gradient, as under DDP. Construction,
    ``step``, ``clip_grad_norm_``, ``state_dict``, ``load_state_dict`` and ``add_param_group`` are
    collective: every rank calls them, in the same order.
    """

    SHARDS = algorithms.WHOLE_TENSOR
    REDUCES_IN_BACKWARD = True

    def _prepare(self) -> None:
        self._owner: dict[Tensor, int] = {}
        self._loads = [0] * self._comm.world_size  # each rank's update cost so far
        # This rank's torch optimizer: its group g holds the parameters of param group g this rank
        # owns (_place adds them). torch refuses to start with no group: one, removed.
        self._inner = self._torch_class([{"params": []}], **self._kwargs)
        self._inner.param_groups.clear()

    # ------------------------------------------------------------------ groups

    def _place(self, group: dict[str, Any]) -> None:
        """Give each of ``group``'s parameters an owner, balancing the update work."""
        params = group["params"]
        costs = [update_cost(self._torch_class.__name__, p.shape) for p in params]
        owners = assign_owners(costs, self._comm.world_size, self._loads)
        for param, owner, cost in zip(params, owners, costs):
            self._owner[param] = owner
            self._loads[owner] += cost
        mine = [p for p in params if self._owner[p] == self._comm.rank]
        self._inner.add_param_group({**self._hyper_parameters(group), "params": mine})

    def _check_param(self, param: Tensor, where: str) -> None:
        if param.is_complex():
            raise TypeError(f"{where} is complex; {self._torch_class.__name__} does not support complex parameters")
        if param.layout is not torch.strided:
            raise TypeError(f"{where} has layout {param.layout}; shardopt optimizes dense (strided) tensors")

    @staticmethod
    def _hyper_parameters(group: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in group.items() if key not in ("params", "param_names")}

    # ------------------------------------------------------------------ step

    def _reduce_grads(self, present: list[Tensor]) -> None:
        """Collective: the reduced gradient in every present ``p.grad``, on every rank (DDP's, as it is)."""
        if self._options.grad_reduction is not None and not self._by_ddp:
            # A parameter with a gradient on some rank only counts zero on the others.
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in present]
            mean = self._options.grad_reduction == "mean"
            reduced = packed.all_reduce(self._comm, grads, "the all-reduce of the gradients", mean)
            for param, grad in zip(present, reduced):
                param.grad = grad

    def _apply(self, reduced: Reduced) -> None:
        """The owners' torch optimizers update their parameters, then every rank gathers them."""
        # Outer groups are the user's (schedulers edit them): the owner's torch optimizer reads them now.
        for outer, inner in zip(self.param_groups, self._inner.param_groups):
            inner.update(self._hyper_parameters(outer))
        self._inner.step()
        owners = [self._owner[p] for p in reduced.present]
        packed.gather_from_owners(self._comm, reduced.present, owners, "the all-gather of updated parameters")

    def _grad_tensors(self, reduced: Reduced) -> list[Tensor]:
        return [p.grad for p in reduced.present if p.grad is not None]

    def _norm_tensors(self, reduced: Reduced) -> list[Tensor]:
        # Every rank holds the whole reduced gradient; each counts the parameters it owns, once.
        return [p.grad for p in reduced.present if p.grad is not None and self._owner[p] == self.rank]

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Collective: the full state, in ``torch.optim.<Algo>.state_dict()``'s format, on every rank.

        One all-reduce says which parameters have state; one all-gather per dtype brings each
        parameter's state from its owner (the others allocate it empty, with its known shape).
        """
        # A rank one step() ahead would pair that step's collectives with these: agree first.
        with self._comm.call("state_dict()", agree=True):
            params = self._params()
            mine = self._inner.state
            entries: dict[Tensor, dict[str, Tensor]] = {}
            tensors: list[Tensor] = []
            owners: list[int] = []
            for param, flag in zip(params, self.has_state()):
                if not flag:
                    continue
                owner = self._owner[param]
                template = torch_state.initial_state(self._torch_class, param)
                entry = {name: mine[param][name].clone() for name in template} if owner == self.rank else template
                entries[param] = entry
                tensors += entry.values()
                owners += [owner] * len(entry)
            packed.gather_from_owners(self._comm, tensors, owners, "the all-gather of optimizer state")
        return state_format.pack(self.param_groups, entries)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict in torch.optim's format, from any world size or from plain torch.optim.

        Collective (every rank must load the same dict: one check); each rank then keeps its own
        parameters' state from the full dict. Everything is checked before anything changes: a
        dict for another model raises ValueError naming the first mismatch and leaves this
        optimizer as it was.
        """
        with self._comm.call("load_state_dict()", agree=True):
            new_groups, states, _ = self._unpacked(state_dict)
        name = self._torch_class.__name__
        templates = {}
        for g, group in enumerate(new_groups):
            for i, param in enumerate(group["params"]):
                if param in states:
                    templates[param] = torch_state.initial_state(self._torch_class, param)
                    torch_state.check_entry(states[param], templates[param], name, groups.describe(group, g, i))
        owned = {p: torch_state.installed(e, templates[p]) for p, e in states.items() if self._owner[p] == self.rank}
        self.restore_state(new_groups, owned)

    def has_state(self) -> list[bool]:
        """Collective: whether each parameter (in the groups' order) has state, on its owner."""
        mine = self._inner.state
        flags = torch.tensor([float(bool(mine.get(p))) for p in self._params()], dtype=torch.float64)
        flags = flags.to(self._comm.device)
        self._comm.all_reduce_(flags, "the agreement on which parameters have optimizer state").wait()
        return [bool(flag) for flag in flags.tolist()]

    def restore_state(self, new_groups: list[dict[str, Any]], owned: dict[Tensor, dict[str, Tensor]]) -> None:
        """Local: install checked param groups and the state of the parameters this rank owns."""
        self.param_groups[:] = new_groups
        self._inner.state.clear()
        self._inner.state.update(owned)

    # ------------------------------------------------------------------ what checkpoints read

    def owner_of(self, param: Tensor) -> int:
        """The rank that keeps ``param``'s state and updates it."""
        return self._owner[param]

    @property
    def owned_state(self) -> dict[Tensor, dict[str, Tensor]]:
        """The state of the parameters this rank owns, as torch's own optimizer keeps it."""
        return self._inner.state

    # ------------------------------------------------------------------ introspection

    def _memory_bytes(self) -> dict[str, int]:
        """This rank's bytes: the full parameters and gradients every rank holds, and the optimizer
        state of the parameters this rank owns (about 1/N of torch.optim's)."""
        params = self._params()
        return {
            "param_bytes": dense_bytes(params),
            "grad_bytes": dense_bytes([p for p in params if p.requires_grad]),
            "state_bytes": dense_bytes(
                [t for entry in self._inner.state.values() for t in entry.values() if isinstance(t, Tensor)]
            ),
        }
