"""The main job, launch/train.py, end to end: real torchrun worlds of 2 gloo ranks on loopback.

One uninterrupted run (with --compare-torch) is the reference: a run killed mid-way and resumed
from its checkpoint must reproduce its losses, and plain torch.optim must too.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")
# A model and corpus small enough that a 2-rank run takes seconds; 8 steps, a checkpoint every 4.
TINY = ["--layers", "1", "--width", "32", "--heads", "2", "--context", "16", "--batch-size", "4"]
TINY += ["--max-data-bytes", "200000", "--steps", "8", "--checkpoint-every", "4", "--grad-accum", "2", "--clip", "1"]


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


def test_killed_run_resumes_exactly(reference: pathlib.Path, tmp_path: pathlib.Path) -> None:
    checkpoint = tmp_path / "checkpoint"
    # Rank 1 dies abruptly after step 6 (index 5); the last checkpoint is from step 4.
    killed = launch(
        *TINY, "--checkpoint-dir", checkpoint, "--out", tmp_path, env={"SHARDOPT_TRAIN_CRASH_AFTER_STEP": "5"}
    )
    assert killed.returncode != 0 and not (tmp_path / "run.json").exists()
    resumed = launch(*TINY, "--checkpoint-dir", checkpoint, "--out", tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    expected, got = record_of(reference)["loss"], record_of(tmp_path)["loss"]
    assert got == pytest.approx(expected, abs=1e-6)


def test_torchrun_restarts_a_killed_run_from_its_checkpoint(reference: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """Rank 1 dies after step 6 in the first attempt; torchrun --max-restarts starts both ranks again,
    and --resume auto takes them from the step-4 checkpoint to the same losses as the uninterrupted run."""
    flags = [*TINY, "--checkpoint-dir", tmp_path / "checkpoint", "--out", tmp_path, "--resume", "auto"]
    done = launch(*flags, env={"SHARDOPT_TRAIN_CRASH_AFTER_STEP": "5"}, restarts=1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert record_of(tmp_path)["loss"] == pytest.approx(record_of(reference)["loss"], abs=1e-6)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("train.py: error:")]


def test_bad_flag_fails_on_every_rank_in_one_line() -> None:
    failed = launch("--optimizer", "nope", *TINY)
    assert failed.returncode != 0
    assert len(error_lines(failed.stderr)) == 2, failed.stderr  # one per rank
    assert "not a torch.optim algorithm" in error_lines(failed.stderr)[0]
    assert 'launch/train.py", line' not in failed.stderr  # torchrun's own report follows, but no trace of ours


def run_in_process(flags: list[Any], capsys: pytest.CaptureFixture[str]) -> str:
    """train.py's main() as a world of one in this process (no torch import to wait for); its stderr."""
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import train

        with pytest.raises(SystemExit) as exit_status:
            train.main([str(flag) for flag in flags])
    finally:
        sys.path.remove(str(ROOT / "launch"))
    assert exit_status.value.code != 0
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--opt-arg", "betas=oops"], "--opt-arg betas='oops'"),
        (["--data", "/no/such/path"], "--data /no/such/path: no such file or directory"),
        (["--opt-arg", "nope"], "--opt-arg: expected key=value"),
        (["--optimizer", "lbfgs"], "--optimizer lbfgs: LBFGS needs a closure"),
    ],
)
def test_bad_flags_single_process(flags: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    stderr = run_in_process([*TINY, *flags], capsys)
    assert says in error_lines(stderr)[0]
    assert "Traceback" not in stderr


def test_resume_of_another_model_fails_in_one_line(
    reference: pathlib.Path, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wider = ["--width", "48"]  # later flags win: another model than the checkpoint's
    stderr = run_in_process(
        [*TINY, *wider, "--checkpoint-dir", reference / "checkpoint", "--resume", "--out", tmp_path], capsys
    )
    assert stderr.strip().splitlines() == error_lines(stderr), stderr


def test_ray_job_trains_as_torchrun_does_and_a_restarted_job_resumes(
    reference: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """launch/ray_job.py on a local 2-CPU Ray cluster: a job whose rank 1 dies after step 6, started
    again with the same --name and --storage, resumes from the step-4 checkpoint Ray keeps and ends
    with the torchrun run's losses."""
    pytest.importorskip("ray.train.torch")
    # A throwaway local cluster needs no token authentication.
    environment = {**os.environ, "RAY_AUTH_MODE": "disabled", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "launch" / "ray_job.py"), "--workers", "2", "--storage", tmp_path / "ray"]
    command += [*TINY, "--out", tmp_path]
    command = [str(c) for c in command]
    crash = {**environment, "SHARDOPT_TRAIN_CRASH_AFTER_STEP": "5"}
    killed = subprocess.run(command, capture_output=True, text=True, env=crash, timeout=300)
    assert killed.returncode != 0 and not (tmp_path / "run.json").exists()
    done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "latest checkpoint: " + str(tmp_path / "ray") in done.stdout
    assert record_of(tmp_path)["loss"] == pytest.approx(record_of(reference)["loss"], abs=1e-6)
