"""The main job: train a small GPT on byte-level text with a ShardedOptimizer on every rank of a torchrun world.

    torchrun --standalone --nproc-per-node 2 launch/train.py [--optimizer adamw] [--steps 300]

gloo on CPU, NCCL when CUDA is present (one GPU per rank); `python launch/train.py` runs a world of one.
Rank 0 shows a progress bar; at the end the run writes run.json and run.png into --out.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import recipes
import report
import text
import torch
import torch.distributed as dist
from gpt import GPT
from torch import nn
from torch.optim import lr_scheduler
from tqdm import tqdm

import shardopt
from shardopt.algorithms import ALGORITHMS, torch_class
from shardopt.checkpoint import CheckpointError

# Tests set this to kill the last rank abruptly after that step, as a lost node would be, to check that
# --resume continues the run exactly.
CRASH_AFTER_STEP = "SHARDOPT_TRAIN_CRASH_AFTER_STEP"


class UsageError(Exception):
    """Bad flags, data or checkpoint: told to the user in one line, not a traceback wall."""


def key_value(argument: str) -> tuple[str, Any]:
    """``key=value`` with value a Python literal (``0.9``, ``(0.9, 0.95)``, ``True``), else the string."""
    key, equals, value = argument.partition("=")
    if not equals or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected key=value, got {argument!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.splitlines()[0])
    model = parser.add_argument_group("model and data")
    model.add_argument("--layers", type=int, default=4, help="transformer blocks")
    model.add_argument("--width", type=int, default=128, help="embedding width")
    model.add_argument("--heads", type=int, default=4, help="attention heads (must divide --width)")
    model.add_argument("--context", type=int, default=64, help="bytes per sequence")
    model.add_argument("--data", help="a text file or a folder of them (default: the Python standard library)")
    model.add_argument("--max-data-bytes", type=int, default=8 * 2**20, help="read at most this much text")
    model.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="the model's parameter dtype")
    optim = parser.add_argument_group("optimizer")
    optim.add_argument("--optimizer", default="adamw", help="any torch.optim algorithm, by name")
    optim.add_argument(
        "--opt-arg", type=key_value, action="append", default=[], metavar="KEY=VALUE", help="its keywords"
    )
    optim.add_argument("--stage", type=int, choices=(1, 2), default=2, help="1: state sharded; 2: gradients too")
    optim.add_argument("--lr", type=float, default=3e-3)
    optim.add_argument(
        "--aux-lr", type=float, default=3e-3, help="muon, sparseadam: the learning rate of AdamW, their partner"
    )
    optim.add_argument(
        "--lr-schedule", default="warmup-cosine", help="warmup-cosine, constant, or a torch.optim.lr_scheduler class"
    )
    optim.add_argument("--sched-arg", type=key_value, action="append", default=[], metavar="KEY=VALUE")
    optim.add_argument("--clip", type=float, help="clip the gradient's global norm to this")
    loop = parser.add_argument_group("training")
    loop.add_argument("--steps", type=int, default=300)
    loop.add_argument("--batch-size", type=int, default=16, help="sequences per rank and micro-batch")
    loop.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    loop.add_argument("--seed", type=int, default=0)
    loop.add_argument("--checkpoint-dir", type=pathlib.Path, help="where to save (and --resume from)")
    loop.add_argument("--checkpoint-every", type=int, default=0, help="steps between saves (0: only at the end)")
    loop.add_argument(
        "--resume",
        nargs="?",
        const="always",
        choices=("always", "auto"),
        help="continue from the checkpoint in --checkpoint-dir; auto: if there is one (torchrun --max-restarts)",
    )
    loop.add_argument("--compare-torch", action="store_true", help="also train with plain torch.optim, and compare")
    loop.add_argument("--out", type=pathlib.Path, help="where run.json and run.png go (default: runs/<time>)")
    args = parser.parse_args(argv)
    if args.resume and args.checkpoint_dir is None:
        parser.error("--resume needs --checkpoint-dir")
    for name in ("layers", "width", "heads", "context", "steps", "batch_size", "grad_accum"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.width % args.heads:
        parser.error(f"--width {args.width} must be a multiple of --heads {args.heads}")
    args.out = args.out or pathlib.Path("runs", time.strftime("%Y%m%d-%H%M%S"))
    return args


def init_distributed() -> torch.device:
    """Join the torchrun world (or run as a world of one) and pick this rank's device."""
    if "RANK" not in os.environ:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # torchrun keeps one store across the attempts of a job run with --max-restarts; the keys a
    # process group publishes there (each rank's address) would outlive their attempt, and a rank
    # of the next attempt could read its peer's old address. One key space per attempt.
    store, rank, size = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", store=store, rank=rank, world_size=size)
        return torch.device("cuda", local_rank)
    if os.environ.get("MASTER_ADDR", "127.0.0.1") in ("127.0.0.1", "localhost"):
        # A single-node CPU run: keep gloo's own connections on loopback too.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", store=store, rank=rank, world_size=size)
    return torch.device("cpu")


@dataclass
class World:
    rank: int
    size: int
    device: torch.device

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks (collective)."""
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        if self.size > 1:
            dist.all_reduce(total)
        return total.item() / self.size

    def first_error(self, error: BaseException | None) -> str | None:
        """The message of the lowest rank that failed, on every rank (collective). Ranks that fail alike
        then exit together, each with its line, before torchrun stops the slower ones."""
        messages = [str(error) if error is not None else None] * self.size
        if self.size > 1:
            dist.all_gather_object(messages, messages[self.rank])
        return next((message for message in messages if message is not None), None)


def make_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    torch.manual_seed(args.seed)  # the same initial weights on every rank and in --compare-torch's run
    model = GPT(args.layers, args.width, args.heads, args.context, recipes.sparse_tokens(args)).to(device)
    return model.to(torch.bfloat16) if args.precision == "bf16" else model


# Only the element-wise algorithms have stages; Adafactor and Muon shard by whole tensors, LBFGS by
# slices of its history, SparseAdam by rows.
STAGED = {cls.__name__.lower() for cls in ALGORITHMS}


def make_optimizers(model: nn.Module, args: argparse.Namespace) -> list[torch.optim.Optimizer]:
    """The recipe's optimizers (one, or for muon and sparseadam two), sharded."""
    optimizers = []
    for part in recipes.parts(model, args):
        keywords = dict(part.keywords, stage=args.stage) if part.algorithm.lower() in STAGED else part.keywords
        try:
            optimizers.append(shardopt.ShardedOptimizer(part.params, part.algorithm, **keywords))
        except (TypeError, ValueError, NotImplementedError) as error:
            raise UsageError(f"{part.flags}: {error}") from error
    return optimizers


def warmup_cosine(steps: int) -> Callable[[int], float]:
    """Linear warmup over the first 10% of the steps, then a cosine decay to 10% of the peak rate."""
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace) -> lr_scheduler.LRScheduler:
    name = args.lr_schedule
    if name == "warmup-cosine":
        return lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.steps))
    if name == "constant":
        return lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    classes = {
        n.lower(): c
        for n, c in vars(lr_scheduler).items()
        if isinstance(c, type) and issubclass(c, lr_scheduler.LRScheduler)
    }
    if name.lower() not in classes:
        raise UsageError(f"--lr-schedule {name!r}: not warmup-cosine, constant or a torch.optim.lr_scheduler class")
    try:
        return classes[name.lower()](optimizer, **dict(args.sched_arg))
    except (TypeError, ValueError) as error:
        raise UsageError(f"--lr-schedule {name}: {error}") from error


class TorchDataParallel:
    """Plain torch.optim fed the mean gradient (all-reduced by hand, as DDP would): the reference that
    --compare-torch trains, with the few methods of ShardedOptimizer the loop calls."""

    def __init__(self, part: recipes.Part, world: World) -> None:
        torch_class = {n.lower(): c for n, c in vars(torch.optim).items() if isinstance(c, type)}[
            part.algorithm.lower()
        ]
        self.params = part.params
        self.optimizer = torch_class(self.params, **part.keywords)
        self.world = world
        self.reduced = False

    def reduce(self) -> None:
        """The mean gradient on every rank, once per backward (gloo all-reduces sparse gradients too)."""
        if self.world.size > 1 and not self.reduced:
            for param in self.params:
                dist.all_reduce(param.grad)
                param.grad /= self.world.size
        self.reduced = True

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """As ShardedOptimizer's: with a closure (LBFGS), every evaluation sees the mean gradient and
        returns the mean loss over ranks, so all ranks take the same decisions."""
        if closure is None:
            self.reduce()
            return self.optimizer.step()

        def mean_closure() -> float:
            loss = closure()
            self.reduce()
            return self.world.mean(loss)

        return self.optimizer.step(mean_closure)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()
        self.reduced = False


@dataclass
class History:
    """Per-step loss (mean over ranks) and wall time; saved in each checkpoint, so a resumed run has it all."""

    loss: list[float] = field(default_factory=list)
    step_time_s: list[float] = field(default_factory=list)


@dataclass
class Job:
    model: nn.Module
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[lr_scheduler.LRScheduler]
    corpus: torch.Tensor
    history: History


def train_step(
    model: nn.Module, optimizers: list[Any], corpus: torch.Tensor, step: int, args: argparse.Namespace, world: World
) -> float:
    """One step of every optimizer over --grad-accum micro-batches; returns this rank's mean loss
    (LBFGS: the mean over ranks of its first closure's, which is what its step() returns)."""
    batches = [
        text.batch(
            corpus, seed=args.seed, step=step, micro=micro, rank=world.rank, size=args.batch_size, context=args.context
        )
        for micro in range(args.grad_accum)
    ]

    def forward_backward() -> float:
        total = 0.0
        for micro, (x, y) in enumerate(batches):
            with contextlib.ExitStack() as stack:
                # All micro-batches but the last accumulate locally, with no communication (no_sync()).
                # The others (Adafactor, Muon, SparseAdam, LBFGS, --compare-torch's) reduce only at step().
                if micro < len(batches) - 1:
                    for optimizer in optimizers:
                        if hasattr(optimizer, "no_sync"):
                            stack.enter_context(optimizer.no_sync())
                loss = model(x.to(world.device), y.to(world.device)) / args.grad_accum
                loss.backward()
            total += loss.item()
        return total

    if torch_class(args.optimizer) is torch.optim.LBFGS:
        (lbfgs,) = optimizers

        def closure() -> float:
            lbfgs.zero_grad()
            return forward_backward()

        return float(lbfgs.step(closure))
    total = forward_backward()
    if args.clip is not None:
        clip_grad_norm_(optimizers, args.clip)
    for optimizer in optimizers:
        optimizer.step()
    for optimizer in optimizers:
        optimizer.zero_grad()
    return total


def train(
    model: nn.Module,
    optimizers: list[Any],
    schedulers: list[lr_scheduler.LRScheduler],
    corpus: torch.Tensor,
    args: argparse.Namespace,
    world: World,
    history: History,
    checkpoint: Callable[[int], None] | None = None,
    label: str = "shardopt",
) -> None:
    """Steps len(history.loss) .. --steps, with a progress bar on rank 0."""
    tokens_per_step = args.batch_size * args.context * args.grad_accum * world.size
    start = len(history.loss)
    with tqdm(total=args.steps, initial=start, disable=world.rank != 0, desc=label, unit="step") as bar:
        for step in range(start, args.steps):
            began = time.perf_counter()
            loss = world.mean(train_step(model, optimizers, corpus, step, args, world))
            for scheduler in schedulers:
                if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(loss)
                else:
                    scheduler.step()
            elapsed = time.perf_counter() - began
            history.loss.append(loss)
            history.step_time_s.append(elapsed)
            bar.set_postfix(
                loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / elapsed:,.0f}", step_ms=f"{elapsed * 1e3:.0f}"
            )
            bar.update()
            if checkpoint is not None:
                checkpoint(step)


def checkpoint_due(step: int, args: argparse.Namespace) -> bool:
    done = step + 1
    return done == args.steps or bool(args.checkpoint_every and done % args.checkpoint_every == 0)


def save(job: Job, args: argparse.Namespace) -> None:
    """A sharded checkpoint in --checkpoint-dir (collective). The batches are a function of (seed, step,
    rank), so the next step is the data's position too."""
    extra = {"next_step": len(job.history.loss), "loss": job.history.loss, "step_time_s": job.history.step_time_s}
    shardopt.checkpoint.save(args.checkpoint_dir, model=job.model, **checkpointed(job), extra=extra)


def checkpointed(job: Job) -> dict[str, Any]:
    """The optimizers and schedulers as checkpoint.save and load take them: one as itself (the layout
    of one-optimizer checkpoints stays as it was), two as lists."""
    if len(job.optimizers) == 1:
        return {"optimizer": job.optimizers[0], "scheduler": job.schedulers[0]}
    return {"optimizer": job.optimizers, "scheduler": job.schedulers}


def checkpointer(job: Job, args: argparse.Namespace, world: World) -> Callable[[int], None] | None:
    """Saves every --checkpoint-every steps and after the last."""
    if args.checkpoint_dir is None:
        return None

    def checkpoint(step: int) -> None:
        if checkpoint_due(step, args):
            save(job, args)
        crash_if_asked(step, world)

    return checkpoint


def crash_if_asked(step: int, world: World) -> None:
    """The tests' fault: the last rank dies abruptly after step ``$SHARDOPT_TRAIN_CRASH_AFTER_STEP``,
    in a first attempt only (a run restarted by torchrun --max-restarts goes on)."""
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if step == int(os.environ.get(CRASH_AFTER_STEP, -1)) and world.rank == world.size - 1 and first_attempt:
        os._exit(3)


def resume(job: Job, path: pathlib.Path | None) -> History:
    if path is None:
        return History()
    extra = shardopt.checkpoint.load(path, model=job.model, **checkpointed(job))
    return History(extra["loss"], extra["step_time_s"])


def memory(optimizers: list[Any], model: nn.Module, world: World) -> tuple[list[dict[str, int]], dict[str, int]]:
    """memory_stats() of every rank, summed over the optimizers, and what unsharded torch.optim holds
    on every rank (collective)."""
    own: dict[str, int] = {}
    for optimizer in optimizers:
        for kind, size in optimizer.memory_stats().items():
            own[kind] = own.get(kind, 0) + size
    stats = [own] * world.size
    if world.size > 1:
        dist.all_gather_object(stats, own)
    # Consolidated: exactly torch.optim's state. LBFGS keeps lists of tensors in it, and plain numbers.
    states = [optimizer.state_dict()["state"] for optimizer in optimizers]
    values = [value for state in states for entry in state.values() for value in entry.values()]
    tensors = [t for value in values for t in (value if isinstance(value, list) else [value])]
    params = list(model.parameters())
    low_precision = params[0].dtype != torch.float32
    unsharded = {
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "grad_bytes": sum(p.numel() * p.element_size() for p in params),
        "master_bytes": sum(p.numel() * 4 for p in params) if low_precision else 0,
        "state_bytes": sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)),
    }
    return stats, unsharded


def clip_grad_norm_(optimizers: list[Any], max_norm: float) -> torch.Tensor:
    """One global norm over the gradients of every optimizer of the job, as
    ``torch.nn.utils.clip_grad_norm_(model.parameters())`` would clip them in one process."""
    if not isinstance(optimizers[0], TorchDataParallel):
        return shardopt.clip_grad_norm_(optimizers, max_norm)
    for optimizer in optimizers:
        optimizer.reduce()
    # torch's clip_grad_norm_ has no kernel for sparse gradients (SparseAdam's embedding): their
    # coalesced values carry the norm, and scaling the sparse tensor scales them.
    params = [p for o in optimizers for p in o.params if p.grad is not None]
    for p in params:
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
    total = nn.utils.get_total_norm([p.grad.values() if p.grad.is_sparse else p.grad for p in params])
    factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        p.grad.mul_(factor)
    return total


def check_clip(args: argparse.Namespace) -> None:
    """--clip clips one global norm over all gradients, of every optimizer of the job; not LBFGS's."""
    if args.clip is not None and torch_class(args.optimizer) is torch.optim.LBFGS:
        raise UsageError("--clip: LBFGS takes no clipping: its line search and curvature pairs need the true gradient")


def set_up(args: argparse.Namespace, world: World, resume_from: pathlib.Path | None) -> Job:
    corpus = text.load_corpus(args.data, args.max_data_bytes, args.context)
    model = make_model(args, world.device)
    optimizers = make_optimizers(model, args)
    check_clip(args)
    job = Job(model, optimizers, [make_scheduler(o, args) for o in optimizers], corpus, History())
    job.history = resume(job, resume_from)
    return job


def compare_torch(job: Job, args: argparse.Namespace, world: World) -> dict[str, Any]:
    """Train the same model from the same weights on the same batches with plain torch.optim, split
    among the same optimizers."""
    reference = make_model(args, world.device)
    optimizers = [TorchDataParallel(part, world) for part in recipes.parts(reference, args)]
    schedulers = [make_scheduler(optimizer.optimizer, args) for optimizer in optimizers]
    history = History()
    train(reference, optimizers, schedulers, job.corpus, args, world, history, label="torch.optim")
    difference = max(abs(a - b) for a, b in zip(job.history.loss, history.loss))
    return {"torch_loss": history.loss, "max_abs_loss_difference": difference}


def run(job: Job, args: argparse.Namespace, world: World, checkpoint: Callable[[int], None] | None) -> dict[str, Any]:
    """Train (calling ``checkpoint`` after every step), then gather what run.json records (collective)."""
    train(job.model, job.optimizers, job.schedulers, job.corpus, args, world, job.history, checkpoint)
    stats, unsharded = memory(job.optimizers, job.model, world)
    record = {
        "config": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
        "optimizers": recipes.algorithms(args),
        "world_size": world.size,
        "device": str(world.device),
        "parameters": sum(p.numel() for p in job.model.parameters()),
        "tokens_per_step": args.batch_size * args.context * args.grad_accum * world.size,
        "loss": job.history.loss,
        "step_time_s": job.history.step_time_s,
        "memory": stats,
        "unsharded": unsharded,
    }
    if args.compare_torch:
        record.update(compare_torch(job, args, world))
    return record


def start(args: argparse.Namespace, world: World, resume_from: pathlib.Path | None) -> Job:
    """:func:`set_up`, failing on every rank alike (collective)."""
    job, error = None, None
    try:
        job = set_up(args, world, resume_from)
    except (UsageError, text.DataError, CheckpointError) as caught:
        error = caught
    message = world.first_error(error)
    if message is not None:
        raise UsageError(message) from error
    return job


def join_world() -> World:
    device = init_distributed()
    if not dist.is_initialized():
        return World(0, 1, device)
    return World(dist.get_rank(), dist.get_world_size(), device)


def resume_from(args: argparse.Namespace) -> pathlib.Path | None:
    """The checkpoint to start from: --resume's, or with --resume auto the one there is, if any."""
    if args.resume == "always" or (args.resume == "auto" and shardopt.checkpoint.is_complete(args.checkpoint_dir)):
        return args.checkpoint_dir
    return None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    world = join_world()
    try:
        job = start(args, world, resume_from(args))
        record = run(job, args, world, checkpointer(job, args, world))
    except (UsageError, CheckpointError) as error:  # CheckpointError: raised on every rank alike
        # One write, so that the ranks' lines sharing a terminal never interleave.
        sys.stderr.write(f"train.py: error: {error}\n")
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if world.rank == 0:
        write_report(args.out, record)


def write_report(out: pathlib.Path, record: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    print(f"run.json: {report.write_json(out, record)}")
    print(f"run.png:  {report.write_plot(out, record)}")


if __name__ == "__main__":
    main()
