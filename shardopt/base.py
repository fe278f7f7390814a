"""``ShardedOptimizer``: what every shardopt optimizer is, whichever way it shards its algorithm.

shardopt shards torch.optim's fifteen algorithms four ways (docs/schemes.md): element ranges of
flat buffers (the element-wise algorithms, :class:`~shardopt.optimizer.ElementOptimizer`), whole
tensors on owner ranks (Adafactor, Muon: :class:`~shardopt.owned.OwnedOptimizer`), rows of sparse
tables (SparseAdam: :class:`~shardopt.sparse.SparseRowOptimizer`) and slices of LBFGS's history
vectors (:class:`~shardopt.lbfgs.ShardedLBFGS`). Each is a subclass that names the algorithms it
shards (``SHARDS``); ``ShardedOptimizer(params, algorithm, ...)`` builds the one that shards
``algorithm``, so users and integrations test one class, and this module imports none of them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from . import algorithms

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
        params = args[0] if args else kwargs.pop("params")
        optimizer_class = args[1] if len(args) > 1 else kwargs.pop("optimizer_class")
        torch_class = algorithms.torch_class(optimizer_class)
        return ShardedOptimizer._schemes[torch_class].build(params, torch_class, **kwargs)


class ShardedOptimizer(torch.optim.Optimizer, metaclass=_BuildsTheScheme):
    """A ``torch.optim`` algorithm whose state is sharded across the ranks of a process group.

    ``ShardedOptimizer(params, optimizer_class, **kwargs)`` takes a torch.optim class
    (``torch.optim.AdamW``) or its case-insensitive name (``"adamw"``), the algorithm's own keywords
    with torch.optim's names, defaults and validation, and shardopt's (``process_group``,
    ``grad_reduction``, ``timeout``; the element-wise algorithms take more: see
    :class:`~shardopt.optimizer.ElementOptimizer`). It returns the scheme that shards that algorithm,
    an instance of this class. Construction, ``step``, ``state_dict``, ``load_state_dict`` and
    ``add_param_group`` are collective: every rank of the group calls them, in the same order.
    """

    #: The torch.optim classes a scheme shards; each is registered to exactly one scheme.
    SHARDS: ClassVar[tuple[type[torch.optim.Optimizer], ...]] = ()
    _schemes: ClassVar[dict[type[torch.optim.Optimizer], type[ShardedOptimizer]]] = {}

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
