"""The global checks between a step's gradient reduction and its update: the gradient norm
(``clip_grad_norm_``) and the inf/NaN verdict of a GradScaler, agreed by every rank.

Every coordinator holds its reduced gradient its own way (``ElementOptimizer``: element shards;
``OwnedOptimizer``: the full mean gradient in every ``p.grad``; ``SparseRowOptimizer``: the values
of its rows' sparse gradients). ``ReducedGradients`` asks it for those tensors and runs the same
collectives on all of them: one all-reduce for the norm, one MAX all-reduce for inf/NaN.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from ..collectives.comm import Comm

T = TypeVar("T")

# The calls of these checks on the phase board (phases.py): a rank that dies or calls something else
# while the others are in one is named with it. One post per call, not per collective.
CLIP_CALL = "clip_grad_norm_()"
UNSCALE_CALL = "GradScaler.unscale_()"
CLOSURE_AFTER_REDUCTION = (
    "step(closure) recomputes the gradients that clip_grad_norm_() or a GradScaler's unscale_() already reduced; "
    "call clip_grad_norm_() inside the closure, after backward, or step() without a closure"
)


def owner(optimizer: Any) -> Any:
    """The object that holds a shardopt optimizer's state: ``optimizer`` itself, or the one a framework's
    wrapper wraps (Fabric's and Lightning's in ``_optimizer``, Accelerate's in ``optimizer``). Fabric's and
    Lightning's take the optimizer's class (so its methods run with the wrapper as ``self``) and forward
    attribute reads; what a method writes would stay on the wrapper."""
    while "_comm" not in vars(optimizer):
        inner = vars(optimizer).get("_optimizer", vars(optimizer).get("optimizer"))
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


def on_owner(method: Callable[..., T]) -> Callable[..., T]:
    """``method`` runs on :func:`owner` of the object it is called on."""

    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> T:
        return method(owner(self), *args, **kwargs)

    return run


class ReducedGradients:
    """Mixin of the coordinators: ``clip_grad_norm_`` and what ``shardopt.GradScaler`` asks of them.

    It runs the step every scheme with a reduction shares (closure, reduction, agreed skip, update).
    A coordinator provides ``_reduce(loss)`` (the first half of its step: the reduced gradients),
    ``_apply(reduced)`` (the second), ``_forget_reduced()``, and which tensors hold the reduced gradient on this rank
    (``_grad_tensors``: all of them; ``_norm_tensors``: a part of them that, over the ranks,
    covers every element once). It keeps ``self._reduced`` (set until the step that follows) and
    ``self._scaler_checked``, and clears both at the end of every step.
    """

    _comm: Comm
    _reduced: Any
    _scaler_checked: bool
    skipped_steps: int
    _in_closure = False  # step() runs the closure: a backward inside it is reduced by the step

    #: torch.amp.GradScaler hands ``grad_scale`` and ``found_inf`` to step() rather than skipping
    #: it itself, so that every rank decides alike (see :class:`shardopt.GradScaler`).
    _step_supports_amp_scaling = True

    def _reduce(self, loss: Any) -> Any:
        raise NotImplementedError

    def _forget_reduced(self) -> None:
        raise NotImplementedError

    def _grad_tensors(self, reduced: Any) -> list[Tensor]:
        raise NotImplementedError

    def _norm_tensors(self, reduced: Any) -> list[Tensor]:
        raise NotImplementedError

    def _norm_like(self) -> tuple[torch.dtype, torch.device]:
        """The dtype and device of the norm ``clip_grad_norm_`` returns."""
        raise NotImplementedError

    def _grads_changed(self) -> None:
        """Called after the reduced gradients were changed in place (unscaled or clipped)."""

    def _unscale_own_grads(self, inv_scale: Tensor) -> None:
        """Multiply what ``p.grad`` holds by ``inv_scale`` where it is not among ``_grad_tensors``
        (SparseAdam: each rank's own sparse gradient), as torch's GradScaler leaves p.grad unscaled."""

    @contextlib.contextmanager
    def _reduced_early(self) -> Iterator[Any]:
        """The gradients reduced ahead of step() (by clip_grad_norm_ or a GradScaler), reducing them
        now if nothing did yet; an error inside the block forgets them, as a failed step() does."""
        try:
            if self._reduced is None:
                self._reduced = self._reduce(None)
            yield self._reduced
        except BaseException:
            self._forget_reduced()
            raise

    def _refuse_closure_after_reduction(self, closure: Any) -> None:
        if closure is not None and self._reduced is not None:
            raise RuntimeError(CLOSURE_AFTER_REDUCTION)

    # ------------------------------------------------------------------ the step

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step on every rank: the closure (if any), the reduction (unless
        ``clip_grad_norm_`` or a GradScaler ran it ahead), then the update, unless the step is
        skipped alike on every rank. Returns the closure's loss averaged over ranks."""
        self._refuse_closure_after_reduction(closure)
        loss = None
        if closure is not None:
            self._in_closure = True
            try:
                with torch.enable_grad():
                    loss = closure()
            finally:
                self._in_closure = False
        self._comm.enter("step()", step=True)
        try:
            self._verify()
            with torch.no_grad():
                reduced = self._reduced or self._reduce(loss)
                if self._skips(reduced):
                    self.skipped_steps += 1
                else:
                    self._apply(reduced)
        finally:
            self._forget_reduced()
            self._scaler_checked = False
            self._comm.leave()
        return reduced.loss

    def _verify(self) -> None:
        """Checks a scheme makes at the start of some steps, inside the step's call."""

    def _skips(self, reduced: Any) -> bool:
        """Whether this step is skipped, the same on every rank; unscales what a GradScaler scaled."""
        return bool(self._scaler_skips(reduced))

    def _apply(self, reduced: Any) -> None:
        """Collective: the update of the parameters from the reduced gradients, on every rank."""
        raise NotImplementedError

    # ------------------------------------------------------------------ clipping

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_`` of the mean gradient, over every parameter of this optimizer.

        Collective; call it between backward and ``step()``. It reduces the gradients (the first
        half of ``step()``, which then only updates), computes the total norm with one all-reduce
        and scales the reduced gradients by ``max_norm / (norm + 1e-6)`` where that is below 1.
        Returns the total norm, as torch does. Several optimizers of one model (Muon + AdamW):
        :func:`clip_grad_norm_` clips them by their one joint norm.
        """
        return clip_grad_norm_([self], max_norm, norm_type, error_if_nonfinite)

    def _reduced_norm(self, norm_type: float) -> Tensor:
        """Collective: the float64 norm of the reduced gradient, reducing it now if nothing did yet.

        Only a failed reduction forgets the gradients: a refused clip (error_if_nonfinite) leaves
        them for step(), as torch's leaves p.grad.
        """
        with self._reduced_early() as reduced:
            pass
        return self._global_norm(self._norm_tensors(reduced), norm_type)

    def _global_norm(self, parts: list[Tensor], norm_type: float) -> Tensor:
        """Collective: the ``norm_type``-norm, in float64, of the vector the ranks' ``parts`` make together.

        Before: each rank holds disjoint parts. The p-th powers of their elements (or, for the
        inf-norm, their largest magnitude) reduced over the ranks cover each element once; after
        the all-reduce every rank holds the same total, so raises the same errors.
        """
        local = torch.zeros((), dtype=torch.float64, device=self._comm.device)
        for part in parts:
            if part.numel():
                magnitude = part.detach().abs().double()
                if norm_type == math.inf:
                    local = torch.maximum(local, magnitude.max().to(local.device))
                else:
                    local = local + magnitude.pow(norm_type).sum().to(local.device)
        op = dist.ReduceOp.MAX if norm_type == math.inf else dist.ReduceOp.SUM
        self._comm.all_reduce_(local, "the all-reduce of the gradient norm", op=op).wait()
        return local if norm_type == math.inf else local.pow(1 / norm_type)

    def _scale_grads(self, reduced: Any, factor: Tensor) -> None:
        for tensor in self._grad_tensors(reduced):
            tensor.mul_(factor.to(tensor.device, tensor.dtype))
        self._grads_changed()

    # ------------------------------------------------------------------ loss scaling

    def _nonfinite(self, reduced: Any, inv_scale: Tensor | None = None) -> Tensor:
        """Collective: 1.0 if any rank's reduced gradient holds an inf or NaN, else 0.0 (float32, on
        the process group's device); with ``inv_scale``, the gradients are multiplied by it too."""
        found = torch.zeros((), dtype=torch.float32, device=self._comm.device)
        by_dtype: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for tensor in self._grad_tensors(reduced):
            by_dtype.setdefault((tensor.device, tensor.dtype), []).append(tensor)
        for (device, _), tensors in by_dtype.items():
            local = torch.zeros((), dtype=torch.float32, device=device)
            scale = torch.ones((), device=device) if inv_scale is None else inv_scale.to(device)
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, local, scale)
            found = torch.maximum(found, local.to(found.device))
        if inv_scale is not None:
            self._grads_changed()
        self._comm.all_reduce_(found, "the agreement on non-finite gradients", op=dist.ReduceOp.MAX).wait()
        return found

    def _unscale_for_scaler(self, inv_scale: Tensor, found_inf: Tensor) -> dict[torch.device, Tensor]:
        """Collective: what ``GradScaler._unscale_grads_`` does for a torch.optim optimizer, on the
        reduced gradients: multiply them by ``inv_scale`` and report inf/NaN, agreed by every rank."""
        with torch.no_grad(), self._comm.call(UNSCALE_CALL), self._reduced_early() as reduced:
            found = self._nonfinite(reduced, inv_scale)
            self._unscale_own_grads(inv_scale)
        self._scaler_checked = True
        agreed = found.to(found_inf.device)
        return {agreed.device: agreed}

    def _scaler_skips(self, reduced: Any) -> bool | None:
        """None when no GradScaler drives this step(); else whether the step is skipped, the same on
        every rank (the scaler's ``found_inf`` is the agreed one), having unscaled the gradients
        where the scaler left that to step()."""
        if not hasattr(self, "found_inf"):  # set by torch.amp.GradScaler.step for this call
            return None
        if not self._scaler_checked:
            # torch's scaler removes these after a step that returns; this one raises.
            del self.found_inf
            self.__dict__.pop("grad_scale", None)
            raise TypeError(
                f"torch.amp.GradScaler cannot see a {type(self).__name__}'s reduced gradients (each rank would "
                "decide alone whether to skip the step); use shardopt.GradScaler, a drop-in subclass of it"
            )
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is not None:
            # Even for a step it skips: torch's scaler unscales p.grad before it skips a torch.optim step.
            inv_scale = grad_scale.double().reciprocal().float()
            self._scale_grads(reduced, inv_scale)
            self._unscale_own_grads(inv_scale)
        return bool(float(self.found_inf))


def clip_grad_norm_(
    optimizers: ReducedGradients | Iterable[ReducedGradients],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` of the mean gradient over every parameter of ``optimizers``
    together: what torch's function does over ``model.parameters()`` when the model's parameters
    are split between optimizers (Muon for the matrices, AdamW for the rest).

    Collective, between backward and ``step()``: each optimizer reduces its gradients and finds
    their norm (one all-reduce each); the joint norm is the norm of those norms, as torch combines
    its per-device norms, and every optimizer's gradients are scaled by ``max_norm / (norm + 1e-6)``
    where that is below 1. Returns the joint norm, in the first optimizer's dtype and device.
    """
    optimizers = [owner(o) for o in ([optimizers] if isinstance(optimizers, ReducedGradients) else list(optimizers))]
    if not optimizers:
        raise ValueError("optimizers is empty: pass the shardopt optimizers whose gradients to clip")
    for index, optimizer in enumerate(optimizers):
        if not isinstance(optimizer, ReducedGradients):
            raise TypeError(
                f"optimizers[{index}] is a {type(optimizer).__name__}: clip_grad_norm_ clips shardopt optimizers' "
                "reduced gradients (not LBFGS, whose step re-evaluates the closure); clip a torch.optim "
                "optimizer's parameters with torch.nn.utils.clip_grad_norm_"
            )
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm >= 0:
        raise ValueError(f"max_norm must be a number >= 0, got {max_norm!r}")
    norm_type = float(norm_type)
    if not (norm_type == math.inf or 0 < norm_type < math.inf):
        raise ValueError(f"norm_type must be a positive number or math.inf, got {norm_type!r}")
    with torch.no_grad(), contextlib.ExitStack() as calls:
        for optimizer in optimizers:
            calls.enter_context(optimizer._comm.call(CLIP_CALL))
        norms = torch.stack([optimizer._reduced_norm(norm_type).cpu() for optimizer in optimizers])
        if len(optimizers) == 1:
            joint = norms[0]
        elif norm_type == math.inf:
            joint = norms.max()
        else:
            joint = norms.pow(norm_type).sum().pow(1 / norm_type)
        dtype, device = optimizers[0]._norm_like()
        total = joint.to(dtype=dtype, device=device)
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(
                f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it "
                "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
                "anyway, set `error_if_nonfinite=False`"
            )
        factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for optimizer in optimizers:
            optimizer._scale_grads(optimizer._reduced, factor)
    return total
