"""``SparseRowOptimizer``: ``torch.optim.SparseAdam`` with each parameter's state sharded by rows.

SparseAdam updates only the rows a sparse gradient names (``nn.Embedding(sparse=True)``), so
each parameter is cut into N contiguous row ranges (``rows.row_ranges``), one per rank, and a
rank keeps SparseAdam's state (exp_avg, exp_avg_sq) for its rows only. One step, on every rank::

    closure (if any) -> agree: which parameters have a gradient on any rank, whether one is dense, the loss
    -> all-gather the entry counts, then each gradient's coalesced indices and values (padded to the most)
    -> keep the entries in this rank's rows, sum duplicates (divided by N for "mean")
    -> torch's own sparse_adam on this rank's rows (a view of the parameter) and their state
    -> all-gather only the rows each owner updated (every rank knows which, from the indices)

No rank ever holds a dense gradient of a table; the bytes exchanged follow the rows the batches
touched (sparse_exchange.py).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor
from torch.optim import _functional
from torch.optim.optimizer import _to_scalar

from ..collectives import sparse_exchange
from ..shared import groups, state_format, torch_state
from ..shared.base import dense_bytes
from ..shared.rows import entries_in, row_ranges, touched_rows
from ..shared.whole_gradients import Reduced, WholeGradientOptimizer

# torch.optim.SparseAdam's own message (torch/optim/sparse_adam.py), so users' handling still works.
DENSE_GRADIENT_ERROR = "SparseAdam does not support dense gradients, please consider Adam instead"
STATE_NAMES = ("exp_avg", "exp_avg_sq")


class SparseRowOptimizer(WholeGradientOptimizer):
    """``torch.optim.SparseAdam`` with each parameter's state split by rows (dim 0) across the ranks.

    Args:
        params: tensors, ``named_parameters()``, or param-group dicts, as torch.optim takes them.
        optimizer_class: ``torch.optim.SparseAdam`` or its name (the only algorithm it runs).
        process_group: the data-parallel group; None means the default group, or a world of one
            when torch.distributed is not initialised.
        grad_reduction: ``"mean"`` or ``"sum"`` of the ranks' sparse gradients, or None when they
            are already reduced (the same on every rank).
        timeout: seconds (or a timedelta) any collective of ours may wait before raising.
        **kwargs: SparseAdam's keywords (lr, betas, eps, maximize), with torch's defaults and validation.

    ``p.grad`` keeps this rank's own sparse gradient (the reduced one exists only row-sliced, on
    the rows' owners); ``shardopt.GradScaler`` unscales it, as torch's unscales ``p.grad``.
    Construction, ``step``, ``clip_grad_norm_``, ``state_dict``, ``load_state_dict`` and
    ``add_param_group`` are collective: every rank calls them, in the same order.
    """

    SHARDS = (torch.optim.SparseAdam,)

    def _prepare(self) -> None:
        self._rows: dict[Tensor, list[range]] = {}  # each parameter's row range per rank
        #: Per parameter, the state of this rank's rows (torch's names); ``opt.state`` stays empty.
        self.shard_state: dict[Tensor, dict[str, Any]] = defaultdict(dict)

    def _place(self, group: dict[str, Any]) -> None:
        """Cut each of ``group``'s parameters into one row range per rank."""
        for param in group["params"]:
            self._rows[param] = row_ranges(param.shape[0], self._comm.world_size)

    def _check_param(self, param: Tensor, where: str) -> None:
        if param.dim() == 0:
            raise ValueError(f"{where} is 0-dimensional; SparseAdam is sharded by rows (dim 0)")

    # ------------------------------------------------------------------ step

    def _reduce_grads(self, present: list[Tensor]) -> dict[Tensor, tuple[Tensor, list[Tensor]]]:
        return self._own_gradients(present)

    def _apply(self, reduced: Reduced) -> None:
        for group in self.param_groups:
            self._update(group, reduced.grads)

    def _grad_tensors(self, reduced: Reduced) -> list[Tensor]:
        # The coalesced values of this rank's rows (views: scaling them scales the sparse slices),
        # which torch's GradScaler unscales too (after coalescing fp16 gradients).
        return [grad.values() for grad, _ in reduced.grads.values()]

    def _norm_tensors(self, reduced: Reduced) -> list[Tensor]:
        return self._grad_tensors(reduced)  # the ranks' rows are disjoint

    def _unscale_own_grads(self, inv_scale: Tensor) -> None:
        # The reduced rows are copies (sparse_exchange, entries_in): p.grad is unscaled on its own, in
        # place and uncoalesced, as torch's GradScaler unscales an fp32 sparse p.grad's _values().
        for param in self._params():
            if param.grad is not None:
                values = param.grad._values()
                values.mul_(inv_scale.to(values.device, values.dtype))

    def _wrong_gradient(self, grad: Tensor) -> bool:
        return not grad.is_sparse

    def _gradient_error(self, where: str) -> str:
        return DENSE_GRADIENT_ERROR  # torch's own words (it names no parameter either)

    def _own_gradients(self, present: list[Tensor]) -> dict[Tensor, tuple[Tensor, list[Tensor]]]:
        """For each parameter with a gradient on some rank: the reduced sparse gradient of this
        rank's rows, and the rows each rank will update (the same on every rank)."""
        local = {p: p.grad.coalesce() if p.grad is not None else None for p in present}
        if self._options.grad_reduction is None or self._comm.world_size == 1:
            # Already reduced (or nothing to reduce): every rank sees every entry in its own gradient.
            everyone = {p: (g.indices(), g.values()) for p, g in local.items() if g is not None}
        else:
            everyone = sparse_exchange.gather_gradients(self._comm, local)
        divide = self._options.grad_reduction == "mean" and self._comm.world_size > 1
        slices = {}
        for param in present:
            ranges = self._rows[param]
            if param not in everyone:  # no rank had an entry (empty gradients): SparseAdam skips it
                indices = torch.zeros(1, 0, dtype=torch.int64, device=param.device)
                everyone[param] = (indices, param.new_zeros(0, *param.shape[1:]))
            indices, values = everyone[param]
            mine, mine_values = entries_in(indices, values, ranges[self.rank])
            if divide:  # before summing duplicates, as (g_0 + ... + g_N-1) / N adds g_r / N
                mine_values = mine_values / self._comm.world_size
            size = (len(ranges[self.rank]), *param.shape[1:])
            # The indices are in range by construction (entries_in): no invariant check needed.
            grad = torch.sparse_coo_tensor(mine, mine_values, size, check_invariants=False).coalesce()
            slices[param] = (grad, touched_rows(indices[0], ranges))
        return slices

    def _update(self, group: dict[str, Any], slices: dict[Tensor, tuple[Tensor, list[Tensor]]]) -> None:
        """torch's own SparseAdam on this rank's rows of ``group``'s parameters, then the updated
        rows to every rank."""
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for param in group["params"]:
            if param not in slices:
                continue
            rows = self.rows_of(param)
            state = self.shard_state[param]
            if not state:  # as torch creates it, for this rank's rows only
                state["step"] = 0
                for name in STATE_NAMES:
                    state[name] = param.new_zeros(len(rows), *param.shape[1:])
            state["step"] += 1
            params.append(param[rows.start : rows.stop])
            grads.append(slices[param][0])
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        _functional.sparse_adam(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            steps,
            eps=group["eps"],
            beta1=beta1,
            beta2=beta2,
            lr=_to_scalar(group["lr"]),
            maximize=group.get("maximize", False),
        )
        if self._comm.world_size > 1:
            for param in group["params"]:
                if param in slices:
                    sparse_exchange.gather_rows(self._comm, param, slices[param][1])

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Collective: the full state, in ``torch.optim.SparseAdam.state_dict()``'s format, on every rank.

        Which parameters have state is the same on every rank (they all step them together); one
        all-gather per parameter with state brings the row shards of exp_avg and exp_avg_sq.
        """
        entries: dict[Tensor, dict[str, Any]] = {}
        # A rank one step() ahead would pair that step's collectives with these: agree first.
        with self._comm.call("state_dict()", agree=True):
            for param in self._params():
                state = self.shard_state.get(param)
                if not state:
                    continue
                shards = [state[name] for name in STATE_NAMES]
                full = sparse_exchange.gather_row_shards(self._comm, shards, self._rows[param])
                entries[param] = {"step": state["step"], **{name: t.clone() for name, t in zip(STATE_NAMES, full)}}
        return state_format.pack(self.param_groups, entries)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict in torch.optim.SparseAdam's format, from any world size or from plain torch.optim.

        Collective (every rank must load the same dict: one check); each rank then keeps its own
        rows of the state. Everything is checked before anything changes: a dict for another model
        raises ValueError naming the first mismatch and leaves this optimizer as it was.
        """
        with self._comm.call("load_state_dict()", agree=True):
            new_groups, states, _ = self._unpacked(state_dict)
        for g, group in enumerate(new_groups):
            for i, param in enumerate(group["params"]):
                if param in states:
                    # Shapes only: "meta" tensors allocate nothing.
                    template = {"step": torch.empty((), device="meta")}
                    template |= {name: torch.empty(param.shape, device="meta") for name in STATE_NAMES}
                    torch_state.check_entry(states[param], template, "SparseAdam", groups.describe(group, g, i))
        mine = {}
        for param, entry in states.items():
            rows = self.rows_of(param)
            mine[param] = {"step": int(entry["step"])} | {
                name: torch.as_tensor(entry[name])[rows.start : rows.stop].to(
                    dtype=param.dtype, device=param.device, copy=True
                )
                for name in STATE_NAMES
            }
        self.restore_state(new_groups, mine)

    def restore_state(self, new_groups: list[dict[str, Any]], mine: dict[Tensor, dict[str, Any]]) -> None:
        """Local: install checked param groups and the state of this rank's rows."""
        self.param_groups[:] = new_groups
        self.shard_state.clear()
        self.shard_state.update(mine)

    # ------------------------------------------------------------------ what checkpoints read

    def rows_of(self, param: Tensor) -> range:
        """The rows of ``param`` this rank keeps the state of (and updates)."""
        return self._rows[param][self._comm.rank]

    # ------------------------------------------------------------------ introspection

    def _memory_bytes(self) -> dict[str, int]:
        """This rank's bytes: the full parameters every rank holds, its sparse gradients (indices
        and values), and the optimizer state of its rows (about 1/N of torch.optim's)."""
        params = self._params()
        grads = [p.grad for p in params if p.grad is not None and p.grad.is_sparse]
        return {
            "param_bytes": dense_bytes(params),
            "grad_bytes": dense_bytes([part for g in grads for part in (g._indices(), g._values())]),
            "state_bytes": dense_bytes(
                [t for entry in self.shard_state.values() for t in entry.values() if isinstance(t, Tensor)]
            ),
        }
