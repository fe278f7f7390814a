"""The order a parameter's elements lie in memory, and its span of a flat buffer in that order.

A flat buffer holds each parameter's elements (its gradient's, its state's) in the order of the
parameter's own memory, as found when the optimizer took it: row-major for a contiguous tensor,
N, H, W, C for a channels_last weight. So a gradient autograd made in the parameter's layout is
copied into a span, or read from it, without a permute, and state handed back in torch.optim's
format has the parameter's memory format, as torch.optim's ``zeros_like(p)`` gives it.
"""

from __future__ import annotations

from torch import Tensor

#: Dims from outermost to innermost in memory; None where that is the tensor's own dim order.
Order = tuple[int, ...] | None


def memory_order(tensor: Tensor) -> Order:
    """The dims of ``tensor`` from outermost to innermost in memory: None for a contiguous tensor, or
    for one whose strides do not describe a dense block of its numel elements (taken in dim order)."""
    if tensor.is_contiguous():
        return None
    shape, strides = tensor.shape, tensor.stride()
    order = sorted(range(tensor.dim()), key=lambda dim: (-strides[dim], dim))
    expected = 1
    for dim in reversed(order):
        if shape[dim] != 1 and strides[dim] != expected:
            return None
        expected *= shape[dim]
    return tuple(order)


def shaped(span: Tensor, shape: tuple[int, ...], order: Order) -> Tensor:
    """A view of the 1-D ``span`` as a tensor of ``shape`` whose elements lie in memory ``order``."""
    if order is None:
        return span.view(shape)
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return span.view([shape[dim] for dim in order]).permute(inverse)


def flattened(tensor: Tensor, order: Order) -> Tensor:
    """``tensor``'s elements as one dimension, in memory ``order``: a view where its memory already
    lies in that order (a gradient in its parameter's layout), else a copy."""
    if order is None:
        return tensor.reshape(-1)
    return tensor.permute(order).reshape(-1)
