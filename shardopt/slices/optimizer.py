"""``ShardedLBFGS``: torch.optim.LBFGS with its history sharded across the data-parallel ranks.

The closure runs on every rank, on that rank's data; the loss is averaged over the ranks and the
gradient mean-reduced, so every rank sees the global objective, as torch's LBFGS on one process
would with the mean loss. The flat vector of all parameters is cut into one slice per rank
(``lbfgs_flat``); each rank keeps only its slice of every vector of the state (d, prev_flat_grad,
and each history pair s, y), so history memory per rank is 1/N of torch's. Dot products are
partial sums over the slices, summed across ranks in batches:

    each closure evaluation: reduce-scatter of the gradient; one exchange: loss, max |g|, sum |g|
        (and g.d inside the line search)
    each iteration: one exchange for the whole two-loop recursion (``lbfgs_history``); one for
        g.d; one all-gather of the direction d

The update x += t d needs the full d on every rank: d is all-gathered once per iteration rather
than the updated parameters, because the strong-Wolfe line search moves the parameters to
x + t d for every trial step t; with the full d that costs no communication per trial.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.optimizer import _to_scalar

from ..collectives import fingerprint, packed
from ..collectives.comm import Comm, GroupMember
from ..shared import state_format
from ..shared.base import ShardedOptimizer, dense_bytes
from ..shared.state_view import ParamState, StateView
from .flat import FlatSlices
from .history import History, two_loop
from .search import strong_wolfe

#: The state vectors torch keeps full and this rank keeps a slice of (the lists: one per pair).
VECTORS = ("d", "prev_flat_grad")
VECTOR_LISTS = ("old_dirs", "old_stps")

SCALER_REFUSAL = (
    "a GradScaler cannot drive LBFGS: its step() re-evaluates the closure, which torch.amp.GradScaler does "
    "not support either ('Closure use is not currently supported if GradScaler is enabled'); train LBFGS "
    "in float32 or bfloat16 without a scaler"
)


class Gradient(NamedTuple):
    """This rank's slice of the mean gradient, and the global max and sum of its absolute values."""

    slice: Tensor
    abs_max: Tensor
    abs_sum: Tensor


class ShardedLBFGS(GroupMember, ParamState, ShardedOptimizer):
    """``torch.optim.LBFGS`` with its state sharded: each rank keeps 1/N of every history vector.

    Args:
        params: the parameters, as torch.optim takes them; one param group, as torch's LBFGS.
        process_group: the data-parallel group; None means the default group, or a world of one
            when torch.distributed is not initialised.
        timeout: seconds (or a timedelta) any collective of ours may wait before raising.
        lr, max_iter, max_eval, tolerance_grad, tolerance_change, history_size, line_search_fn:
            torch.optim.LBFGS's keywords, with its defaults and validation.

    Construction, ``step``, ``state_dict`` and ``load_state_dict`` are collective: every rank calls
    them, in the same order. ``step(closure)`` calls the closure on every rank the same number of
    times; it must return this rank's loss (the mean over ranks is the objective) after backward.
    """

    SHARDS = (torch.optim.LBFGS,)

    @classmethod
    def build(cls, params: Any, torch_class: type[torch.optim.Optimizer], **kwargs: Any) -> ShardedLBFGS:
        return cls(params, **kwargs)  # torch's LBFGS signature: no optimizer_class

    def __init__(
        self,
        params: Iterable[Any],
        *,
        process_group: dist.ProcessGroup | None = None,
        timeout: float | timedelta = 300,
        lr: float | Tensor = 1,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        history_size: int = 100,
        line_search_fn: str | None = None,
    ) -> None:
        keywords = {
            "lr": lr,
            "max_iter": max_iter,
            "max_eval": max_eval,
            "tolerance_grad": tolerance_grad,
            "tolerance_change": tolerance_change,
            "history_size": history_size,
            "line_search_fn": line_search_fn,
        }
        # torch's own validation and defaults (max_eval's), from a throwaway LBFGS.
        defaults = dict(torch.optim.LBFGS([torch.nn.Parameter(torch.zeros(1))], **keywords).defaults)
        params = self._ordered(params)  # refused before the first collective, as torch.optim refuses at once
        self._comm = Comm(process_group, timeout)
        self._history: History | None = None
        super().__init__(params, defaults)
        #: This rank's slices of the LBFGS state (torch's names), under the first parameter as torch keeps
        #: it; ``opt.state`` stays empty.
        self.shard_state: dict[Tensor, dict[str, Any]] = defaultdict(dict)
        self.state = StateView()

    def _check_group(self, group: dict[str, Any], g: int) -> None:
        if g:
            raise ValueError("LBFGS doesn't support per-parameter options (parameter groups)")
        self._check_params(group, g)

    def _setup_items(self) -> list[fingerprint.Item]:
        return [("the algorithm (LBFGS)", fingerprint.stable_hash("LBFGS"))]

    def _lay_out(self, group: dict[str, Any], g: int) -> None:
        self._params: list[Tensor] = group["params"]
        self._flat = FlatSlices(self._params, self._comm)
        # Every rank must start from the same parameters, as DDP ensures at construction.
        with torch.no_grad():
            packed.broadcast_from_first(self._comm, self._params, "the broadcast of the initial parameters")

    # ------------------------------------------------------------------ evaluations

    def _evaluate(self, closure: Callable[[], Any], d: Tensor | None = None) -> tuple[Any, float, Gradient, Tensor]:
        """Collective: the closure on every rank; returns its value, the mean loss over ranks (a
        float, as torch's ``float(closure())``), the mean gradient's slice, and g.d if ``d`` is given."""
        with torch.enable_grad():
            value = closure()
        g = self._flat.mean_grad("the reduce-scatter of the LBFGS gradient")
        own = torch.stack([g.abs().max(), g.abs().sum(), g.dot(d) if d is not None else g.new_zeros(())]).double()
        loss = torch.tensor([float(value)], dtype=torch.float64, device=own.device)
        rows = self._flat.rows(torch.cat([loss, own]), "the exchange of the loss and gradient norms")
        sums, abs_max = rows.sum(0), rows[:, 1].amax()
        scalars = torch.stack([abs_max, sums[2], sums[3]]).to(dtype=g.dtype, device=g.device)
        gradient = Gradient(g, scalars[0], scalars[1])
        return value, sums[0].item() / self._comm.world_size, gradient, scalars[2]

    def _global_dot(self, a: Tensor, b: Tensor, what: str) -> Tensor:
        """Collective: the dot product of two sliced vectors, as a 0-d tensor of their dtype."""
        return self._flat.rows(a.dot(b)[None], what).sum().to(dtype=a.dtype, device=a.device)

    def _mean_value(self, value: Any, loss: float) -> Any:
        """The first closure value, averaged over ranks, in the closure's own type (as torch returns it)."""
        if self._comm.world_size == 1:
            return value
        if isinstance(value, Tensor):
            return torch.tensor(loss, dtype=value.dtype, device=value.device)
        return loss

    # ------------------------------------------------------------------ step

    #: torch.amp.GradScaler then calls step() on every rank (rather than skipping it on the ranks
    #: that saw an inf in their own gradients), where the refusal is raised alike.
    _step_supports_amp_scaling = True

    @torch.no_grad()
    def step(self, closure: Callable[[], Any]) -> Any:  # type: ignore[override]
        """One LBFGS step, torch's sequence of iterations; returns the first closure value averaged
        over ranks."""
        if hasattr(self, "found_inf"):  # set by torch.amp.GradScaler.step for this call
            del self.found_inf
            self.__dict__.pop("grad_scale", None)
            raise TypeError(SCALER_REFUSAL)
        if len(self.param_groups) != 1:
            raise AssertionError(f"Expected exactly one param_group, but got {len(self.param_groups)}")
        with self._comm.call("step()", step=True):
            return self._iterate(closure)

    def _iterate(self, closure: Callable[[], Any]) -> Any:
        """The iterations of a step: torch's ``LBFGS.step``, whose comments these are; the changes are
        the sharded dot products."""
        group = self.param_groups[0]
        lr = _to_scalar(group["lr"])
        max_iter = group["max_iter"]
        max_eval = group["max_eval"]
        tolerance_grad = group["tolerance_grad"]
        tolerance_change = group["tolerance_change"]
        line_search_fn = group["line_search_fn"]
        history_size = group["history_size"]

        state = self.shard_state[self._params[0]]
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)

        # evaluate initial f(x) and df/dx
        value, loss, flat_grad, _ = self._evaluate(closure)
        orig_loss = self._mean_value(value, loss)
        current_evals = 1
        state["func_evals"] += 1
        opt_cond = flat_grad.abs_max <= tolerance_grad

        # optimal condition
        if opt_cond:
            return orig_loss

        # tensors cached in state (this rank's slices of the vectors)
        d = state.get("d")
        t = state.get("t")
        h_diag = state.get("H_diag")
        prev_flat_grad = state.get("prev_flat_grad")
        prev_loss = state.get("prev_loss")
        history = self._history

        n_iter = 0
        # optimize for a max of max_iter iterations
        while n_iter < max_iter:
            # keep track of nb of iterations
            n_iter += 1
            state["n_iter"] += 1

            ############################################################
            # compute gradient descent direction
            ############################################################
            if state["n_iter"] == 1:
                d = flat_grad.slice.neg()
                history = self._history = History([], [], [], self._flat.dtype)
                h_diag = 1
            else:
                # do lbfgs update (update memory), with every dot product of the pass in one exchange
                y = flat_grad.slice.sub(prev_flat_grad)
                s = d.mul(t)
                partials = history.partials(y, s, flat_grad.slice)
                sums = self._flat.rows(partials, "the exchange of the LBFGS dot products").sum(0)
                sg, yg, new_h_diag = history.update(y, s, sums, history_size)
                if new_h_diag is not None:
                    h_diag = new_h_diag

                # compute the approximate (L-BFGS) inverse Hessian multiplied by the gradient
                if "al" not in state:
                    state["al"] = [None] * history_size
                ro = torch.stack(history.ro).cpu() if history.ro else torch.zeros(0, dtype=self._flat.dtype)
                h = h_diag.cpu() if isinstance(h_diag, Tensor) else h_diag
                al, y_coefficients, s_coefficients = two_loop(history.sy, history.yy, sg, yg, ro, h)
                for i, value_i in enumerate(al.to(self._flat.device).unbind()):
                    state["al"][i] = value_i.clone()
                d = history.direction(flat_grad.slice, h_diag, y_coefficients, s_coefficients)

            if prev_flat_grad is None:
                prev_flat_grad = flat_grad.slice.clone(memory_format=torch.contiguous_format)
            else:
                prev_flat_grad.copy_(flat_grad.slice)
            prev_loss = loss

            ############################################################
            # compute step length
            ############################################################
            # reset initial guess for step size
            if state["n_iter"] == 1:
                t = min(1.0, 1.0 / flat_grad.abs_sum) * lr
            else:
                t = lr

            # directional derivative
            gtd = self._global_dot(flat_grad.slice, d, "the exchange of the directional derivative")

            # directional derivative is below tolerance
            if gtd > -tolerance_change:
                break

            (full_d,) = self._flat.gather([d], "the all-gather of the LBFGS direction")

            # optional line search: user function
            ls_func_evals = 0
            if line_search_fn is not None:
                # perform line search, using user function
                if line_search_fn != "strong_wolfe":
                    raise RuntimeError("only 'strong_wolfe' is supported")
                x_init = [p.clone(memory_format=torch.contiguous_format) for p in self._params]

                def obj_func(x: list[Tensor], t: Any, full_d: Tensor, d: Tensor = d) -> tuple[float, Gradient, Tensor]:
                    return self._directional_evaluate(closure, x, t, full_d, d)

                loss, flat_grad, t, ls_func_evals = strong_wolfe(
                    obj_func, x_init, t, full_d, loss, flat_grad, gtd, max_ls=max_eval - current_evals
                )
                self._flat.add_(t, full_d)
                opt_cond = flat_grad.abs_max <= tolerance_grad
            else:
                # no line search, simply move with fixed-step
                self._flat.add_(t, full_d)
                if n_iter != max_iter:
                    # re-evaluate function only if not in last iteration
                    # the reason we do this: in a stochastic setting,
                    # no use to re-evaluate that function here
                    _, loss, flat_grad, _ = self._evaluate(closure)
                    opt_cond = flat_grad.abs_max <= tolerance_grad
                    ls_func_evals = 1

            # update func eval
            current_evals += ls_func_evals
            state["func_evals"] += ls_func_evals

            ############################################################
            # check conditions
            ############################################################
            if n_iter == max_iter:
                break

            if current_evals >= max_eval:
                break

            # optimal condition
            if opt_cond:
                break

            # lack of progress (on the full d every rank holds)
            if full_d.mul(t).abs().max() <= tolerance_change:
                break

            if abs(loss - prev_loss) < tolerance_change:
                break

        state["d"] = d
        state["t"] = t
        # No history yet when no iteration ran (max_iter <= 0): torch keeps None then.
        state["old_dirs"] = history.dirs if history is not None else None
        state["old_stps"] = history.stps if history is not None else None
        state["ro"] = history.ro if history is not None else None
        state["H_diag"] = h_diag
        state["prev_flat_grad"] = prev_flat_grad
        state["prev_loss"] = prev_loss

        return orig_loss

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """Refused on every rank (no communication): LBFGS's gradients are not the user's to clip."""
        raise RuntimeError(
            "clip_grad_norm_ is not supported for LBFGS: step() evaluates the closure several times and the "
            "line search and curvature history need each evaluation's true gradient (torch.optim.LBFGS is not "
            "used with clipping either); bound its steps with lr, max_iter or line_search_fn='strong_wolfe'"
        )

    def _directional_evaluate(
        self, closure: Callable[[], Any], x: list[Tensor], t: Any, full_d: Tensor, d: Tensor
    ) -> tuple[float, Gradient, Tensor]:
        """torch's ``_directional_evaluate``: loss and gradient at x + t d, then back to x; and g.d."""
        self._flat.add_(t, full_d)
        _, loss, flat_grad, gtd = self._evaluate(closure, d)
        for param, value in zip(self._params, x, strict=True):
            param.copy_(value)
        return loss, flat_grad, gtd

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Collective: torch.optim.LBFGS's state_dict on every rank (its state under the first
        parameter), the sharded vectors all-gathered in one collective."""
        entry = self.shard_state.get(self._params[0]) if self._params else None
        sliced = []  # in the entry's key order, as they are taken back below
        for key, value in (entry or {}).items():
            if _sliced(key, value, VECTORS):
                sliced.append(value)
            elif _sliced(key, value, VECTOR_LISTS):
                sliced += value
        # A rank one step() ahead would pair that step's collectives with these: agree first.
        with self._comm.call("state_dict()", agree=True):
            full = iter(self._flat.gather(sliced, "the all-gather of the LBFGS state"))
        states = {}
        if entry:
            packed: dict[str, Any] = {}
            for key, value in entry.items():
                if _sliced(key, value, VECTORS):
                    packed[key] = next(full).clone()
                elif _sliced(key, value, VECTOR_LISTS):
                    packed[key] = [next(full).clone() for _ in value]
                elif isinstance(value, list):
                    packed[key] = [v.clone() if isinstance(v, Tensor) else v for v in value]
                else:
                    packed[key] = value.clone() if isinstance(value, Tensor) else value
            states[self._params[0]] = packed
        return state_format.pack(self.param_groups, states)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Collective: load torch.optim.LBFGS's format, from any world size or from plain torch.optim.

        Each rank cuts its slices out of the full vectors (cast, as torch casts, to the first
        parameter's dtype and device); one exchange rebuilds the Gram matrices of the history.
        A dict for another model raises ValueError and leaves this optimizer as it was.
        """
        with self._comm.call("load_state_dict()", agree=True):
            new_groups, states, _ = self._unpacked(state_dict)
            entry = states.get(self._params[0]) if self._params else None
            loaded: dict[str, Any] = {}
            for key, value in (entry or {}).items():
                if _sliced(key, value, VECTORS):
                    loaded[key] = self._cut(value, key)
                elif _sliced(key, value, VECTOR_LISTS):
                    loaded[key] = [self._cut(v, key) for v in value]
                elif isinstance(value, list):
                    loaded[key] = [self._cast(v) for v in value]
                else:
                    loaded[key] = self._cast(value)
            self.restore_state(new_groups, loaded)

    def gram(self) -> tuple[Tensor, Tensor] | None:
        """The history's Gram matrices S^T Y and Y^T Y (the same on every rank); None without pairs."""
        return (self._history.sy, self._history.yy) if self._history is not None and self._history.dirs else None

    def restore_state(
        self, new_groups: list[dict[str, Any]], loaded: dict[str, Any], gram: tuple[Tensor, Tensor] | None = None
    ) -> None:
        """Collective: install checked param groups and this rank's state (its slices of the vectors,
        zero-padded to the slice length). Without the saved ``gram`` (``gram()``), one exchange
        rebuilds the Gram matrices of the history (equal to the saved ones to rounding only)."""
        history = None
        if loaded.get("old_dirs") is not None:
            history = History(loaded["old_dirs"], loaded["old_stps"], loaded["ro"], self._flat.dtype)
            if gram is None:
                sums = self._flat.rows(history.gram_partials(), "the exchange of the loaded LBFGS Gram matrices")
                history.set_gram(sums.sum(0))
            else:
                history.sy, history.yy = gram
        self.param_groups[:] = new_groups
        self._params = new_groups[0]["params"]
        self.shard_state.clear()
        if loaded:
            self.shard_state[self._params[0]] = loaded
        self._history = history

    def _cast(self, value: Any) -> Any:
        """A private copy of a loaded tensor, cast as torch.optim's load_state_dict casts it."""
        if not isinstance(value, Tensor):
            return value
        first = self._params[0]
        if first.is_floating_point():
            return value.to(dtype=first.dtype, device=first.device, copy=True)
        return value.to(device=first.device, copy=True)

    def _cut(self, value: Any, key: str) -> Tensor:
        if not isinstance(value, Tensor) or value.numel() != self._flat.numel:
            size = value.numel() if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"loaded LBFGS state {key!r} has {size} elements but the parameters have {self._flat.numel}: "
                "the state dict belongs to a different model"
            )
        return self._flat.cut(self._cast(value))

    # ------------------------------------------------------------------ what checkpoints read

    @property
    def torch_class(self) -> type[torch.optim.Optimizer]:
        return torch.optim.LBFGS

    @property
    def flat(self) -> FlatSlices:
        """The parameters as one flat vector, and this rank's slice of it."""
        return self._flat

    # ------------------------------------------------------------------ introspection

    def _memory_bytes(self) -> dict[str, int]:
        """This rank's bytes: the full parameters and gradients every rank holds, and its optimizer
        state: its slices of the vectors (about 1/N of torch.optim's), the scalars, the Gram matrices."""
        tensors = []
        entry = self.shard_state.get(self._params[0], {}) if self._params else {}
        for value in entry.values():
            tensors += value if isinstance(value, list) else [value]
        state_bytes = dense_bytes([t for t in tensors if isinstance(t, Tensor)])
        return {
            "param_bytes": dense_bytes(self._params),
            "grad_bytes": dense_bytes([p for p in self._params if p.requires_grad]),
            "state_bytes": state_bytes + (self._history.nbytes() if self._history else 0),
        }


def _sliced(key: str, value: Any, keys: tuple[str, ...]) -> bool:
    """Whether state ``key`` is one of ``keys`` and holds vectors (None before any iteration ran)."""
    return key in keys and value is not None
