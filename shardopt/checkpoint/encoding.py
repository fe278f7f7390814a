"""Hyper-parameters, scheduler state and ``extra`` as JSON, with their tensors kept apart.

Loading must never unpickle, so whatever is not a tensor chunk goes into our JSON
manifest. JSON lacks tuples (``betas``), non-string keys and tensors (a tensor ``lr``):
tuples and such dicts are tagged, and each tensor is replaced by a reference to a DCP
entry that holds it. Anything else (a function, an arbitrary object) is refused when
saving, naming where it sits.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import CheckpointError

TUPLE, PAIRS, TENSOR = "__tuple__", "__pairs__", "__tensor__"
TENSOR_PREFIX = "shardopt.tensor."


@dataclass(frozen=True)
class Stored:
    """A tensor the checkpoint holds under its own DCP ``key`` (written in pieces by the ranks that hold
    them), which an encoded value refers to rather than holding it."""

    key: str
    device: str


class Encoder:
    """Turns values into JSON, collecting the tensors they hold as ``{dcp key: tensor}``."""

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}

    def encode(self, value: Any, where: str) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real):
            return float(value)
        if isinstance(value, Stored):
            return {TENSOR: value.key, "device": value.device}
        if isinstance(value, Tensor):
            key = f"{TENSOR_PREFIX}{len(self.tensors)}"
            self.tensors[key] = value.detach()
            return {TENSOR: key, "device": str(value.device)}
        if isinstance(value, tuple):
            return {TUPLE: [self.encode(item, f"{where}[{i}]") for i, item in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
        if isinstance(value, Mapping):
            if all(isinstance(key, str) and not key.startswith("__") for key in value):
                return {key: self.encode(item, f"{where}[{key!r}]") for key, item in value.items()}
            return {
                PAIRS: [
                    [self.encode(key, f"a key of {where}"), self.encode(item, f"{where}[{key!r}]")]
                    for key, item in value.items()
                ]
            }
        raise CheckpointError(
            f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which a checkpoint cannot hold: "
            "it keeps tensors, numbers, strings, bools, None, and lists, tuples and dicts of them"
        )


def tensor_keys(value: Any) -> list[str]:
    """The DCP keys of the tensors an encoded value refers to."""
    if isinstance(value, list):
        return [key for item in value for key in tensor_keys(item)]
    if isinstance(value, dict):
        if TENSOR in value:
            return [value[TENSOR]]
        return [key for item in value.values() for key in tensor_keys(item)]
    return []


def decode(value: Any, tensor: Callable[[str, str], Tensor]) -> Any:
    """The value :meth:`Encoder.encode` encoded; ``tensor(key, device)`` gives each tensor back."""
    if isinstance(value, list):
        return [decode(item, tensor) for item in value]
    if not isinstance(value, dict):
        return value
    if TENSOR in value:
        return tensor(value[TENSOR], value["device"])
    if TUPLE in value:
        return tuple(decode(item, tensor) for item in value[TUPLE])
    if PAIRS in value:
        return {decode(key, tensor): decode(item, tensor) for key, item in value[PAIRS]}
    return {key: decode(item, tensor) for key, item in value.items()}


def restore_device(tensor: Tensor, device: str) -> Tensor:
    """``tensor`` (read on the CPU) on the CUDA device it was saved from, where this process has CUDA."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return tensor.to(device)
    return tensor
