"""Sharded weight averaging: ``torch.optim.swa_utils.AveragedModel`` (EMA or SWA) with 1/N of its memory.

Each rank keeps the running average of only its own shard of every flat buffer, in the dtype
the update writes (fp32 master weights where the model is low precision), and updates it after
the optimizer step with no communication.
Exporting gathers the shards; ``swapped()`` writes the average into the model's parameters
for evaluation and puts the training weights back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .elements.buffer import ShardedBuffer
from .elements.memory_order import flattened
from .elements.optimizer import ElementOptimizer
from .shared.groups import describe


class ShardedAveragedModel:
    """An EMA or SWA average of the parameters an :class:`ElementOptimizer` trains, kept as shards.

    The same average as ``torch.optim.swa_utils.AveragedModel(model)`` (SWA, ``decay=None``) or
    ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))`` (EMA) updated at the same
    steps: the first update copies the weights, each later one moves the average towards them
    (by ``1 - decay``, or by ``1 / (n_averaged + 1)`` for SWA's equal average). Parameters only,
    as AveragedModel's default ``use_buffers=False``: module buffers (BatchNorm statistics) are
    not averaged; recompute them with ``torch.optim.swa_utils.update_bn`` inside :meth:`swapped`.

    It is not a Module: evaluate the average through :meth:`swapped`, or export it with
    :meth:`model_state_dict`. Each rank holds the average of its shard only, in the dtype of the
    weights the update writes (fp32 with master weights): 1/N of AveragedModel's memory.

    Args:
        model: the module whose parameters ``optimizer`` trains (for the parameters' names).
        optimizer: the :class:`ElementOptimizer` training them (an element-wise algorithm).
        decay: EMA decay in [0, 1]; None (default) averages equally, as SWA.
        start_after: optimizer steps to let pass before the first average.
        every: average after every ``every``-th step from then on (step ``start_after + every``
            first); None: never on its own, only when :meth:`update_parameters` is called.

    With ``every`` set, a step post-hook on ``optimizer`` updates the average: step ``t``
    (counting from 1) is averaged when ``t > start_after`` and ``(t - start_after) % every == 0``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: ElementOptimizer,
        *,
        decay: float | None = None,
        start_after: int = 0,
        every: int | None = 1,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be the torch.nn.Module the optimizer trains, got {type(model).__name__}")
        if not isinstance(optimizer, ElementOptimizer):
            raise TypeError(
                f"optimizer must be a shardopt.ElementOptimizer (an element-wise algorithm: Adam, SGD, ...), got "
                f"{type(optimizer).__name__}; for another optimizer use torch.optim.swa_utils.AveragedModel"
            )
        if decay is not None:
            if isinstance(decay, bool) or not isinstance(decay, (int, float)):
                raise TypeError(f"decay must be a number in [0, 1] (EMA) or None (SWA), got {decay!r}")
            if not 0.0 <= decay <= 1.0:
                # torch's own message (get_ema_multi_avg_fn), so that existing handling still matches.
                raise ValueError(
                    f"Invalid decay value {decay} provided. Please provide a value in [0,1] range "
                    "(or decay=None for SWA's equal average)"
                )
        if isinstance(start_after, bool) or not isinstance(start_after, int) or start_after < 0:
            raise ValueError(
                f"start_after must be an int >= 0 (optimizer steps before the first average), got {start_after!r}"
            )
        if every is None:
            if start_after:
                raise ValueError(
                    f"start_after={start_after} needs every= (averaging on step); with every=None the average "
                    "changes only when you call update_parameters()"
                )
        elif isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(
                f"every must be an int >= 1 (average after every every-th step) or None (only on "
                f"update_parameters()), got {every!r}"
            )
        self._model = model
        self._optimizer = optimizer
        self._decay = decay
        self._start_after = start_after
        self._every = every
        self._names = {param: name for name, param in model.named_parameters()}
        self._buffers: list[ShardedBuffer] = []
        self._averages: list[Tensor] = []  # per buffer: this rank's shard of the average
        self._n_averaged = 0
        self._steps = 0  # optimizer steps the post-hook has seen
        self._skipped_before = 0  # optimizer.skipped_steps when the step under way began
        self._swapped = False
        self._adopt_new_buffers()
        optimizer.register_step_pre_hook(self._before_step)
        if every is not None:
            optimizer.register_step_post_hook(self._after_step)

    @property
    def n_averaged(self) -> int:
        """How many times the weights were averaged in (AveragedModel's ``n_averaged``)."""
        return self._n_averaged

    def memory_bytes(self) -> int:
        """This rank's bytes of averaged weights: its shard of every buffer."""
        return sum(average.numel() * average.element_size() for average in self._averages)

    # ------------------------------------------------------------------ averaging

    @torch.no_grad()
    def update_parameters(self) -> None:
        """Average the current weights in, as ``AveragedModel.update_parameters(model)``. Local: no communication."""
        if self._swapped:
            raise RuntimeError(
                "update_parameters() inside swapped() would average the average; call it after the block"
            )
        self._adopt_new_buffers()
        self._optimizer.finish_param_gather()  # the parameters hold the step's update
        if self._n_averaged == 0:
            self._averages = [_weights(buffer) for buffer in self._buffers]
        else:
            weight = 1 - self._decay if self._decay is not None else 1 / (self._n_averaged + 1)
            for average, buffer in zip(self._averages, self._buffers):
                average.lerp_(_weights(buffer), weight)
        self._n_averaged += 1

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._swapped:
            raise RuntimeError(
                "optimizer.step() inside swapped() would train the averaged weights; step after the with block"
            )
        self._adopt_new_buffers()
        self._skipped_before = self._optimizer.skipped_steps

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._optimizer.skipped_steps != self._skipped_before:
            return  # a skipped step (non-finite gradient) changed no weight: neither counted nor averaged
        self._steps += 1
        since = self._steps - self._start_after
        if since > 0 and since % self._every == 0:
            self.update_parameters()

    def _adopt_new_buffers(self) -> None:
        """Take on buffers ``add_param_group`` created since (their parameters were frozen until then).

        Called before every step and export: a parameter that did not train so far kept one value, and an
        average of one value is that value, so its average starts from the weights as they are
        now, exactly as AveragedModel's would stand.
        """
        new = self._optimizer.buffers[len(self._buffers) :]
        for buffer in new:
            group = self._optimizer.param_groups[buffer.group_index]
            for slot, param in zip(buffer.layout.slots, buffer.params):
                if param not in self._names:
                    where = describe(group, buffer.group_index, slot.index)
                    raise ValueError(
                        f"optimizer {where} is not a parameter of `model`; pass the model whose parameters "
                        "the optimizer trains"
                    )
        self._buffers += new
        if self._n_averaged:
            self._averages += [_weights(buffer) for buffer in new]

    # ------------------------------------------------------------------ export

    def _require_average(self, what: str) -> None:
        if self._n_averaged == 0:
            raise RuntimeError(
                f"{what} needs an average, but none was taken yet: step the optimizer "
                f"(start_after={self._start_after}, every={self._every}) or call update_parameters() first"
            )

    def _gather(self) -> Iterator[tuple[ShardedBuffer, Tensor]]:
        """Collective: each buffer with its full average (in the master dtype), one buffer at a time."""
        comm = self._optimizer.comm
        for buffer, average in zip(self._buffers, self._averages):
            full = torch.empty(buffer.layout.numel, dtype=average.dtype, device=average.device)
            comm.all_gather(full, average, "the all-gather of averaged weights").wait()
            yield buffer, full

    def model_state_dict(self) -> dict[str, Tensor]:
        """Collective: ``model.state_dict()`` with the averaged parameters, in the parameters' own dtype.

        Buffers (BatchNorm statistics) and parameters the optimizer does not train (frozen ones)
        are the model's current values, as they are never averaged. Every rank gets the whole dict.
        """
        self._require_average("model_state_dict()")
        self._adopt_new_buffers()
        averaged: dict[Tensor, Tensor] = {}
        for buffer, full in self._gather():
            for view, param in zip(buffer.views(full), buffer.params):
                averaged[param] = view.to(param.dtype, copy=True)
        state = self._model.state_dict(keep_vars=True)
        return {key: averaged[value] if value in averaged else value.detach() for key, value in state.items()}

    def state_dict(self) -> dict[str, Any]:
        """Collective: what resuming needs, on every rank, loadable at any world size.

        ``{"n_averaged": int, "steps": int, "averaged": {parameter name: full average}}``: ``steps``
        counts the optimizer steps seen (for ``start_after`` and ``every``), the averages are in the
        master dtype (fp32 where the model is low precision).
        """
        self._adopt_new_buffers()
        averaged = {}
        if self._n_averaged:
            for buffer, full in self._gather():
                for view, param in zip(buffer.views(full), buffer.params):
                    averaged[self._names[param]] = view.clone()
        in_model_order = {name: averaged[name] for name in self._names.values() if name in averaged}
        return {"n_averaged": self._n_averaged, "steps": self._steps, "averaged": in_model_order}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load what :meth:`state_dict` returned, at this or any other world size. Local: every rank
        cuts its own shard out of the full tensors. A dict for another model raises ValueError
        naming the first mismatch and changes nothing."""
        self._adopt_new_buffers()
        if not isinstance(state_dict, Mapping) or not {"n_averaged", "steps", "averaged"} <= state_dict.keys():
            raise ValueError(
                "load_state_dict expects what ShardedAveragedModel.state_dict() returns, a dict with "
                f"'n_averaged', 'steps' and 'averaged'; got {type(state_dict).__name__}"
                + (f" with keys {sorted(state_dict)}" if isinstance(state_dict, Mapping) else "")
            )
        n_averaged, steps, saved = state_dict["n_averaged"], state_dict["steps"], state_dict["averaged"]
        for key, value in (("n_averaged", n_averaged), ("steps", steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"loaded {key!r} must be an int >= 0, got {value!r}")
        trained = {param for buffer in self._buffers for param in buffer.params}
        expected = {name: param for param, name in self._names.items() if param in trained}  # in the model's order
        if not isinstance(saved, Mapping):
            raise ValueError(f"loaded 'averaged' must map parameter names to tensors, got {type(saved).__name__}")
        if n_averaged == 0 and saved:
            raise ValueError("loaded state has n_averaged=0 but holds averages; it is corrupt")
        if n_averaged:
            missing = [name for name in expected if name not in saved]
            unexpected = [name for name in saved if name not in expected]
            if missing or unexpected:
                raise ValueError(
                    "loaded averages belong to a different model or optimizer: "
                    + (f"no average of parameter {missing[0]!r}" if missing else "")
                    + ("; " if missing and unexpected else "")
                    + (f"{unexpected[0]!r} is not a parameter this optimizer trains" if unexpected else "")
                )
            for name, param in expected.items():
                tensor = saved[name]
                if not isinstance(tensor, Tensor) or tensor.shape != param.shape:
                    shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
                    raise ValueError(
                        f"loaded average of {name!r} has shape {shape} but the parameter has shape "
                        f"{tuple(param.shape)}: it belongs to a different model"
                    )
        averages = []
        if n_averaged:
            for buffer in self._buffers:
                average = buffer.new_shard()
                for piece in buffer.pieces:
                    full = flattened(saved[self._names[buffer.params[piece.slot]]], buffer.orders[piece.slot])
                    average[piece.in_shard.slice].copy_(full[piece.in_param.slice])
                averages.append(average)
        self._averages, self._n_averaged, self._steps = averages, n_averaged, steps

    # ------------------------------------------------------------------ evaluation

    @contextlib.contextmanager
    def swapped(self) -> Iterator[nn.Module]:
        """Collective: the model holds the averaged weights inside the block; yields the model.

        On entry it waits for parameter gathers still in flight, keeps this rank's shard of the
        training weights and a copy of the model's buffers, writes the average into the
        parameters (cast to their dtype) and all-gathers them; on exit, also on an exception,
        it puts the training weights and the buffers back exactly (so ``update_bn`` inside the
        block leaves training's BatchNorm statistics alone). ``optimizer.step()`` inside raises.
        """
        self._require_average("swapped()")
        if self._swapped:
            raise RuntimeError("swapped() is already active; blocks of it do not nest")
        self._optimizer.finish_param_gather()
        self._adopt_new_buffers()
        training = [buffer.read_shard(buffer.new_shard(buffer.dtype)) for buffer in self._buffers]
        buffers = [(tensor, tensor.detach().clone()) for tensor in self._model.buffers()]
        self._swapped = True
        try:
            self._optimizer.publish(self._averages, "swapped weights")
            yield self._model
        finally:
            try:
                self._optimizer.publish(training, "swapped weights")
            finally:
                with torch.no_grad():
                    for tensor, saved in buffers:
                        tensor.copy_(saved)
                self._swapped = False


def _weights(buffer: ShardedBuffer) -> Tensor:
    """A copy of this rank's shard of the weights the update writes: the fp32 master weights where
    the parameters are of low precision, else the parameters themselves."""
    if buffer.master is not None:
        return buffer.master.clone()
    return buffer.read_shard(buffer.new_shard())
