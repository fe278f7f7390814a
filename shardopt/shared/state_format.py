"""torch.optim's consolidated ``state_dict`` format, for every scheme.

torch.optim numbers parameters across groups in order and keys their state by that
number; each entry holds 0-d scalar tensors (``step``, ...) and tensors of the
parameter's shape. Each scheme gathers its state into entries of that shape and cuts
its shard back out of them, so a dict from any world size (or from plain torch.optim)
loads at any other.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import Tensor

StateEntry = dict[str, Any]

#: The key of a state dict's fp32 master weights (``master_weights``), next to "state" and
#: "param_groups": torch.optim ignores it, shardopt restores the weights from it exactly.
MASTER_KEY = "master_params"


def pack(
    param_groups: list[dict[str, Any]],
    states: Mapping[Tensor, StateEntry],
    masters: Mapping[Tensor, Tensor] | None = None,
) -> dict[str, Any]:
    """torch.optim's format: parameters numbered across groups in order (and master weights, if any)."""
    packed_groups, packed_state, packed_masters = [], {}, {}
    masters = masters or {}
    index = 0
    for group in param_groups:
        packed = {key: value for key, value in group.items() if key != "params"}
        packed["params"] = list(range(index, index + len(group["params"])))
        for number, param in zip(packed["params"], group["params"]):
            if param in states:
                packed_state[number] = states[param]
            if param in masters:
                packed_masters[number] = masters[param]
        index += len(group["params"])
        packed_groups.append(packed)
    packed_dict = {"state": packed_state, "param_groups": packed_groups}
    if packed_masters:
        packed_dict[MASTER_KEY] = packed_masters
    return packed_dict


def unpack(
    state_dict: Mapping[str, Any], param_groups: list[dict[str, Any]], defaults: Mapping[str, Any]
) -> tuple[list[dict[str, Any]], dict[Tensor, StateEntry], dict[Tensor, Any]]:
    """The new param groups, the per-parameter state and master weights a torch.optim-format dict holds.

    The groups keep this optimizer's parameters and take the saved hyper-parameters,
    as torch.optim's load_state_dict does; keys an older dict lacks take the defaults.
    """
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= state_dict.keys():
        raise ValueError(
            "load_state_dict expects a dict with 'state' and 'param_groups' (what state_dict() returns), "
            f"got {type(state_dict).__name__}"
            + (f" with keys {sorted(state_dict)}" if isinstance(state_dict, Mapping) else "")
        )
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(
            f"loaded state dict has {len(saved_groups)} parameter groups but the optimizer has "
            f"{len(param_groups)}: it belongs to a different model or optimizer setup"
        )
    new_groups, states, masters = [], {}, {}
    saved_state = state_dict["state"]
    saved_masters = state_dict.get(MASTER_KEY) or {}
    for g, (group, saved) in enumerate(zip(param_groups, saved_groups)):
        if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), (list, tuple)):
            raise ValueError(
                f"loaded state dict's parameter group {g} has no 'params' list (got {type(saved).__name__}"
                f"{' with keys ' + str(sorted(saved)) if isinstance(saved, Mapping) else ''}): load what "
                "state_dict() returns"
            )
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"loaded state dict's parameter group {g} has {len(saved['params'])} parameters but the "
                f"optimizer's has {len(group['params'])}: it belongs to a different model"
            )
        new_group = copy.deepcopy({key: value for key, value in saved.items() if key != "params"})
        for key, value in defaults.items():
            new_group.setdefault(key, value)
        new_group["params"] = group["params"]
        if "param_names" in group and "param_names" not in saved:
            new_group["param_names"] = group["param_names"]
        for number, param in zip(saved["params"], group["params"]):
            if saved_state.get(number):
                states[param] = saved_state[number]
            if number in saved_masters:
                masters[param] = saved_masters[number]
        new_groups.append(new_group)
    return new_groups, states, masters
