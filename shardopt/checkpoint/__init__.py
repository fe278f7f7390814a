"""Checkpoints of a sharded run, on ``torch.distributed.checkpoint`` (DCP).

    shardopt.checkpoint.save(path, model=model, optimizer=opt, scheduler=sched, extra={"epoch": 3})
    extra = shardopt.checkpoint.load(path, model=model, optimizer=opt, scheduler=sched)

Every rank writes, and reads, only its own shard of the optimizer state (whatever the
algorithm: element ranges, whole tensors on owners, rows, LBFGS's slices); a checkpoint saved
at one world size loads at any other. ``optimizer=`` may be a list (Muon + AdamW), and
``scheduler=`` then one per optimizer. ``path`` is a directory in DCP's format (DCP's own
tools read it) plus a JSON manifest; it is replaced only once a new save is complete.
Loading never unpickles anything but DCP's metadata, through an allow-list.

    python -m shardopt.checkpoint export DIR out.pt     # one torch.save file torch.optim loads
    shardopt.checkpoint.load_torch("out.pt", model=model, optimizer=opt)   # and back
"""

from .errors import CheckpointError
from .sharded import load, save
from .storage import is_complete
from .torch_format import consolidate, export, load_torch

__all__ = ["CheckpointError", "consolidate", "export", "is_complete", "load", "load_torch", "save"]
