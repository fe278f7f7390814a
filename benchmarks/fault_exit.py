"""How a world ends when a rank fails: the survivors' time to shardopt's error, and to their
process's end after it.

    python -m benchmarks.fault_exit [--timeout 5]

3 gloo ranks on loopback train a small model with shardopt.Adam(timeout=...), the process group's
own timeout 10 minutes. After two steps rank 2 dies (``os._exit``) in backward, between backward and
step(), or before a checkpoint save, or stays alive calling nothing; or rank 0, which hosts the
TCPStore, dies in step(). The survivors catch the error, call ``dist.destroy_process_group()`` and
return, ending as a user's script would. Prints a Markdown table and writes it under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pathlib
import platform
import socket
import tempfile
import time
from datetime import timedelta

import torch

from benchmarks.report import markdown, publish

RESULTS = pathlib.Path(__file__).parent / "results"
FAULTS = {
    "backward": "rank 2 exits in backward",
    "step": "rank 2 exits between backward and step()",
    "save": "rank 2 exits just before a checkpoint save",
    "stuck": "rank 2 alive, calling nothing (stuck)",
    "store host": "rank 0, hosting the TCPStore, exits in step()",
}
GROUP_TIMEOUT = timedelta(minutes=10)


def _rank(rank: int, world_size: int, directory: pathlib.Path, fault: str, port: int, timeout: float) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch.distributed as dist

    import shardopt
    from shardopt import checkpoint

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=rank == 0, timeout=GROUP_TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=GROUP_TIMEOUT)
    victim = rank == (0 if fault == "store host" else world_size - 1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    optimizer = shardopt.Adam(model.parameters(), lr=1e-3, timeout=timeout)
    data = torch.randn(16, 64)
    started, outcome = time.time(), {"error": None}
    try:
        for step in range(4):
            optimizer.zero_grad()
            if victim and step == 2:
                (directory / "fault").write_text(str(time.time()))
            if victim and step == 2 and fault == "stuck":
                time.sleep(GROUP_TIMEOUT.total_seconds())  # until the parent kills it
            loss = model(data + rank).square().mean()
            if victim and step == 2 and fault == "backward":
                loss.register_hook(lambda grad: os._exit(3))
            loss.backward()
            if victim and step == 2 and fault in ("step", "store host"):
                os._exit(3)
            optimizer.step()
            if victim and step == 2 and fault == "save":
                os._exit(3)
            checkpoint.save(directory / "checkpoint", model=model, optimizer=optimizer)
    except RuntimeError as error:
        outcome = {"error": str(error)[:120], "at": time.time()}
    outcome["started"] = started
    (directory / f"rank{rank}.json").write_text(json.dumps(outcome))
    dist.destroy_process_group()


def run(fault: str, timeout: float, world_size: int = 3) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as name, socket.socket() as probe:
        directory = pathlib.Path(name)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        context = mp.get_context("spawn")
        args = (world_size, directory, fault, port, timeout)
        ranks = [context.Process(target=_rank, args=(rank, *args), daemon=True) for rank in range(world_size)]
        for process in ranks:
            process.start()
        victim = 0 if fault == "store host" else world_size - 1
        survivors = [rank for rank in range(world_size) if rank != victim]
        ended = {}
        deadline = time.time() + GROUP_TIMEOUT.total_seconds()
        while len(ended) < len(survivors) and time.time() < deadline:
            for rank in survivors:
                if rank not in ended and not ranks[rank].is_alive():
                    ended[rank] = time.time()
            time.sleep(0.01)
        for process in ranks:
            process.kill()
        fault_at = float((directory / "fault").read_text())
        outcomes = {rank: json.loads((directory / f"rank{rank}.json").read_text()) for rank in survivors}
    errors = [outcomes[rank]["at"] - fault_at for rank in survivors]
    exits = [ended[rank] - outcomes[rank]["at"] for rank in survivors]
    return {
        "fault": FAULTS[fault],
        "error on every survivor": all(outcomes[rank]["error"] for rank in survivors),
        "time to error (s, max)": max(errors),
        "error to process end (s, max)": max(exits),
        "survivors' exit codes": ", ".join(str(ranks[rank].exitcode) for rank in survivors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=5, help="shardopt's timeout, seconds")
    args = parser.parse_args()
    rows = [run(fault, args.timeout) for fault in FAULTS]
    header = (
        f"3 gloo ranks on loopback, shardopt timeout {args.timeout:g} s, process group timeout "
        f"{GROUP_TIMEOUT.total_seconds() / 60:g} min; {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}. Times from the fault (the victim's last act) to each survivor's error, "
        "and from its error to the end of its process."
    )
    publish(markdown(header, rows), RESULTS / "fault_exit.md")


if __name__ == "__main__":
    main()
