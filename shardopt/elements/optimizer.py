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
import warnings
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

from .. import algorithms
from ..collectives import fingerprint
from ..collectives.comm import Comm, GroupMember
from ..collectives.span import Span
from ..shared import closure_loss, groups, state_format
from ..shared.base import ShardedOptimizer
from ..shared.options import Options
from ..shared.reduced_grads import ReducedGradients, on_owner
from ..shared.state_view import ParamState, StateView
from . import refusals, sparse_grads, update
from .buffer import ShardedBuffer
from .layout import ParamSpec, plan_buffers
from .param_gather import UPDATE_BATCH, ParamGathers
from .reducer import GradReducer
from .state import check_loaded, gather_state, initial_entry, install_state


class ElementOptimizer(ReducedGradients, GroupMember, ParamState, ShardedOptimizer):
    """An element-wise ``torch.optim`` algorithm whose state is sharded by element ranges of flat
    buffers across the ranks of a process group (``ShardedOptimizer(params, "adamw")`` builds one).

    Args:
        params: tensors, ``named_parameters()``, or param-group dicts, as torch.optim takes them.
        optimizer_class: a torch.optim algorithm class (``torch.optim.AdamW``) or its name (``"adamw"``).
        process_group: the data-parallel group; None means the default group, or a world of one
            when torch.distributed is not initialised.
        stage, grad_reduction, timeout, bucket_cap_mb, overlap_param_gather, master_weights,
            reduce_dtype, verify_every, skip_nonfinite: shardopt's options, each described in
            :class:`~shardopt.shared.options.Options` (the README's table has their defaults).
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
        self._options = Options(
            stage=stage,
            grad_reduction=grad_reduction,
            timeout=timeout,
            bucket_cap_mb=bucket_cap_mb,
            overlap_param_gather=overlap_param_gather,
            master_weights=master_weights,
            reduce_dtype=reduce_dtype,
            skip_nonfinite=skip_nonfinite,
            verify_every=verify_every,
        )
        params = self._ordered(params)  # refused before the first collective, as torch.optim refuses at once
        torch_class = self._algorithm.torch_class
        # torch's Adam, AdamW, SGD and Adagrad take ``fused`` themselves (it lives in their param
        # groups); for the others it is ours alone, kept out of the groups so they stay torch's.
        ours = "fused" not in inspect.signature(torch_class.__init__).parameters
        self._fused = kwargs.pop("fused", None) if ours else None
        if self._fused not in (None, True, False):
            raise ValueError(f"fused must be None (choose), True or False, got {self._fused!r}")
        defaults = groups.torch_defaults(torch_class, kwargs)
        self._comm = Comm(process_group, timeout)
        #: Steps skipped because the gradient was not finite (``skip_nonfinite``, or a GradScaler).
        self.skipped_steps = 0
        self._scaler_checked = False  # shardopt.GradScaler looked at this step's gradients
        self._warned_fp16 = False
        self._scalar_dtype = _get_scalar_dtype()
        self._buffers: list[ShardedBuffer] = []
        self._reducer = GradReducer(self._comm, self._options.stage, self._options.grad_reduction)
        self._gathers = ParamGathers(self._comm, lazy=self._options.overlap_param_gather)
        self._reduced: update.Reduced | None = None  # set by clip_grad_norm_ until the step that follows
        # Parameters of the groups that did not require grad when added: kept in the
        # groups (state_dict numbering counts them, as torch's does) but not sharded.
        self._unsharded: list[tuple[int, int, Tensor]] = []
        super().__init__(params, defaults)
        self.state = StateView()

    # ------------------------------------------------------------------ groups

    def _release(self) -> None:
        self._gathers.wait_all()
        self._reducer.remove_hooks()

    def _check_group(self, group: dict[str, Any], g: int) -> None:
        for flag in ("capturable", "differentiable"):
            if group.get(flag):
                raise NotImplementedError(
                    f"{flag}=True is not supported by shardopt yet (param group {g}); leave it False"
                )
        devices = {p.device for earlier in self.param_groups[:g] for p in earlier["params"]}
        for i, param in enumerate(group["params"]):
            devices.add(param.device)
            if len(devices) > 1:
                raise ValueError(
                    f"parameters are on more than one device ({', '.join(sorted(map(str, devices)))}), first "
                    f"differing at {groups.describe(group, g, i)}; move the model to one device before creating "
                    "the optimizer"
                )
        self._check_params(group, g)

    def _check_param(self, param: Tensor, where: str) -> None:
        if not param.is_leaf:
            raise ValueError(f"can't optimize a non-leaf Tensor: {where} is the result of an operation")
        if not (param.is_floating_point() and not param.is_complex()):
            raise TypeError(f"{where} has dtype {param.dtype}; shardopt optimizes real floating-point tensors")
        if param.layout is not torch.strided:
            raise TypeError(f"{where} has layout {param.layout}; shardopt optimizes dense (strided) tensors")

    def _setup_items(self) -> list[fingerprint.Item]:
        """What every rank must construct alike besides the param groups."""
        o = self._options
        options = (o.stage, o.grad_reduction, o.bucket_cap_bytes, o.keeps_master_weights, str(o.reduce_dtype))
        options += (o.skip_nonfinite, self._gathers.lazy, self._fused)
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
            items += fingerprint.group_items(group, g, groups.describe)
        return items

    def _lay_out(self, group: dict[str, Any], g: int) -> None:
        trainable = []
        for i, param in enumerate(group["params"]):
            if param.requires_grad:
                trainable.append(ParamSpec(i, tuple(param.shape), param.element_size(), (param.device, param.dtype)))
            else:
                self._unsharded.append((g, i, param))
        scalar_names = tuple(self._algorithm.scalar_state(group))
        for layout in plan_buffers(trainable, self._comm.world_size, bucket_cap_bytes=self._options.bucket_cap_bytes):
            params = [group["params"][slot.index] for slot in layout.slots]
            buffer = ShardedBuffer(
                layout,
                params,
                g,
                self._comm.rank,
                scalar_names,
                self._options.keeps_master_weights,
                self._options.reduce_dtype,
            )
            # Every rank must start from the same parameters, as DDP ensures at construction.
            self._gathers.broadcast(buffer)
            buffer.reset_master()
            if self._algorithm.eager_state:
                update.create_state(
                    self._algorithm,
                    buffer,
                    group,
                    list(range(len(params))),
                    [Span(0, layout.shard_numel)],
                    self._scalar_dtype,
                )
            self._gathers.add_buffer(len(self._buffers), buffer)
            self._buffers.append(buffer)
            self._reducer.add(buffer)

    # ------------------------------------------------------------------ step

    def _verify(self) -> None:
        if self._options.verify_every and self._comm.steps % self._options.verify_every == 0:
            self._comm.agree()
            fingerprint.check(self._comm, self._items(), f"step() call {self._comm.steps} (verify_every)")

    def _apply(self, reduced: update.Reduced) -> None:
        updated = []
        offset = 0
        for index, (buffer, grad_shard) in enumerate(zip(self._buffers, reduced.grad_shards)):
            present = reduced.has_grad[offset : offset + len(buffer.params)]
            offset += len(buffer.params)
            if present.any():
                updated.append((index, grad_shard, present))
        # A few buffers at a time: each needs a staging buffer until its all-gather is written back.
        for start in range(0, len(updated), UPDATE_BATCH):
            self._update(updated[start : start + UPDATE_BATCH])
        self._gathers.issued_all()

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
            works += update.plan(buffer, weights, grad_shard, present)
            fulls.append(full)
        update.run(self._algorithm, self.param_groups, works, self._scalar_dtype, self._fused)
        for (index, _, _), full in zip(batch, fulls):
            buffer = self._buffers[index]
            if buffer.master is not None:
                full[buffer.shard.slice].copy_(buffer.master)  # rounded into the parameters' dtype
            self._gathers.issue(index, buffer, full)

    def _skips(self, reduced: update.Reduced) -> bool:
        """Whether this step is skipped, the same on every rank; unscales the gradients a GradScaler scaled."""
        scaler_skips = self._scaler_skips(reduced)
        if scaler_skips is not None:
            return scaler_skips
        if self._options.skip_nonfinite:
            return bool(self._nonfinite(reduced))
        if not self._warned_fp16 and any(b.dtype == torch.float16 for b in self._buffers):
            self._warned_fp16 = True
            warnings.warn(
                "shardopt: float16 parameters trained without a gradient scaler: small gradients underflow to "
                "zero and large ones overflow to inf; use shardopt.GradScaler (or bfloat16)",
                stacklevel=3,
            )
        return False

    def _grad_tensors(self, reduced: update.Reduced) -> list[Tensor]:
        """What holds this rank's reduced gradients: stage 1 the full gradient (p.grad are views of
        it, or copies kept in step), stage 2 the shard."""
        return [b.full_grad if self._options.stage == 1 else s for b, s in zip(self._buffers, reduced.grad_shards)]

    def _norm_tensors(self, reduced: update.Reduced) -> list[Tensor]:
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

    def _reduce(self, loss: Any) -> update.Reduced:
        """The first half of a step: this rank's shards of the mean gradient, and what the ranks agree on."""
        self._gathers.wait_all()  # the update writes the shards the last step's gathers read
        self._reducer.launch_remaining()
        has_grad, sparse, late, loss = self._agree(loss)
        self._reducer.launch_late(late)
        shards = [self._reducer.reduced_shard(index) for index in range(len(self._buffers))]
        if sparse.any():
            self._reducer.add_sparse(sparse.tolist(), shards)
        return update.Reduced(has_grad, shards, loss)

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
        kinds = torch.tensor([refusals.kind_of(buffer) for buffer in self._buffers], dtype=torch.float64)
        dropped = self._reducer.custody.dropped_flags()
        stale = torch.tensor([float(self._reducer.custody.stale)], dtype=torch.float64)
        own = [dense, sparse, late, stray, problems, kinds, dropped, stale]
        (dense, sparse, late, stray, problems, all_kinds, dropped, stale), loss_entries = self._agreement(loss, own)
        if problems.any() or not torch.equal(all_kinds, kinds * self._comm.world_size):
            refusals.refuse_change(
                problems, all_kinds != kinds * self._comm.world_size, self._buffers, self._reducer.problems, self._name
            )
        refusals.refuse_custody(dropped, int(stale.item()), self._comm.world_size, self._locate)
        known = self._reducer.known_sparse()
        if sparse.any() or known is not None:
            refusals.refuse_sparse(dense, sparse, known, self._algorithm.torch_class, self.param_groups, self._locate)
        if stray.any():
            g, i, _ = self._unsharded[int(stray.nonzero()[0])]
            raise RuntimeError(
                f"{groups.describe(self.param_groups[g], g, i)} has a gradient but did not require grad when it "
                "was given to the optimizer; create the optimizer after unfreezing it, or add it with "
                "add_param_group"
            )
        loss = closure_loss.agreed(loss, loss_entries, self._comm.world_size)
        return dense + sparse > 0, sparse > 0, (late > 0).tolist(), loss

    def _name(self, g: int, i: int) -> str:
        """Parameter ``i`` of param group ``g``, as errors name it."""
        return groups.describe(self.param_groups[g], g, i)

    def _locate(self, position: int) -> tuple[int, str]:
        """(param group, name) of the parameter at ``position`` in the buffers' concatenated order."""
        g, i = refusals.where_in_groups(self._buffers, position)
        return g, self._name(g, i)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Collective: the full state, in ``torch.optim.<Algo>.state_dict()``'s format, on every rank.

        With master weights it also holds them, full, under ``"master_params"`` (keyed by parameter
        number like ``"state"``): torch.optim ignores that key, ``load_state_dict`` restores them.
        """
        self._gathers.wait_all()
        # Agreed first: a rank one step() ahead would pair that step's collectives with these.
        with self._comm.call("state_dict()", agree=True):
            states, masters = gather_state(self._buffers, self._comm, self._scalar_dtype)
        if self._algorithm.eager_state:
            for g, _, param in self._unsharded:
                states[param] = initial_entry(self._algorithm, self.param_groups[g], param, self._scalar_dtype)
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
            check_loaded(group, g, states, masters, self._algorithm)
        self._agree_on_loaded(new_groups, states)
        self.param_groups[:] = new_groups
        install_state(self._buffers, new_groups, states, masters, self._algorithm)

    # ------------------------------------------------------------------ what checkpoints and averaging read

    @property
    def torch_class(self) -> type[torch.optim.Optimizer]:
        return self._algorithm.torch_class

    @property
    def algorithm(self) -> algorithms.Algorithm:
        """The algorithm's math on flat shards: its state's names and initial values."""
        return self._algorithm

    @property
    def buffers(self) -> tuple[ShardedBuffer, ...]:
        """This rank's flat buffers, in the order groups were added: what it holds of every parameter."""
        return tuple(self._buffers)

    @property
    def scalar_dtype(self) -> torch.dtype:
        """The dtype of the 0-d state tensors (``step``) in torch.optim's format."""
        return self._scalar_dtype

    @torch.no_grad()
    def publish(self, shards: list[Tensor], what: str) -> None:
        """Collective: every rank's parameters of the first ``len(shards)`` buffers take the values whose
        shard of this rank is ``shards`` (one per buffer), through the step's own gathers."""
        for index, (buffer, shard) in enumerate(zip(self._buffers, shards)):
            full = self._gathers.staging(buffer)
            full[buffer.shard.slice].copy_(shard)
            self._gathers.issue(index, buffer, full, what)
        self._gathers.wait_all()

    # ------------------------------------------------------------------ introspection

    @on_owner
    def _memory_bytes(self) -> dict[str, int]:
        """This rank's bytes: the full parameters it holds, its gradients (stage 1: full; stage 2:
        its shard), the staging buffers gradients pass through on their way to a reduction (stage
        2) and updated parameters on their way back into the parameters (a few buffers each, reused
        every step), its shard of fp32 master weights (low-precision parameters) and its shard of
        the optimizer state."""
        return {
            "param_bytes": sum(b.param_bytes() for b in self._buffers),
            "grad_bytes": sum(b.grad_bytes(self._options.stage) for b in self._buffers),
            "staging_bytes": self._reducer.staging_bytes + self._gathers.staging_bytes,
            "master_bytes": sum(b.master_bytes() for b in self._buffers),
            "state_bytes": sum(b.state_bytes() for b in self._buffers),
        }
