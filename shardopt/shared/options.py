"""shardopt's own keywords, besides the algorithm's: one frozen, validated record per optimizer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

import torch

GRAD_REDUCTIONS = ("mean", "sum", None)
REDUCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class Options:
    """shardopt's keywords; the element-wise algorithms take them all, the other schemes
    ``grad_reduction`` and ``timeout``. A bad value raises here, naming the keyword.

    Attributes:
        stage: 1 (default) shards the optimizer state, and reduces the gradients as DDP does: each
            ``p.grad`` holds the mean gradient when backward returns. 2 shards the gradients as well
            (each gradient is taken into its buffer's reduction as backward produces it; ``p.grad``
            then holds a storage-less stand-in, ``elements/taken_grad.py``).
        grad_reduction: ``"mean"`` or ``"sum"`` of the ranks' gradients, or None when someone else
            always reduces them (a model wrapped in DDP is found by itself and needs nothing).
        timeout: seconds (or a timedelta) any collective of ours may wait before raising.
        bucket_cap_mb: the largest flat buffer, in MiB; each buffer is one reduction (DDP's bucket,
            hence DDP's keyword).
        overlap_param_gather: leave the all-gathers of updated parameters in flight after ``step()``;
            each module's forward pre-hook waits for its own parameters (see
            :meth:`ElementOptimizer.finish_param_gather`).
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
    """

    stage: int = 1
    grad_reduction: str | None = "mean"
    timeout: float | timedelta = 300
    bucket_cap_mb: float = 25
    overlap_param_gather: bool = False
    master_weights: bool | None = None
    reduce_dtype: torch.dtype | None = None
    skip_nonfinite: bool = False
    verify_every: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stage, bool) or self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 (shard optimizer state) or 2 (shard gradients too), got {self.stage!r}")
        if self.grad_reduction not in GRAD_REDUCTIONS:
            raise ValueError(
                f"grad_reduction must be 'mean', 'sum' or None (gradients already reduced), got {self.grad_reduction!r}"
            )
        cap = self.bucket_cap_mb
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 < cap < math.inf:
            raise ValueError(f"bucket_cap_mb must be a finite positive number of MiB, got {cap!r}")
        if not isinstance(self.overlap_param_gather, bool):
            raise TypeError(f"overlap_param_gather must be True or False, got {self.overlap_param_gather!r}")
        if self.master_weights not in (None, True, False):
            raise TypeError(f"master_weights must be None (default: True), True or False, got {self.master_weights!r}")
        every = self.verify_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"verify_every must be None or a number of steps >= 1, got {every!r}")
        if not isinstance(self.skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite must be True or False, got {self.skip_nonfinite!r}")
        if self.reduce_dtype is not None and self.reduce_dtype not in REDUCE_DTYPES:
            raise TypeError(
                f"reduce_dtype must be None (the parameters' dtype) or one of "
                f"{', '.join(map(str, REDUCE_DTYPES))}, got {self.reduce_dtype!r}"
            )

    @property
    def bucket_cap_bytes(self) -> int:
        return int(self.bucket_cap_mb * 2**20)

    @property
    def keeps_master_weights(self) -> bool:
        """Whether low-precision parameters get fp32 master weights (None means yes)."""
        return self.master_weights is not False
