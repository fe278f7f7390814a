"""``WholeGradientOptimizer``: what the coordinators that keep every parameter whole on every rank share.

``OwnedOptimizer`` (Adafactor, Muon: state by whole tensors) and ``SparseRowOptimizer``
(SparseAdam: state by rows) split only the optimizer state; parameters stay whole and
replicated, as under DDP. They share construction (torch's keyword validation, the check that
every rank builds alike, the broadcast of the initial parameters), the groups' checks, and the
sequence of a step: closure, agreement, reduction (which ``clip_grad_norm_`` and a GradScaler
may run ahead of ``step()``: ``ReducedGradients``), then the subclass's update.

A subclass whose reduced gradients are the whole mean in ``p.grad`` (``REDUCES_IN_BACKWARD``)
reduces at the end of each backward, as DDP does, so code between backward and step (torch's
``clip_grad_norm_``, ``model.zero_grad()`` to skip a batch) sees DDP's gradients; ``step()``
then takes ``p.grad`` as it is. Under DDP (a forward through a DDP module that holds the
parameters, ``ddp_watch.py``) backward's gradients are taken as DDP leaves them, not reduced again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..collectives import fingerprint, packed
from ..collectives.comm import Comm, GroupMember
from ..collectives.phases import BACKWARD, DDP_FORWARD
from . import closure_loss, groups
from .backward_hooks import BackwardHooks
from .base import ShardedOptimizer
from .ddp_watch import DDPWatch
from .options import Options
from .reduced_grads import ReducedGradients, on_owner
from .state_view import ParamState, StateView

OUR_KEYWORDS = ("process_group", "grad_reduction", "timeout")


@dataclass
class Reduced:
    """A step's gradients once reduced: kept from ``clip_grad_norm_`` or a GradScaler until the step."""

    present: list[Tensor]  # the parameters with a gradient on some rank
    grads: Any  # what the subclass keeps of this rank's reduced gradients besides p.grad
    loss: Any  # the closure's loss, averaged over the ranks


class WholeGradientOptimizer(ReducedGradients, GroupMember, ParamState, ShardedOptimizer):
    """Base class: subclasses place each new group's parameters (:meth:`_place`), reduce their
    gradients (:meth:`_reduce_grads`) and update them (:meth:`_apply`)."""

    #: The subclass's reduction leaves the mean in every p.grad: it runs at the end of backward.
    REDUCES_IN_BACKWARD = False

    def __init__(
        self,
        params: Iterable[Any],
        optimizer_class: type[torch.optim.Optimizer] | str | None = None,
        *,
        process_group: dist.ProcessGroup | None = None,
        grad_reduction: str | None = "mean",
        timeout: float | timedelta = 300,
        **kwargs: Any,
    ) -> None:
        """``optimizer_class``: one the scheme shards (``SHARDS``), or its name; None where it shards one only."""
        only = self.SHARDS[0] if len(self.SHARDS) == 1 else None
        torch_class = self.sharded_class(optimizer_class if optimizer_class is not None else only)
        self._options = Options(grad_reduction=grad_reduction, timeout=timeout)
        defaults = groups.torch_defaults(torch_class, kwargs, OUR_KEYWORDS)
        self._torch_class = torch_class
        self._kwargs = kwargs
        params = self._ordered(params)  # refused before the first collective, as torch.optim refuses at once
        self._comm = Comm(process_group, timeout)
        self._reduced: Reduced | None = None  # set by clip_grad_norm_ or a GradScaler until the step that follows
        self._scaler_checked = False  # shardopt.GradScaler looked at this step's gradients
        self._by_ddp = False  # a backward since the last step was reduced by DDP: its p.grad is final
        self._from_backward: Reduced | None = None  # reduced at the end of backward, for what comes next
        comm = self._comm
        self._watch = DDPWatch(lambda: comm.mark(DDP_FORWARD))
        self._hooks = BackwardHooks(self._backward_ended)
        #: Steps a GradScaler skipped because the mean gradient was not finite.
        self.skipped_steps = 0
        self._prepare()
        torch.optim.Optimizer.__init__(self, params, defaults)
        self.state = StateView()  # each scheme keeps its part of the state elsewhere (owners, rows)

    def _prepare(self) -> None:
        """Set up what :meth:`_place` fills, before the first group is added."""

    def _place(self, group: dict[str, Any]) -> None:
        """Decide which rank keeps which state of ``group``'s parameters (checked, the same on every rank)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ groups

    def _lay_out(self, group: dict[str, Any], g: int) -> None:
        self._place(group)
        if self.REDUCES_IN_BACKWARD and self._options.grad_reduction is not None and self._comm.world_size > 1:
            self._watch.add(group["params"])
            self._hooks.add(group["params"], range(len(group["params"])))
        # Every rank must start from the same parameters, as DDP ensures at construction.
        with torch.no_grad():
            packed.broadcast_from_first(self._comm, group["params"], "the broadcast of the initial parameters")

    def _release(self) -> None:
        self._hooks.remove()

    def _setup_items(self) -> list[fingerprint.Item]:
        """What every rank must construct alike besides the param groups."""
        name = self._torch_class.__name__
        return [
            (f"the algorithm ({name})", fingerprint.stable_hash(name)),
            (
                f"grad_reduction ({self._options.grad_reduction!r})",
                fingerprint.stable_hash(self._options.grad_reduction),
            ),
        ]

    def _check_group(self, group: dict[str, Any], g: int) -> None:
        # torch's own validation of the group (Muon: 2-D parameters only), without creating state.
        self._torch_class([dict(group)], **self._kwargs)
        self._check_params(group, g)

    @property
    def torch_class(self) -> type[torch.optim.Optimizer]:
        return self._torch_class

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    # ------------------------------------------------------------------ step

    def _backward_ended(self) -> None:
        """A backward that gave some of our parameters a gradient has ended: reduce now, as DDP would
        have (the first half of step(), kept for it), unless DDP did or step()'s closure runs it."""
        under_ddp = self._watch.reduces()
        self._watch.backward_ended()
        if under_ddp is not None:
            self._by_ddp = self._by_ddp or under_ddp
            return
        if not self._in_closure:
            self._from_backward = None  # a second backward adds to p.grad: reduced again, as DDP does
            with self._comm.call(BACKWARD):
                self._from_backward = self._reduce(None)

    def _reduce_grads(self, present: list[Tensor]) -> Any:
        """Collective: reduce the gradients of ``present``; returns what :attr:`Reduced.grads` keeps."""
        raise NotImplementedError

    def _reduce(self, loss: Any) -> Reduced:
        """The first half of a step: the agreement on gradients and loss, then the reduction; or what
        the end of backward reduced, where there is no closure's loss to agree on."""
        if self._from_backward is not None and loss is None:
            reduced, self._from_backward = self._from_backward, None
            return reduced
        self._from_backward = None
        present, loss = self._agree(loss)
        with torch.no_grad():
            return Reduced(present, self._reduce_grads(present), loss)

    def _forget_reduced(self) -> None:
        self._reduced = None
        self._by_ddp = False
        self._from_backward = None

    @on_owner
    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim's; also forgets gradients reduced ahead of step()."""
        self._forget_reduced()
        super().zero_grad(set_to_none)

    def _norm_like(self) -> tuple[torch.dtype, torch.device]:
        params = self._params()
        return (params[0].dtype, params[0].device) if params else (torch.float32, torch.device("cpu"))

    def _agree(self, loss: Any) -> tuple[list[Tensor], Any]:
        """One all-reduce that tells every rank the same parameters with a gradient on some rank,
        the same error, and the mean loss."""
        params = self._params()
        flags = torch.tensor([float(p.grad is not None) for p in params], dtype=torch.float64)
        wrong = torch.tensor([float(p.grad is not None and self._wrong_gradient(p.grad)) for p in params])
        (flags, wrong), loss_entries = self._agreement(loss, [flags, wrong.double()])
        if wrong.any():
            raise RuntimeError(self._gradient_error(self._locate(int(wrong.nonzero()[0]))))
        loss = closure_loss.agreed(loss, loss_entries, self._comm.world_size)
        return [p for p, flag in zip(params, flags.tolist()) if flag > 0], loss

    def _wrong_gradient(self, grad: Tensor) -> bool:
        """Whether this coordinator refuses ``grad`` (sparse where it takes dense, or the reverse)."""
        return grad.is_sparse

    def _gradient_error(self, where: str) -> str:
        return f"{where} has a sparse gradient; {self._torch_class.__name__} does not support sparse gradients"

    def _locate(self, position: int) -> str:
        """Describe the parameter at ``position`` in the groups' concatenated parameter order."""
        for g, group in enumerate(self.param_groups):
            if position < len(group["params"]):
                return groups.describe(group, g, position)
            position -= len(group["params"])
        raise IndexError(position)
