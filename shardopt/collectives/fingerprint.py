"""Desync detection: every rank must build and drive the optimizer alike; check that cheaply.

Ranks that pass different parameters (a shape, a dtype, one parameter more), different
hyper-parameters or another algorithm would otherwise pack different layouts and exchange
the wrong bytes, or hang in a collective that some rank never issues. A fingerprint is a
list of (what, 63-bit hash) items; two all-reduces (MAX of the item count and its negation,
then MAX of every hash and its negation) tell every rank, alike, whether all ranks hold the
same list and which item differs first, so every rank raises the same error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .pending import Link

Item = tuple[str, int]


class DesyncError(RuntimeError):
    """Ranks disagree about something they must share (raised on every rank alike)."""


def stable_hash(value: Any) -> int:
    """A hash that is the same in every process (Python's own ``hash`` of a str is salted per process)."""
    digest = hashlib.blake2b(repr(value).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: its negation fits an int64


def _plain(value: Any) -> Any:
    """``value`` with tensors as their values, so that equal hyper-parameters hash alike on every rank."""
    if isinstance(value, Tensor):
        return ("tensor", value.tolist(), str(value.dtype))
    if isinstance(value, (list, tuple)):
        return type(value).__name__, [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return sorted((str(k), _plain(v)) for k, v in value.items())
    return value


def group_items(group: Mapping[str, Any], g: int, describe: Any) -> list[Item]:
    """A param group's hyper-parameters, and each parameter's shape, dtype and whether it trains."""
    hyper = _hyper(group)
    items = [(f"the hyper-parameters of param group {g} ({_short(hyper)})", stable_hash(_plain(hyper)))]
    for i, param in enumerate(group["params"]):
        what = (tuple(param.shape), str(param.dtype), bool(param.requires_grad))
        items.append((f"{describe(group, g, i)} (shape {what[0]}, {what[1]})", stable_hash(what)))
    return items


def loaded_items(groups: list[dict[str, Any]], states: Mapping[Tensor, Mapping[str, Any]], describe: Any) -> list[Item]:
    """What a load installs that every rank must install alike: the groups' hyper-parameters and
    parameters, and every parameter's scalar state (step counts)."""
    scalars = [
        tuple(float(v) for v in states[param].values() if isinstance(v, (int, float)) or _is_scalar_tensor(v))
        if param in states
        else None
        for group in groups
        for param in group["params"]
    ]
    items = [("the loaded scalar state (step counts)", stable_hash(scalars))]
    for g, group in enumerate(groups):
        items += group_items(group, g, describe)
    return items


def _is_scalar_tensor(value: Any) -> bool:
    return isinstance(value, Tensor) and value.ndim == 0


def _short(hyper: Mapping[str, Any]) -> str:
    text = ", ".join(f"{key}={_plain(value)!r}" for key, value in hyper.items())
    return text if len(text) <= 200 else text[:197] + "..."


def check(comm: Link, items: Iterable[Item], context: str) -> None:
    """Collective: raise DesyncError on every rank unless every rank passed the same items.

    Before: each rank holds its own list. After: all ranks know whether the lists are equal,
    and, if not, the first item that differs (or that the lists differ in length).
    """
    items = list(items)
    if comm.world_size == 1:
        return
    count = torch.tensor([len(items), -len(items)], dtype=torch.int64, device=comm.device)
    comm.all_reduce_(count, f"the agreement on {context}", op=dist.ReduceOp.MAX).wait()
    most, fewest = int(count[0]), -int(count[1])
    if most != fewest:
        raise DesyncError(
            f"ranks disagree at {context}: they hold between {fewest} and {most} items to agree on (param "
            f"groups and parameters); this rank has {len(items)}. Build the model and the optimizer identically "
            "on every rank"
        )
    hashes = torch.tensor([h for _, h in items], dtype=torch.int64, device=comm.device)
    both = torch.cat([hashes, -hashes])
    comm.all_reduce_(both, f"the agreement on {context}", op=dist.ReduceOp.MAX).wait()
    differ = (both[: len(items)] != -both[len(items) :]).nonzero()
    if differ.numel():
        what = items[int(differ[0])][0]
        raise DesyncError(
            f"ranks disagree at {context}: {what} differs between ranks (this rank's value is shown). Every rank "
            "must pass the same parameters, hyper-parameters and algorithm, in the same order"
        )


# Bits of each group's hyper-parameter hash in the step's agreement: squares of such hashes summed over
# a few thousand ranks stay exact in float64.
HYPER_BITS = 20


def hyper_entries(param_groups: list[Mapping[str, Any]]) -> list[float]:
    """Per group, a short hash of its hyper-parameters and its square: summed over the ranks by the
    step's agreement all-reduce, they tell every rank alike whether all ranks hold the same values
    (the sum of squares is N times the mean square exactly when every hash is the mean)."""
    hashes = [float(stable_hash(_plain(_hyper(group))) % 2**HYPER_BITS) for group in param_groups]
    return hashes + [h * h for h in hashes]


def check_hyper(param_groups: list[Mapping[str, Any]], agreed: list[float], world_size: int, steps: int) -> None:
    """DesyncError, on every rank alike, for the first group whose hyper-parameters differ between the
    ranks; ``agreed`` is :func:`hyper_entries` summed over the ranks."""
    n = len(param_groups)
    for g in range(n):
        total, squares = agreed[g], agreed[n + g]
        if squares * world_size != total * total:
            raise DesyncError(
                f"ranks disagree on the hyper-parameters of param group {g} at step() call {steps}: this rank "
                f"has {_short(_hyper(param_groups[g]))}; every rank must step with the same values (a scheduler "
                "driven by each rank's own metric, such as ReduceLROnPlateau, needs the metric averaged over "
                "the ranks first)"
            )


def _hyper(group: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in group.items() if key not in ("params", "param_names")}
