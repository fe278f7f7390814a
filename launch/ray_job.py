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
import text
import train
from ray.train import Checkpoint, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchTrainer

from shardopt.checkpoint import CheckpointError

LAUNCH = str(pathlib.Path(__file__).resolve().parent)

# What train.py tells the user in one line: bad flags, data or checkpoint.
USER_ERRORS = (train.UsageError, text.DataError, CheckpointError)


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


def root_error(error: BaseException) -> BaseException:
    """The error behind what trainer.fit() raised: Ray wraps a worker's exception (by rank, in
    WorkerGroupError.worker_failures), a controller's (ControllerError.controller_failure), or
    chains it (__cause__). Down to the first of USER_ERRORS, else to the innermost."""
    while not isinstance(error, USER_ERRORS):
        failures = getattr(error, "worker_failures", None)
        inner = failures[min(failures)] if failures else getattr(error, "controller_failure", None) or error.__cause__
        if inner is None:
            return error
        error = inner
    return error


def failure_line(error: TrainingFailedError) -> tuple[str, int]:
    """One line for the user and the exit status: 2 for train.py's own errors (its status), 1 otherwise
    (a worker that died, a bug: its traceback is in the worker's log above)."""
    root = root_error(error)
    if isinstance(root, USER_ERRORS):
        return f"ray_job.py: error: {root}", 2
    first = next(iter(str(root).strip().splitlines()), "")
    return f"ray_job.py: error: training failed: {type(root).__name__}: {first}", 1


def main(argv: list[str] | None = None) -> None:
    ours, args = parse_args(argv)
    ray.init(address=ours.address)
    trainer = TorchTrainer(
        worker,
        train_loop_config={"args": args, "launch": LAUNCH},
        scaling_config=ScalingConfig(num_workers=ours.workers, use_gpu=ours.use_gpu),
        run_config=RunConfig(name=ours.name, storage_path=str(ours.storage)),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as error:
        line, status = failure_line(error)
        sys.stderr.write(line + "\n")
        sys.exit(status)
    print(f"latest checkpoint: {result.checkpoint.path if result.checkpoint else None}")


if __name__ == "__main__":
    main()
