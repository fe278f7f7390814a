"""The main job on a Ray cluster: launch/train.py's training on each worker of a ray.train.torch.TorchTrainer.

    python launch/ray_job.py --workers 2 [--use-gpu] [--address HOST:PORT] [train.py flags]

With no --address it starts a local cluster. Checkpoints are shardopt's sharded checkpoints, reported
through ray.train.report; a job restarted with the same --name and --storage resumes from the latest.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any

import ray
import train
from ray.train import Checkpoint, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

LAUNCH = str(pathlib.Path(__file__).resolve().parent)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """Ray's own flags, and train.py's (checked here, before any worker starts)."""
    parser = argparse.ArgumentParser(prog="ray_job.py", description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument("--workers", type=int, default=2, help="training processes (ranks)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--address", help="an existing cluster (default: start a local one)")
    parser.add_argument("--name", default="shardopt", help="the run's name: a restarted job resumes its checkpoints")
    parser.add_argument(
        "--storage", type=pathlib.Path, default=pathlib.Path("runs", "ray"), help="where Ray keeps checkpoints"
    )
    ours, rest = parser.parse_known_args(argv)
    flags = train.parse_args(rest)
    # Workers run elsewhere (another directory, another node): every path they write must be absolute.
    flags.out = flags.out.resolve()
    flags.checkpoint_dir = (flags.checkpoint_dir or flags.out / "checkpoint").resolve()
    ours.storage = ours.storage.resolve()
    return ours, flags


def worker(config: dict[str, Any]) -> None:
    """One rank: Ray has set up the process group and this rank's device."""
    sys.path.insert(0, config["launch"])  # where train.py and its modules are, on this worker's node
    import ray.train.torch as ray_torch
    import torch.distributed as dist
    import train as job_module

    args = config["args"]
    world = job_module.World(dist.get_rank(), dist.get_world_size(), ray_torch.get_device())
    restored = ray.train.get_checkpoint()
    if restored is None:
        job = job_module.start(args, world, None)
    else:
        with restored.as_directory() as directory:
            job = job_module.start(args, world, pathlib.Path(directory))

    def checkpoint(step: int) -> None:
        if job_module.checkpoint_due(step, args):
            job_module.save(job, args)
            # Every rank reports (Ray waits for all); rank 0 hands over the directory the ranks wrote together.
            saved = Checkpoint.from_directory(str(args.checkpoint_dir)) if world.rank == 0 else None
            ray.train.report({"step": step + 1, "loss": job.history.loss[-1]}, checkpoint=saved)
        job_module.crash_if_asked(step, world)

    record = job_module.run(job, args, world, checkpoint)
    if world.rank == 0:
        job_module.write_report(args.out, record)


def main(argv: list[str] | None = None) -> None:
    ours, args = parse_args(argv)
    ray.init(address=ours.address)
    trainer = TorchTrainer(
        worker,
        train_loop_config={"args": args, "launch": LAUNCH},
        scaling_config=ScalingConfig(num_workers=ours.workers, use_gpu=ours.use_gpu),
        run_config=RunConfig(name=ours.name, storage_path=str(ours.storage)),
    )
    result = trainer.fit()
    print(f"latest checkpoint: {result.checkpoint.path if result.checkpoint else None}")


if __name__ == "__main__":
    main()
