"""The gradient pipeline: from each parameter's ``.grad`` to this rank's shard of the reduced gradient.

Stage 2 overlaps the reduction with backward, as DDP does. A post-accumulate-grad hook
copies each parameter's gradient into its span of the bucket's staging buffer as soon as
autograd has it, and releases it (``p.grad = None``), so a gradient exists twice only for
the length of one copy. Once a bucket is complete, and every bucket before it in the launch
order has been launched, its staging buffer is reduce-scattered asynchronously while
backward goes on. Staging buffers come from a pool of at most ``MAX_STAGING`` per dtype and
device: a bucket that needs one when all are taken first waits for the oldest reduction in
flight, which hands its buffer back. So the gradient memory of a step is this rank's shard
plus a few buckets, not a full copy of the model's gradients, and no bucket pays for a fresh
allocation every step. In a world of one the gradients are copied straight into the shard.
Where the reduce-scatter can read the gradients where they lie (gloo between two ranks:
``Comm.reduces_parts``), the hook keeps each gradient as autograd made it instead of copying
it, and the reduction reads it from there; at most ``MAX_STAGING`` buckets are in flight,
the same bound.

``step()`` launches what backward left (buckets with a parameter that is unused on this
rank, gradients written into ``.grad`` directly) in the same order, so every rank issues the
same collectives in the same order however its backward went. Gradient that arrives for a
bucket after its launch (a second backward before the step) is reduced in a second round,
which every rank joins when any rank needs it; reductions are sums, so the rounds add up to
the reduction of the total.

Stage 1 reduces as DDP does: the hook copies each gradient into its span of the buffer's full
gradient (``p.grad`` becomes a view of it), a complete bucket is all-reduced at once, and a
callback at the end of backward launches the rest, waits, and leaves the mean in every
``p.grad`` (one flag per parameter rides with each all-reduce, so a parameter unused on this
rank gets the others' mean too). Code between backward and step sees DDP's gradients; a
``p.grad`` replaced after backward is taken as it is at ``step()``, as torch.optim takes it.
Gradients written into ``.grad`` with no backward are reduced at ``step()``.

Under DDP (the model wrapped after the optimizer was built, as frameworks do, ``ddp_watch.py``)
neither stage reduces: ``step()`` takes ``p.grad`` as DDP leaves it.

Sparse gradients (SGD, Adagrad) leave zeros in their spans and are reduced as entries once the
ranks have agreed which parameters have them (``add_sparse``, ``sparse_grads.py``); a buffer
holding a parameter sparse in an earlier step reduces only the ranges around it.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..collectives import sparse_exchange
from ..collectives.comm import Comm, Pending
from ..collectives.phases import BACKWARD, DDP_FORWARD
from ..collectives.ring import PartsPlan, parts_plan
from ..collectives.span import Span
from ..shared.backward_hooks import BackwardHooks
from ..shared.ddp_watch import DDPWatch
from .buffer import DENSE, NO_GRAD, SPARSE, ShardedBuffer, grad_code
from .sparse_grads import add_entries, dense_ranges, reduce_ranges
from .staging import PoolKey, StagingPool
from .taken_grad import TakenGrad

# Staging buffers (each as long as the longest bucket) per dtype and device: two reductions in
# flight keep the link busy while a third bucket fills, and a fourth absorbs buckets that
# complete out of the launch order. More are made only if every one is filling, none in flight.
MAX_STAGING = 4
_GRAD = operator.attrgetter("grad")


def _pool_key(buffer: ShardedBuffer) -> PoolKey:
    return (buffer.grad_dtype, buffer.device)


@dataclass
class _Round:
    """One issued reduction of a buffer's gradient."""

    buffer: ShardedBuffer
    pending: Pending | None  # None: nothing to wait for (no reduction, or a world of one)
    staging: Tensor | None  # handed back to the pool once the collective is done
    into: Tensor  # where the result lands
    accumulate: bool  # add ``into`` to the gradient shard once done (a second round)
    done: bool = False
    # Stage 2: parameters whose gradient was dropped (model.zero_grad()) after this round was issued and
    # before the next: their pieces of the gradient shard are zeroed once it is done.
    dropped: list[int] = field(default_factory=list)


@dataclass
class _Window:
    """One buffer's gradient between two steps."""

    size: int
    arrived: list[bool] = field(init=False)
    arrived_count: int = 0
    codes: list[int] = field(init=False)  # per parameter, the kinds absorbed: NO_GRAD, or DENSE | SPARSE bits
    staging: Tensor | None = None  # being filled, not launched yet
    # Where the reduce-scatter reads the gradients where they lie: per parameter, its flat gradient
    # (None until it has one); None where gradients are copied into ``staging``.
    held: list[Tensor | None] | None = None
    views: list[Tensor] = field(default_factory=list)  # of ``staging``, one per parameter
    sparse_grads: dict[int, Tensor] = field(default_factory=dict)  # stage 2: per slot, kept aside whole
    followed: bool = False  # the buffer has looked for a new dtype or device of its parameters
    launched: bool = False
    late: bool = False
    rounds: list[_Round] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.arrived = [False] * self.size
        self.codes = [NO_GRAD] * self.size

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
        self._parts = stage == 2 and self._reduce and comm.reduces_parts
        self._plans: list[PartsPlan | None] = []
        self._next = 0  # position in the launch order of the next buffer to launch
        self._pool = StagingPool()
        self._in_flight: deque[_Round] = deque()
        self._views: dict[tuple[int, int], list[Tensor]] = {}
        # Per buffer, the slots agreed sparse in some step (the same on every rank) and, where there
        # are any, the ranges its dense reduction covers instead of the whole buffer.
        self._sparse: list[set[int]] = []
        self._dense_ranges: list[list[Span] | None] = []
        # Inside ``no_sync()``: backward's hooks leave gradients where they are.
        self.accumulating = False
        # A rank that goes on training past a call the others are in is named there (phases.py).
        self._watch = DDPWatch(lambda: comm.mark(DDP_FORWARD))
        self._hooks = BackwardHooks(self.end_of_backward, self.arrived)
        self._in_backward = False  # stage 1: this backward's reduction is under way (entered on the board)
        # Per buffer: DDP reduced its gradients (they are taken as they are); stage 1: the gradients
        # a backward's reduction put in p.grad (None where a parameter got none), its full gradient
        # with one flag per parameter after it (summed by the reduction: how many ranks had one),
        # and views of it shaped like the parameters.
        self._by_ddp: list[bool] = []
        self._bound: list[list[Tensor | None] | None] = []
        self._storage: list[Tensor | None] = []
        self._full_views: list[list[Tensor]] = []
        # Stage 2, per buffer and parameter: the TakenGrad it leaves in p.grad (made once), whether one
        # was left there since the last step, and whether the gradient taken was dropped since.
        self._taken: list[list[TakenGrad | None]] = []
        self._placed: list[list[bool]] = []
        self._dropped: list[list[bool]] = []
        self._looked = False  # stage 2: this backward looked for dropped gradients at its first arrival
        #: Stage 2: a backward added to a gradient an earlier step() took (no zero_grad() after it).
        self.stale = False
        #: Per buffer: what it cannot follow of what was done to its parameters, as (slot, what
        #: happened), None where it can; step() raises on every rank, and such a buffer is not reduced.
        self.problems: list[tuple[int, str] | None] = []

    def add(self, buffer: ShardedBuffer) -> None:
        self._buffers.append(buffer)
        self._windows.append(self._window(buffer))
        self._plans.append(None)
        self._sparse.append(set())
        self._dense_ranges.append(None)
        self.problems.append(None)
        self._taken.append([None] * len(buffer.params))
        self._placed.append([False] * len(buffer.params))
        self._dropped.append([False] * len(buffer.params))
        self._by_ddp.append(False)
        self._bound.append(None)
        self._storage.append(None)
        self._full_views.append([])
        if self._stage == 2:
            self._pool.reserve(buffer.layout.numel, _pool_key(buffer))
        # Gradients already reduced (grad_reduction=None, under DDP) are final only once backward has
        # ended, when DDP has written its result into them: step() takes them then, with no hook.
        if self._reduce:
            self._watch.add(buffer.params)
            index = len(self._buffers) - 1
            self._hooks.add(buffer.params, [(index, slot) for slot in range(len(buffer.params))])

    def _window(self, buffer: ShardedBuffer) -> _Window:
        window = _Window(len(buffer.params))
        if self._parts:
            window.held = [None] * window.size
        return window

    def _plan(self, index: int) -> PartsPlan:
        """Buffer ``index``'s messages in :meth:`Comm.reduce_scatter_parts`, made once."""
        if self._plans[index] is None:
            buffer = self._buffers[index]
            spans = [slot.span for slot in buffer.layout.slots]
            self._plans[index] = parts_plan(
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
                self._pool.reserve(buffer.layout.numel, _pool_key(buffer))

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
                staging = self._grad_shard(buffer)  # nothing to reduce: straight into the shard
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
        pool, key = self._pool, _pool_key(buffer)
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
            self._absorb_full([slot], index)
            return
        window, buffer = self._windows[index], self._buffers[index]
        param = buffer.params[slot]
        grad, first = self._new_grad(index, slot), not window.arrived[slot]
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
            param.grad = self._taken_grad(index, slot)
            self._placed[index][slot] = True
        elif code == SPARSE:
            param.grad = None

    def _taken_grad(self, index: int, slot: int) -> TakenGrad:
        """Stage 2: what parameter ``slot`` of buffer ``index`` holds in p.grad once its gradient is taken."""
        taken, param = self._taken[index][slot], self._buffers[index].params[slot]
        if taken is None or taken.dtype != param.dtype or taken.device != param.device:
            taken = self._taken[index][slot] = TakenGrad.like(param)
        taken.incoming, taken.zeroed = None, False
        return taken

    def _new_grad(self, index: int, slot: int) -> Tensor | None:
        """Stage 2: the gradient parameter ``slot`` of buffer ``index`` has that this round did not take
        yet: what autograd added to its TakenGrad, or what p.grad holds instead of one."""
        grad = self._buffers[index].params[slot].grad
        if isinstance(grad, TakenGrad):  # one an earlier step() left is found stale by _look_for_drops first
            grad, grad.incoming = grad.incoming, None
        return grad

    def _look_for_drops(self) -> None:
        """Stage 2: every parameter whose TakenGrad is gone from p.grad (set to None, replaced) or was
        zeroed had its gradient dropped, as torch would drop it: what was taken of it is dropped too."""
        for index, buffer in enumerate(self._buffers):
            placed = self._placed[index]
            for slot, grad in enumerate(_grads(buffer)):
                there = isinstance(grad, TakenGrad) and not grad.zeroed  # a cast model's gradients are cast ones
                if placed[slot] and not there:
                    self._drop(index, slot)
                elif not placed[slot] and there:
                    self.stale = True  # left in p.grad by an earlier step: torch would take that gradient again

    def _drop(self, index: int, slot: int) -> None:
        window = self._windows[index]
        self._placed[index][slot] = False
        self._dropped[index][slot] = True
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

    def _full(self, index: int) -> Tensor:
        """Stage 1: buffer ``index``'s full gradient, and one flag per parameter after it."""
        buffer = self._buffers[index]
        if buffer.full_grad is None:
            numel = buffer.layout.numel
            storage = torch.zeros(numel + len(buffer.params), dtype=buffer.grad_dtype, device=buffer.device)
            self._storage[index], buffer.full_grad = storage, storage[:numel]
            self._full_views[index] = buffer.views(buffer.full_grad)
        return self._storage[index]

    def _absorb_full(self, slots: list[int], index: int) -> None:
        """Stage 1: parameters ``slots`` of buffer ``index`` give their ``.grad`` to the full gradient,
        which each p.grad then is a view of (zeros where there is none, or a sparse one)."""
        window, buffer = self._windows[index], self._buffers[index]
        self._full(index)
        views = self._full_views[index]
        targets, sources = [], []
        for slot in slots:
            param, view = buffer.params[slot], views[slot]
            grad = param.grad
            code = grad_code(grad)
            window.codes[slot] |= code
            if code != DENSE:
                view.zero_()  # a sparse gradient stays this rank's own in p.grad: add_sparse reduces it
            elif grad is not view:
                targets.append(view)
                sources.append(grad)
                if view.dtype == param.dtype:
                    param.grad = view  # the reduction's result lands where autograd adds the next gradient
        if targets:  # one call: per-tensor copies of small gradients cost more than the bytes they move
            torch._foreach_copy_(targets, sources)

    def _settle_full(self, index: int, reduced: bool = True) -> None:
        """Stage 1, buffer ``index``'s reduction done: the mean (or sum) in its full gradient, and p.grad
        of every parameter that had a gradient on some rank a view of it (a copy in another dtype)."""
        window, buffer = self._windows[index], self._buffers[index]
        for round_ in window.rounds:
            self._finish(round_)
        window.rounds.clear()
        if reduced and self._mean and self._comm.world_size > 1:
            buffer.full_grad.div_(self._comm.world_size)
        used = (self._storage[index][buffer.layout.numel :] > 0).tolist()
        # A sparse gradient stays this rank's own: add_sparse reduces it, and a dense one elsewhere is an error.
        mine = buffer.grad_codes()
        buffer.bind_grads(buffer.full_grad, [present and code != SPARSE for present, code in zip(used, mine)])
        self._bound[index] = [param.grad for param in buffer.params]

    def _launch_in_order(self, until_incomplete: bool) -> None:
        order = self._order()
        while self._next < len(order):
            index = order[self._next]
            if until_incomplete and not self._windows[index].complete:
                return
            if not self._windows[index].launched:  # else reduced by a backward (stage 1)
                self._launch(index)
            self._next += 1

    @staticmethod
    def _grad_shard(buffer: ShardedBuffer) -> Tensor:
        if buffer.grad_shard is None:
            buffer.grad_shard = buffer.new_shard(buffer.grad_dtype)
        return buffer.grad_shard

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
            self._absorb_full(
                [slot for slot in range(window.size) if not window.arrived[slot] or window.launched], index
            )
            storage = self._full(index)
            flags = [float(code & DENSE != 0) for code in window.codes]
            storage[buffer.layout.numel :].copy_(torch.tensor(flags, dtype=storage.dtype))
            pending = self._all_reduce(index, storage) if reduce else None
            window.rounds.append(_Round(buffer, pending, None, storage, accumulate=False))
            window.launched = True
            return
        for slot in range(window.size):
            if not window.arrived[slot]:
                self._absorb(index, slot)
        window.arrived = [False] * window.size  # a second round starts from no gradient
        grad_shard = self._grad_shard(buffer)
        accumulate = window.launched
        if window.held is not None:
            held, window.held = window.held, [None] * window.size
            if self._dense_ranges[index] is None and reduce:
                window.launched = True
                self._launch_parts(index, held, torch.empty_like(grad_shard) if accumulate else grad_shard, accumulate)
                return
            self._stage_held(index, held)  # the ranges' all-reduce wants one flat buffer
        staging, window.staging = self._staging(index), None
        window.launched = True
        if staging is grad_shard:
            window.rounds.append(_Round(buffer, None, None, grad_shard, accumulate=False))
            return
        into = torch.empty_like(grad_shard) if accumulate else grad_shard
        pending = None
        if reduce and self._dense_ranges[index] is not None:
            pending = self._all_reduce(index, staging, then=lambda: into.copy_(staging[buffer.shard.slice]))
        elif reduce:
            pending = self._comm.reduce_scatter(into, staging, "the gradient reduce-scatter")
        else:
            into.copy_(staging[buffer.shard.slice])
        round_ = _Round(buffer, pending, staging, into, accumulate)
        window.rounds.append(round_)
        self._in_flight.append(round_)

    def _launch_parts(self, index: int, held: list[Tensor | None], into: Tensor, accumulate: bool) -> None:
        """Issue buffer ``index``'s reduce-scatter from the gradients ``held`` where they lie (zeros for
        a parameter without one), once fewer than ``MAX_STAGING`` reductions are in flight."""
        buffer = self._buffers[index]
        parts = [
            torch.zeros(slot.span.size, dtype=buffer.grad_dtype, device=buffer.device) if grad is None else grad
            for slot, grad in zip(buffer.layout.slots, held)
        ]
        while len(self._in_flight) >= MAX_STAGING:
            self._finish(self._in_flight.popleft())
        pending = self._comm.reduce_scatter_parts(into, parts, self._plan(index), "the gradient reduce-scatter")
        round_ = _Round(buffer, pending, None, into, accumulate)
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
        ranges = self._dense_ranges[index]
        if ranges is None:
            return self._comm.all_reduce_(tensor, "the gradient all-reduce")
        numel = self._buffers[index].layout.numel
        if tensor.numel() > numel:  # stage 1's flags after the gradient
            ranges = [*ranges, Span(numel, tensor.numel())]
        return reduce_ranges(self._comm, tensor, ranges, "the gradient all-reduce", then)

    def _finish(self, round_: _Round) -> None:
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
            grads = _grads(buffer)
            bound = self._bound[index]
            if bound is not None and not window.launched:
                window.launched = True
                window.codes = buffer.grad_codes()
                if any(grad is not kept for grad, kept in zip(grads, bound)):
                    # Replaced or set to None since: taken as it is, as torch.optim takes p.grad after DDP.
                    self._absorb_full(list(range(window.size)), index)
            elif window.launched and (window.late or any(map(grad_code, grads))):
                window.late = True
                window.codes = [old | new for old, new in zip(window.codes, buffer.grad_codes())]
        self._launch_in_order(until_incomplete=False)

    def local_flags(self) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's (has a dense gradient, has a sparse gradient) per parameter, and late per buffer."""
        codes = torch.cat([_as_tensor(w.codes) for w in self._windows] or [torch.zeros(0, dtype=torch.int64)])
        late = torch.tensor([float(w.late) for w in self._windows], dtype=torch.float64)
        return (codes & DENSE != 0).double(), (codes & SPARSE != 0).double(), late

    def dropped_flags(self) -> Tensor:
        """Stage 2, per parameter: whether this rank dropped the gradient taken of it since the last step."""
        return torch.tensor([float(flag) for flags in self._dropped for flag in flags], dtype=torch.float64)

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
        if not any(self._sparse):
            return None
        sizes = [len(buffer.params) for buffer in self._buffers]
        return torch.tensor([slot in sparse for size, sparse in zip(sizes, self._sparse) for slot in range(size)])

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
        world = self._comm.world_size
        if self._reduce and world > 1:
            everyone = sparse_exchange.gather_gradients(self._comm, local)
        else:  # nothing to reduce: this rank's own gradient is the result
            everyone = {p: (g.indices(), g.values()) for p, g in local.items() if g is not None}
        for param, (indices, values) in everyone.items():
            index, slot = places[param]
            buffer = self._buffers[index]
            values = values.to(buffer.grad_dtype)
            if self._mean and world > 1:  # before summing duplicates, as (g_0 + ... + g_N-1) / N adds g_r / N
                values = values / world
            for piece in buffer.pieces:
                if piece.slot == slot:
                    window = shards[index][piece.in_shard.slice]
                    add_entries(window, piece.in_param, tuple(param.shape), indices, values)
        for index, slot in places.values():
            if slot not in self._sparse[index]:
                self._sparse[index].add(slot)
                layout = self._buffers[index].layout
                self._dense_ranges[index] = dense_ranges(layout.slots, self._sparse[index], layout.numel)

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
        self._bound = [None] * len(self._buffers)
        self._placed = [[False] * len(buffer.params) for buffer in self._buffers]
        self._dropped = [[False] * len(buffer.params) for buffer in self._buffers]
        self.stale = False


def _grads(buffer: ShardedBuffer) -> list[Tensor | None]:
    return list(map(_GRAD, buffer.params))


def _as_tensor(codes: list[int]) -> Tensor:
    # Every parameter dense is the common case; testing for it runs at C speed, a general list does not.
    if codes.count(DENSE) == len(codes):
        return torch.full((len(codes),), DENSE, dtype=torch.int64)
    return torch.tensor(codes, dtype=torch.int64)
