"""Hooks removed only where nothing can be iterating them.

torch unpacks the dict of global module hooks at every module call, and the garbage collector can
run in the middle of that (any allocation may start it): a finalizer that removed a hook there made
an unrelated forward raise "OrderedDict mutated during iteration". So the hooks of an owner that was
collected are handed to :func:`discard` (their functions do nothing once the owner is gone) and
removed at the next :func:`sweep`, which runs wherever hooks are added: outside any forward or backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

_DISCARDED: list[RemovableHandle] = []


def discard(handles: Iterable[RemovableHandle]) -> None:
    """Remove ``handles`` at the next :func:`sweep` (safe from a finalizer)."""
    _DISCARDED.extend(handles)


def sweep() -> None:
    """Remove the hooks discarded so far (call where no forward or backward runs)."""
    while _DISCARDED:
        _DISCARDED.pop().remove()


def forward_pre_hook(hook: Callable[[nn.Module, Any], None]) -> RemovableHandle:
    """``hook`` before every module's forward (torch's global forward pre-hook), after a :func:`sweep`."""
    sweep()
    return nn.modules.module.register_module_forward_pre_hook(hook)
