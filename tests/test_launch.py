"""The main job, launch/train.py, end to end: real torchrun worlds of 2 gloo ranks on loopback.

One uninterrupted run (with --compare-torch) is the reference: a run killed mid-way and resumed
from its checkpoint must reproduce its losses, and plain torch.optim must too.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import re
import subprocess
import sys
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")
# A model and corpus small enough that a 2-rank run takes seconds; 8 steps, a checkpoint every 4.
TINY = ["--layers", "1", "--width", "32", "--heads", "2", "--context", "16", "--batch-size", "4"]
TINY += ["--max-data-bytes", "200000", "--steps", "8", "--checkpoint-every", "4", "--grad-accum", "2", "--clip", "1"]
UNCLIPPED = TINY[: TINY.index("--clip")]  # LBFGS refuses --clip
# LBFGS as it is run: full steps with a line search. (Without one, its first steps are tiny, and float32
# rounding, which differs between sharded and whole dot products, grows to ~1e-2 within 8 steps.)
LBFGS = "--lr 1 --lr-schedule constant --opt-arg line_search_fn=strong_wolfe --opt-arg max_iter=4".split()


def launch(
    *flags: Any, nproc: int | None = 2, env: dict[str, str] | None = None, restarts: int = 0
) -> subprocess.CompletedProcess[str]:
    """train.py under torchrun with ``nproc`` ranks (None: as a plain single process)."""
    command = [sys.executable, TRAIN] if nproc is None else [sys.executable, "-m", "torch.distributed.run"]
    if nproc is not None:
        command += ["--standalone", "--nproc-per-node", str(nproc), "--max-restarts", str(restarts), TRAIN]
    environment = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        command + [str(flag) for flag in flags], capture_output=True, text=True, env=environment, timeout=180
    )


def record_of(out: pathlib.Path) -> dict[str, Any]:
    return json.loads((out / "run.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The uninterrupted run: its --out folder (with the checkpoint under checkpoint/)."""
    root = tmp_path_factory.mktemp("reference")
    done = launch(*TINY, "--checkpoint-dir", root / "checkpoint", "--out", root, "--compare-torch")
    assert done.returncode == 0, done.stderr
    assert f"run.json: {root / 'run.json'}" in done.stdout
    return root


def test_run_json_records_every_rank(reference: pathlib.Path) -> None:
    record = record_of(reference)
    assert {"config", "loss", "step_time_s", "memory", "unsharded", "parameters", "world_size"} <= record.keys()
    assert record["config"]["optimizer"] == "adamw" and record["world_size"] == 2
    assert len(record["loss"]) == len(record["step_time_s"]) == 8
    assert len(record["memory"]) == 2  # one memory_stats() per rank
    for stats in record["memory"]:
        assert 0 < stats["state_bytes"] < record["unsharded"]["state_bytes"]
        assert stats["grad_bytes"] < record["unsharded"]["grad_bytes"]  # stage 2 shards the gradients too
    assert (reference / "run.png").stat().st_size > 10_000


def test_compare_torch_curves_coincide(reference: pathlib.Path) -> None:
    record = record_of(reference)
    assert len(record["torch_loss"]) == 8
    assert record["max_abs_loss_difference"] < 1e-5, record


# The tests' fault: the last rank dies abruptly after step 6 (index 5), two steps past the step-4 checkpoint.
CRASH = {"SHARDOPT_TRAIN_CRASH_AFTER_STEP": "5"}


def test_killed_run_resumes_exactly(reference: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """A run whose rank 1 dies, started again with --resume, continues from its step-4 checkpoint."""
    flags = [*TINY, "--checkpoint-dir", tmp_path / "checkpoint", "--out", tmp_path]
    killed = launch(*flags, env=CRASH)
    assert killed.returncode != 0 and not (tmp_path / "run.json").exists()
    resumed = launch(*flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert record_of(tmp_path)["loss"] == pytest.approx(record_of(reference)["loss"], abs=1e-6)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("train.py: error:")]


def test_bad_flag_fails_on_every_rank_in_one_line() -> None:
    failed = launch("--optimizer", "nope", *TINY)
    assert failed.returncode != 0
    assert len(error_lines(failed.stderr)) == 2, failed.stderr  # one per rank
    assert "not a torch.optim algorithm" in error_lines(failed.stderr)[0]
    assert 'launch/train.py", line' not in failed.stderr  # torchrun's own report follows, but no trace of ours


def launch_module(name: str) -> types.ModuleType:
    """A module of launch/ (train, ray_job) imported into this process, finding its sibling modules
    as the scripts do."""
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "launch"))


def run_in_process(flags: list[Any], capsys: pytest.CaptureFixture[str]) -> str:
    """train.py's main() as a world of one in this process (no torch import to wait for); its stderr."""
    with pytest.raises(SystemExit) as exit_status:
        launch_module("train").main([str(flag) for flag in flags])
    assert exit_status.value.code != 0
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--opt-arg", "betas=oops"], "--opt-arg betas='oops'"),
        (["--data", "/no/such/path"], "--data /no/such/path: no such file or directory"),
        (["--opt-arg", "nope"], "--opt-arg: expected key=value"),
        (["--optimizer", "lbfgs"], "--clip: LBFGS takes no clipping"),
        (["--optimizer", "sparseadam", "--aux-lr", "-1"], "--aux-lr -1.0 (for adamw): Invalid learning rate: -1.0"),
    ],
)
def test_bad_flags_single_process(flags: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    stderr = run_in_process([*TINY, *flags], capsys)
    assert says in error_lines(stderr)[0]
    assert "Traceback" not in stderr


RECIPES = {
    "muon": [],  # Muon on the blocks' matrices, AdamW on the rest
    "sparseadam": [],  # SparseAdam on the sparse token embedding, AdamW on the rest
    "lbfgs": LBFGS,  # step(closure), the micro-batches inside the closure
}


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], pathlib.Path]:
    """The uninterrupted --compare-torch run of a recipe (once per module): its --out folder."""
    outs: dict[str, pathlib.Path] = {}

    def run(optimizer: str) -> pathlib.Path:
        if optimizer not in outs:
            out = tmp_path_factory.mktemp(optimizer)
            # Muon + AdamW and SparseAdam + AdamW clip one norm over both optimizers (shardopt.clip_grad_norm_).
            flags = UNCLIPPED if optimizer == "lbfgs" else TINY
            done = launch(*flags, "--optimizer", optimizer, *RECIPES[optimizer], "--compare-torch", "--out", out)
            assert done.returncode == 0, done.stderr[-3000:]
            outs[optimizer] = out
        return outs[optimizer]

    return run


def loss_bound(optimizer: str, config: dict[str, Any]) -> float:
    """How far the recipe's losses may part from torch.optim's over the run.

    fp32 throughout, the only difference is the order the ranks' gradients are summed in: 1e-5.
    Muon orthogonalises each update in bfloat16 (torch's Newton-Schulz iteration), so a gradient one
    fp32 rounding away can round its update to the neighbouring bfloat16 value: up to one bfloat16
    epsilon of the update's size, ``lr``, per element and step, so the losses may part by up to
    steps x lr x epsilon (how much a CPU's bf16 arithmetic rounds that way differs between CPUs).
    """
    if optimizer != "muon":
        return 1e-5
    return config["steps"] * config["lr"] * torch.finfo(torch.bfloat16).eps


@pytest.mark.parametrize("optimizer", sorted(RECIPES))
def test_recipe_matches_torch(optimizer: str, recipe_run: Callable[[str], pathlib.Path]) -> None:
    record = record_of(recipe_run(optimizer))
    assert record["optimizers"] == ([optimizer] if optimizer == "lbfgs" else [optimizer, "adamw"])
    assert len(record["torch_loss"]) == len(record["loss"]) == 8
    assert record["max_abs_loss_difference"] < loss_bound(optimizer, record["config"]), record
    assert record["loss"][-1] < record["loss"][0]  # it trains: the curves coincide, not stand still
    for stats in record["memory"]:  # summed over the optimizers: each rank keeps part of the state
        assert 0 < stats["state_bytes"] < record["unsharded"]["state_bytes"]


def test_torchrun_restarts_a_killed_run_from_its_checkpoint(
    recipe_run: Callable[[str], pathlib.Path], tmp_path: pathlib.Path
) -> None:
    """Rank 1 of a Muon + AdamW run dies after step 6 in the first attempt; torchrun --max-restarts starts
    both ranks again, and --resume auto takes them from the step-4 checkpoint (two optimizers and their
    two schedulers in one) to the same losses as the uninterrupted run."""
    flags = [*TINY, "--optimizer", "muon", "--checkpoint-dir", tmp_path / "checkpoint", "--out", tmp_path]
    done = launch(*flags, "--resume", "auto", env=CRASH, restarts=1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert record_of(tmp_path)["loss"] == pytest.approx(record_of(recipe_run("muon"))["loss"], abs=1e-6)


def test_resume_of_another_model_fails_in_one_line(
    reference: pathlib.Path, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wider = ["--width", "48"]  # later flags win: another model than the checkpoint's
    stderr = run_in_process(
        [*TINY, *wider, "--checkpoint-dir", reference / "checkpoint", "--resume", "--out", tmp_path], capsys
    )
    assert stderr.strip().splitlines() == error_lines(stderr), stderr


@pytest.fixture
def ray_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skips without Ray Train. Ray's import prepends to sys.path and sets RAY_CLIENT_MODE=0 (its default):
    undone after the test, or every world tests.world holds would no longer fit this process and be
    spawned again."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("RAY_CLIENT_MODE", "0")  # set here, so that it is unset again afterwards
    pytest.importorskip("ray.train.torch")


def ray_job(out: pathlib.Path, *flags: Any, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """launch/ray_job.py with 2 workers on a local cluster of its own, writing under ``out``."""
    # A throwaway local cluster needs no token authentication.
    environment = {**os.environ, "RAY_AUTH_MODE": "disabled", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, ROOT / "launch" / "ray_job.py", "--workers", "2", "--storage", out / "ray"]
    command += [*flags, "--out", out]
    return subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, env={**environment, **(env or {})}, timeout=300
    )


# What Ray forwards from its actors' logs: "(RayTrainWorker pid=123) ...", maybe coloured.
FORWARDED = re.compile(r"^(\x1b\[\d+m)?\(\w+ pid=\d+")


def ray_errors(stderr: str) -> list[str]:
    """ray_job.py's own error lines, and any traceback of the driver's (not what Ray forwards from the workers'
    logs, which keep theirs)."""
    ours = [line for line in stderr.splitlines() if not FORWARDED.match(line)]
    return [line for line in ours if line.startswith("ray_job.py: error:") or "Traceback" in line]


@pytest.mark.usefixtures("ray_installed")
def test_ray_job_says_why_a_job_failed_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """What trainer.fit() raises, in the shapes Ray wraps a worker's error in (by rank; in a controller's
    error; chained): train.py's own errors (of the lowest rank that failed) end the job with train.py's
    line and status 2, any other error with one line naming it and status 1. The real Ray job below
    fails the second way."""
    from ray.train import ControllerError, WorkerGroupError

    script = launch_module("ray_job")
    train = launch_module("train")
    flags = [*TINY, "--opt-arg", "betas=oops"]  # raised by the workers, as they build the optimizer
    (in_process,) = error_lines(run_in_process(flags, capsys))
    usage = train.UsageError(in_process.removeprefix("train.py: error: "))
    lost = RuntimeError("the actor died unexpectedly\nits log follows")
    chained = RuntimeError("the controller failed")
    chained.__cause__ = usage
    user_errors = {
        "by rank": WorkerGroupError("2 workers failed", {1: train.UsageError("rank 1"), 0: usage}),
        "in a controller's": ControllerError(WorkerGroupError("1 worker failed", {0: usage})),
        "chained": ControllerError(chained),
    }
    for shape, error in user_errors.items():
        assert script.failure_line(error) == (in_process.replace("train.py", "ray_job.py", 1), 2), shape
    other = ControllerError(WorkerGroupError("2 workers failed", {1: lost, 0: RuntimeError("gloo: peer gone")}))
    assert script.failure_line(other) == ("ray_job.py: error: training failed: RuntimeError: gloo: peer gone", 1)
    first_line = "ray_job.py: error: training failed: RuntimeError: the actor died unexpectedly"
    assert script.failure_line(WorkerGroupError("1 worker failed", {1: lost})) == (first_line, 1)


@pytest.mark.usefixtures("ray_installed")
def test_ray_job_trains_as_torchrun_does_and_a_restarted_job_resumes(
    reference: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """launch/ray_job.py on a local 2-CPU Ray cluster: a job whose rank 1 dies after step 6 ends in one
    line and status 1; started again with the same --name and --storage, it resumes from the step-4
    checkpoint Ray keeps and ends with the torchrun run's losses."""
    killed = ray_job(tmp_path, *TINY, env=CRASH)
    assert killed.returncode == 1 and not (tmp_path / "run.json").exists(), killed.stderr[-3000:]
    (line,) = ray_errors(killed.stderr)
    assert line.startswith("ray_job.py: error: training failed: "), killed.stderr[-3000:]
    done = ray_job(tmp_path, *TINY)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "latest checkpoint: " + str(tmp_path / "ray") in done.stdout
    assert record_of(tmp_path)["loss"] == pytest.approx(record_of(reference)["loss"], abs=1e-6)
