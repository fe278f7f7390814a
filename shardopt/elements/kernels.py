"""How an algorithm's update runs; ``shardopt/algorithms/`` says what it is.

Three interchangeable paths, with torch.optim's results (to rounding) on each:

- native: torch's own fused kernel (``torch._fused_adam_`` and friends), one call over
  every slice that shares its scalar state (usually every buffer's whole shard), where
  the algorithm has one (Adam, AdamW, SGD, Adagrad) and the device and dtype take it;
- compiled: ``torch.compile`` of the algorithm's ``elementwise`` (C++/OpenMP on CPU,
  Triton on CUDA) over a batch of slices in one call: one graph per algorithm, device,
  dtype, combination of its static flags and batch size (8, 4, 2 or 1 slices), with
  dynamic shapes and every float coefficient a tensor input, so neither new slice lengths
  nor a new ``lr`` or step recompiles it; Inductor's on-disk cache serves later processes;
- eager: ``Algorithm.update``, the reference the others are tested against.
"""

from __future__ import annotations

import functools
import os
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor

from ..algorithms import Algorithm, Group, Slices
from ..algorithms.base import Coefficients

#: Below this many elements in all, ``fused=None`` does not compile: the first compile takes
#: seconds and the eager update of a few small slices is already short.
COMPILE_THRESHOLD = 2**20

#: The most slices one compiled call updates. Each call has a fixed cost before any element
#: moves, and a kernel runs slower per element in more, shorter calls, so slices are batched
#: (benchmarks/results/design_measurements.md). A batch of k slices is a graph of its own, so a
#: call takes the largest of 8, 4, 2 and 1 that fits: at most four graphs per algorithm and flags.
BATCH = 8

#: ``SHARDOPT_COMPILE=0`` turns the compiled path off (the eager update runs instead).
COMPILE_ENV = "SHARDOPT_COMPILE"

# The coefficients travel as float64, the Python float the eager update passes, so each
# op rounds it to its own computation type as eager does: float32 for float32, bfloat16
# and float16 parameters (a bfloat16 coefficient would keep 3 digits of lr), float64 for
# float64 ones.
COEFFICIENT_DTYPE = torch.float64


def update(
    algorithm: Algorithm, slices: Slices, scalars: dict[str, Tensor], group: Group, fresh: bool, fused: bool | None
) -> None:
    """``algorithm.update`` of slices that share ``scalars`` (advanced once, for all of them),
    all on one device and of one dtype, run by the path ``fused`` asks for.

    ``fused=False``: eager. ``fused=True``: the native kernel where there is one (one call
    for every slice, as torch's fused optimizers make one call per step), else compiled,
    else (compiling disabled or failed) eager with one warning per reason. ``fused=None``:
    the native kernel where there is one, compiled where the slices hold at least
    :data:`COMPILE_THRESHOLD` elements in all, else eager.
    """
    coefficients = algorithm.coefficients(scalars, group, fresh)
    if fused is not False and run_native(algorithm, slices, scalars, group, fresh):
        return
    eager = list(slices)
    # Sizes 0 and 1 would each get a graph of their own (torch specialises them).
    compilable = [piece for piece in eager if piece[0].numel() > 1] if fused is not False else []
    if compilable and (fused or sum(piece[0].numel() for piece in compilable) >= COMPILE_THRESHOLD):
        if os.environ.get(COMPILE_ENV) == "0":
            if fused:
                _warn_once(f"fused=True, but {_name(algorithm)} has no native fused kernel and {COMPILE_ENV}=0")
        else:
            eager = [piece for piece in eager if piece[0].numel() <= 1]
            for batch in batches(compilable):
                if not run_compiled(algorithm, Slices(*(list(column) for column in zip(*batch))), coefficients, group):
                    eager += batch
    for param, grad, state in eager:
        algorithm.elementwise(param, grad, state, coefficients, group)


def batches(items: list[Any]) -> list[list[Any]]:
    """``items`` in runs of :data:`BATCH`, the rest in runs of the powers of two below it, largest first."""
    runs, start, size = [], 0, BATCH
    while start < len(items):
        while size > len(items) - start:
            size //= 2
        runs.append(items[start : start + size])
        start += size
    return runs


# ------------------------------------------------------------------ native


# (algorithm, device, dtype) -> whether torch's fused kernel runs there; found on first use.
_native_works: dict[tuple[Algorithm, torch.device, torch.dtype], bool] = {}


def run_native(algorithm: Algorithm, slices: Slices, scalars: dict[str, Tensor], group: Group, fresh: bool) -> bool:
    """Run torch's fused kernel over every slice, ``scalars`` already advanced; False where it
    has none that runs here."""
    first = slices.params[0]
    key = (algorithm, first.device, first.dtype)
    works = _native_works.get(key)
    if works:
        algorithm.native_fused(slices, scalars, group, fresh)
        return True
    if works is False or algorithm.native_fused is None or not first.is_floating_point():
        _native_works[key] = False
        return False
    # The kernels check their device and dtype before writing anything, so a refusal
    # leaves the slices as they were for the next path.
    try:
        algorithm.native_fused(slices, scalars, group, fresh)
    except (NotImplementedError, RuntimeError) as error:
        _native_works[key] = False
        _warn_once(f"torch's fused {_name(algorithm)} kernel does not run on {key[1]} {key[2]}: {_first_line(error)}")
        return False
    _native_works[key] = True
    return True


# ------------------------------------------------------------------ compiled


@dataclass(frozen=True)
class _Graph:
    """One compiled ``elementwise`` over a batch of slices and the constants it was compiled for."""

    function: Callable[..., None]
    tensor_names: tuple[str, ...]  # coefficients passed as the 0-d tensors of one input vector
    static: dict[str, bool]  # bool coefficients: the graph's branches
    flags: dict[str, Any]  # the group's static keywords, all elementwise may read

    def __call__(self, algorithm: Algorithm, slices: Slices, values: Tensor) -> None:
        # Without duck sizing, slices that happen to have equal lengths get no guard saying so,
        # which another step's lengths would fail (a recompile).
        with fx_config.patch(use_duck_shape=False):
            columns = (slices.params, slices.grads, slices.states)
            self.function(algorithm, *columns, values, self.tensor_names, self.static, self.flags)


# (algorithm, device, dtype, flag values, coefficient layout, slices) -> its graph, or None where compiling failed.
_graphs: dict[tuple[Any, ...], _Graph | None] = {}


def run_compiled(algorithm: Algorithm, slices: Slices, coefficients: Coefficients, group: Group) -> bool:
    """Run the compiled ``elementwise`` over ``slices`` (at most :data:`BATCH`, on one device, of
    one dtype) with these coefficients, in one call; False where compiling failed."""
    first = slices.params[0]
    flags = tuple(group[name] for name in algorithm.flags)
    layout = tuple((name, value if isinstance(value, bool) else None) for name, value in coefficients.items())
    key = (algorithm, first.device, first.dtype, flags, layout, len(slices.params))
    try:
        graph = _graphs[key]
    except KeyError:
        graph = _graphs[key] = _Graph(
            function=_compile(),
            tensor_names=tuple(name for name, static in layout if static is None),
            static={name: static for name, static in layout if static is not None},
            flags=dict(zip(algorithm.flags, flags)),
        )
    if graph is None:
        return False
    values = torch.tensor(
        [float(coefficients[name]) for name in graph.tensor_names], dtype=COEFFICIENT_DTYPE, device=first.device
    )
    # Compiling happens inside the call, before the graph writes anything; so does a
    # recompile, were a guard ever to fail.
    try:
        graph(algorithm, slices, values)
    except Exception as error:
        _graphs[key] = None
        _warn_once(f"compiling {_name(algorithm)}'s update failed: {_first_line(error)}")
        return False
    return True


def _elementwise(
    algorithm: Algorithm,
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    values: Tensor,
    tensor_names: tuple[str, ...],
    static: dict[str, bool],
    flags: dict[str, Any],
) -> None:
    coefficients: Coefficients = dict(static)
    for index, name in enumerate(tensor_names):
        coefficients[name] = values[index]
    for param, grad, state in zip(params, grads, states):
        algorithm.elementwise(param, grad, state, coefficients, flags)


def _compile() -> Callable[..., None]:
    # torch.compile caches graphs on the code object, at most a few per object before it
    # gives up and runs eagerly, and checks each call against every graph it holds. A
    # copy of the code per graph keeps each one alone, its check a single guard set.
    code = _elementwise.__code__.replace()
    function = types.FunctionType(code, _elementwise.__globals__, _elementwise.__name__)
    # On CPU, Inductor sizes a kernel's OpenMP parallelism from the slice length it was
    # first compiled for, and its on-disk cache hands that kernel to every later length:
    # compiled for a small slice, it would update a large one on a single thread.
    # dynamic_threads leaves the choice to OpenMP at run time.
    return torch.compile(function, dynamic=True, fullgraph=True, options={"cpp.dynamic_threads": True})


# ------------------------------------------------------------------ warnings


def _name(algorithm: Algorithm) -> str:
    return algorithm.torch_class.__name__


def _first_line(error: BaseException) -> str:
    # torch.compile wraps what its backend raised; that is the reason worth a line.
    error = getattr(error, "inner_exception", None) or error
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(f"shardopt: {reason}; the update runs eagerly instead", stacklevel=4)
