"""``ShardedOptimizer``: what every shardopt optimizer is, whichever way it shards its algorithm.

shardopt shards torch.optim's fifteen algorithms four ways (docs/design.md): element ranges of
flat buffers (the element-wise algorithms: ``elements.optimizer.ElementOptimizer``), whole tensors
on owner ranks (Adafactor, Muon: ``owner.optimizer.OwnedOptimizer``), rows of sparse tables
(SparseAdam: ``rows.optimizer.SparseRowOptimizer``) and slices of LBFGS's history vectors
(``slices.optimizer.ShardedLBFGS``). Each is a subclass that names the algorithms it shards
(``SHARDS``); ``ShardedOptimizer(params, algorithm, ...)`` builds the one that shards
``algorithm``, so users and integrations test one class, and this module imports none of them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.distributed as dist

from .. import algorithms
from ..collectives import fingerprint
from ..collectives.comm import Comm
from ..collectives.fingerprint import Item
from . import claims, closure_loss, groups, state_format

#: What :meth:`ShardedOptimizer.memory_stats` reports, for every scheme (0 where a scheme has none).
MEMORY_KEYS = ("param_bytes", "grad_bytes", "staging_bytes", "master_bytes", "state_bytes")


class _BuildsTheScheme(type):
    """Calling ``ShardedOptimizer`` itself builds the scheme registered for the algorithm; calling a
    scheme (or an alias such as ``shardopt.AdamW``) builds that class, as any class call does."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is not ShardedOptimizer:
            return super().__call__(*args, **kwargs)
        if len(args) > 2:
            raise TypeError(
                "ShardedOptimizer takes params and optimizer_class positionally, the rest as keywords; "
                f"got {len(args)} positional arguments"
            )
        named = dict(zip(("params", "optimizer_class"), args)) | kwargs
        if "params" not in named or "optimizer_class" not in named:
            raise TypeError("ShardedOptimizer needs params and optimizer_class (a torch.optim class or its name)")
        params, optimizer_class = named.pop("params"), named.pop("optimizer_class")
        kwargs = named
        torch_class = algorithms.torch_class(optimizer_class)
        return ShardedOptimizer._schemes[torch_class].build(params, torch_class, **kwargs)


class ShardedOptimizer(torch.optim.Optimizer, metaclass=_BuildsTheScheme):
    """A ``torch.optim`` algorithm whose state is sharded across the ranks of a process group.

    ``ShardedOptimizer(params, optimizer_class, **kwargs)`` takes a torch.optim class
    (``torch.optim.AdamW``) or its case-insensitive name (``"adamw"``), the algorithm's own keywords
    with torch.optim's names, defaults and validation, and shardopt's (``process_group``,
    ``grad_reduction``, ``timeout``; the element-wise algorithms take more: see
    :class:`~shardopt.elements.optimizer.ElementOptimizer`). It returns the scheme that shards that
    algorithm, an instance of this class. Construction, ``step``, ``state_dict``, ``load_state_dict`` and
    ``add_param_group`` are collective: every rank of the group calls them, in the same order.
    """

    #: The torch.optim classes a scheme shards; each is registered to exactly one scheme.
    SHARDS: ClassVar[tuple[type[torch.optim.Optimizer], ...]] = ()
    _schemes: ClassVar[dict[type[torch.optim.Optimizer], type[ShardedOptimizer]]] = {}
    _comm: Comm  # set by each scheme's constructor before its first param group

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for torch_class in cls.__dict__.get("SHARDS", ()):
            ShardedOptimizer._schemes[torch_class] = cls

    @classmethod
    def build(cls, params: Any, torch_class: type[torch.optim.Optimizer], **kwargs: Any) -> ShardedOptimizer:
        """This scheme over ``params`` for ``torch_class`` (one of its ``SHARDS``)."""
        return cls(params, torch_class, **kwargs)

    @classmethod
    def sharded_class(cls, optimizer_class: object) -> type[torch.optim.Optimizer]:
        """The torch.optim class of ``optimizer_class`` (a class or its name), which this scheme must shard."""
        torch_class = algorithms.torch_class(optimizer_class)
        scheme = next(base for base in cls.__mro__ if "SHARDS" in base.__dict__)
        if torch_class not in scheme.SHARDS:
            raise TypeError(
                f"{scheme.__name__} shards {', '.join(c.__name__ for c in scheme.SHARDS)}, not "
                f"{torch_class.__name__}; use ShardedOptimizer(params, {torch_class.__name__!r}), which picks "
                f"{ShardedOptimizer._schemes[torch_class].__name__}"
            )
        return torch_class

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, as torch.optim does; collective (its parameters are broadcast from rank 0, once
        every rank is found to add the same parameters and hyper-parameters)."""
        super().add_param_group(param_group)
        g = len(self.param_groups) - 1
        group = self.param_groups[g]
        try:
            self._check_group(group, g)
            opening = [] if g else self._setup_items()
            fingerprint.check(
                self._comm, opening + fingerprint.group_items(group, g, groups.describe), f"param group {g}"
            )
        except Exception:
            self.param_groups.pop()
            raise
        self._lay_out(group, g)
        self._members = groups.members(self.param_groups)
        claims.claim(self, group["params"])

    def _check_group(self, group: dict[str, Any], g: int) -> None:
        """Raise, before anything changes, if this scheme cannot take param group ``g``."""
        raise NotImplementedError

    def _setup_items(self) -> list[Item]:
        """What every rank must construct alike besides the param groups (agreed with the first group)."""
        raise NotImplementedError

    def _lay_out(self, group: dict[str, Any], g: int) -> None:
        """Collective: shard param group ``g`` over the ranks, each starting from rank 0's values."""
        raise NotImplementedError

    def _agreement(self, loss: Any, own: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[float]]:
        """Collective: the one all-reduce at the start of a step. Before: each rank knows its own
        param groups, closure loss and ``own`` flags (float64 vectors the scheme sums over ranks).
        After: every rank has raised the same error for a group edited by hand or hyper-parameters
        that differ between ranks, or holds the summed ``own`` and the loss's summed entries
        (:func:`closure_loss.agreed` makes them the loss step() returns)."""
        edit = groups.edited(self.param_groups, self._members)
        hyper = fingerprint.hyper_entries(self.param_groups)
        common = [float(edit is not None), *hyper, *closure_loss.agreement_entries(loss)]
        parts = [torch.tensor(common, dtype=torch.float64), *own]
        agreed = torch.cat(parts).to(self._comm.device)
        self._comm.all_reduce_(agreed, "the agreement on gradients and loss at the start of step()").wait()
        summed, *own = agreed.cpu().split([len(part) for part in parts])
        if summed[0]:
            raise RuntimeError(groups.EDITED.format(what=edit or "on other ranks", ranks=int(summed[0])))
        hyper_summed = summed[1 : 1 + len(hyper)].tolist()
        fingerprint.check_hyper(self.param_groups, hyper_summed, self._comm.world_size, self._comm.steps)
        return own, summed[1 + len(hyper) :].tolist()

    def _unpacked(self, state_dict: Any) -> tuple[list[dict[str, Any]], dict[Any, Any], dict[Any, Any]]:
        """Collective, inside a load's call: the param groups, state and master weights that ``state_dict``
        (torch.optim's format) holds for this optimizer, once every rank is found to load the same one."""
        new_groups, states, masters = state_format.unpack(state_dict, self.param_groups, self.defaults)
        self._agree_on_loaded(new_groups, states)
        return new_groups, states, masters

    def _agree_on_loaded(self, new_groups: list[dict[str, Any]], states: dict[Any, Any]) -> None:
        """Collective: ranks loading different dicts would install a mix; they get one error instead."""
        items = fingerprint.loaded_items(new_groups, states, groups.describe)
        fingerprint.check(self._comm, items, "load_state_dict (every rank must load the same state dict)")

    @staticmethod
    def _ordered(params: Any) -> list[Any]:
        """``params`` as a list, refusing what torch.optim refuses and a set, whose order differs between
        processes (torch.optim tolerates one; ranks would lay out different shards)."""
        if isinstance(params, torch.Tensor):
            raise TypeError(
                "params argument given to the optimizer should be an iterable of Tensors or dicts, "
                f"but got {torch.typename(params)}"
            )
        if isinstance(params, (set, frozenset)):
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections, but the ordering of "
                "tensors in sets differs between processes; pass a list (e.g. list(model.parameters()))"
            )
        return list(params)

    def _check_params(self, group: dict[str, Any], g: int) -> None:
        """What every scheme checks of param group ``g``'s parameters: each given once, none sharded
        by another library already, what the scheme needs of each (:meth:`_check_param`), and a
        device the process group communicates."""
        comm = self._comm
        seen: set[torch.Tensor] = set()
        for i, param in enumerate(group["params"]):
            where = groups.describe(group, g, i)
            if param in seen:
                raise ValueError(f"{where} appears twice in the group; pass each parameter once")
            seen.add(param)
            groups.check_plain(param, where)
            self._check_param(param, where)
            if comm.world_size > 1 and param.device.type != comm.device.type:
                raise ValueError(
                    f"{where} is on {param.device} but the process group's backend "
                    f"({dist.get_backend(comm.group)}) communicates {comm.device.type} tensors; "
                    "use NCCL for CUDA parameters and gloo for CPU ones"
                )

    def _check_param(self, param: torch.Tensor, where: str) -> None:
        """What this scheme needs of a parameter beyond torch's own checks."""

    # ------------------------------------------------------------------ what shardopt's subsystems read
    # Checkpoints, averaging and the claims on parameters read an optimizer through these (and each
    # scheme's own, below its class docstring), never through its private attributes.

    @property
    def comm(self) -> Comm:
        """This optimizer's collectives over its process group: rank, world size, the calls ranks make together."""
        return self._comm

    @property
    def torch_class(self) -> type[torch.optim.Optimizer]:
        """The torch.optim algorithm this optimizer runs."""
        raise NotImplementedError

    def check_group(self, group: dict[str, Any], g: int) -> None:
        """Raise, before anything changes, if this optimizer cannot take ``group`` as its param group ``g``
        (what ``add_param_group`` and every load check)."""
        self._check_group(group, g)

    def memory_stats(self) -> dict[str, int]:
        """This rank's bytes, by what holds them (:data:`MEMORY_KEYS`): the parameters, the gradients,
        the staging buffers gradients and parameters pass through, fp32 master weights and the
        optimizer state. Each scheme says what its numbers count."""
        return {key: 0 for key in MEMORY_KEYS} | self._memory_bytes()

    def _memory_bytes(self) -> dict[str, int]:
        """This scheme's nonzero entries of :meth:`memory_stats`."""
        raise NotImplementedError


def dense_bytes(tensors: list[torch.Tensor]) -> int:
    """The bytes ``tensors`` hold (dense ones, or a sparse tensor's parts)."""
    return sum(t.numel() * t.element_size() for t in tensors)
