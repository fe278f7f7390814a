"""One shardopt optimizer per parameter: a newer optimizer over a parameter retires the older one.

Two shardopt optimizers over one parameter would both hook its gradient (stage 2 takes it away from
p.grad, both reduce it) and neither would train it right. The usual way to get there is to replace
an optimizer (built again after a change, or by a framework): so the newer one takes the parameter,
the older one's hooks are removed, and any later collective call of the older one (step(),
state_dict(), a checkpoint) raises. Construction comes in the same order on every rank, so every
rank retires the same optimizer and raises alike, before any update.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import Tensor

from . import groups

# id(parameter) -> the parameter and its optimizer, both held weakly (a WeakKeyDictionary would compare
# tensors with ==); an entry goes with its parameter.
_OWNERS: dict[int, tuple[weakref.ref[Tensor], weakref.ref[Any]]] = {}


def claim(optimizer: Any, params: list[Tensor]) -> None:
    """``optimizer`` trains ``params`` from now on; an earlier live shardopt optimizer over any of them
    is retired (its ``_retire(reason)``)."""
    for param in params:
        entry = _OWNERS.get(id(param))
        previous = entry[1]() if entry is not None and entry[0]() is param else None
        if previous is not None and previous is not optimizer and previous.comm.retired is None:
            previous._retire(
                f"shardopt: this {type(previous).__name__} no longer trains its {_position(previous, param)}: "
                f"a {type(optimizer).__name__} created after it took that parameter, and a parameter is trained "
                "by one shardopt optimizer. Give each optimizer parameters of its own (Muon on the matrices, AdamW "
                "on the rest); to replace an optimizer, go on with the new one only"
            )
        _OWNERS[id(param)] = (weakref.ref(param, _forget(id(param))), weakref.ref(optimizer))


def _forget(key: int) -> Any:
    return lambda _: _OWNERS.pop(key, None)


def _position(optimizer: Any, param: Tensor) -> str:
    for g, group in enumerate(optimizer.param_groups):
        for i, member in enumerate(group["params"]):
            if member is param:
                return groups.describe(group, g, i)
    return "parameter"
