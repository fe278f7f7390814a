"""Hooks on parameters that report each gradient autograd finishes, and the end of that backward.

DDP reduces gradients inside backward, so code between backward and step sees the mean; an
optimizer that does the same needs to know when each of its parameters has its gradient and
when the backward that gave it is over (autograd's queued callback runs once backward has
finished every node, before ``backward()`` returns).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Iterable

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from . import hook_handles


class BackwardHooks:
    """Calls ``on_gradient(key)`` as each added parameter gets its gradient (after accumulation into
    ``p.grad``), and ``on_end()`` once at the end of every backward that called it.

    The hooks hold this object weakly and are removed when it is collected: an optimizer that is
    dropped leaves no hook behind to launch collectives for it.
    """

    def __init__(self, on_end: Callable[[], None], on_gradient: Callable[[Hashable], None] | None = None) -> None:
        self._on_end = on_end
        self._on_gradient = on_gradient
        self._queued = False
        self._handles: list[RemovableHandle] = []
        weakref.finalize(self, hook_handles.discard, self._handles)

    def add(self, params: Iterable[Tensor], keys: Iterable[Hashable]) -> None:
        """Hook ``params``; ``keys`` (one per parameter) are what ``on_gradient`` is called with."""
        hook_handles.sweep()
        me = weakref.ref(self)
        self._handles += [param.register_post_accumulate_grad_hook(_hook(me, key)) for param, key in zip(params, keys)]

    def remove(self) -> None:
        """Remove every hook: later backwards call nothing."""
        hook_handles.discard(self._handles)
        hook_handles.sweep()
        self._handles.clear()

    def gradient(self, key: Hashable) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(_end(weakref.ref(self)))
        if self._on_gradient is not None:
            self._on_gradient(key)

    def end(self) -> None:
        self._queued = False
        self._on_end()


def _hook(hooks: weakref.ref[BackwardHooks], key: Hashable) -> Callable[[Tensor], None]:
    def on_gradient(param: Tensor) -> None:
        live = hooks()
        if live is not None:
            live.gradient(key)

    return on_gradient


def _end(hooks: weakref.ref[BackwardHooks]) -> Callable[[], None]:
    def callback() -> None:
        live = hooks()
        if live is not None:
            live.end()

    return callback
