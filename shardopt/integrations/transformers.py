"""shardopt under Hugging Face ``transformers.Trainer``.

Trainer saves the optimizer with ``torch.save(optimizer.state_dict(), ...)`` on the main process
alone. A shardopt optimizer's ``state_dict()`` is collective (every rank holds a part of the state),
so under plain Trainer that save cannot complete: the main process raises a ``DesyncError`` naming
it as soon as another rank goes on training. :class:`ShardedTrainer` is Trainer with that one step
changed: every rank writes its part of the optimizer (with the model and the scheduler) as a
shardopt sharded checkpoint, in a folder of Trainer's checkpoint, and ``resume_from_checkpoint``
loads it back, at any world size::

    from shardopt.integrations.transformers import ShardedTrainer

    optimizer = shardopt.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    trainer = ShardedTrainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
    trainer.train()                                 # periodic saves as args say
    trainer.train(resume_from_checkpoint=True)      # or a checkpoint-N folder

Everything else (the model's own files, the trainer state, clipping by ``max_grad_norm``,
gradient accumulation, logging) is Trainer's own. A torch.optim optimizer is saved as Trainer does.
"""

from __future__ import annotations

import os

from transformers import Trainer

from .. import checkpoint
from . import sharded

#: The folder of a Trainer checkpoint that holds the shardopt checkpoint.
FOLDER = "shardopt"


class ShardedTrainer(Trainer):
    """``transformers.Trainer`` that checkpoints a shardopt optimizer from every rank (see the module)."""

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        optimizer = sharded(self.optimizer)
        if optimizer is None:
            super()._save_optimizer_and_scheduler(output_dir)
            return
        model = self.accelerator.unwrap_model(self.model)
        checkpoint.save(os.path.join(output_dir, FOLDER), model=model, optimizer=optimizer, scheduler=self.lr_scheduler)

    def _load_optimizer_and_scheduler(self, checkpoint_dir: str | None) -> None:
        optimizer = sharded(self.optimizer)
        if checkpoint_dir is None or optimizer is None or not os.path.isdir(os.path.join(checkpoint_dir, FOLDER)):
            super()._load_optimizer_and_scheduler(checkpoint_dir)  # e.g. a torch.optim checkpoint: loads on every rank
            return
        model = self.accelerator.unwrap_model(self.model)
        checkpoint.load(
            os.path.join(checkpoint_dir, FOLDER), model=model, optimizer=optimizer, scheduler=self.lr_scheduler
        )
