"""The phase board: which collective call each rank last entered, kept on the process group's store.

A collective that never completes says only that some rank did not join it. To name that rank,
each rank posts one entry per optimizer on the store torch.distributed already has (the one
``init_process_group`` or torchrun set up): the collective calls it has entered (``step()``,
``state_dict()``, ``clip_grad_norm_()``, a checkpoint save, ...), how many of them were
``step()`` calls, and the last one. That is one small write per call, not per collective.
On a failure a rank reads the others' entries, with a bounded wait, and
names the ranks that are not in its call and where each of them is.

The same entries catch ranks that called ``step()`` a different number of times: at the calls
that must agree (``state_dict()``, loads, checkpoint saves, ``verify_every``), each rank waits on
the board until every rank has entered as many calls; a rank found in another call, or in the
same call after another number of steps, makes it a :class:`DesyncError` before any collective.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

import torch.distributed as dist

from .fingerprint import DesyncError

T = TypeVar("T")

# The longest a rank waits for the store to answer a read, where the store's host may have died.
READ_SECONDS = 5.0
# Pauses between the reads of a rank waiting on the board for the others (the longest one).
FIRST_PAUSE, LONGEST_PAUSE = 0.0005, 0.05
CONSTRUCTION = "the optimizer's construction"
# Posted on the board by the training itself (stage 1's reduction in backward; a forward through the DDP
# module that will reduce the gradients): a rank found there went on training past a call of the others.
BACKWARD, DDP_FORWARD = "backward", "a forward under DDP"
# How long a rank waits for others that left their last call to enter the one it is in, before it takes
# them as not coming: ranks reach a collective call within moments of each other (the call before
# was collective too), and one made on some ranks only (``if rank == 0: opt.state_dict()``) would
# otherwise wait out the timeout.
LONE_SECONDS = 20.0
ONLY_SOME = (
    "a call made on some ranks only never completes (HF Trainer saves the optimizer from the main process "
    "alone: use shardopt.integrations.transformers); make it on every rank"
)
WENT_ON = "{ranks} went on training while this rank is in {mine}: " + ONLY_SOME
UNREADABLE = "the phase board (on the process group's store) could not be read, so its host may have died"
TOGETHER = (
    "every rank must call step(), state_dict(), load_state_dict(), clip_grad_norm_(), a GradScaler's unscale_() "
    "and checkpoint save/load together"
)

# Optimizers created on each process group, in order (the same on every rank): each gets its own entries.
_created: defaultdict[str, Iterator[int]] = defaultdict(itertools.count)


@dataclass(frozen=True)
class Phase:
    """The last collective call a rank entered on one optimizer."""

    calls: int  # the collective calls entered so far, this one included (0: none yet)
    steps: int  # how many of them were step() calls
    call: str  # "step()", "state_dict()", "checkpoint.save", ...
    left: bool = field(default=False, compare=False)  # the rank has returned from it

    def __str__(self) -> str:
        if self.call == "step()":
            return f"step() call {self.steps}"
        if not self.steps:
            return self.call
        return f"{self.call} after {self.steps} step() call{'s' if self.steps > 1 else ''}"

    def encode(self) -> str:
        return f"{self.calls} {self.steps} {int(self.left)} {self.call}"

    @staticmethod
    def decode(text: str) -> Phase:
        calls, steps, left, call = text.split(" ", 3)
        return Phase(int(calls), int(steps), call, left=left == "1")


@dataclass
class Survey:
    """Where the other ranks are, seen from a rank in ``mine``."""

    mine: Phase
    rank: int
    entries: dict[int, Phase | None]  # every rank's entry (None: it posted none)

    def _ranks(self, keep: Callable[[Phase | None], bool]) -> list[int]:
        return [r for r, phase in self.entries.items() if r != self.rank and keep(phase)]

    @property
    def behind(self) -> list[int]:
        """Ranks that have not entered this call yet (or posted nothing)."""
        return self._ranks(lambda phase: phase is None or phase.calls < self.mine.calls)

    @property
    def astray(self) -> list[int]:
        """Ranks in another call than this one, where they cannot take part in it."""
        mine = self.mine
        return self._ranks(
            lambda phase: (
                phase is not None and (phase.calls > mine.calls or (phase.calls == mine.calls and phase != mine))
            )
        )

    def explain(self) -> str:
        """Why a collective of this call did not complete, as far as the board tells."""
        return self.desync() if self.astray else self.silence()

    def desync(self) -> str:
        """Every rank's call, grouped: "rank 1 is in step() call 2 while ranks 0, 2 are in state_dict()..."."""
        groups: dict[str, list[int]] = {}
        for rank, phase in self.entries.items():
            groups.setdefault("no call (it posted nothing)" if phase is None else str(phase), []).append(rank)
        parts = [
            f"{ranks_text(ranks)} {'is' if len(ranks) == 1 else 'are'} in {where}" for where, ranks in groups.items()
        ]
        story = f"ranks called step() different numbers of times, or made different calls: {' while '.join(parts)}"
        training = self._ranks(lambda phase: phase is not None and phase.call in (BACKWARD, DDP_FORWARD))
        if training and self.mine.call not in (BACKWARD, DDP_FORWARD, "step()"):
            story += "; " + WENT_ON.format(ranks=ranks_text(training), mine=self.mine)
        return story

    def lone(self, seconds: float) -> str:
        """The ranks that left their last call and did not come to this one within ``seconds``."""
        behind = self.behind
        last = "; ".join(f"rank {rank} left {self.entries[rank]}" for rank in behind)
        return f"{last} and did not enter {self.mine} within {seconds:g} s of this rank: {ONLY_SOME}"

    def silence(self) -> str:
        """Which ranks did not answer, and the last call each entered."""
        behind = self.behind
        if not behind:
            return f"every rank is in {self.mine}: one of them may be stuck inside it, or the collective itself failed"
        lines = []
        for rank in behind:
            phase = self.entries[rank]
            lines.append(
                f"rank {rank} posted nothing on the phase board"
                if phase is None
                else f"the last call rank {rank} entered is {phase}"
            )
        company = [r for r in self.entries if r != self.rank and r not in behind]
        here = (
            f"this rank{' and ' + ranks_text(company) if company else ''} {'are' if company else 'is'} in {self.mine}"
        )
        return f"{ranks_text(behind)} did not answer: {'; '.join(lines)} ({here})"


def ranks_text(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def _within(seconds: float, fn: Callable[[], T]) -> T:
    """``fn()``, run by a daemon thread so that a store that stopped answering cannot hang this rank."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(fn())
        except BaseException as error:  # re-raised in the caller
            failure.append(error)

    thread = threading.Thread(target=run, name="shardopt-phase-board", daemon=True)
    thread.start()
    thread.join(seconds)
    if failure:
        raise failure[0]
    if not outcome:
        raise TimeoutError(f"the process group's store did not answer within {seconds:g} s (its host may have died)")
    return outcome[0]


class PhaseBoard:
    """This optimizer's entries on the store of its process group; a world of one has none."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self._store: dist.Store | None = None
        self._keys = [f"rank{r}" for r in range(world_size)]
        if group is None or world_size == 1:
            return
        try:  # the group's own store, already prefixed by its name (private, hence guarded)
            store, name = dist.distributed_c10d._get_process_group_store(group), group.group_name
        except (AttributeError, KeyError):  # a group torch.distributed does not know: errors just say less
            return
        self._store = dist.PrefixStore(f"shardopt/{next(_created[name])}", store)

    def post(self, phase: Phase, quiet: bool = False) -> None:
        """Say that this rank entered ``phase`` (one small write to the store).
        ``quiet``: a store that fails is left to the next collective to report."""
        if self._store is not None:
            try:
                self._store.set(self._keys[self.rank], phase.encode())
            except Exception:
                if not quiet:
                    raise

    def survey(self, mine: Phase) -> Survey | str:
        """Every rank's entry, read within :data:`READ_SECONDS`; or why they could not be read."""
        if self._store is None:
            return "the process group has no store shardopt can read, so it cannot tell which rank did not answer"
        try:
            return _within(READ_SECONDS, lambda: self._read(mine))
        except Exception as error:
            return f"{UNREADABLE}: {type(error).__name__}: {error}"

    def _read(self, mine: Phase) -> Survey:
        assert self._store is not None
        store = self._store
        posted = self._keys if store.check(self._keys) else [key for key in self._keys if store.check([key])]
        values = dict(zip(posted, store.multi_get(posted))) if posted else {}
        entries = {r: Phase.decode(values[key].decode()) if key in values else None for r, key in enumerate(self._keys)}
        return Survey(mine, self.rank, entries)

    @staticmethod
    def _lone(survey: Survey, started: float) -> bool:
        """Whether the ranks ``survey`` finds behind all left their last call :data:`LONE_SECONDS` ago or more."""
        behind = [survey.entries[rank] for rank in survey.behind]
        waited = time.monotonic() - started >= LONE_SECONDS
        return bool(behind) and waited and all(phase is not None and phase.left for phase in behind)

    def gather(self, mine: Phase, timeout: timedelta, failure: Callable[[str], Exception]) -> None:
        """Wait until every rank has entered the call this rank is in (``mine``, posted already).

        DesyncError where a rank is found in another call, or in this one after another number of
        steps, once every other rank has come (or ``timeout`` passed), so that the error says where
        each one is; ``failure(story)`` where some rank has not come within ``timeout``.
        """
        if self._store is None:
            return
        started = time.monotonic()
        deadline = started + timeout.total_seconds()

        def wait() -> Survey:
            pause = FIRST_PAUSE
            while True:
                survey = self._read(mine)
                if not survey.behind or time.monotonic() > deadline or self._lone(survey, started):
                    return survey
                time.sleep(pause)
                pause = min(2 * pause, LONGEST_PAUSE)

        try:
            survey = _within(timeout.total_seconds() + READ_SECONDS, wait)
        except Exception as error:
            raise failure(f"{UNREADABLE}: {type(error).__name__}: {error}") from error
        if survey.astray:
            raise DesyncError(f"ranks disagree at {mine}: {survey.desync()}; {TOGETHER}")
        if self._lone(survey, started):
            raise DesyncError(f"ranks disagree at {mine}: {survey.lone(LONE_SECONDS)}; {TOGETHER}")
        if survey.behind:
            raise failure(survey.silence())
