"""Whether ``DistributedDataParallel`` reduces the gradients of the backward under way.

Accelerate, HF Trainer and Lightning wrap the model in DDP, and their users swap only the
optimizer line: the optimizer is built over the model's parameters, DDP wraps the model after
it. Then DDP already averages every gradient in backward, and the optimizer must take them as
they are, not average them a second time (a second all-reduce of the same bytes) nor take them
away from DDP. DDP reduces a backward when the forward before it ran through the DDP module
with gradients enabled and outside ``no_sync()``; a forward pre-hook on every module sees that.
Inside DDP's ``no_sync()`` the gradients stay each rank's own, as DDP leaves them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.hooks import RemovableHandle

from . import hook_handles


class DDPWatch:
    """Watches the forwards of DDP modules that hold some of the parameters given to :meth:`add`;
    calls ``on_reducing_forward`` at each forward after which DDP reduces (every rank makes it)."""

    def __init__(self, on_reducing_forward: Callable[[], None]) -> None:
        self._on_reducing_forward = on_reducing_forward
        self._ids: set[int] = set()
        self._holds: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
        self._reduces: bool | None = None
        self._handle: RemovableHandle | None = None

    def add(self, params: list[Tensor]) -> None:
        self._ids.update(id(p) for p in params)
        self._holds.clear()
        if self._handle is None:
            self._handle = _install(weakref.ref(self))
            weakref.finalize(self, hook_handles.discard, [self._handle])

    def saw(self, module: nn.Module) -> None:
        holds = self._holds.get(module)
        if holds is None:
            holds = self._holds[module] = any(id(p) in self._ids for p in module.parameters())
        if holds:
            self._reduces = torch.is_grad_enabled() and module.require_backward_grad_sync
            if self._reduces:
                self._on_reducing_forward()

    def reduces(self) -> bool | None:
        """Whether DDP reduces the gradients of the backward under way: True, False (the forward ran
        inside DDP's ``no_sync()``: they stay each rank's own), None (the forward did not run through DDP)."""
        return self._reduces

    def backward_ended(self) -> None:
        self._reduces = None


def _install(watch: weakref.ref[DDPWatch]) -> RemovableHandle:
    """A forward pre-hook on every module (the DDP module may be made after the optimizer), holding
    the watch weakly so that it never keeps a dropped optimizer alive."""

    def before_forward(module: nn.Module, args: Any) -> None:
        if isinstance(module, DistributedDataParallel):
            live = watch()
            if live is not None:
                live.saw(module)

    return hook_handles.forward_pre_hook(before_forward)
