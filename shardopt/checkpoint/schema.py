"""The manifest's shape, checked field by field when a checkpoint is loaded: a ``shardopt.json``
edited by hand or damaged is an error naming the file and the field, before anything is read into
the model or the optimizers (rather than a ``KeyError: 'model'``, or a string ``lr`` that loads and
fails in the next ``step()``)."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from typing import Any

from .encoding import TENSOR, TUPLE
from .errors import CheckpointError

Check = Callable[[Any], bool]


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _list_of(check: Check) -> Check:
    return lambda value: isinstance(value, list) and all(check(item) for item in value)


def _string(value: Any) -> bool:
    return isinstance(value, str)


_SHAPE = _list_of(lambda size: _integer(size) and size >= 0)
# [key, shape, dtype] of each entry of the model's state dict.
_MODEL_ENTRY: Check = lambda entry: (  # noqa: E731
    isinstance(entry, list) and len(entry) == 3 and _string(entry[0]) and _SHAPE(entry[1]) and _string(entry[2])
)
_PARAM_FIELDS: dict[str, tuple[Check, str]] = {
    "name": (_string, "a string"),
    "shape": (_SHAPE, "a list of sizes"),
    "dtype": (_string, "a dtype's name"),
    "scalar_state": (_list_of(_string), "a list of state names"),
    "tensor_state": (_list_of(_string), "a list of state names"),
}


class _Fields:
    """Checks the fields of one manifest, raising at the first problem, named by its path in the JSON."""

    def __init__(self, file: pathlib.Path) -> None:
        self.file = file

    def fail(self, field: str, problem: str) -> None:
        raise CheckpointError(
            f"{self.file}: {field} {problem}: the manifest was edited or is corrupt; restore the file, or load "
            "another checkpoint"
        )

    def get(self, mapping: dict[str, Any], key: str, where: str, check: Check, expected: str) -> Any:
        field = f"{where}{key}"
        if key not in mapping:
            self.fail(field, f"is missing (it should be {expected})")
        if not check(mapping[key]):
            self.fail(field, f"is {_shown(mapping[key])}, not {expected}")
        return mapping[key]


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def check(manifest: dict[str, Any], file: pathlib.Path) -> None:
    """Raise CheckpointError naming ``file`` and the field where ``manifest`` (as read from ``file``,
    of any version) does not have the shape save writes."""
    fields = _Fields(file)
    version = fields.get(manifest, "version", "", _integer, "the format's version number")
    fields.get(manifest, "world_size", "", lambda size: _integer(size) and size >= 1, "the saving world's size")
    fields.get(manifest, "model", "", _list_of(_MODEL_ENTRY), "a list of [key, shape, dtype] of the model's state")
    fields.get(manifest, "extra", "", lambda _: True, "the extra= of the save")
    if version == 1:
        _record(fields, manifest, "")
        return
    records = fields.get(
        manifest, "optimizers", "", lambda value: isinstance(value, list) and value != [], "a list of records"
    )
    for position, record in enumerate(records):
        where = f"optimizers[{position}]"
        if not isinstance(record, dict):
            fields.fail(where, f"is {_shown(record)}, not an optimizer's record")
        _record(fields, record, f"{where}.")


def _record(fields: _Fields, record: dict[str, Any], where: str) -> None:
    fields.get(record, "optimizer", where, _string, "the name of a torch.optim algorithm")
    fields.get(record, "scheduler", where, lambda value: value is None or isinstance(value, dict), "a dict or null")
    for number, param in enumerate(fields.get(record, "params", where, _list_of(_is_dict), "a list of records")):
        for key, (check_field, expected) in _PARAM_FIELDS.items():
            fields.get(param, key, f"{where}params[{number}].", check_field, expected)
    groups = fields.get(record, "param_groups", where, _list_of(_is_dict), "a list of param groups")
    for g, group in enumerate(groups):
        fields.get(group, "params", f"{where}param_groups[{g}].", _list_of(_integer), "a list of parameter numbers")


def _is_dict(value: Any) -> bool:
    return isinstance(value, dict)


def check_hyper_parameters(
    saved: list[dict[str, Any]], current: list[dict[str, Any]], file: pathlib.Path, where: str
) -> None:
    """Every saved hyper-parameter has the kind of the optimizer's own (a number where it has a number,
    a bool where a bool, a tuple of as many where a tuple), which load would otherwise install as it is."""
    fields = _Fields(file)
    for g, (saved_group, group) in enumerate(zip(saved, current)):
        for key, value in group.items():
            if key != "params" and key in saved_group and not _same_kind(saved_group[key], value):
                fields.fail(
                    f"{where}param_groups[{g}].{key}",
                    f"is {_shown(saved_group[key])}, but the optimizer's {key} is {_kind(value)}",
                )


def _same_kind(saved: Any, value: Any) -> bool:
    """Whether the encoded ``saved`` can stand for ``value``."""
    if value is None or (isinstance(saved, dict) and TENSOR in saved):
        return True
    if isinstance(value, bool):
        return isinstance(saved, bool)
    if isinstance(value, (int, float)) or hasattr(value, "dim"):  # numbers, and tensors (a tensor lr)
        return isinstance(saved, (int, float)) and not isinstance(saved, bool)
    if isinstance(value, (tuple, list)):
        items = saved.get(TUPLE) if isinstance(saved, dict) else saved
        return isinstance(items, list) and len(items) == len(value) and all(map(_same_kind, items, value))
    if isinstance(value, str):
        return isinstance(saved, str)
    return True  # anything else a param group may hold is the optimizer's own business


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, (int, float)) or hasattr(value, "dim"):
        return "a number"
    if isinstance(value, (tuple, list)):
        return f"a sequence of {len(value)}"
    return f"a {type(value).__name__}"
