"""``ElementOptimizer``: the element-wise algorithms, sharded by element ranges of flat buffers.

One step, on every rank::

    (backward: stage 1 all-reduces the full gradient, as DDP; stage 2 reduce-scatters it into
    this rank's shard; both leave what DDP wrapped around the model reduced as it is)
    closure (if any) -> agree: which parameters have a gradient on any rank, problems, mean loss
    per few buffers: read this rank's shard of the parameters into a staging buffer -> update it
    with the algorithm -> all-gather the shards there -> copy the buffer into the parameters
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

from . import algorithms, claims, closure_loss, fingerprint, groups, kernels, sparse_grads
from . import state_dict as state_format
from .algorithms import Slices
from .base import ShardedOptimizer
from .buffer import ShardedBuffer
from .comm import Comm, OnGroup
from .grad_checks import GradChecks, on_owner
from .layout import ParamSpec, Span, plan_buffers, runs
from .param_gather import UPDATE_BATCH, ParamGathers
from .reducer import GradReducer
from .state_view import ParamState, StateView

GRAD_REDUCTIONS = ("mean", "sum", None)
REDUCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class _Reduced:
    """A step's gradients once reduced: what the update reads and ``clip_grad_norm_`` scales."""

    has_grad: Tensor  # per parameter, in the buffers' order: a gradient on some rank
    grad_shards: list[Tensor]  # per buffer, this rank's shard of the mean gradient
    loss: Any


@dataclass
class _Work:
    """Parameters (``slots``) of one buffer that share ``key`` (fresh, scalar values), and the
    spans of this rank's shard they cover: what one kernel call may update together."""

    buffer: ShardedBuffer
    weights: Tensor  # this rank's shard of the weights the update writes
    grad_shard: Tensor
    key: tuple[bool, tuple[float, ...]]
    slots: list[int]
    spans: list[Span]


def _kind(buffer: ShardedBuffer) -> float:
    """A number for the dtype and device type of ``buffer``'s parameters: equal on every rank, or they differ."""
    return float(fingerprint.stable_hash((str(buffer.dtype), buffer.device.type)) % 2**40)


def _takes(torch_class: type[torch.optim.Optimizer], keyword: str) -> bool:
    return keyword in inspect.signature(torch_class.__init__).parameters


class ElementOptimizer(GradChecks, OnGroup, ParamState, ShardedOptimizer):
    """An element-wise ``torch.optim`` algorithm whose state is sharded by element ranges of flat
    buffers across the ranks of a process group (``ShardedOptimizer(params, "adamw")`` builds one).

    Args:
        params: tensors, ``named_parameters()``, or param-group dicts, as torch.optim takes them.
        optimizer_class: a torch.optim algorithm class (``torch.optim.AdamW``) or its name (``"adamw"``).
        process_group: the data-parallel group; None means the default group, or a world of one
            when torch.distributed is not initialised.
        stage: 1 (default) shards the optimizer state, and reduces the gradients as DDP does: each
            ``p.grad`` holds the mean gradient when backward returns. 2 shards the gradients as well
            (each ``p.grad`` is moved into its bucket's reduction as backward produces it, so it is
            None after backward).
        grad_reduction: ``"mean"`` or ``"sum"`` of the ranks' gradients, or None when someone else
            always reduces them (a model wrapped in DDP is found by itself and needs nothing).
        timeout: seconds (or a timedelta) any collective of ours may wait before raising.
        bucket_cap_mb: the largest flat buffer, in MiB; each buffer is one reduction.
        overlap_param_gather: leave the all-gathers of updated parameters in flight after ``step()``;
            each module's forward pre-hook waits for its own parameters (see :meth:`finish_param_gather`).
        master_weights: keep fp32 master weights (and fp32 optimizer state) of this rank's shard
            for bfloat16/float16 parameters; the update runs on them and each step rounds them
            into the parameters. None (default) means True; False updates in the parameters'
            dtype, as torch.optim does.
        reduce_dtype: the dtype gradients are reduced and sharded in: None (the parameters'
            dtype) or ``torch.float32`` (exact sums of low-precision gradients, twice the bytes).
        verify_every: every this many steps, check (two small all-reduces) that every rank holds the
            same hyper-parameters and parameters, so that e.g. an lr scheduler stepped on one rank
            only is an error naming it rather than silent divergence; None (default): only at
            construction, ``add_param_group`` and loads.
        skip_nonfinite: skip the step, on every rank, when the mean gradient holds an inf or NaN
            (counted in :attr:`skipped_steps`); for fp16, use :class:`shardopt.GradScaler` instead.
        fused: how each shard update runs: torch's native fused kernel (Adam, AdamW, SGD,
            Adagrad), else ``torch.compile`` of the algorithm's element-wise math; True insists,
            False runs eagerly, None (default) chooses, compiling only shards of 1M elements or more.
        **kwargs: the algorithm's keywords, with torch.optim's names, defaults and validation.

    Construction, ``step``, ``state_dict``, ``load_state_dict`` and ``add_param_group`` are
    collective: every rank of the group calls them, in the same order.
    """

    SHARDS = tuple(algorithms.ALGORITHMS)

    def __init__(
        self,
        params: Iterable[Any],
        optimizer_class: type[torch.optim.Optimizer] | str,
        *,
        process_group: dist.ProcessGroup | None = None,
        stage: int = 1,
        grad_reduction: str | None = "mean",
        timeout: float | timedelta = 300,
        bucket_cap_mb: float = 25,
        overlap_param_gather: bool = False,
        master_weights: bool | None = None,
        reduce_dtype: torch.dtype | None = None,
        skip_nonfinite: bool = False,
        verify_every: int | None = None,
        **kwargs: Any,
    ) -> None:
        self._algorithm = algorithms.ALGORITHMS[self.sharded_class(optimizer_class)]
        if isinstance(stage, bool) or stage not in (1, 2):
            raise ValueError(f"stage must be 1 (shard optimizer state) or 2 (shard gradients too), got {stage!r}")
        if grad_reduction not in GRAD_REDUCTIONS:
            raise ValueError(
                f"grad_reduction must be 'mean', 'sum' or None (gradients already reduced), got {grad_reduction!r}"
            )
        if (
            isinstance(bucket_cap_mb, bool)
            or not isinstance(bucket_cap_mb, (int, float))
            or not 0 < bucket_cap_mb < math.inf
        ):
            raise ValueError(f"bucket_cap_mb must be a finite positive number of MiB, got {bucket_cap_mb!r}")
        if not isinstance(overlap_param_gather, bool):
            raise TypeError(f"overlap_param_gather must be True or False, got {overlap_param_gather!r}")
        if master_weights not in (None, True, False):
            raise TypeError(f"master_weights must be None (default: True), True or False, got {master_weights!r}")
        if verify_every is not None and (
            isinstance(verify_every, bool) or not isinstance(verify_every, int) or verify_every < 1
        ):
            raise ValueError(f"verify_every must be None or a number of steps >= 1, got {verify_every!r}")
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite must be True or False, got {skip_nonfinite!r}")
        if reduce_dtype is not None and reduce_dtype not in REDUCE_DTYPES:
            raise TypeError(
                f"reduce_dtype must be None (the parameters' dtype) or one of "
                f"{', '.join(map(str, REDUCE_DTYPES))}, got {reduce_dtype!r}"
            )
        if isinstance(params, Tensor):
            raise TypeError(
                "params argument given to the optimizer should be an iterable of Tensors or dicts, "
                f"but got {torch.typename(params)}"
            )
        if isinstance(params, (set, frozenset)):
            # torch.optim tolerates a set here, but its order differs between processes:
            # ranks would pack different layouts and exchange the wrong elements.
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections, but the ordering of "
                "tensors in sets differs between processes; pass a list (e.g. list(model.parameters()))"
            )
        torch_class = self._algorithm.torch_class
        # torch's Adam, AdamW, SGD and Adagrad take ``fused`` themselves (it lives in their param
        # groups); for the others it is ours alone, kept out of the groups so they stay torch's.
        self._fused = None if _takes(torch_class, "fused") else kwargs.pop("fused", None)
        if self._fused not in (None, True, False):
            raise ValueError(f"fused must be None (choose), True or False, got {self._fused!r}")
        defaults = groups.torch_defaults(torch_class, kwargs)
        self._comm = Comm(process_group, timeout)
        self._stage = stage
        self._grad_reduction = grad_reduction
        self._bucket_cap_bytes = int(bucket_cap_mb * 2**20)
        self._master_weights = master_weights is not False
        self._reduce_dtype = reduce_dtype
        self._skip_nonfinite = skip_nonfinite
        self._verify_every = verify_every
        #: Steps skipped because the gradient was not finite (``skip_nonfinite``, or a GradScaler).
        self.skipped_steps = 0
        self._scaler_checked = False  # shardopt.GradScaler looked at this step's gradients
        self._warned_fp16 = False
        self._scalar_dtype = _get_scalar_dtype()
        self._buffers: list[ShardedBuffer] = []
        self._reducer = GradReducer(self._comm, stage, grad_reduction)
        self._gathers = ParamGathers(self._comm, lazy=overlap_param_gather)
        self._reduced: _Reduced | None = None  # set by clip_grad_norm_ until the step that follows
        # Parameters of the groups that did not require grad when added: kept in the
        # groups (state_dict numbering counts them, as torch's does) but not sharded.
        self._unsharded: list[tuple[int, int, Tensor]] = []
        super().__init__(list(params), defaults)
        self.state = StateView()

    # ------------------------------------------------------------------ groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, as torch.optim does; collective (its parameters are broadcast from rank 0, once
        every rank is found to add the same parameters and hyper-parameters)."""
        super().add_param_group(param_group)
        group_index = len(self.param_groups) - 1
        try:
            self._check_group(self.param_groups[group_index], group_index)
            opening = [] if group_index else self._setup_items()
            group_items = fingerprint.group_items(self.param_groups[group_index], group_index, self._describe)
            fingerprint.check(self._comm, opening + group_items, f"param group {group_index}")
        except Exception:
            self.param_groups.pop()
            raise
        self._shard_group(self.param_groups[group_index], group_index)
        self._members = groups.members(self.param_groups)
        claims.claim(self, self.param_groups[group_index]["params"])

    def _release(self) -> None:
        self._gathers.wait_all()
        self._reducer.remove_hooks()

    def _check_group(self, group: dict[str, Any], g: int) -> None:
        for flag in ("capturable", "differentiable"):
            if group.get(flag):
                raise NotImplementedError(
                    f"{flag}=True is not supported by shardopt yet (param group {g}); leave it False"
                )
        seen: set[Tensor] = set()
        devices = {p.device for earlier in self.param_groups[:g] for p in earlier["params"]}
        for i, param in enumerate(group["params"]):
            where = self._describe(group, g, i)
            if param in seen:
                raise ValueError(f"{where} appears twice in the group; pass each parameter once")
            seen.add(param)
            groups.check_plain(param, where)
            if not param.is_leaf:
                raise ValueError(f"can't optimize a non-leaf Tensor: {where} is the result of an operation")
            if not (param.is_floating_point() and not param.is_complex()):
                raise TypeError(f"{where} has dtype {param.dtype}; shardopt optimizes real floating-point tensors")
            if param.layout is not torch.strided:
                raise TypeError(f"{where} has layout {param.layout}; shardopt optimizes dense (strided) tensors")
            devices.add(param.device)
            if len(devices) > 1:
                raise ValueError(
                    f"parameters are on more than one device ({', '.join(sorted(map(str, devices)))}), "
                    f"first differing at {where}; move the model to one device before creating the optimizer"
                )
            if self._comm.world_size > 1 and param.device.type != self._comm.device.type:
                raise ValueError(
                    f"{where} is on {param.device} but the process group's backend "
                    f"({dist.get_backend(self._comm.group)}) communicates {self._comm.device.type} tensors; "
                    "use NCCL for CUDA parameters and gloo for CPU ones"
                )

    def _setup_items(self) -> list[fingerprint.Item]:
        """What every rank must construct alike besides the param groups."""
        options = (self._stage, self._grad_reduction, self._bucket_cap_bytes, self._master_weights)
        options += (str(self._reduce_dtype), self._skip_nonfinite, self._gathers.lazy, self._fused)
        return [
            (
                f"the algorithm ({self._algorithm.torch_class.__name__})",
                fingerprint.stable_hash(self._algorithm.torch_class.__name__),
            ),
            (
                "the options (stage, grad_reduction, bucket_cap_mb, master_weights, reduce_dtype, skip_nonfinite, "
                f"overlap_param_gather, fused) = {options}",
                fingerprint.stable_hash(options),
            ),
        ]

    def _items(self) -> list[fingerprint.Item]:
        """Everything ranks must hold alike: the setup, every group's hyper-parameters and parameters."""
        items = self._setup_items()
        for g, group in enumerate(self.param_groups):
            items += fingerprint.group_items(group, g, self._describe)
        return items

    _describe = staticmethod(groups.describe)

    def _shard_group(self, group: dict[str, Any], g: int) -> None:
        trainable = []
        for i, param in enumerate(group["params"]):
            if param.requires_grad:
                trainable.append(ParamSpec(i, tuple(param.shape), param.element_size(), (param.device, param.dtype)))
            else:
                self._unsharded.append((g, i, param))
        scalar_names = tuple(self._algorithm.scalar_state(group))
        for layout in plan_buffers(trainable, self._comm.world_size, bucket_cap_bytes=self._bucket_cap_bytes):
            params = [group["params"][slot.index] for slot in layout.slots]
            buffer = ShardedBuffer(
                layout, params, g, self._comm.rank, scalar_names, self._master_weights, self._reduce_dtype
            )
            # Every rank must start from the same parameters, as DDP ensures at construction.
            self._gathers.broadcast(buffer)
            buffer.reset_master()
            if self._algorithm.eager_state:
                self._create_state(buffer, group, list(range(len(params))), [Span(0, layout.shard_numel)])
            self._gathers.add_bucket(len(self._buffers), buffer)
            self._buffers.append(buffer)
            self._reducer.add(buffer)

    # ------------------------------------------------------------------ step

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One optimizer step on every rank; returns the closure's loss averaged over ranks."""
        loss = None
        if closure is not None:
            self._refuse_closure_after_reduction(closure)
            with torch.enable_grad():
                loss = closure()
        self._comm.enter("step()", step=True)
        if self._verify_every and self._comm.steps % self._verify_every == 0:
            self._comm.agree()
            fingerprint.check(self._comm, self._items(), f"step() call {self._comm.steps} (verify_every)")
        with torch.no_grad():
            try:
                reduced = self._reduced or self._reduce(loss)
                if self._skips(reduced):
                    self.skipped_steps += 1
                    return reduced.loss
                updated = []
                offset = 0
                for index, (buffer, grad_shard) in enumerate(zip(self._buffers, reduced.grad_shards)):
                    present = reduced.has_grad[offset : offset + len(buffer.params)]
                    offset += len(buffer.params)
                    if present.any():
                        updated.append((index, grad_shard, present))
                # A few buckets at a time: each needs a staging buffer until its all-gather is written back.
                for start in range(0, len(updated), UPDATE_BATCH):
                    self._update(updated[start : start + UPDATE_BATCH])
                self._gathers.issued_all()
            finally:
                self._reduced = None
                self._scaler_checked = False
                self._reducer.reset()
                self._comm.leave()
        return reduced.loss

    def _update(self, batch: list[tuple[int, Tensor, Tensor]]) -> None:
        """Update this rank's shard of each buffer of ``batch`` (its index, gradient shard, which parameters
        have a gradient) in as few kernel calls as their groups and state allow, and issue their gathers."""
        works, fulls = [], []
        for index, grad_shard, present in batch:
            buffer = self._buffers[index]
            full = self._gathers.staging(buffer)
            shard = full[buffer.shard.slice]
            buffer.refresh_changed_master()
            weights = buffer.read_shard(shard) if buffer.master is None else buffer.master
            works += self._plan(buffer, weights, grad_shard, present)
            fulls.append(full)
        self._run(works)
        for (index, _, _), full in zip(batch, fulls):
            buffer = self._buffers[index]
            if buffer.master is not None:
                full[buffer.shard.slice].copy_(buffer.master)  # rounded into the parameters' dtype
            self._gathers.issue(index, buffer, full)

    def _skips(self, reduced: _Reduced) -> bool:
        """Whether this step is skipped, the same on every rank; unscales the gradients a GradScaler scaled."""
        scaler_skips = self._scaler_skips(reduced)
        if scaler_skips is not None:
            return scaler_skips
        if self._skip_nonfinite:
            return bool(self._nonfinite(reduced))
        if not self._warned_fp16 and any(b.dtype == torch.float16 for b in self._buffers):
            self._warned_fp16 = True
            warnings.warn(
                "shardopt: float16 parameters trained without a gradient scaler: small gradients underflow to "
                "zero and large ones overflow to inf; use shardopt.GradScaler (or bfloat16)",
                stacklevel=3,
            )
        return False

    def _grad_tensors(self, reduced: _Reduced) -> list[Tensor]:
        """What holds this rank's reduced gradients: stage 1 the full gradient (p.grad are views of
        it, or copies kept in step), stage 2 the shard."""
        return [b.full_grad if self._stage == 1 else s for b, s in zip(self._buffers, reduced.grad_shards)]

    def _norm_tensors(self, reduced: _Reduced) -> list[Tensor]:
        return reduced.grad_shards  # each rank's shards are disjoint slices of the buffers

    def _norm_like(self) -> tuple[torch.dtype, torch.device]:
        if not self._buffers:
            return torch.float32, torch.device("cpu")
        return self._buffers[0].weights_dtype, self._buffers[0].device

    def _grads_changed(self) -> None:
        for buffer in self._buffers:
            buffer.refresh_grads()

    def _forget_reduced(self) -> None:
        self._reduced = None
        self._reducer.reset()

    def _reduce(self, loss: Any) -> _Reduced:
        """The first half of a step: this rank's shards of the mean gradient, and what the ranks agree on."""
        self._gathers.wait_all()  # the update writes the shards the last step's gathers read
        self._reducer.launch_remaining()
        has_grad, sparse, late, loss = self._agree(loss)
        self._reducer.launch_late(late)
        shards = [self._reducer.reduced_shard(index) for index in range(len(self._buffers))]
        if sparse.any():
            self._reducer.add_sparse(sparse.tolist(), shards)
        return _Reduced(has_grad, shards, loss)

    @on_owner
    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally, with no communication, as DDP's ``no_sync()`` does.

        Backward passes inside the block leave their gradients in ``p.grad`` (summed by autograd,
        on every rank alone); the first backward after it, or ``step()``, reduces the total, so
        several micro-batches give the gradient of one large batch.
        """
        if self._reducer.accumulating:
            raise RuntimeError(
                "no_sync() is already active: blocks of it do not nest; accumulate every micro-batch but the "
                "last inside one block"
            )
        self._reducer.accumulating = True
        try:
            yield
        finally:
            self._reducer.accumulating = False

    @on_owner
    def finish_param_gather(self) -> None:
        """Wait for the parameter all-gathers the last step left in flight (``overlap_param_gather=True``).

        Forward pre-hooks wait for each module's own parameters; call this before reading
        parameters any other way (a functional call, ``model.state_dict()``, a weight tied into
        a module that does not own it).
        """
        self._gathers.wait_all()

    @on_owner
    def refresh_master_weights(self) -> None:
        """Take every element of the fp32 master weights from the parameters again. Not needed after
        changing parameters outside ``step()`` (``model.load_state_dict``, ``param.data = ...``): the
        next step takes a changed parameter's new values by itself, and keeps the fp32 precision of
        the elements that still hold the master's rounding. Local: no communication."""
        self._gathers.wait_all()
        for buffer in self._buffers:
            buffer.reset_master()

    @on_owner
    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim's; also drops gradient already handed to an unfinished reduction."""
        self._forget_reduced()
        super().zero_grad(set_to_none)

    def _agree(self, loss: Any) -> tuple[Tensor, Tensor, list[bool], Any]:
        """One all-reduce: which parameters have a gradient on some rank, which a sparse one (or a bad
        one), which buffers need a second reduction round, the mean loss.

        Before: each rank knows its own gradients and loss. After: every rank knows the
        same flags, raises the same error, and holds the same mean loss.
        """
        dense, sparse, late = self._reducer.local_flags()
        stray = torch.tensor([float(p.grad is not None) for _, _, p in self._unsharded], dtype=torch.float64)
        problems = torch.tensor([float(p is not None) for p in self._reducer.problems], dtype=torch.float64)
        kinds = torch.tensor([_kind(buffer) for buffer in self._buffers], dtype=torch.float64)
        dropped = self._reducer.dropped_flags()
        edit = groups.edited(self.param_groups, self._members)
        stale = torch.tensor([float(self._reducer.stale)], dtype=torch.float64)
        edited = torch.tensor([float(edit is not None)], dtype=torch.float64)
        hyper = torch.tensor(fingerprint.hyper_tail(self.param_groups), dtype=torch.float64)
        tail = torch.tensor(closure_loss.tail(loss), dtype=torch.float64)
        parts = [dense, sparse, late, stray, problems, kinds, dropped, stale, edited, hyper, tail]
        agreed = torch.cat(parts).to(self._comm.device)
        self._comm.all_reduce_(agreed, "the agreement on gradients and loss at the start of step()").wait()
        split = agreed.cpu().split([len(part) for part in parts])
        dense, sparse, late, stray, problems, all_kinds, dropped, stale, edited, hyper, tail = split
        if problems.any() or not torch.equal(all_kinds, kinds * self._comm.world_size):
            self._refuse_change(problems, all_kinds != kinds * self._comm.world_size)
        if edited.item():
            raise RuntimeError(groups.EDITED.format(what=edit or "on other ranks", ranks=int(edited.item())))
        fingerprint.check_hyper(self.param_groups, hyper.tolist(), self._comm.world_size, self._comm.steps)
        self._refuse_custody(dropped, int(stale.item()))
        known = self._reducer.known_sparse()
        if sparse.any() or known is not None:
            self._refuse_sparse(dense, sparse, known)
        if stray.any():
            g, i, _ = self._unsharded[int(stray.nonzero()[0])]
            raise RuntimeError(
                f"{self._describe(self.param_groups[g], g, i)} has a gradient but did not require grad when it "
                "was given to the optimizer; create the optimizer after unfreezing it, or add it with "
                "add_param_group"
            )
        loss = closure_loss.agreed(loss, tail.tolist(), self._comm.world_size)
        return dense + sparse > 0, sparse > 0, (late > 0).tolist(), loss

    def _refuse_custody(self, dropped: Tensor, stale: int) -> None:
        """Stage 2: raise, on every rank, where torch would have used a gradient the reduction no longer
        holds (``stale``: ranks whose backward added to a gradient an earlier step took), or where some
        ranks dropped a parameter's gradient after backward and others did not (``dropped``: how many)."""
        if stale:
            raise RuntimeError(
                f"on {stale} rank(s) a backward added to gradients that the last step() already took (no "
                "zero_grad() after step()): torch.optim would add that old gradient, but at stage 2 it is gone; "
                "call optimizer.zero_grad() (or model.zero_grad()) after each step(), or use stage=1"
            )
        apart = (dropped > 0) & (dropped < self._comm.world_size)
        if apart.any():
            position = int(apart.nonzero()[0])
            g, i = self._position(position)
            raise RuntimeError(
                f"{self._describe(self.param_groups[g], g, i)} had its gradient dropped after backward "
                f"(p.grad set to None, replaced or zeroed) on {int(dropped[position])} of {self._comm.world_size} "
                "ranks: at stage 2 backward already summed the ranks' gradients, so every rank must drop it "
                "alike (model.zero_grad() on every rank), or use stage=1"
            )

    def _refuse_change(self, problems: Tensor, apart: Tensor) -> None:
        """Raise, on every rank, for the first buffer whose parameters changed in a way it cannot follow
        (``problems``: the ranks that found one, per buffer), or that differ between the ranks in dtype or
        device (``apart``)."""
        index = int((problems.bool() | apart).nonzero()[0])
        buffer, g = self._buffers[index], self._buffers[index].group_index
        found = self._reducer.problems[index]
        if found is None and not problems[index]:
            slot, what = 0, f"is {buffer.dtype} on {buffer.device} here, but of another dtype or device on other ranks"
        elif found is None:
            slot, what = 0, f"(or a parameter of its bucket) changed on {int(problems[index])} other rank(s)"
        else:
            slot, what = found
        where = self._describe(self.param_groups[g], g, buffer.layout.slots[slot].index)
        raise RuntimeError(
            f"{where} {what} after the optimizer was built; shardopt follows a model cast or moved as a whole "
            "(model.to(...), model.half(), ...) on every rank alike, not this: change the model before "
            "building the optimizer, or build a new one"
        )

    def _refuse_sparse(self, dense: Tensor, sparse: Tensor, known: Tensor | None) -> None:
        """Raise, alike on every rank, for the first parameter whose sparse gradient this step cannot
        take. ``dense`` and ``sparse`` count the ranks with a dense and with a sparse gradient (a rank
        may have both: a dense one written after backward moved a sparse one aside); ``known``: the
        parameters sparse in earlier steps (their dense reductions skip them)."""
        suspect = sparse > 0 if known is None else (sparse > 0) | (known & (dense > 0))
        for position in suspect.nonzero().view(-1).tolist():
            g, i = self._position(position)
            where = self._describe(self.param_groups[g], g, i)
            if sparse[position] and dense[position]:
                raise RuntimeError(
                    f"{where} has a sparse gradient on {int(sparse[position])} rank(s) and a dense one on "
                    f"{int(dense[position])}; every rank must produce the same kind (the same nn.Embedding(sparse=...))"
                )
            if dense[position]:
                raise RuntimeError(
                    f"{where} has a dense gradient after sparse ones in earlier steps; shardopt reduces a parameter's "
                    "gradients one way for the whole run: keep them sparse, or use another optimizer for it"
                )
            refusal = sparse_grads.refusal(self._algorithm.torch_class, self.param_groups[g], where)
            if refusal is not None:
                raise RuntimeError(refusal)

    def _position(self, position: int) -> tuple[int, int]:
        """(param group, index in it) of the parameter at ``position`` in the buffers' concatenated order."""
        for buffer in self._buffers:
            if position < len(buffer.params):
                return buffer.group_index, buffer.layout.slots[position].index
            position -= len(buffer.params)
        raise IndexError(position)

    def _create_state(self, buffer: ShardedBuffer, group: dict[str, Any], slots: list[int], spans: list[Span]) -> None:
        """torch's initial state for ``slots``, whose elements in this shard are ``spans``."""
        algorithm = self._algorithm
        for name, value in algorithm.scalar_state(group).items():
            buffer.set_scalars(name, slots, torch.tensor(value, dtype=self._scalar_dtype).item())
        for name in algorithm.tensor_state(group):
            tensor = buffer.state_tensor(name)
            fill = algorithm.initial_value(name, group)
            for span in spans:
                tensor[span.slice].fill_(fill)
        if buffer.scalars or algorithm.tensor_state(group):
            buffer.set_initialized(slots)

    def _plan(self, buffer: ShardedBuffer, weights: Tensor, grad_shard: Tensor, has_grad: Tensor) -> list[_Work]:
        """What updating this rank's shard of ``buffer`` takes: one work per set of parameters
        that share their scalar state, covering the contiguous spans of the shard they hold.
        That is one work for the whole shard, unless some parameters have no gradient or fell
        behind in an earlier step."""
        everyone = bool(has_grad.all())
        if everyone and buffer.uniform:
            shard = (
                Span(buffer.pieces[0].in_shard.start, buffer.pieces[-1].in_shard.end) if buffer.pieces else Span(0, 0)
            )
            key = (not buffer.initialized[0], tuple(values[0] for values in buffer.scalars.values()))
            return [_Work(buffer, weights, grad_shard, key, list(range(len(buffer.params))), [shard])]
        present = has_grad.tolist()
        keys = [
            (not buffer.initialized[s], tuple(values[s] for values in buffer.scalars.values())) if present[s] else None
            for s in range(len(buffer.params))
        ]
        spans = runs(buffer.pieces, keys)
        distinct = dict.fromkeys(k for k in keys if k is not None)
        buffer.uniform = everyone and len(distinct) == 1
        # A key with no element in this shard still advances its parameters' scalars.
        return [
            _Work(
                buffer,
                weights,
                grad_shard,
                key,
                [s for s, k in enumerate(keys) if k == key],
                spans.get(key) or [Span(0, 0)],
            )
            for key in distinct
        ]

    def _run(self, works: list[_Work]) -> None:
        """Run ``works``: those of one group, device and dtype that share their key go to one
        kernel call, as torch's fused optimizers make one call per step, not one per tensor."""
        batches: dict[tuple[Any, ...], list[_Work]] = {}
        for work in works:
            weights = work.weights
            batches.setdefault((work.buffer.group_index, weights.device, weights.dtype, work.key), []).append(work)
        for (g, _, _, (is_fresh, values)), members in batches.items():
            group = self.param_groups[g]
            names = self._algorithm.tensor_state(group)
            params, grads, states = [], [], []
            for work in members:
                buffer = work.buffer
                if is_fresh:
                    self._create_state(buffer, group, work.slots, work.spans)
                    values = tuple(buffer.scalars[name][work.slots[0]] for name in buffer.scalars)
                state = {name: buffer.state_tensor(name) for name in names}
                weights = work.weights
                # Gradients reduced in another dtype than the weights' are cast (one slice at a time).
                grad_shard = work.grad_shard
                for span in work.spans:
                    params.append(weights[span.slice])
                    grads.append(grad_shard[span.slice].to(weights.dtype))
                    states.append({name: tensor[span.slice] for name, tensor in state.items()})
            scalar_names = members[0].buffer.scalars
            scalars = {name: torch.tensor(value, dtype=self._scalar_dtype) for name, value in zip(scalar_names, values)}
            kernels.update(
                self._algorithm,
                Slices(params, grads, states),
                scalars,
                group,
                is_fresh,
                group.get("fused", self._fused),
            )
            for work in members:
                for name, scalar in scalars.items():
                    work.buffer.set_scalars(name, work.slots, scalar.item())

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Collective: the full state, in ``torch.optim.<Algo>.state_dict()``'s format, on every rank.

        With master weights it also holds them, full, under ``"master_params"`` (keyed by parameter
        number like ``"state"``): torch.optim ignores that key, ``load_state_dict`` restores them.
        """
        self._gathers.wait_all()
        states: dict[Tensor, state_format.StateEntry] = {}
        masters: dict[Tensor, Tensor] = {}
        # Agreed first: a rank one step() ahead would pair that step's collectives with these.
        with self._comm.call("state_dict()", agree=True):
            for buffer in self._buffers:
                entries = state_format.gather_buffer_state(buffer, self._comm, self._scalar_dtype)
                for slot, entry in entries.items():
                    states[buffer.params[slot]] = entry
                if buffer.master is not None:
                    for slot, master in state_format.gather_master(buffer, self._comm).items():
                        masters[buffer.params[slot]] = master
        if self._algorithm.eager_state:
            for g, _, param in self._unsharded:
                states[param] = state_format.initial_entry(
                    self._algorithm, self.param_groups[g], param, self._scalar_dtype
                )
        return state_format.pack(self.param_groups, states, masters)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict in torch.optim's format, from any world size or from plain torch.optim.

        Everything is checked before anything changes: a dict for another model raises
        ValueError naming the first mismatch and leaves this optimizer as it was. Master weights
        come from the dict's ``"master_params"``, else from the parameters as they are now (load
        the model first, or call :meth:`refresh_master_weights` after loading it).
        """
        self._gathers.wait_all()
        with self._comm.call("load_state_dict()", agree=True):
            self._load_state_dict(state_dict)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """load_state_dict's checks, then the new state put in place; inside its call."""
        new_groups, states, masters = state_format.unpack(state_dict, self.param_groups, self.defaults)
        states = {param: sparse_grads.densified(entry) for param, entry in states.items()}
        for g, group in enumerate(new_groups):
            self._check_group(group, g)
            for i, param in enumerate(group["params"]):
                where = self._describe(group, g, i)
                if param in states:
                    state_format.check_entry(states[param], param, self._algorithm, group, where)
                if param in masters:
                    state_format.check_master(masters[param], param, where)
        # Ranks loading different dicts would install a mix; they get one error instead.
        items = fingerprint.loaded_items(new_groups, states, self._describe)
        fingerprint.check(self._comm, items, "load_state_dict (every rank must load the same state dict)")
        self.param_groups[:] = new_groups
        for buffer in self._buffers:
            group = new_groups[buffer.group_index]
            entries = [states.get(param) for param in buffer.params]
            state_format.load_buffer_state(buffer, entries, self._algorithm.tensor_state(group))
            state_format.load_master(buffer, [masters.get(param) for param in buffer.params])

    # ------------------------------------------------------------------ introspection

    @on_owner
    def _memory_bytes(self) -> dict[str, int]:
        """This rank's bytes: the full parameters it holds, its gradients (stage 1: full; stage 2:
        its shard), the staging buffers gradients pass through on their way to a reduction (stage
        2) and updated parameters on their way back into the parameters (a few buckets each, reused
        every step), its shard of fp32 master weights (low-precision parameters) and its shard of
        the optimizer state."""
        return {
            "param_bytes": sum(b.param_bytes() for b in self._buffers),
            "grad_bytes": sum(b.grad_bytes(self._stage) for b in self._buffers),
            "staging_bytes": self._reducer.staging_bytes + self._gathers.staging_bytes,
            "master_bytes": sum(b.master_bytes() for b in self._buffers),
            "state_bytes": sum(b.state_bytes() for b in self._buffers),
        }
