"""The collectives shardopt issues, each bounded by a timeout, and the world-of-one path.

Every collective is issued asynchronously and waited with ``timeout``, so a rank
that dies or stops calling collectives turns into an error on the others instead
of a hang as long as the process group's own timeout (30 minutes by default). The
error names the ranks that did not answer, from the phase board (``phases.py``).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from . import fingerprint
from .own_group import own_group
from .pending import Pending
from .phases import CONSTRUCTION, TOGETHER, Phase, PhaseBoard
from .ring import HeldPlan, PairReduceScatter, Ring

__all__ = ["Comm", "GroupMember", "Pending", "as_timedelta"]


def as_timedelta(timeout: float | timedelta) -> timedelta:
    """``timeout`` as a timedelta; seconds may be given as a number."""
    if isinstance(timeout, timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise TypeError(f"timeout must be seconds (a number) or a timedelta, got {type(timeout).__name__}")
    if not 0 < seconds < math.inf:
        raise ValueError(f"timeout must be a finite positive number of seconds, got {seconds}")
    return timedelta(seconds=seconds)


class Comm:
    """The process group the shards live on: this rank, the world size, and its collectives."""

    def __init__(self, process_group: dist.ProcessGroup | None, timeout: float | timedelta) -> None:
        self.timeout = as_timedelta(timeout)
        #: The last collective call of the optimizer this rank entered, and whether it is still inside it.
        self.phase, self.inside = Phase(0, 0, CONSTRUCTION), True
        self._failed: RuntimeError | None = None  # the first collective of ours that did not complete
        #: Why the optimizer may no longer call collectives (claims.py), or None.
        self.retired: str | None = None
        if process_group is None and dist.is_available() and dist.is_initialized():
            process_group = dist.group.WORLD
        self._group: weakref.ref[dist.ProcessGroup] | None = None
        if process_group is None:
            self.rank, self.world_size, self._rings = 0, 1, False
            self._board = PhaseBoard(None, 0, 1)
            return
        self.rank = dist.get_rank(process_group)
        if self.rank < 0:
            raise ValueError("process_group does not include this rank: create the optimizer only on its members")
        self.world_size = dist.get_world_size(process_group)
        self._board = PhaseBoard(process_group, self.rank, self.world_size)
        self._board.post(self.phase)
        # Held weakly: once dist.destroy_process_group() lets the group go, its destructor joins gloo's
        # worker threads while Python still runs. A group an optimizer kept alive is destroyed at
        # interpreter exit instead, where a worker still releasing the tensors of a last collective
        # cannot take the GIL and the process aborts ("terminate called without an active exception").
        try:  # collective the first time over this group with this timeout: a rank that never comes is named
            own = own_group(process_group, self.timeout)
        except RuntimeError as error:  # torch's DistStoreError of a store-based barrier is one
            raise self._explained("the creation of shardopt's process group", error) from error
        self._group = weakref.ref(own)
        # gloo's reduce-scatter and all-gather are its slowest collectives: on gloo shardopt sends the
        # same bytes around a ring of point-to-point messages (ring.py), which is faster. NCCL keeps its
        # own collectives, rings already.
        self._rings = dist.get_backend(process_group) == "gloo" and self.world_size > 1

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The process group, or None for a world of one without torch.distributed."""
        if self._group is None:
            return None
        group = self._group()
        if group is None:
            raise RuntimeError(
                "shardopt: the process group of this optimizer was destroyed (dist.destroy_process_group()); "
                "create the optimizer again after dist.init_process_group(), loading its state from a checkpoint"
            )
        return group

    @property
    def device(self) -> torch.device:
        """Where this group's collectives want their tensors (NCCL: this rank's GPU)."""
        if self.group is not None and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def steps(self) -> int:
        """The step() calls this rank has entered."""
        return self.phase.steps

    def enter(self, call: str, *, step: bool = False) -> None:
        """This rank enters the collective call ``call`` ("step()", "state_dict()", ...): it posts it on
        the phase board, where ranks whose collectives it fails to join will read it. An optimizer another
        took the parameters of (claims.py) raises instead."""
        if self.retired is not None:
            raise RuntimeError(self.retired)
        self._post(call, step)

    def _post(self, call: str, step: bool = False) -> None:
        self.phase, self.inside = Phase(self.phase.calls + 1, self.phase.steps + step, call), True
        self._board.post(self.phase)

    def mark(self, call: str) -> None:
        """Post ``call`` on the phase board as a call entered and left at once: a point every rank passes
        that holds no collective of ours (a forward under DDP)."""
        self._post(call)
        self.leave()

    def leave(self) -> None:
        """The call entered last has returned (errors of collectives waited later say "after" it)."""
        self.inside = False
        self._board.post(replace(self.phase, left=True), quiet=True)  # in the finally of a call that may be failing

    @contextlib.contextmanager
    def call(self, call: str, *, step: bool = False, agree: bool = False) -> Iterator[None]:
        """The block holds the collectives of the call ``call``: entered (as :meth:`enter`; with
        ``agree``, agreed: see :meth:`agree`) before them, left after them, whether they complete or raise."""
        self.enter(call, step=step)
        try:
            if agree:
                self.agree()
            yield
        finally:
            self.leave()

    def agree(self) -> None:
        """Collective: check that every rank is in the call this rank entered last, after as many
        step() calls; DesyncError if not, an error naming the ranks that never come after the timeout.

        The board is read before any collective: a rank in another call (one more step()) would
        otherwise pair its collectives with these. The fingerprint check that follows is the same
        test where the board cannot be read, and a collective every rank leaves this call by.
        """
        if self.world_size == 1:
            return
        self._board.gather(self.phase, self.timeout, lambda story: self._failure("the agreement", story, None))
        steps = self.phase.steps
        item = (f"the number of step() calls ({steps} on this rank)", fingerprint.stable_hash(steps))
        fingerprint.check(self, [item], str(self.phase))

    def _failure(self, what: str, story: str, error: BaseException | None, desync: bool = False) -> RuntimeError:
        """The error of a collective ``what`` this rank could not complete; ``story`` tells why."""
        where = f" ({'' if self.inside else 'after '}{self.phase})" if self.phase.calls else ""
        cause = f" ({type(error).__name__}: {error})" if error is not None else ""
        return (fingerprint.DesyncError if desync else RuntimeError)(
            f"shardopt: {what}{where} on rank {self.rank} of {self.world_size} did not complete (the timeout is "
            f"{self.timeout.total_seconds():g} s): {story}; {TOGETHER}{cause}"
        )

    def _issue(self, work: dist.Work | None, what: str, then: Callable[[], None] | None = None) -> Pending:
        return Pending(self, work, what, then)

    def wait(self, work: dist.Work | None, what: str) -> None:
        """Wait for ``work``, raising a clear error if it does not complete within the timeout."""
        if work is not None and self._failed is not None:
            # Collectives issued before a failure (other buffers of the step) would each wait out the
            # timeout again, to end in the same error: it comes at once instead.
            raise type(self._failed)(str(self._failed)) from self._failed
        try:
            if work is not None and not work.wait(self.timeout):
                raise RuntimeError("the wait returned without completing")
        except RuntimeError as error:
            self._failed = self._explained(what, error)
            raise self._failed from error

    def _explained(self, what: str, error: RuntimeError) -> RuntimeError:
        """The error of ``what``, which did not complete, with what the phase board says of the others."""
        survey = self._board.survey(self.phase)
        if isinstance(survey, str):  # the board could not be read
            return self._failure(what, survey, error)
        return self._failure(what, survey.explain(), error, desync=bool(survey.astray))

    def all_reduce_(self, tensor: Tensor, what: str, op: dist.ReduceOp = dist.ReduceOp.SUM) -> Pending:
        """Every rank: ``tensor`` becomes the element-wise reduction of all ranks' ``tensor``."""
        if self.world_size == 1:
            return self._issue(None, what)
        return self._issue(dist.all_reduce(tensor, op=op, group=self.group, async_op=True), what)

    def reduce_scatter(self, shard: Tensor, full: Tensor, what: str) -> Pending:
        """Before: every rank holds a ``full`` buffer. After: rank r's ``shard`` is the sum of
        all ranks' r-th slices of it (on gloo ``full`` is summed in place on the way). ``shard`` is
        not a part of ``full``."""
        if self.world_size == 1:
            shard.copy_(full)
            return self._issue(None, what)
        if self._rings:
            return Ring(self, full, shard, what, reduce=True)
        return self._issue(dist.reduce_scatter_single(shard, full, group=self.group, async_op=True), what)

    @property
    def reduces_held(self) -> bool:
        """Whether :meth:`reduce_scatter_held` can be called: gloo between two ranks, where the
        reduce-scatter only reads each rank's own data (ring.py)."""
        return self._rings and self.world_size == 2

    def reduce_scatter_held(self, shard: Tensor, parts: Sequence[Tensor], plan: HeldPlan, what: str) -> Pending:
        """:meth:`reduce_scatter` of the flat buffer ``plan`` describes, given as the tensors it holds
        (``parts``: 1-D, one per span the plan was made of, read where they lie); only where
        :attr:`reduces_held`."""
        return PairReduceScatter(self, shard, parts, plan, what)

    def all_gather(self, full: Tensor, shard: Tensor, what: str) -> Pending:
        """Before: rank r holds ``shard``, its slice r of ``full``. After: every rank holds all of ``full``.

        ``shard`` may be a view of ``full`` (the all-gather is then in place).
        """
        if self.world_size == 1:
            if shard.data_ptr() != full.data_ptr():
                full.copy_(shard)
            return self._issue(None, what)
        if self._rings:
            return Ring(self, full, shard, what, reduce=False)
        return self._issue(dist.all_gather_single(full, shard, group=self.group, async_op=True), what)

    def broadcast_(self, tensor: Tensor, what: str, src: int = 0) -> Pending:
        """Every rank: ``tensor`` becomes rank ``src``'s ``tensor`` (``src`` is a rank of this group)."""
        if self.world_size == 1:
            return self._issue(None, what)
        global_src = dist.get_global_rank(self.group, src)
        return self._issue(dist.broadcast(tensor, src=global_src, group=self.group, async_op=True), what)


class GroupMember:
    """What an optimizer over a process group tells about its place in it (``self._comm``)."""

    _comm: Comm

    def _retire(self, reason: str) -> None:
        """Another optimizer took parameters of this one (claims.py): stop acting on them, and raise
        ``reason`` from every later collective call."""
        self._release()
        self._comm.retired = reason

    def _release(self) -> None:
        """Remove every hook this optimizer put on the parameters or modules."""

    @property
    def rank(self) -> int:
        return self._comm.rank

    @property
    def world_size(self) -> int:
        return self._comm.world_size
