"""``opt.state`` and copies of a sharded optimizer: what torch.optim users reach for, answered.

torch.optim keeps each parameter's state in ``opt.state[p]``; a sharded optimizer keeps only this
rank's part, elsewhere, so ``opt.state`` stays empty. Code that reads ``opt.state[p]["exp_avg"]``
for logging would get a bare ``KeyError``; it gets one that names :meth:`ParamState.param_state`,
which gathers that parameter's state in torch's names and shapes (collective).

An optimizer holds a process group and collectives in flight, which neither ``copy.deepcopy`` nor
``pickle`` can carry: a copy would fail at its first ``step()``. Both raise at once instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

COPY_ERROR = (
    "a shardopt optimizer cannot be copied or pickled: it holds a process group and collectives in flight; "
    "save and restore its state with state_dict() / load_state_dict() or shardopt.checkpoint.save / load, "
    "and build a new optimizer for a copied model"
)


class StateView(dict):
    """``opt.state``: empty, as the state is sharded; a missing parameter's KeyError names the way to read it."""

    def __missing__(self, key: Any) -> Any:
        raise KeyError(
            "shardopt keeps each parameter's optimizer state sharded across the ranks, not in opt.state; "
            "read one parameter's state with opt.param_state(param) (collective: every rank calls it), "
            "or all of it with opt.state_dict()"
        )


class ParamState:
    """Mixin: :meth:`param_state`, and refusing copies (see the module docstring)."""

    param_groups: list[dict[str, Any]]
    state_dict: Callable[[], dict[str, Any]]

    def param_state(self, param: Tensor) -> dict[str, Any]:
        """Collective: ``param``'s optimizer state as ``torch.optim``'s ``opt.state[param]`` would hold it
        (full tensors, torch's names), on every rank; empty before its first step. It gathers the whole
        state (``state_dict()``): for logging now and then, not every step."""
        position = next(
            (i for i, p in enumerate(p for group in self.param_groups for p in group["params"]) if p is param), None
        )
        state = self.state_dict()["state"]  # every rank joins the collective before any may raise
        if position is None:
            raise KeyError("param_state(): the tensor given is not a parameter of this optimizer")
        return dict(state.get(position, {}))

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(COPY_ERROR)

    def __deepcopy__(self, memo: dict) -> Any:
        raise TypeError(COPY_ERROR)
