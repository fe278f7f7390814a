"""shardopt under the Lightning ``Trainer``, reducing the gradients itself instead of DDP.

With ``strategy="ddp"`` a shardopt optimizer needs nothing more than the optimizer line, but DDP
holds every gradient in full, so ``stage=2`` saves no memory there. :class:`ShardoptStrategy` is
Lightning's DDP strategy without the DDP wrapper: the optimizer reduces the gradients in backward
(stage 2: reduce-scattered, only this rank's shard kept), and what DDP did besides is done here::

    from shardopt.integrations.lightning import ShardoptStrategy

    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=ShardoptStrategy(), gradient_clip_val=1.0)
    # in the LightningModule:
    def configure_optimizers(self):
        return shardopt.AdamW(self.parameters(), lr=1e-3, stage=2)

- ``gradient_clip_val`` (by norm) runs the optimizer's own ``clip_grad_norm_``, on the mean gradient;
- ``accumulate_grad_batches`` keeps the micro-batches but the last inside ``optimizer.no_sync()``,
  as DDP's ``no_sync()`` keeps them (optimizers without it reduce every micro-batch: the same sum);
- the modules start alike on every rank, and buffers (BatchNorm statistics) are broadcast from
  rank 0 before each training step, as DDP's ``broadcast_buffers`` does.

Every optimizer must be a shardopt one that reduces (``grad_reduction`` not None): a torch.optim
optimizer under this strategy would train each rank on its own gradients, so setup raises.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch.distributed as dist
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy

from . import sharded

# Buffers are broadcast in messages of at most this many bytes (DDP's own default).
BROADCAST_BUCKET_BYTES = 250 * 1024 * 1024


class ShardoptStrategy(DDPStrategy):
    """Lightning's ``DDPStrategy`` with shardopt reducing the gradients instead of DDP (see the module)."""

    strategy_name = "shardopt"

    def configure_ddp(self) -> None:
        # No DDP wrapper; the modules start alike on every rank, as DDP's construction makes them.
        _sync_module_states(self.model)

    def setup_optimizers(self, trainer: Any) -> None:
        super().setup_optimizers(trainer)
        for index, optimizer in enumerate(self.optimizers):
            inner = sharded(optimizer)
            if inner is None or getattr(inner, "_grad_reduction", "mean") is None:
                raise ValueError(
                    f"ShardoptStrategy: optimizer {index} ({type(optimizer).__name__}) does not reduce the "
                    "gradients, and this strategy has no DDP to do it: each rank would train on its own "
                    "gradients; return a shardopt optimizer with grad_reduction 'mean' or 'sum' from "
                    "configure_optimizers, or use strategy='ddp'"
                )

    def setup_precision_plugin(self) -> None:
        super().setup_precision_plugin()
        plugin = self.precision_plugin
        plugin.clip_grad_by_norm = functools.partial(_clip_by_norm, plugin.clip_grad_by_norm)  # type: ignore[method-assign]

    @contextlib.contextmanager
    def block_backward_sync(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for optimizer in self.optimizers:
                inner = sharded(optimizer)
                if hasattr(inner, "no_sync"):
                    stack.enter_context(inner.no_sync())
            yield

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        buffers = [buffer for buffer in self.lightning_module.buffers() if buffer.numel()]
        if buffers and dist.get_world_size() > 1:
            dist._broadcast_coalesced(dist.group.WORLD, buffers, BROADCAST_BUCKET_BYTES, 0)
        return super().training_step(*args, **kwargs)


def _clip_by_norm(lightning_clip: Callable[[Any, float], None], optimizer: Any, clip_val: float) -> None:
    """Lightning's clipping by norm: the shardopt optimizer's own (the mean gradient's norm)."""
    inner = sharded(optimizer)
    if inner is None:
        lightning_clip(optimizer, clip_val)
    else:
        inner.clip_grad_norm_(clip_val)
