"""One rank of one contender of ``benchmarks.train_step``; torchrun starts it, one world per contender.

    python -m torch.distributed.run ... -m benchmarks.train_step_rank --contender ddp --outdir DIR ...

Trains the benchmark model for warmup + timed steps and writes this rank's measurements to
``DIR/<contender>.rank<r>.json`` (rank 0 also writes the final parameters to
``DIR/<contender>.params.pt`` for the parity check).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks import wire

LR = 1e-3
WEIGHT_DECAY = 0.01
# DDP's default bucket; DeepSpeed's buckets are set to it and shardopt's default is the same.
BUCKET_MB = 25
SEED = 0


# ---------------------------------------------------------------- model and data


class Block(nn.Module):
    """A pre-norm transformer block's MLP half: x + W2 gelu(W1 LN(x)), 4x expansion."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Model(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def model_width(params: float, depth: int) -> int:
    """The width (a multiple of 8) whose model has about ``params`` parameters.

    A block holds 8 w^2 + 7 w parameters and the head w^2 + 3 w, so the total is close to (8 depth + 1) w^2.
    """
    return max(8, round(math.sqrt(params / (8 * depth + 1)) / 8) * 8)


def build_model(width: int, depth: int, device: torch.device) -> Model:
    """The same initial model on every rank and for every contender."""
    torch.manual_seed(SEED)
    return Model(width, depth).to(device)


def count_params(width: int, depth: int) -> int:
    return depth * (8 * width * width + 7 * width) + width * width + 3 * width


def make_batch(step: int, rank: int, batch: int, seq: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Each rank its own samples, the same for every contender (regression to random targets)."""
    generator = torch.Generator().manual_seed(1_000_003 * step + rank)
    x = torch.randn(batch, seq, width, generator=generator)
    y = torch.randn(batch, seq, width, generator=generator)
    return x.to(device), y.to(device)


# ---------------------------------------------------------------- measuring


class PeakMemory:
    """Peak memory of this process above its level when created.

    CPU: the kernel's resident-set high-water mark (VmHWM), reset to the current RSS first
    through /proc/self/clear_refs so that imports and start-up do not count; where that
    reset is refused, getrusage's high-water mark, which may then include start-up.
    CUDA: torch.cuda.max_memory_allocated after resetting the peak.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.how = "torch.cuda.max_memory_allocated"
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.how = "VmHWM (reset at baseline)"
        except OSError:
            self.how = "ru_maxrss (not reset)"
        self.base = _status_bytes("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        if self.how.startswith("VmHWM"):
            return _status_bytes("VmHWM") - self.base
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def tensor_bytes(tensors: Any) -> int:
    """Bytes of the local parts of every tensor in a (nested) optimizer state."""
    if isinstance(tensors, Tensor):
        local = tensors.to_local() if hasattr(tensors, "to_local") else tensors
        return local.numel() * local.element_size()
    if isinstance(tensors, dict):
        return sum(tensor_bytes(value) for value in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return sum(tensor_bytes(value) for value in tensors)
    return 0


def flat_params(model: nn.Module) -> Tensor:
    """Every parameter in the model's own order, as one fp32 CPU vector (collective for DTensors)."""
    pieces = []
    for param in model.parameters():
        data = param.detach()
        if hasattr(data, "full_tensor"):
            data = data.full_tensor()
        pieces.append(data.reshape(-1).float().cpu())
    return torch.cat(pieces)


def ring_all_reduce_bytes(model: nn.Module, world: int) -> float:
    """What one all-reduce of every gradient sends per rank on a ring: 2(N-1)/N x the gradients' bytes."""
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return 2 * (world - 1) / world * grad_bytes


# ---------------------------------------------------------------- contenders


@dataclass
class Context:
    device: torch.device
    backend: str
    rank: int
    world: int


@dataclass
class Trainer:
    """A contender set up on one rank."""

    step: Callable[[Tensor, Tensor], Tensor]  # forward + backward + optimizer step; returns the loss
    state_bytes: Callable[[], int]  # this rank's optimizer state
    analytic_wire_bytes: float = 0.0  # per step, for collectives issued from C++ (not counted)
    finish: Callable[[], None] = lambda: None  # makes the parameters whole before they are read


def plain_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[Tensor, Tensor], Tensor]:
    def step(x: Tensor, y: Tensor) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def ddp_wrap(model: nn.Module, ctx: Context) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=BUCKET_MB)


def setup_ddp(model: nn.Module, ctx: Context) -> Trainer:
    ddp = ddp_wrap(model, ctx)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    # DDP's reducer all-reduces every gradient once per step from C++: invisible to the counter.
    return Trainer(
        plain_step(ddp, optimizer), lambda: tensor_bytes(optimizer.state), ring_all_reduce_bytes(model, ctx.world)
    )


def setup_zero(model: nn.Module, ctx: Context) -> Trainer:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    ddp = ddp_wrap(model, ctx)
    # The same fused kernel as the DDP row, on this rank's partition; the parameters it updates
    # reach the other ranks by dist.broadcast (counted).
    optimizer = ZeroRedundancyOptimizer(
        model.parameters(), optimizer_class=torch.optim.AdamW, lr=LR, weight_decay=WEIGHT_DECAY, fused=True
    )
    return Trainer(
        plain_step(ddp, optimizer), lambda: tensor_bytes(optimizer.optim.state), ring_all_reduce_bytes(model, ctx.world)
    )


def setup_fsdp2(model: nn.Module, ctx: Context) -> Trainer:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world,))
    # One FSDP unit per block (gathered for its forward and backward only) and the root for the head.
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    return Trainer(plain_step(model, optimizer), lambda: tensor_bytes(optimizer.state))


def deepspeed_init(ctx: Context) -> None:
    """DeepSpeed's communication layer on top of our process group (builds its shm op once)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend=ctx.backend)


def setup_deepspeed(model: nn.Module, ctx: Context, stage: int) -> Trainer:
    import deepspeed

    bucket_elements = BUCKET_MB * 2**20 // 4
    config = {
        # Only read by DeepSpeed's own data loader and throughput timer, which are not used here.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": stage,
            # DeepSpeed's default buckets are 5e8 elements (2 GB each in fp32): use DDP's 25 MB instead.
            "reduce_bucket_size": bucket_elements,
            "allgather_bucket_size": bucket_elements,
        },
        # torch.optim.AdamW on DeepSpeed's fp32 partitions: the same math as the other rows.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    client = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=client, config=config)

    def step(x: Tensor, y: Tensor) -> Tensor:
        loss = F.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return Trainer(step, lambda: tensor_bytes(optimizer.optimizer.state))


def setup_local(model: nn.Module, ctx: Context) -> Trainer:
    """No communication at all: each rank trains its own copy. Not a contender but the floor, the
    compute (forward, backward, update) that every data-parallel row pays before its collectives."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    return Trainer(plain_step(model, optimizer), lambda: tensor_bytes(optimizer.state))


def setup_shardopt(model: nn.Module, ctx: Context, stage: int, overlap_param_gather: bool = False) -> Trainer:
    import shardopt

    # No DDP: shardopt reduces the gradients itself (stage 2 already during backward).
    optimizer = shardopt.AdamW(
        model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, stage=stage, overlap_param_gather=overlap_param_gather
    )
    return Trainer(
        plain_step(model, optimizer),
        lambda: optimizer.memory_stats()["state_bytes"],
        finish=optimizer.finish_param_gather,
    )


@dataclass(frozen=True)
class Contender:
    label: str
    setup: Callable[[nn.Module, Context], Trainer]
    # Run before the memory baseline: process-level set-up that is not the training's memory.
    prepare: Callable[[Context], None] | None = None
    # Modules imported before the memory baseline, so that their import does not count.
    modules: tuple[str, ...] = ()
    # How the wire column is obtained, for the report.
    wire_note: str = "counted"


CONTENDERS: dict[str, Contender] = {
    "ddp": Contender("DDP + AdamW(fused)", setup_ddp, modules=("torch.nn.parallel",), wire_note="analytic"),
    "zero": Contender(
        "DDP + ZeroRedundancyOptimizer(AdamW)",
        setup_zero,
        modules=("torch.nn.parallel", "torch.distributed.optim"),
        wire_note="partly analytic",
    ),
    "fsdp2": Contender("FSDP2 fully_shard + AdamW", setup_fsdp2, modules=("torch.distributed.fsdp",)),
    "deepspeed1": Contender(
        "DeepSpeed ZeRO-1",
        lambda model, ctx: setup_deepspeed(model, ctx, 1),
        prepare=deepspeed_init,
        modules=("deepspeed",),
    ),
    "deepspeed2": Contender(
        "DeepSpeed ZeRO-2",
        lambda model, ctx: setup_deepspeed(model, ctx, 2),
        prepare=deepspeed_init,
        modules=("deepspeed",),
    ),
    "shardopt1": Contender("shardopt stage 1", lambda model, ctx: setup_shardopt(model, ctx, 1), modules=("shardopt",)),
    "shardopt2": Contender("shardopt stage 2", lambda model, ctx: setup_shardopt(model, ctx, 2), modules=("shardopt",)),
    "shardopt2-overlap": Contender(
        "shardopt stage 2, overlap_param_gather",
        lambda model, ctx: setup_shardopt(model, ctx, 2, overlap_param_gather=True),
        modules=("shardopt",),
    ),
    "local": Contender("(floor) no communication: local AdamW(fused) per rank", setup_local),
}


# ---------------------------------------------------------------- the run


def init_world() -> Context:
    """Join torchrun's world: NCCL with one GPU per rank when there are enough, gloo on loopback otherwise."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = timedelta(minutes=10)
    # The same rule as the launcher's (it sets DS_ACCELERATOR=cpu otherwise).
    if torch.cuda.is_available() and torch.cuda.device_count() >= world:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
        return Context(device, "nccl", rank, world)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", timeout=timeout)
    return Context(torch.device("cpu"), "gloo", rank, world)


def start_up(ctx: Context) -> None:
    """Run once, on a tiny model, what every contender's step runs: autograd, the model's kernels,
    fused AdamW and a collective. Their first use costs ~100 MB of one-off start-up (code pages,
    allocator arenas, autograd's threads) that belongs to no contender, so it happens before the
    memory baseline."""
    model = build_model(8, 1, ctx.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
    x, y = make_batch(0, ctx.rank, 2, 2, 8, ctx.device)
    F.mse_loss(model(x), y).backward()
    optimizer.step()
    dist.all_reduce(torch.ones(1, device=ctx.device))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> dict[str, Any]:
    contender = CONTENDERS[args.contender]
    # Wrap the collectives before the framework under test is imported: some keep references.
    counter = wire.install()
    torch.set_num_threads(args.threads)
    for module in contender.modules:
        importlib.import_module(module)
    ctx = init_world()
    if contender.prepare is not None:
        contender.prepare(ctx)
    start_up(ctx)
    dist.barrier()

    memory = PeakMemory(ctx.device)
    width = model_width(args.params, args.depth)
    model = build_model(width, args.depth, ctx.device)
    trainer = contender.setup(model, ctx)

    total = args.warmup + args.steps
    batches = [make_batch(step, ctx.rank, args.batch_size, args.seq_len, width, ctx.device) for step in range(total)]
    step_seconds, wire_bytes, losses = [], [], []
    # Steps run back to back, as in training: a barrier between them would wait for the parameter
    # all-gathers that overlap_param_gather leaves in flight and take them out of the timed step.
    # A step is the time from the end of the step before it; the last one includes finish().
    dist.barrier()
    synchronize(ctx.device)
    before = time.perf_counter()
    for step, (x, y) in enumerate(batches):
        counter.reset()
        loss = trainer.step(x, y)
        if step == total - 1:
            trainer.finish()
        synchronize(ctx.device)
        now = time.perf_counter()
        elapsed, before = now - before, now
        losses.append(float(loss))
        if step >= args.warmup:
            step_seconds.append(elapsed)
            wire_bytes.append(counter.wire_bytes)
    peak = memory.peak()
    result = {
        "contender": args.contender,
        "rank": ctx.rank,
        "world": ctx.world,
        "backend": ctx.backend,
        "device": str(ctx.device),
        "params": sum(p.numel() for p in model.parameters()),
        "step_seconds": step_seconds,
        "counted_wire_bytes": statistics.median(wire_bytes),
        "analytic_wire_bytes": trainer.analytic_wire_bytes,
        "calls": dict(counter.calls),  # of the last timed step
        "payload_bytes": dict(counter.payload_bytes),
        "peak_bytes": peak,
        "memory_how": memory.how,
        "state_bytes": trainer.state_bytes(),
        "losses": losses,
    }
    params = flat_params(model)
    if ctx.rank == 0:
        torch.save(params, Path(args.outdir) / f"{args.contender}.params.pt")
    dist.barrier()
    dist.destroy_process_group()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contender", required=True, choices=sorted(CONTENDERS))
    parser.add_argument("--outdir", required=True)
    parser.add_argument("--params", type=float, required=True)
    parser.add_argument("--depth", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    result = run(args)
    path = Path(args.outdir) / f"{args.contender}.rank{result['rank']}.json"
    path.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
