"""The gradient pipeline: from each parameter's ``.grad`` to this rank's shard of the reduced gradient.

Stage 2 overlaps the reduction with backward. A post-accumulate-grad hook counts, per
buffer, the parameters whose gradient has arrived; once a buffer is complete, and every
buffer before it in the launch order has been launched, its gradients are copied into
one flat tensor, released (``p.grad = None``) and reduce-scattered asynchronously while
backward goes on. ``step()`` launches what backward left (buffers with a parameter that
is unused on this rank, gradients written into ``.grad`` directly) in the same order, so
every rank issues the same collectives in the same order however its backward went.
Gradient that arrives for a buffer after its launch (a second backward before the step)
is reduced in a second round, which every rank joins when any rank needs it; reductions
are sums, so the rounds add up to the reduction of the total.

Stage 1 reduces at ``step()``: each buffer's full gradient is all-reduced and the
parameters' ``.grad`` become views of the result, as under DDP.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .buffer import NO_GRAD, SPARSE, ShardedBuffer
from .comm import Comm, Pending


@dataclass
class _Round:
    """One issued reduction of a buffer's gradient."""

    pending: Pending | None  # None: nothing to wait for (no reduction, or a world of one)
    full: Tensor  # the flattened local gradient, kept alive until the collective is done
    into: Tensor  # where the result lands
    accumulate: bool  # add ``into`` to the gradient shard once done (a second round)


@dataclass
class _Window:
    """One buffer's gradient between two steps."""

    size: int
    arrived: list[bool] = field(init=False)
    arrived_count: int = 0
    codes: Tensor = field(init=False)  # NO_GRAD / DENSE / SPARSE per parameter, as flattened
    launched: bool = False
    late: bool = False
    rounds: list[_Round] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.arrived = [False] * self.size
        self.codes = torch.zeros(self.size, dtype=torch.float64)

    @property
    def complete(self) -> bool:
        return self.arrived_count == self.size


class GradReducer:
    """Reduces the gradients of a list of buffers, as the module docstring says."""

    def __init__(self, comm: Comm, stage: int, grad_reduction: str | None) -> None:
        self._comm = comm
        self._stage = stage
        self._reduce = grad_reduction is not None
        self._mean = grad_reduction == "mean"
        self._buffers: list[ShardedBuffer] = []
        self._windows: list[_Window] = []
        self._next = 0  # position in the launch order of the next buffer to launch

    def add(self, buffer: ShardedBuffer) -> None:
        self._buffers.append(buffer)
        self._windows.append(_Window(len(buffer.params)))
        if self._stage == 2:
            index = len(self._buffers) - 1
            handles = [
                param.register_post_accumulate_grad_hook(_arrival_hook(weakref.ref(self), index, slot))
                for slot, param in enumerate(buffer.params)
            ]
            # Hooks outlive an optimizer that is dropped; they must not launch collectives for it.
            weakref.finalize(self, _remove_all, handles)

    def arrived(self, index: int, slot: int) -> None:
        """Parameter ``slot`` of buffer ``index`` has its gradient (called from backward)."""
        window = self._windows[index]
        if window.launched:
            window.late = True
        elif not window.arrived[slot]:
            window.arrived[slot] = True
            window.arrived_count += 1
            if window.complete:
                self._launch_in_order(until_incomplete=True)

    def _order(self) -> range:
        # Backward produces the last parameters' gradients first: launch the last buffer first.
        return range(len(self._buffers) - 1, -1, -1)

    def _launch_in_order(self, until_incomplete: bool) -> None:
        order = self._order()
        while self._next < len(order):
            index = order[self._next]
            if until_incomplete and not self._windows[index].complete:
                return
            self._launch(index)
            self._next += 1

    def _launch(self, index: int) -> None:
        """Flatten buffer ``index``'s gradients and issue their reduction."""
        buffer, window = self._buffers[index], self._windows[index]
        if self._stage == 1:
            if buffer.full_grad is None:
                buffer.full_grad = torch.zeros_like(buffer.flat)
            full = into = buffer.full_grad
            window.codes = torch.tensor(buffer.flatten_grads(full, release=False), dtype=torch.float64)
            pending = self._comm.all_reduce_(full, "the gradient all-reduce") if self._reduce else None
            window.rounds.append(_Round(pending, full, into, accumulate=False))
        else:
            full = torch.zeros_like(buffer.flat)
            codes = torch.tensor(buffer.flatten_grads(full, release=True), dtype=torch.float64)
            window.codes = torch.maximum(window.codes, codes)
            if buffer.grad_shard is None:
                buffer.grad_shard = torch.empty_like(buffer.param_shard)
            accumulate = bool(window.rounds)
            into = torch.empty_like(buffer.grad_shard) if accumulate else buffer.grad_shard
            pending = None
            if self._reduce:
                pending = self._comm.reduce_scatter(into, full, "the gradient reduce-scatter")
            else:
                into.copy_(full[buffer.shard.slice])
            window.rounds.append(_Round(pending, full, into, accumulate))
        window.launched = True

    # ------------------------------------------------------------------ step()

    def launch_remaining(self) -> None:
        """Issue what backward did not: every buffer not launched yet, in the launch order.

        A launched buffer whose parameters hold a gradient again (written directly, or by a
        second backward) is marked late.
        """
        for window, buffer in zip(self._windows, self._buffers):
            if window.launched:
                codes = torch.tensor(buffer.grad_codes(), dtype=torch.float64)
                if codes.any():
                    window.late = True
                    window.codes = torch.maximum(window.codes, codes)
        self._launch_in_order(until_incomplete=False)

    def local_flags(self) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's (has a gradient, has a sparse gradient) per parameter, and late per buffer."""
        codes = torch.cat([w.codes for w in self._windows]) if self._windows else torch.zeros(0, dtype=torch.float64)
        late = torch.tensor([float(w.late) for w in self._windows], dtype=torch.float64)
        return (codes != NO_GRAD).double(), (codes == SPARSE).double(), late

    def launch_late(self, late: list[bool]) -> None:
        """A second round for the buffers late on any rank (every rank calls this with the same flags)."""
        for index in self._order():
            if late[index]:
                self._launch(index)

    def reduced_shard(self, index: int) -> Tensor:
        """Wait for buffer ``index``'s reductions; this rank's shard of the reduced gradient."""
        buffer, window = self._buffers[index], self._windows[index]
        for round_ in window.rounds:
            if round_.pending is not None:
                round_.pending.wait()
            if round_.accumulate:
                buffer.grad_shard.add_(round_.into)
        window.rounds.clear()
        scale = self._comm.world_size if self._mean and self._comm.world_size > 1 else None
        if self._stage == 1:
            if scale:
                buffer.full_grad.div_(scale)
            buffer.bind_grads(buffer.full_grad, (window.codes != NO_GRAD).tolist())
            return buffer.full_grad[buffer.shard.slice]
        if scale:
            buffer.grad_shard.div_(scale)
        return buffer.grad_shard

    def reset(self) -> None:
        """Start a new window: wait for anything still in flight and forget the gradients."""
        for window in self._windows:
            for round_ in window.rounds:
                if round_.pending is not None:
                    round_.pending.wait()
        self._windows = [_Window(len(buffer.params)) for buffer in self._buffers]
        self._next = 0


def _arrival_hook(reducer: weakref.ref[GradReducer], index: int, slot: int) -> Callable[[Tensor], None]:
    def on_gradient(param: Tensor) -> None:
        live = reducer()
        if live is not None:
            live.arrived(index, slot)

    return on_gradient


def _remove_all(handles: list[torch.utils.hooks.RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
