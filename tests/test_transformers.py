"""shardopt under Hugging Face ``transformers.Trainer``, on 2 gloo ranks.

A 2-layer GPT-2 built from ``GPT2Config`` (no download) learns random token ids. Each run is
compared with the same Trainer driving plain torch.optim: the logged losses and gradient norms
(Trainer clips by ``max_grad_norm`` through Accelerate) and the final parameters, rtol 1e-4 /
atol 1e-5 (the gradients are summed in another order, and then pass through GPT-2's layer norms
and softmax). ``ShardedTrainer`` saves every few steps; a run resumed from its checkpoint by
``resume_from_checkpoint`` continues the uninterrupted one. Plain Trainer saves the optimizer from
the main process alone, which a sharded optimizer cannot serve: the main process raises a
``DesyncError`` naming it within seconds (phases.LONE_SECONDS), rather than waiting out the
timeout, and every process ends.
"""

from __future__ import annotations

import os
import pathlib
import time
from typing import Any

import pytest
import torch

from shardopt.integrations.transformers import FOLDER, ShardedTrainer
from tests.common import flat_params
from tests.frameworks import SETTINGS, WORLD, compare_with_torch, make_optimizer, torchrun_environment

STEPS, SAVE_EVERY = 6, 3
# Per torch.optim class: GPT-2 from scratch, with warmup and clipping.
LR = {"AdamW": 3e-3, "SGD": 0.05, "Adafactor": 1e-2}


def _trainer(setting: str, sharded: bool, out: pathlib.Path, accumulation: int, plain: bool = False) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (64, 16), generator=generator)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accumulation,
        max_steps=STEPS,
        save_strategy="steps",
        save_steps=SAVE_EVERY,
        logging_steps=1,
        max_grad_norm=0.5,
        lr_scheduler_type="linear",
        warmup_steps=2,
        use_cpu=True,
        report_to=[],
        seed=0,
        disable_tqdm=True,
    )
    optimizer = make_optimizer(model.parameters(), setting, sharded, lr=LR[SETTINGS[setting][0].__name__])
    kind = Trainer if plain or not sharded else ShardedTrainer
    return kind(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))


def _record(trainer: Any) -> dict[str, Any]:
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {
        "losses": [entry["loss"] for entry in history],
        "norms": [entry["grad_norm"] for entry in history],
        "params": flat_params(trainer.model),
    }


def trainer_runs(setting: str, sharded: bool, directory: pathlib.Path) -> dict[str, Any]:
    import torch.distributed as dist

    torchrun_environment()
    results = {}
    for accumulation in (1, 2):
        out = directory / f"{setting}-{sharded}-{accumulation}"
        trainer = _trainer(setting, sharded, out, accumulation)
        trainer.train()
        results[f"accumulation {accumulation}"] = _record(trainer)
    # A new Trainer resumes from the first of those checkpoints.
    first = directory / f"{setting}-{sharded}-1"
    resumed = _trainer(setting, sharded, first, 1)
    resumed.train(resume_from_checkpoint=str(first / f"checkpoint-{SAVE_EVERY}"))
    results["resumed"] = _record(resumed)
    results["saved"] = sorted(path.name for path in (first / f"checkpoint-{SAVE_EVERY}").iterdir())
    dist.barrier()
    return results


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_trainer_trains_and_resumes_shardopt_as_torch_optim(setting: str, tmp_path: pathlib.Path) -> None:
    names = ("accumulation 1", "accumulation 2", "resumed")
    ours, reference = compare_with_torch(trainer_runs, setting, tmp_path, names, rtol=1e-4, atol=1e-5)
    for mine, theirs in zip(ours, reference):
        # The resumed run ends where the uninterrupted one did, and logged its last steps alike.
        uninterrupted, resumed = mine["accumulation 1"], mine["resumed"]
        torch.testing.assert_close(resumed["params"], uninterrupted["params"], rtol=0, atol=0)
        assert resumed["losses"] == uninterrupted["losses"]  # the first ones from the checkpoint's trainer state
        assert FOLDER in mine["saved"] and "optimizer.pt" not in mine["saved"]
        assert "optimizer.pt" in theirs["saved"]


def _plain_trainer_rank(rank: int, directory: pathlib.Path) -> None:
    """One process of a 2-rank job training plain Trainer with a shardopt optimizer; what it raised goes
    to a file, and the process ends as a torchrun worker would (status 1 on an error)."""
    import json
    from datetime import timedelta

    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    store = dist.FileStore(str(directory / "store"), WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=600))
    torchrun_environment()
    started = time.monotonic()
    outcome: dict[str, Any] = {"error": None}
    try:
        _trainer("AdamW", True, directory / "plain", 1, plain=True).train()
    except Exception as error:
        outcome = {"error": f"{type(error).__name__}: {error}"}
    outcome["seconds"] = time.monotonic() - started
    (directory / f"rank{rank}.json").write_text(json.dumps(outcome))
    os._exit(1 if outcome["error"] else 0)


def test_plain_trainer_saving_a_sharded_optimizer_is_an_error_and_every_process_ends(tmp_path: pathlib.Path) -> None:
    """Trainer saves the optimizer on rank 0 alone, while rank 1 goes on to Trainer's next collective:
    rank 0 raises a DesyncError naming the call and the fix within seconds (the optimizer's timeout is
    300 s, the process group's 600 s), its process ends, and rank 1's, waiting for it, ends after it."""
    import json
    import multiprocessing as mp

    context = mp.get_context("spawn")
    processes = [context.Process(target=_plain_trainer_rank, args=(rank, tmp_path)) for rank in range(WORLD)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + 120
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    alive = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for process in processes:
        process.kill()
    assert not alive, f"ranks {alive} still running 120 s after the start"
    assert [process.exitcode for process in processes] == [1, 1]
    first = json.loads((tmp_path / "rank0.json").read_text())
    assert first["error"].startswith("DesyncError: "), first
    assert "rank 1 left step() call 3 and did not enter state_dict() after 3 step() calls" in first["error"], first
    assert "shardopt.integrations.transformers" in first["error"], first
    assert first["seconds"] < 60, first
    assert json.loads((tmp_path / "rank1.json").read_text())["error"] is not None
