"""The all-gathers of updated parameters that end a step, and their writing into the parameters.

The parameters keep their own storage (buffer.py), so each buffer is gathered into a staging
buffer of its length, whose slice of this rank is where the step's update ran, and then
copied into the parameters. At most ``MAX_IN_FLIGHT`` gathers are in flight; a buffer that
needs a staging buffer when that many are taken first finishes the oldest gather, so the extra
memory is a few buffers, never a copy of the model.

By default ``step()`` finishes every gather before it returns, so the model is whole again when
the user sees it. With ``overlap_param_gather=True`` (as Megatron's distributed optimizer
offers) the last gathers stay in flight after ``step()``: a forward pre-hook finishes, module by
module, only the buffers holding that module's own parameters, so the gather of late layers
overlaps the forward of early ones. Whatever is still pending is finished at the next
``step()``, ``state_dict()``, ``load_state_dict()`` or ``finish_param_gather()``.
"""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..collectives.comm import Comm, Pending
from ..shared import hook_handles
from .buffer import ShardedBuffer
from .staging import StagingPool

# Staging buffers taken at once (being updated, or gathering): the step updates UPDATE_BATCH buffers
# at a time, while the gathers of the batch before are in flight.
MAX_IN_FLIGHT = 4
UPDATE_BATCH = MAX_IN_FLIGHT // 2


@dataclass
class _Gather:
    index: int
    buffer: ShardedBuffer
    full: Tensor
    pending: Pending


class ParamGathers:
    """Pending parameter all-gathers, each written into its parameters once done."""

    def __init__(self, comm: Comm, lazy: bool) -> None:
        self._comm = comm
        self.lazy = lazy
        self._pool = StagingPool()
        self._buffer_of: dict[int, int] = {}  # id(parameter) -> buffer index
        self._in_flight: deque[_Gather] = deque()
        self._taken = 0  # staging buffers handed out by staging() and not issued yet
        self._hook: RemovableHandle | None = None

    def add_buffer(self, index: int, buffer: ShardedBuffer) -> None:
        for param in buffer.params:
            self._buffer_of[id(param)] = index

    def staging(self, buffer: ShardedBuffer) -> Tensor:
        """A flat staging buffer of ``buffer``'s length; its slice ``buffer.shard`` is where this rank's
        shard is updated before :meth:`issue`. Finishes the oldest gathers while too many buffers are out."""
        while self._in_flight and len(self._in_flight) + self._taken >= MAX_IN_FLIGHT:
            self._finish(self._in_flight.popleft())
        self._taken += 1
        key = (buffer.dtype, buffer.device)
        self._pool.reserve(buffer.layout.numel, key)
        return self._pool.take(buffer.layout.numel, key)

    def broadcast(self, buffer: ShardedBuffer) -> None:
        """Every rank's parameters of ``buffer`` become rank 0's (at construction, as DDP does)."""
        if self._comm.world_size == 1:
            return
        full = buffer.read_full(self.staging(buffer))
        self._comm.broadcast_(full, "the broadcast of the initial parameters").wait()
        buffer.write_params(full)
        self._taken -= 1
        self._pool.give(full)

    def issue(self, index: int, buffer: ShardedBuffer, full: Tensor, what: str = "updated parameters") -> None:
        """All-gather the updated ``full[buffer.shard]`` of every rank into ``full``; then into the parameters."""
        self._taken -= 1
        shard = full[buffer.shard.slice]
        pending = self._comm.all_gather(full, shard, f"the all-gather of {what}")
        self._in_flight.append(_Gather(index, buffer, full, pending))

    def issued_all(self) -> None:
        """The step has issued its gathers: finish them now, or leave them to the next forward."""
        if not self.lazy:
            self.wait_all()
        elif self._in_flight and self._hook is None:
            self._hook = _install_waiter(weakref.ref(self))

    def wait_all(self) -> None:
        while self._in_flight:
            self._finish(self._in_flight.popleft())
        self._unhook()

    def _finish(self, gather: _Gather) -> None:
        gather.pending.wait()
        gather.buffer.write_params(gather.full)
        self._pool.give(gather.full)

    def before_forward(self, module: nn.Module) -> None:
        """``module`` is about to run: finish the gathers of its own (not its children's) parameters,
        and those issued before them."""
        wanted = {self._buffer_of.get(id(p), -1) for p in module._parameters.values() if p is not None}
        last = max((n for n, gather in enumerate(self._in_flight) if gather.index in wanted), default=-1)
        for _ in range(last + 1):
            self._finish(self._in_flight.popleft())
        if not self._in_flight:
            self._unhook()

    @property
    def pending_buffers(self) -> int:
        return len(self._in_flight)

    @property
    def staging_bytes(self) -> int:
        return self._pool.bytes

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
        live.before_forward(module)

    handle = hook_handles.forward_pre_hook(before_forward)
    return handle
