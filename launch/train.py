"""The main job: train a small model with a ShardedOptimizer on every rank of a torchrun world.

    torchrun --standalone --nproc-per-node 2 launch/train.py [--optimizer adamw] [--steps 200]

gloo on CPU, NCCL when CUDA is present (one GPU per rank). Prints the loss as it goes
and, at the end, the optimizer bytes each rank holds against an unsharded optimizer.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import shardopt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="adamw", help="any sharded torch.optim algorithm, by name")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--stage", type=int, choices=(1, 2), default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=256, help="hidden width of the model")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def init_distributed() -> torch.device:
    """Join the torchrun world (or run as a world of one) and pick this rank's device."""
    if "RANK" not in os.environ:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return torch.device("cuda", local_rank)
    if os.environ.get("MASTER_ADDR", "127.0.0.1") in ("127.0.0.1", "localhost"):
        # A single-node CPU run: keep gloo's own connections on loopback too.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo")
    return torch.device("cpu")


def make_model(width: int, device: torch.device) -> nn.Module:
    return nn.Sequential(nn.Linear(32, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1)).to(
        device
    )


def make_batch(step: int, rank: int, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed regression task; each rank draws its own samples."""
    generator = torch.Generator().manual_seed(step * 1_000_003 + rank)
    x = torch.randn(batch_size, 32, generator=generator)
    y = torch.sin(x[:, :8].sum(dim=1, keepdim=True)) + 0.1 * x[:, 8:9]
    return x.to(device), y.to(device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = init_distributed()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    torch.manual_seed(args.seed)
    model = make_model(args.width, device)
    try:
        optimizer = shardopt.ShardedOptimizer(model.parameters(), args.optimizer, lr=args.lr, stage=args.stage)
    except (TypeError, ValueError, NotImplementedError) as error:
        print(f"rank {rank}: {error}", file=sys.stderr)
        return 2

    for step in range(args.steps):
        x, y = make_batch(step, rank, args.batch_size, device)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            mean_loss = loss.detach().clone()
            if world > 1:
                dist.all_reduce(mean_loss)
                mean_loss /= world
            if rank == 0:
                print(f"step {step:5d}  loss {mean_loss.item():.5f}", flush=True)

    stats = optimizer.memory_stats()
    gathered = [stats] * world
    if world > 1:
        dist.all_gather_object(gathered, stats)
    # What one unsharded torch.optim holds: the consolidated state, in torch's own format.
    full_state = optimizer.state_dict()["state"]
    unsharded = sum(t.numel() * t.element_size() for entry in full_state.values() for t in entry.values())
    if rank == 0:
        numel = sum(p.numel() for p in model.parameters())
        print(f"{numel:,} parameters, {world} ranks, {args.optimizer} stage {args.stage}")
        for r, s in enumerate(gathered):
            print(f"rank {r}: optimizer state {s['state_bytes']:,} B, gradients {s['grad_bytes']:,} B")
        print(f"unsharded torch.optim: optimizer state {unsharded:,} B on every rank")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
