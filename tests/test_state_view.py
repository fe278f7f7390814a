"""Reading a sharded optimizer's state the torch.optim way, and copying it.

``opt.state[p]`` is empty (each rank keeps a part of the state, elsewhere): a missing entry raises a
``KeyError`` naming ``opt.param_state(p)``, which gathers that parameter's state on every rank, in
torch's names and shapes, equal to torch.optim's fed the mean gradient (fp32 parity bounds: only the
order the ranks' gradients are summed in differs). ``copy.deepcopy``, ``copy.copy`` and ``pickle``
raise a ``TypeError`` naming ``state_dict()`` and checkpoints at once, instead of a copy that fails
at its first step.
"""

from __future__ import annotations

import copy
import pickle
from typing import Any

import torch

import shardopt
from tests.common import loss_of, make_model, reference_run
from tests.world import run_world

WORLD, STEPS = 2, 3
ALGORITHMS = {"AdamW": {"lr": 1e-2}, "Adafactor": {"lr": 1e-2}}


def read_state() -> dict[str, Any]:
    import torch.distributed as dist

    rank, found = dist.get_rank(), {}
    for algorithm, kwargs in ALGORITHMS.items():
        model = make_model()
        optimizer = shardopt.ShardedOptimizer(model.parameters(), algorithm, **kwargs)
        for step in range(STEPS):
            optimizer.zero_grad()
            loss_of(model, rank, step).backward()
            optimizer.step()
        try:
            optimizer.state[next(model.parameters())]
            missing = "no error"
        except KeyError as error:
            missing = str(error)
        copies = {}
        for copier in (copy.deepcopy, copy.copy, pickle.dumps):
            try:
                copier(optimizer)
                copies[copier.__name__] = "no error"
            except TypeError as error:
                copies[copier.__name__] = str(error)
        states = [optimizer.param_state(param) for param in model.parameters()]
        found[algorithm] = {"missing": missing, "copies": copies, "states": states}
    return found


def test_param_state_is_torchs_state_and_opt_state_and_copies_say_what_to_use() -> None:
    for rank, found in enumerate(run_world(read_state, WORLD)):
        for algorithm, kwargs in ALGORITHMS.items():
            label = f"{algorithm} rank {rank}"
            mine = found[algorithm]
            assert "opt.param_state(param)" in mine["missing"], label
            for copier, message in mine["copies"].items():
                assert "cannot be copied or pickled" in message and "state_dict()" in message, (label, copier)
            _, reference = reference_run(getattr(torch.optim, algorithm), kwargs, WORLD, STEPS)
            for index, state in enumerate(mine["states"]):
                expected = reference["state"][index]
                assert sorted(state) == sorted(expected), (label, index)
                for name, value in expected.items():
                    torch.testing.assert_close(state[name], value, msg=f"{label} parameter {index}: {name}")


def sparse_and_lbfgs_state() -> dict[str, Any]:
    """SparseAdam and LBFGS after a step: what ``opt.state[p]`` raised, and ``param_state(p)``'s names.
    (They once kept this rank's rows or slices in ``opt.state``: a part, read silently as the whole.)"""
    import torch.distributed as dist

    rank, found = dist.get_rank(), {}
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    sparse = shardopt.SparseRowOptimizer(embedding.parameters(), "sparseadam", lr=1e-2)
    embedding(torch.tensor([rank, 3])).sum().backward()
    sparse.step()
    model = make_model()
    lbfgs = shardopt.ShardedLBFGS(model.parameters(), lr=0.1)
    lbfgs.step(lambda: loss_of(model, rank, 0).backward() or loss_of(model, rank, 0))
    first = lbfgs.param_groups[0]["params"][0]  # LBFGS keeps its state under the first parameter, as torch does
    for name, optimizer, param in (("SparseAdam", sparse, embedding.weight), ("LBFGS", lbfgs, first)):
        try:
            optimizer.state[param]
            found[name] = "no error"
        except KeyError as error:
            found[name] = str(error)
        found[f"{name} names"] = sorted(optimizer.param_state(param))
    return found


def test_sparse_adam_and_lbfgs_keep_opt_state_empty_too() -> None:
    for found in run_world(sparse_and_lbfgs_state, WORLD):
        for name in ("SparseAdam", "LBFGS"):
            assert "opt.param_state(param)" in found[name], found[name]
        assert found["SparseAdam names"] == ["exp_avg", "exp_avg_sq", "step"]
        assert "d" in found["LBFGS names"] and "old_dirs" in found["LBFGS names"], found["LBFGS names"]
