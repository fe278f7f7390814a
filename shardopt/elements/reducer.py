"""The gradient pipeline: from each parameter's ``.grad`` to this rank's shard of the reduced gradient
(the whole flow, stage by stage: docs/design.md).

Backward's hooks take each gradient as autograd finishes it. Stage 1 reduces as DDP does: each
gradient goes into its span of the buffer's full gradient (``full_grad.py``; ``p.grad`` becomes a
view of it), a complete buffer is all-reduced at once, and the end of backward waits for all, so
``p.grad`` holds the mean when backward returns. Stage 2 copies each gradient into a staging buffer
(or, where the reduce-scatter reads gradients where they lie, keeps it), leaves a storage-less
stand-in in ``p.grad`` (``taken_grad.py``), and reduce-scatters each complete buffer while backward
goes on; at most ``MAX_STAGING`` staging buffers per dtype and device, so a step's gradient memory
is this rank's shard plus a few buffers.

``step()`` launches what backward left, in the same order on every rank however its backward went;
gradient that arrives after its buffer's launch is reduced in a second round that every rank
joins (reductions are sums, so the rounds add up). Under DDP (``ddp_watch.py``) neither stage
reduces: ``step()`` takes ``p.grad`` as DDP leaves it. Sparse gradients are reduced as entries
once the ranks agree which parameters have them (``sparse_grads.py``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch
from torch import Tensor

from ..collectives.comm import Comm, Pending
from ..collectives.phases import BACKWARD, DDP_FORWARD
from ..collectives.ring import HeldPlan, held_plan
from ..collectives.span import Span
from ..shared.backward_hooks import BackwardHooks
from ..shared.ddp_watch import DDPWatch
from .buffer import DENSE, NO_GRAD, SPARSE, ShardedBuffer, grad_code
from .full_grad import FullGradient
from .sparse_grads import KnownSparse, add_reduced, reduce_ranges
from .staging import StagingPool
from .taken_grad import Custody
from .windows import Round, Window, codes_tensor

# Staging buffers (each as long as the longest flat buffer) per dtype and device: two reductions
# in flight keep the link busy while a third buffer fills, and a fourth absorbs buffers that
# complete out of the launch order. More are made only if every one is filling, none in flight.
MAX_STAGING = 4


class GradReducer:
    """Reduces the gradients of a list of buffers, as the module docstring says."""

    def __init__(self, comm: Comm, stage: int, grad_reduction: str | None) -> None:
        self._comm = comm
        self._stage = stage
        self._reduce = grad_reduction is not None
        self._mean = grad_reduction == "mean"
        self._buffers: list[ShardedBuffer] = []
        self._windows: list[Window] = []
        self._parts = stage == 2 and self._reduce and comm.reduces_held
        self._plans: list[HeldPlan | None] = []
        self._next = 0  # position in the launch order of the next buffer to launch
        self._pool = StagingPool()
        self._in_flight: deque[Round] = deque()
        self._views: dict[tuple[int, int], list[Tensor]] = {}
        self._known = KnownSparse()
        # Inside ``no_sync()``: backward's hooks leave gradients where they are.
        self.accumulating = False
        # A rank that goes on training past a call the others are in is named there (phases.py).
        self._watch = DDPWatch(lambda: comm.mark(DDP_FORWARD))
        self._hooks = BackwardHooks(self.end_of_backward, self.arrived)
        self._in_backward = False  # stage 1: this backward's reduction is under way (entered on the board)
        # Per buffer: DDP reduced its gradients (they are taken as they are); stage 1: its full gradient.
        self._by_ddp: list[bool] = []
        self._full: list[FullGradient] = []
        self.custody = Custody()  # stage 2: the stand-ins left in p.grad, and what was done to them
        self._looked = False  # stage 2: this backward looked for dropped gradients at its first arrival
        #: Per buffer: what it cannot follow of what was done to its parameters, as (slot, what
        #: happened), None where it can; step() raises on every rank, and such a buffer is not reduced.
        self.problems: list[tuple[int, str] | None] = []

    def add(self, buffer: ShardedBuffer) -> None:
        self._buffers.append(buffer)
        self._windows.append(self._window(buffer))
        self._plans.append(None)
        self._known.add_buffer()
        self.problems.append(None)
        self.custody.add(len(buffer.params))
        self._by_ddp.append(False)
        self._full.append(FullGradient(buffer))
        if self._stage == 2:
            self._pool.reserve(buffer.layout.numel, buffer.pool_key)
        # Gradients already reduced (grad_reduction=None, under DDP) are final only once backward has
        # ended, when DDP has written its result into them: step() takes them then, with no hook.
        if self._reduce:
            self._watch.add(buffer.params)
            index = len(self._buffers) - 1
            self._hooks.add(buffer.params, [(index, slot) for slot in range(len(buffer.params))])

    def _window(self, buffer: ShardedBuffer) -> Window:
        window = Window(len(buffer.params))
        if self._parts:
            window.held = [None] * window.size
        return window

    def _plan(self, index: int) -> HeldPlan:
        """Buffer ``index``'s messages in :meth:`Comm.reduce_scatter_held`, made once."""
        if self._plans[index] is None:
            buffer = self._buffers[index]
            spans = [slot.span for slot in buffer.layout.slots]
            self._plans[index] = held_plan(
                spans, buffer.layout.numel, self._comm.world_size, buffer.grad_dtype.itemsize
            )
        return self._plans[index]

    @property
    def staging_bytes(self) -> int:
        return self._pool.bytes

    def follow(self, index: int) -> None:
        """Buffer ``index`` follows its parameters to a new dtype or device, before any of this window's
        gradients are taken (stage 2: at the first one of a backward); what made for the old dtype is
        made again. A change it cannot follow is kept in :attr:`problems`."""
        window, buffer = self._windows[index], self._buffers[index]
        if window.followed:
            return
        window.followed = True
        self.problems[index] = buffer.mismatch()
        change = buffer.changes()
        if self.problems[index] is None and change is not None and self._comm.world_size > 1:
            if change[1].type != self._comm.device.type:
                self.problems[index] = (0, f"was moved to {change[1]}, which the process group does not communicate")
        if self.problems[index] is None and change is not None:
            buffer.follow()
            self._plans[index] = None
            self._views = {key: views for key, views in self._views.items() if key[0] != index}
            if self._stage == 2:
                self._pool.reserve(buffer.layout.numel, buffer.pool_key)

    # ------------------------------------------------------------------ backward

    def arrived(self, where: tuple[int, int]) -> None:
        """Parameter ``slot`` of buffer ``index`` (``where``) has its gradient (called from backward)."""
        index, slot = where
        if self.accumulating:
            return  # the gradient stays in p.grad, where autograd adds the next micro-batch's to it
        under_ddp = self._watch.reduces()
        if under_ddp is not None:
            # DDP averages it (step() takes p.grad as DDP leaves it), or leaves it alone (its no_sync()).
            self._by_ddp[index] = self._by_ddp[index] or under_ddp
            return
        if self._stage == 1 and not self._in_backward:
            # Its collectives are waited before backward returns: a rank that never joins is named from there.
            self._comm.enter(BACKWARD)
            self._in_backward = True
        if self._stage == 2 and not self._looked:
            self._looked = True
            self._look_for_drops()
        window = self._windows[index]
        if window.launched:
            window.late = True
            return
        self.follow(index)
        if self.problems[index] is not None:
            return  # step() raises on every rank
        self._absorb(index, slot)
        if not window.arrived[slot]:
            window.arrived[slot] = True
            window.arrived_count += 1
            if window.complete:
                self._launch_in_order(until_incomplete=True)

    def _staging(self, index: int) -> Tensor:
        """Buffer ``index``'s staging buffer for this round, its alignment gaps zeroed."""
        window, buffer = self._windows[index], self._buffers[index]
        if window.staging is None:
            if self._comm.world_size == 1 and not window.launched:
                staging = buffer.own_grad_shard()  # nothing to reduce: straight into the shard
            else:
                staging = self._take(buffer)
            if buffer.gap_index.numel():
                staging.index_fill_(0, buffer.gap_index, 0)
            window.staging = staging
            window.views = self._slot_views(index, staging)
        return window.staging

    def _slot_views(self, index: int, staging: Tensor) -> list[Tensor]:
        """Views of ``staging`` shaped like buffer ``index``'s parameters; made once per staging buffer,
        as making a view costs more than copying a small gradient into it."""
        key = (index, staging.data_ptr())
        if key not in self._views:
            self._views[key] = self._buffers[index].views(staging)
        return self._views[key]

    def _take(self, buffer: ShardedBuffer) -> Tensor:
        pool, key = self._pool, buffer.pool_key
        while self._in_flight and not pool.has_free(key) and pool.count(key) >= MAX_STAGING:
            self._finish(self._in_flight.popleft())
        return pool.take(buffer.layout.numel, key)

    def remove_hooks(self) -> None:
        """Backward no longer reports gradients to this reducer (its optimizer was retired)."""
        self._hooks.remove()

    def end_of_backward(self) -> None:
        """Backward has ended. Stage 1 (unless DDP reduced it): every buffer is reduced now, and p.grad
        holds the mean gradient when backward returns, as under DDP."""
        self._watch.backward_ended()
        self._looked = False
        if not self._in_backward:
            return  # stage 2 (its reductions are waited in step()), no_sync(), or DDP's backward
        try:
            self._launch_in_order(until_incomplete=False)
            for index, window in enumerate(self._windows):
                if window.rounds:
                    self._settle_full(index)
        finally:
            self._in_backward = False
            self._comm.leave()
        # The next backward (an accumulation without zero_grad) is a reduction of its own.
        self._windows = [self._window(buffer) for buffer in self._buffers]
        self._next = 0

    def _absorb(self, index: int, slot: int) -> None:
        """Take parameter ``slot``'s ``.grad`` into this round: kept as it is (``held``) or copied into
        the staging buffer the first time, added after that (a second backward before the launch);
        zeros if it has none or a sparse one (kept aside whole, for :meth:`add_sparse`). Stage 1: into
        its span of the full gradient, which p.grad then is."""
        if self._stage == 1:
            self._full[index].absorb([slot], self._windows[index].codes)
            return
        window, buffer = self._windows[index], self._buffers[index]
        param = buffer.params[slot]
        grad, first = self.custody.new_grad(param), not window.arrived[slot]
        code = grad_code(grad)
        if window.held is not None:
            if code == DENSE:
                # A view where autograd made it contiguous in the reduced dtype; never written in place
                # (it may be a tensor the caller set as .grad and still holds).
                flat, kept = buffer.flat_grad(slot, grad), window.held[slot]
                window.held[slot] = flat if first or kept is None else kept + flat
        else:
            if window.staging is None:
                self._staging(index)
            span = window.views[slot]
            if code == DENSE:
                if first:
                    span.copy_(grad)
                else:
                    span.add_(grad)
            elif first:
                span.zero_()
        if code == SPARSE:
            kept = window.sparse_grads.get(slot)
            window.sparse_grads[slot] = grad if kept is None else kept + grad
        window.codes[slot] |= code
        if code == DENSE:
            param.grad = self.custody.stand_in(index, slot, param)
        elif code == SPARSE:
            param.grad = None

    def _look_for_drops(self) -> None:
        """Stage 2: what was taken of every gradient dropped since (model.zero_grad()) is dropped too."""
        for index, slot in self.custody.drops([buffer.grads() for buffer in self._buffers]):
            self._drop(index, slot)

    def _drop(self, index: int, slot: int) -> None:
        window = self._windows[index]
        window.codes[slot] = NO_GRAD
        if window.launched:
            if window.rounds:  # issued already: its pieces of the shard are zeroed once the reduction is done
                window.rounds[-1].dropped.append(slot)
            return
        if window.arrived[slot]:
            window.arrived[slot] = False  # the next gradient is copied over it, or zeros at the launch
            window.arrived_count -= 1
        if window.held is not None:
            window.held[slot] = None

    def _settle_full(self, index: int, reduced: bool = True) -> None:
        """Stage 1, buffer ``index``'s reduction done: the mean (or sum) in its full gradient, and p.grad
        of every parameter that had a gradient on some rank a view of it (a copy in another dtype)."""
        window = self._windows[index]
        for round_ in window.rounds:
            self._finish(round_)
        window.rounds.clear()
        divide = reduced and self._mean and self._comm.world_size > 1
        self._full[index].settle(self._comm.world_size if divide else 1)

    def _launch_in_order(self, until_incomplete: bool) -> None:
        order = self._order()
        while self._next < len(order):
            index = order[self._next]
            if until_incomplete and not self._windows[index].complete:
                return
            if not self._windows[index].launched:  # else reduced by a backward (stage 1)
                self._launch(index)
            self._next += 1

    def _order(self) -> range:
        # Backward produces the last parameters' gradients first: launch the last buffer first.
        return range(len(self._buffers) - 1, -1, -1)

    def _launch(self, index: int) -> None:
        """Issue buffer ``index``'s reduction (stage 2: of what its staging buffer holds, after
        absorbing the gradients that did not arrive through backward)."""
        buffer, window = self._buffers[index], self._windows[index]
        self.follow(index)
        if self.problems[index] is not None:
            window.launched = True  # step() raises on every rank before it would wait for a reduction
            return
        reduce = self._reduce and not self._by_ddp[index]
        if self._stage == 1:
            full = self._full[index]
            full.absorb(
                [slot for slot in range(window.size) if not window.arrived[slot] or window.launched], window.codes
            )
            full.set_flags(window.codes)
            storage = full.storage()
            pending = self._all_reduce(index, storage) if reduce else None
            window.rounds.append(Round(buffer, pending, None, storage, accumulate=False))
            window.launched = True
            return
        for slot in range(window.size):
            if not window.arrived[slot]:
                self._absorb(index, slot)
        window.arrived = [False] * window.size  # a second round starts from no gradient
        grad_shard = buffer.own_grad_shard()
        accumulate = window.launched
        if window.held is not None:
            held, window.held = window.held, [None] * window.size
            if self._known.ranges[index] is None and reduce:
                window.launched = True
                self._launch_held(index, held, torch.empty_like(grad_shard) if accumulate else grad_shard, accumulate)
                return
            self._stage_held(index, held)  # the ranges' all-reduce wants one flat buffer
        staging, window.staging = self._staging(index), None
        window.launched = True
        if staging is grad_shard:
            window.rounds.append(Round(buffer, None, None, grad_shard, accumulate=False))
            return
        into = torch.empty_like(grad_shard) if accumulate else grad_shard
        pending = None
        if reduce and self._known.ranges[index] is not None:
            pending = self._all_reduce(index, staging, then=lambda: into.copy_(staging[buffer.shard.slice]))
        elif reduce:
            pending = self._comm.reduce_scatter(into, staging, "the gradient reduce-scatter")
        else:
            into.copy_(staging[buffer.shard.slice])
        round_ = Round(buffer, pending, staging, into, accumulate)
        window.rounds.append(round_)
        self._in_flight.append(round_)

    def _launch_held(self, index: int, held: list[Tensor | None], into: Tensor, accumulate: bool) -> None:
        """Issue buffer ``index``'s reduce-scatter from the gradients ``held`` where they lie (zeros for
        a parameter without one), once fewer than ``MAX_STAGING`` reductions are in flight."""
        buffer = self._buffers[index]
        parts = [
            torch.zeros(slot.span.size, dtype=buffer.grad_dtype, device=buffer.device) if grad is None else grad
            for slot, grad in zip(buffer.layout.slots, held)
        ]
        while len(self._in_flight) >= MAX_STAGING:
            self._finish(self._in_flight.popleft())
        pending = self._comm.reduce_scatter_held(into, parts, self._plan(index), "the gradient reduce-scatter")
        round_ = Round(buffer, pending, None, into, accumulate)
        self._windows[index].rounds.append(round_)
        self._in_flight.append(round_)

    def _stage_held(self, index: int, held: list[Tensor | None]) -> None:
        """Copy the gradients ``held`` for buffer ``index`` into its staging buffer (zeros where none)."""
        staging = self._staging(index)
        for slot, grad in zip(self._buffers[index].layout.slots, held):
            if grad is None:
                staging[slot.span.slice].zero_()
            else:
                staging[slot.span.slice].copy_(grad)

    def _all_reduce(self, index: int, tensor: Tensor, then: Callable[[], object] | None = None) -> Pending:
        """Issue the all-reduce of buffer ``index``'s gradient ``tensor``: of all of it, or, where the
        buffer holds parameters known to be sparse, of the ranges around them (their spans are zeros
        on every rank: their entries travel in :meth:`add_sparse`). Then ``then``."""
        ranges = self._known.ranges[index]
        if ranges is None:
            return self._comm.all_reduce_(tensor, "the gradient all-reduce")
        numel = self._buffers[index].layout.numel
        if tensor.numel() > numel:  # stage 1's flags after the gradient
            ranges = [*ranges, Span(numel, tensor.numel())]
        return reduce_ranges(self._comm, tensor, ranges, "the gradient all-reduce", then)

    def _finish(self, round_: Round) -> None:
        """Wait for ``round_`` and complete it on this rank (rounds of a buffer finish in order)."""
        if round_.done:
            return
        round_.done = True
        if round_.pending is not None:
            round_.pending.wait()
        if round_.accumulate:
            round_.buffer.grad_shard.add_(round_.into)
        if round_.dropped:
            for piece in round_.buffer.pieces:
                if piece.slot in round_.dropped:
                    round_.buffer.grad_shard[piece.in_shard.slice].zero_()
        if round_.staging is not None:
            self._pool.give(round_.staging)

    # ------------------------------------------------------------------ step()

    def launch_remaining(self) -> None:
        """Issue what backward did not: every buffer not launched yet, in the launch order.

        A launched buffer whose parameters hold a gradient again (written directly, or by a
        second backward) is marked late. Stage 1: a buffer a backward reduced is not reduced
        again; where some p.grad is no longer what that reduction left there (replaced, or set to
        None), the step takes what p.grad holds now.
        """
        if self._stage == 2:
            self._look_for_drops()
        for index, (window, buffer) in enumerate(zip(self._windows, self._buffers)):
            # map(attrgetter) runs at C speed: this is the one look at every parameter a step takes.
            grads = buffer.grads()
            bound = self._full[index].bound
            if bound is not None and not window.launched:
                window.launched = True
                window.codes = buffer.grad_codes()
                if any(grad is not kept for grad, kept in zip(grads, bound)):
                    # Replaced or set to None since: taken as it is, as torch.optim takes p.grad after DDP.
                    self._full[index].absorb(list(range(window.size)), window.codes)
            elif window.launched and (window.late or any(map(grad_code, grads))):
                window.late = True
                window.codes = [old | new for old, new in zip(window.codes, buffer.grad_codes())]
        self._launch_in_order(until_incomplete=False)

    def local_flags(self) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's (has a dense gradient, has a sparse gradient) per parameter, and late per buffer."""
        codes = torch.cat([codes_tensor(w.codes) for w in self._windows] or [torch.zeros(0, dtype=torch.int64)])
        late = torch.tensor([float(w.late) for w in self._windows], dtype=torch.float64)
        return (codes & DENSE != 0).double(), (codes & SPARSE != 0).double(), late

    def launch_late(self, late: list[bool]) -> None:
        """A second round for the buffers late on any rank (every rank calls this with the same flags)."""
        for index in self._order():
            if late[index]:
                self._launch(index)

    def reduced_shard(self, index: int) -> Tensor:
        """Wait for buffer ``index``'s reductions; this rank's shard of the reduced gradient."""
        buffer, window = self._buffers[index], self._windows[index]
        reduced = not self._by_ddp[index]
        if self._stage == 1:
            if window.rounds:  # else a backward reduced it and nothing changed since
                self._settle_full(index, reduced)
            return buffer.full_grad[buffer.shard.slice]
        for round_ in window.rounds:
            self._finish(round_)
        window.rounds.clear()
        if reduced and self._mean and self._comm.world_size > 1:
            buffer.grad_shard.div_(self._comm.world_size)
        return buffer.grad_shard

    def known_sparse(self) -> Tensor | None:
        """Per parameter, in the buffers' order: whether it had a sparse gradient in an earlier step;
        None while no parameter had one (the common case, looked up once per buffer)."""
        return self._known.flags([len(buffer.params) for buffer in self._buffers])

    def add_sparse(self, sparse: list[bool], shards: list[Tensor]) -> None:
        """Collective. Before: ``sparse`` (agreed, per parameter in the buffers' order) names the
        parameters with a sparse gradient on some rank; ``shards`` are this rank's shards of each
        buffer's reduced gradient, zeros in those parameters' spans. After: the reduction (mean or
        sum) of the ranks' sparse gradients is added into the shards, and those parameters stay out
        of the dense reductions of later steps.
        """
        local: dict[Tensor, Tensor | None] = {}
        places: dict[Tensor, tuple[int, int]] = {}
        flags = iter(sparse)
        for index, (buffer, window) in enumerate(zip(self._buffers, self._windows)):
            for slot, param in enumerate(buffer.params):
                if next(flags):
                    grad = window.sparse_grads.get(slot) if self._stage == 2 else param.grad
                    local[param] = None if grad is None else grad.coalesce()
                    places[param] = (index, slot)
        add_reduced(self._comm, local, places, self._buffers, shards, self._reduce, self._mean)
        for index, slot in places.values():
            self._known.mark(index, slot, self._buffers[index].layout)

    def reset(self) -> None:
        """Start a new window: wait for anything still in flight and forget the gradients."""
        while self._in_flight:
            self._finish(self._in_flight.popleft())
        for window, buffer in zip(self._windows, self._buffers):
            for round_ in window.rounds:
                self._finish(round_)
            if window.staging is not None and window.staging is not buffer.grad_shard:
                self._pool.give(window.staging)
        self._windows = [self._window(buffer) for buffer in self._buffers]
        self._next = 0
        self._by_ddp = [False] * len(self._buffers)
        for full in self._full:
            full.bound = None
        self.custody.reset()
