"""shardopt inside the Lightning ``Trainer`` (``strategy="ddp"`` on CPU), returned by
``configure_optimizers`` in place of torch.optim.

Lightning wraps the model in DDP and the optimizer in ``LightningOptimizer``, clips through
``gradient_clip_val``, accumulates with ``accumulate_grad_batches`` (DDP's ``no_sync``) and
checkpoints by asking every rank for the optimizer's state. Each run is compared with the same
Trainer driving plain torch.optim: logged losses and parameters to fp32 parity bounds; a run
resumed by ``fit(ckpt_path=...)`` from the checkpoint ``ModelCheckpoint`` wrote after the first
epoch ends with the uninterrupted run's parameters, bit for bit.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import torch

from tests.common import flat_params, make_model
from tests.frameworks import SETTINGS, WORLD, compare_with_torch, make_optimizer, torchrun_environment
from tests.world import run_world

EPOCHS, BATCH, SAMPLES = 2, 4, 24  # 24 samples over 2 ranks in batches of 4: 3 batches per rank and epoch


def _module(setting: str, sharded: bool, **ours: Any) -> Any:
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()
            self.losses: list[float] = []

        def training_step(self, batch: Any, index: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.losses.append(float(loss))
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return make_optimizer(self.parameters(), setting, sharded, **ours)

    return Module()


def _fit(
    setting: str,
    sharded: bool,
    directory: pathlib.Path,
    accumulation: int,
    ckpt: str | None = None,
    own: bool = False,
) -> Any:
    """One fit; ``own``: shardopt reduces the gradients itself (ShardoptStrategy, stage 2) instead of DDP."""
    import lightning.pytorch as pl

    from shardopt.integrations.lightning import ShardoptStrategy

    generator = torch.Generator().manual_seed(3)
    inputs, targets = torch.randn(SAMPLES, 7, generator=generator), torch.randn(SAMPLES, 3, generator=generator)
    data = torch.utils.data.TensorDataset(inputs, targets)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=directory, save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=ShardoptStrategy() if own else "ddp",
        max_epochs=EPOCHS,
        gradient_clip_val=0.05,
        accumulate_grad_batches=accumulation,
        callbacks=[checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = _module(setting, sharded, **({"stage": 2} if own else {}))
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=BATCH), ckpt_path=ckpt)
    return module


def lightning_runs(setting: str, sharded: bool, directory: pathlib.Path, own: bool = False) -> dict[str, Any]:
    torchrun_environment()
    results = {}
    name = f"{setting}-{sharded}-{own}"
    for accumulation in (1, 3):
        module = _fit(setting, sharded, directory / f"{name}-{accumulation}", accumulation, own=sharded and own)
        results[f"accumulation {accumulation}"] = {"losses": module.losses, "params": flat_params(module.net)}
    (epoch0,) = sorted((directory / f"{name}-1").glob("epoch=0-*.ckpt"))
    resumed = _fit(setting, sharded, directory / f"{name}-resumed", 1, str(epoch0), own=sharded and own)
    results["resumed"] = {"losses": resumed.losses, "params": flat_params(resumed.net)}
    return results


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_lightning_trainer_trains_and_resumes_shardopt_as_torch_optim(setting: str, tmp_path: pathlib.Path) -> None:
    ours, _ = compare_with_torch(lightning_runs, setting, tmp_path, ("accumulation 1", "accumulation 3", "resumed"))
    for rank, mine in enumerate(ours):
        uninterrupted, resumed = mine["accumulation 1"], mine["resumed"]
        assert torch.equal(resumed["params"], uninterrupted["params"]), f"{setting} rank {rank}: resume"
        assert resumed["losses"] == uninterrupted["losses"][len(uninterrupted["losses"]) // EPOCHS :]


def lightning_runs_without_ddp(setting: str, sharded: bool, directory: pathlib.Path) -> dict[str, Any]:
    """shardopt at stage 2 under ShardoptStrategy (no DDP); the reference is DDP with torch.optim."""
    return lightning_runs(setting, sharded, directory, own=True)


@pytest.mark.parametrize("setting", ("AdamW", "SGD"))
def test_shardopt_strategy_trains_stage_2_without_ddp_as_ddp_with_torch_optim(
    setting: str, tmp_path: pathlib.Path
) -> None:
    names = ("accumulation 1", "accumulation 3", "resumed")
    ours, _ = compare_with_torch(lightning_runs_without_ddp, setting, tmp_path, names)
    for rank, mine in enumerate(ours):
        uninterrupted, resumed = mine["accumulation 1"], mine["resumed"]
        assert torch.equal(resumed["params"], uninterrupted["params"]), f"{setting} rank {rank}: resume"


def torch_optimizer_under_shardopt_strategy(directory: pathlib.Path) -> str:
    torchrun_environment()
    try:
        _fit("AdamW", False, directory / "torch", 1, own=True)
    except ValueError as error:
        return str(error)
    return "no error"


def test_shardopt_strategy_refuses_an_optimizer_that_does_not_reduce(tmp_path: pathlib.Path) -> None:
    # Without DDP nobody would reduce torch.optim's gradients: every rank refuses at setup, before a step.
    for rank, message in enumerate(run_world(torch_optimizer_under_shardopt_strategy, WORLD, tmp_path, fresh=True)):
        assert "does not reduce the gradients" in message and "strategy='ddp'" in message, (rank, message)
