"""The all-gathers of updated parameters that end a step, and when they are waited for.

By default ``step()`` waits for every bucket's gather before it returns, so the model is
whole again when the user sees it. With ``overlap_param_gather=True`` (as Megatron's
distributed optimizer offers) the gathers stay in flight after ``step()``: a forward
pre-hook waits, module by module, only for the buckets holding that module's own
parameters, so the gather of late layers overlaps the forward of early ones. Whatever is
still pending is waited at the next ``step()``, ``state_dict()``, ``load_state_dict()`` or
``finish_param_gather()``.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .comm import Pending


class ParamGathers:
    """Pending parameter all-gathers, one per bucket, waited eagerly or by forward pre-hooks."""

    def __init__(self, lazy: bool) -> None:
        self.lazy = lazy
        self._bucket_of: dict[int, int] = {}  # id(parameter) -> bucket index
        self._pending: dict[int, Pending] = {}
        self._hook: RemovableHandle | None = None

    def add_bucket(self, index: int, params: list[Tensor]) -> None:
        for param in params:
            self._bucket_of[id(param)] = index

    def issue(self, index: int, pending: Pending) -> None:
        self._pending[index] = pending

    def issued_all(self) -> None:
        """The step has issued its gathers: wait now, or leave them to the next forward."""
        if not self.lazy:
            self.wait_all()
        elif self._pending and self._hook is None:
            self._hook = _install_waiter(weakref.ref(self))

    def wait_all(self) -> None:
        pending, self._pending = self._pending, {}
        for gather in pending.values():
            gather.wait()
        self._unhook()

    def before_forward(self, module: nn.Module) -> None:
        """``module`` is about to run: wait for the buckets of its own (not its children's) parameters."""
        for param in module._parameters.values():
            if param is not None:
                gather = self._pending.pop(self._bucket_of.get(id(param), -1), None)
                if gather is not None:
                    gather.wait()
        if not self._pending:
            self._unhook()

    @property
    def pending_buckets(self) -> int:
        return len(self._pending)

    def _unhook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _install_waiter(gathers: weakref.ref[ParamGathers]) -> RemovableHandle:
    """A forward pre-hook on every module: global, so that it needs no model; holding the gathers
    weakly, so that it never keeps a dropped optimizer alive (it then removes itself)."""

    def before_forward(module: nn.Module, args: Any) -> None:
        live = gathers()
        if live is None:
            handle.remove()
            return
        with torch.no_grad():
            live.before_forward(module)

    handle = nn.modules.module.register_module_forward_pre_hook(before_forward)
    return handle
