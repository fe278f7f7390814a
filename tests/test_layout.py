"""The layout arithmetic (parameters -> flat buffers -> shards) on its own, in one process."""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardopt.collectives.span import Span
from shardopt.elements.buffer import ShardedBuffer
from shardopt.elements.layout import BufferLayout, ParamSpec, Piece, plan_buffers, runs

F32 = ("cpu", torch.float32)
F64 = ("cpu", torch.float64)
BIG_CAP = 1 << 40


# ------------------------------------------------------------------ helpers


def _specs(shapes: Sequence[tuple[int, ...]], itemsize: int = 4, key: Hashable = F32) -> list[ParamSpec]:
    return [ParamSpec(i, shape, itemsize, key) for i, shape in enumerate(shapes)]


def _alignment(align_bytes: int, itemsize: int) -> int:
    return max(1, align_bytes // itemsize)


def _piece(slot: int, start: int, end: int) -> Piece:
    """A world-of-one piece of slot ``slot`` at [start, end): the shard is the whole buffer."""
    span = Span(start, end)
    return Piece(slot=slot, in_buffer=span, in_shard=span, in_param=Span(0, end - start))


# ------------------------------------------------------------------ Span


def test_span_size_and_slice() -> None:
    span = Span(3, 8)
    assert span.size == 5
    assert span.slice == slice(3, 8)
    assert list(range(10))[span.slice] == [3, 4, 5, 6, 7]
    assert Span(4, 4).size == 0


def test_span_intersect_overlap() -> None:
    assert Span(0, 10).intersect(Span(5, 15)) == Span(5, 10)
    assert Span(5, 15).intersect(Span(0, 10)) == Span(5, 10)
    assert Span(0, 10).intersect(Span(2, 4)) == Span(2, 4)
    assert Span(2, 4).intersect(Span(0, 10)) == Span(2, 4)
    assert Span(1, 6).intersect(Span(1, 6)) == Span(1, 6)


def test_span_intersect_touching_and_disjoint() -> None:
    assert Span(0, 5).intersect(Span(5, 10)) is None
    assert Span(5, 10).intersect(Span(0, 5)) is None
    assert Span(0, 3).intersect(Span(7, 9)) is None
    assert Span(7, 9).intersect(Span(0, 3)) is None
    # An empty span shares no element with anything, even inside another span.
    assert Span(4, 4).intersect(Span(0, 10)) is None


def test_span_shift() -> None:
    assert Span(3, 8).shift(4) == Span(7, 12)
    assert Span(3, 8).shift(-3) == Span(0, 5)
    assert Span(3, 8).shift(0) == Span(3, 8)
    with pytest.raises(ValueError):
        Span(3, 8).shift(-4)


@pytest.mark.parametrize(("start", "end"), [(5, 4), (-1, 3), (-3, -1), (1, 0)])
def test_span_invalid_raises(start: int, end: int) -> None:
    with pytest.raises(ValueError, match="invalid span"):
        Span(start, end)


# ------------------------------------------------------------------ plan_buffers


def test_plan_keeps_parameter_order() -> None:
    shapes = [(3, 2), (5,), (1,), (2, 2, 2), (7,)]
    (layout,) = plan_buffers(_specs(shapes), 1, bucket_cap_bytes=BIG_CAP)
    assert [slot.index for slot in layout.slots] == [0, 1, 2, 3, 4]
    assert [slot.shape for slot in layout.slots] == shapes
    starts = [slot.span.start for slot in layout.slots]
    assert starts == sorted(starts)


def test_plan_exact_offsets() -> None:
    # float32 with 16-byte alignment: every parameter starts at a multiple of 4 elements.
    (layout,) = plan_buffers(_specs([(3,), (5,), (4,), (1,)]), 2, bucket_cap_bytes=BIG_CAP, align_bytes=16)
    assert [slot.span for slot in layout.slots] == [Span(0, 3), Span(4, 9), Span(12, 16), Span(16, 17)]
    assert layout.numel == 24  # 17 rounded up to world_size * alignment = 8
    assert layout.shard_numel == 12


def test_plan_different_keys_different_buffers() -> None:
    specs = [
        ParamSpec(0, (3,), 4, F32),
        ParamSpec(1, (2,), 8, F64),
        ParamSpec(2, (4,), 4, F32),
        ParamSpec(3, (5,), 8, F64),
    ]
    layouts = plan_buffers(specs, 2, bucket_cap_bytes=BIG_CAP)
    assert [layout.key for layout in layouts] == [F32, F64]
    assert [[slot.index for slot in layout.slots] for layout in layouts] == [[0, 2], [1, 3]]
    # Each key's buffer is laid out on its own: the float64 buffer starts at 0, aligned to 2 elements.
    assert [slot.span for slot in layouts[1].slots] == [Span(0, 2), Span(2, 7)]


def test_plan_buffers_ordered_by_first_parameter() -> None:
    specs = [
        ParamSpec(0, (3,), 8, F64),
        ParamSpec(1, (3,), 4, F32),
        ParamSpec(2, (3,), 8, F64),
    ]
    layouts = plan_buffers(specs, 1, bucket_cap_bytes=BIG_CAP)
    assert [layout.key for layout in layouts] == [F64, F32]
    # With a cap that closes every float64 buffer, the still-open float32 one sorts between them.
    layouts = plan_buffers(specs, 1, bucket_cap_bytes=24)
    assert [layout.key for layout in layouts] == [F64, F32, F64]
    assert [layout.slots[0].index for layout in layouts] == [0, 1, 2]


def test_plan_bucket_cap_closes_buffer() -> None:
    # float32, alignment 1 element: a cap of 40 bytes holds 10 elements.
    specs = _specs([(4,), (6,), (1,), (5,), (5,)])
    layouts = plan_buffers(specs, 1, bucket_cap_bytes=40, align_bytes=4)
    assert [[slot.index for slot in layout.slots] for layout in layouts] == [[0, 1], [2, 3], [4]]
    assert [[slot.span for slot in layout.slots] for layout in layouts] == [
        [Span(0, 4), Span(4, 10)],
        [Span(0, 1), Span(1, 6)],
        [Span(0, 5)],
    ]


def test_plan_bucket_cap_counts_alignment_padding() -> None:
    # 3 elements, padded to 4, then 5: 9 elements = 36 bytes > 32, though 3 + 5 = 8 would fit.
    layouts = plan_buffers(_specs([(3,), (5,)]), 1, bucket_cap_bytes=32, align_bytes=16)
    assert [[slot.index for slot in layout.slots] for layout in layouts] == [[0], [1]]


def test_plan_parameter_larger_than_cap_gets_own_buffer() -> None:
    specs = _specs([(2,), (100,), (2,), (2,)])
    layouts = plan_buffers(specs, 1, bucket_cap_bytes=32, align_bytes=4)
    assert [[slot.index for slot in layout.slots] for layout in layouts] == [[0], [1], [2, 3]]
    # Even as the first parameter of the group.
    layouts = plan_buffers(_specs([(100,), (2,)]), 1, bucket_cap_bytes=32, align_bytes=4)
    assert [[slot.index for slot in layout.slots] for layout in layouts] == [[0], [1]]
    assert layouts[0].numel == 100


@pytest.mark.parametrize(("itemsize", "align_bytes", "alignment"), [(2, 16, 8), (4, 16, 4), (8, 16, 2), (8, 4, 1)])
@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_plan_alignment_and_padding(itemsize: int, align_bytes: int, alignment: int, world_size: int) -> None:
    shapes = [(1,), (3, 3), (0,), (7,), (2, 5), (13,)]
    (layout,) = plan_buffers(_specs(shapes, itemsize), world_size, bucket_cap_bytes=BIG_CAP, align_bytes=align_bytes)
    for slot in layout.slots:
        assert slot.span.start % alignment == 0
    assert layout.numel % (world_size * alignment) == 0
    assert layout.numel >= layout.slots[-1].span.end
    assert layout.numel - layout.slots[-1].span.end < world_size * alignment
    for rank in range(world_size):
        assert layout.shard(rank).start % alignment == 0


def test_plan_zero_element_parameters() -> None:
    specs = _specs([(0,), (3,), (2, 0), (5,)])
    (layout,) = plan_buffers(specs, 2, bucket_cap_bytes=BIG_CAP)
    assert [slot.index for slot in layout.slots] == [0, 1, 2, 3]
    assert [slot.span.size for slot in layout.slots] == [0, 3, 0, 5]
    # No rank owns any piece of an empty parameter.
    owned = {piece.slot for rank in range(2) for piece in layout.pieces(rank)}
    assert owned == {1, 3}


def test_plan_only_zero_element_parameters() -> None:
    (layout,) = plan_buffers(_specs([(0,), (0, 4)]), 3, bucket_cap_bytes=BIG_CAP)
    assert [slot.span for slot in layout.slots] == [Span(0, 0), Span(0, 0)]
    assert layout.numel > 0
    assert layout.numel % 3 == 0
    assert all(layout.pieces(rank) == () for rank in range(3))


def test_plan_empty_group() -> None:
    assert plan_buffers([], 2, bucket_cap_bytes=BIG_CAP) == []


@pytest.mark.parametrize("world_size", [0, -1])
def test_plan_world_size_below_one_raises(world_size: int) -> None:
    with pytest.raises(ValueError, match="world_size"):
        plan_buffers(_specs([(3,)]), world_size, bucket_cap_bytes=BIG_CAP)


# ------------------------------------------------------------------ shard / pieces


@pytest.mark.parametrize("rank", [-1, 3, 10])
def test_shard_rank_out_of_range_raises(rank: int) -> None:
    (layout,) = plan_buffers(_specs([(10,)]), 3, bucket_cap_bytes=BIG_CAP)
    with pytest.raises(ValueError, match="outside a world"):
        layout.shard(rank)
    with pytest.raises(ValueError, match="outside a world"):
        layout.pieces(rank)


def test_parameter_cut_by_shard_boundary() -> None:
    # float32, alignment 1: spans [0, 5) and [5, 12), 12 elements, two shards of 6.
    (layout,) = plan_buffers(_specs([(5,), (7,)]), 2, bucket_cap_bytes=BIG_CAP, align_bytes=4)
    assert layout.numel == 12
    assert layout.shard(0) == Span(0, 6)
    assert layout.shard(1) == Span(6, 12)
    assert layout.pieces(0) == (
        Piece(slot=0, in_buffer=Span(0, 5), in_shard=Span(0, 5), in_param=Span(0, 5)),
        Piece(slot=1, in_buffer=Span(5, 6), in_shard=Span(5, 6), in_param=Span(0, 1)),
    )
    assert layout.pieces(1) == (Piece(slot=1, in_buffer=Span(6, 12), in_shard=Span(0, 6), in_param=Span(1, 7)),)


def test_cut_pieces_coordinates_agree() -> None:
    (layout,) = plan_buffers(_specs([(3,), (4, 5), (2,)]), 3, bucket_cap_bytes=BIG_CAP, align_bytes=16)
    cut = 1
    found = []
    for rank in range(layout.world_size):
        shard = layout.shard(rank)
        for piece in layout.pieces(rank):
            slot = layout.slots[piece.slot]
            assert piece.in_buffer == piece.in_shard.shift(shard.start)
            assert piece.in_buffer == piece.in_param.shift(slot.span.start)
            if piece.slot == cut:
                found.append((rank, piece))
    assert [rank for rank, _ in found] == [0, 1]
    (_, first), (_, second) = found
    assert first.in_param.start == 0
    assert first.in_param.end == second.in_param.start
    assert second.in_param.end == 20
    assert first.in_buffer.end == layout.shard(0).end == layout.shard(1).start == second.in_buffer.start
    assert second.in_shard.start == 0


# ------------------------------------------------------------------ properties
#
# One drawn plan is checked against every invariant in a single test (drawing is most of the
# cost); each invariant has its own check, so a failure names the one it broke.

_SHAPES = st.lists(st.integers(0, 40), min_size=0, max_size=4).map(tuple)
_PARAMS = st.lists(st.tuples(_SHAPES, st.sampled_from([2, 4, 8]), st.sampled_from(["cpu", "cuda"])), max_size=12)


class Plan(NamedTuple):
    specs: list[ParamSpec]
    layouts: list[BufferLayout]
    align_bytes: int
    cap: int

    def alignment(self, key: Hashable) -> int:
        return _alignment(self.align_bytes, self.itemsize(key))

    def itemsize(self, key: Hashable) -> int:
        return next(spec.itemsize for spec in self.specs if spec.key == key)


@st.composite
def _plans(draw: st.DrawFn) -> Plan:
    # The key fixes the itemsize, as (device, dtype) does.
    params = draw(_PARAMS)
    specs = [ParamSpec(i, shape, itemsize, (device, itemsize)) for i, (shape, itemsize, device) in enumerate(params)]
    world_size = draw(st.integers(1, 8))
    align_bytes = draw(st.sampled_from([1, 4, 16, 64]))
    cap = draw(st.one_of(st.integers(0, 2000), st.just(BIG_CAP)))
    layouts = plan_buffers(specs, world_size, bucket_cap_bytes=cap, align_bytes=align_bytes)
    assert all(layout.world_size == world_size for layout in layouts)
    return Plan(specs, layouts, align_bytes, cap)


def _check_every_parameter_placed_once_in_order(plan: Plan) -> None:
    placed = [slot.index for layout in plan.layouts for slot in layout.slots]
    assert sorted(placed) == [spec.index for spec in plan.specs]
    firsts = [layout.slots[0].index for layout in plan.layouts]
    assert firsts == sorted(firsts)
    for layout in plan.layouts:
        indices = [slot.index for slot in layout.slots]
        assert indices == sorted(indices)
        for slot in layout.slots:
            spec = plan.specs[slot.index]
            assert spec.key == layout.key
            assert slot.shape == spec.shape
            assert slot.span.size == spec.numel


def _check_every_element_owned_exactly_once(layout: BufferLayout) -> None:
    owned: list[tuple[Span, int]] = []
    for rank in range(layout.world_size):
        shard = layout.shard(rank)
        for piece in layout.pieces(rank):
            slot = layout.slots[piece.slot]
            assert piece.in_buffer.size > 0
            assert piece.in_buffer.intersect(shard) == piece.in_buffer
            assert piece.in_buffer.intersect(slot.span) == piece.in_buffer
            assert piece.in_buffer == piece.in_shard.shift(shard.start)
            assert piece.in_buffer == piece.in_param.shift(slot.span.start)
            owned.append((piece.in_buffer, piece.slot))
    # No element is owned twice: the owned spans, in buffer order, don't overlap.
    owned.sort(key=lambda item: item[0].start)
    for (before, _), (after, _) in itertools.pairwise(owned):
        assert before.end <= after.start
    # Every element is owned: each slot's owned spans, in order, run from its start to its end.
    for position, slot in enumerate(layout.slots):
        reached = slot.span.start
        for span, owner in owned:
            if owner == position:
                assert span.start == reached
                reached = span.end
        assert reached == slot.span.end


def _check_shards_equal_contiguous_and_tile(layout: BufferLayout, alignment: int) -> None:
    assert layout.numel > 0
    assert layout.numel % (layout.world_size * alignment) == 0
    assert layout.shard_numel * layout.world_size == layout.numel
    shards = [layout.shard(rank) for rank in range(layout.world_size)]
    assert shards[0].start == 0
    assert shards[-1].end == layout.numel
    for shard in shards:
        assert shard.size == layout.shard_numel
        assert shard.start % alignment == 0
    for before, after in itertools.pairwise(shards):
        assert before.end == after.start


def _check_slots_disjoint_aligned_small_gaps(layout: BufferLayout, alignment: int) -> None:
    slots = layout.slots
    assert slots[0].span.start == 0
    assert slots[-1].span.end <= layout.numel
    for slot in slots:
        assert slot.span.start % alignment == 0
    for before, after in itertools.pairwise(slots):
        assert before.span.intersect(after.span) is None
        gap = after.span.start - before.span.end
        assert 0 <= gap < alignment


def _check_in_param_spans_tile_parameter(layout: BufferLayout) -> None:
    in_param: dict[int, list[Span]] = {position: [] for position in range(len(layout.slots))}
    for rank in range(layout.world_size):
        for piece in layout.pieces(rank):
            in_param[piece.slot].append(piece.in_param)
    for position, spans in in_param.items():
        # Ranks are visited in order, so a parameter's pieces come in order too.
        reached = 0
        for span in spans:
            assert span.start == reached
            reached = span.end
        assert reached == layout.slots[position].span.size


def _check_bucket_cap(plan: Plan) -> None:
    for layout in plan.layouts:
        if len(layout.slots) > 1:
            assert layout.slots[-1].span.end * plan.itemsize(layout.key) <= plan.cap
    # A buffer is closed only when the next parameter of its key would not fit.
    for key in {layout.key for layout in plan.layouts}:
        same = [layout for layout in plan.layouts if layout.key == key]
        alignment = plan.alignment(key)
        for before, after in itertools.pairwise(same):
            start = -(-before.slots[-1].span.end // alignment) * alignment
            assert (start + after.slots[0].span.size) * plan.itemsize(key) > plan.cap


def _check_gaps_and_slots_tile_buffer(layout: BufferLayout) -> None:
    covered = sorted([slot.span for slot in layout.slots] + list(layout.gaps()), key=lambda span: span.start)
    reached = 0
    for span in covered:
        assert span.start == reached
        reached = span.end
    assert reached == layout.numel
    assert all(gap.size > 0 for gap in layout.gaps())


def _check_runs_one_key_is_one_span(layout: BufferLayout) -> None:
    for rank in range(layout.world_size):
        pieces = layout.pieces(rank)
        result = runs(pieces, ["k"] * len(layout.slots))
        if pieces:
            assert result == {"k": [Span(pieces[0].in_shard.start, pieces[-1].in_shard.end)]}
        else:
            assert result == {}


@settings(max_examples=200, deadline=None)
@given(_plans())
def test_property_layout_invariants(plan: Plan) -> None:
    _check_every_parameter_placed_once_in_order(plan)
    _check_bucket_cap(plan)
    for layout in plan.layouts:
        alignment = plan.alignment(layout.key)
        _check_every_element_owned_exactly_once(layout)
        _check_shards_equal_contiguous_and_tile(layout, alignment)
        _check_slots_disjoint_aligned_small_gaps(layout, alignment)
        _check_in_param_spans_tile_parameter(layout)
        _check_gaps_and_slots_tile_buffer(layout)
        _check_runs_one_key_is_one_span(layout)


# ------------------------------------------------------------------ runs


def test_runs_skips_none_keys() -> None:
    pieces = [_piece(0, 0, 3), _piece(1, 4, 8), _piece(2, 8, 9)]
    assert runs(pieces, [None, "a", None]) == {"a": [Span(4, 8)]}
    assert runs(pieces, [None, None, None]) == {}
    assert runs([], []) == {}


def test_runs_merges_neighbours_including_gaps() -> None:
    pieces = [_piece(0, 0, 3), _piece(1, 4, 8), _piece(2, 12, 13)]
    assert runs(pieces, ["a", "a", "a"]) == {"a": [Span(0, 13)]}
    assert runs(pieces, ["a", "a", "b"]) == {"a": [Span(0, 8)], "b": [Span(12, 13)]}


def test_runs_other_key_between_splits() -> None:
    pieces = [_piece(0, 0, 3), _piece(1, 4, 8), _piece(2, 8, 9), _piece(3, 12, 20)]
    assert runs(pieces, ["a", "b", "a", "a"]) == {"a": [Span(0, 3), Span(8, 20)], "b": [Span(4, 8)]}


def test_runs_none_between_splits() -> None:
    # The skipped parameter's elements must not be updated, so they cannot sit inside a run.
    pieces = [_piece(0, 0, 3), _piece(1, 4, 8), _piece(2, 8, 9)]
    assert runs(pieces, ["a", None, "a"]) == {"a": [Span(0, 3), Span(8, 9)]}


def test_runs_uses_slot_positions_of_a_cut_layout() -> None:
    # Rank 1's shard starts inside slot 1: the runs are in shard coordinates and keyed by slot.
    (layout,) = plan_buffers(_specs([(5,), (7,), (2,)]), 2, bucket_cap_bytes=BIG_CAP, align_bytes=4)
    assert layout.shard(1) == Span(7, 14)
    assert runs(layout.pieces(1), ["x", "y", "y"]) == {"y": [Span(0, 7)]}
    assert runs(layout.pieces(1), ["x", "y", "z"]) == {"y": [Span(0, 5)], "z": [Span(5, 7)]}
    assert runs(layout.pieces(0), ["x", "y", "z"]) == {"x": [Span(0, 5)], "y": [Span(5, 7)]}


# ------------------------------------------------------------------ tensors


def _make_params() -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (7,), (0, 4), (2, 2, 3), (1,)]
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]


def _specs_of(params: Sequence[torch.Tensor]) -> list[ParamSpec]:
    # As ShardedOptimizer builds them.
    return [ParamSpec(i, tuple(p.shape), p.element_size(), (p.device, p.dtype)) for i, p in enumerate(params)]


@pytest.mark.parametrize(("bucket_cap_bytes", "buffer_count"), [(BIG_CAP, 2), (64, 4)])
def test_sharded_buffer_reads_and_writes_the_parameters(bucket_cap_bytes: int, buffer_count: int) -> None:
    params = _make_params() + [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))]
    storages = [p.data_ptr() for p in params]
    originals = [p.detach().clone() for p in params]
    layouts = plan_buffers(_specs_of(params), 1, bucket_cap_bytes=bucket_cap_bytes)
    assert len(layouts) == buffer_count
    assert {(str(layout.key[0]), layout.key[1]) for layout in layouts} == {F32, F64}
    buffers = []
    for layout in layouts:
        members = [params[slot.index] for slot in layout.slots]
        buffers.append(ShardedBuffer(layout, members, 0, 0, ("step",)))
    assert sorted(slot.index for layout in layouts for slot in layout.slots) == list(range(len(params)))
    for buffer in buffers:
        assert buffer.shard == Span(0, buffer.layout.numel)
        full = buffer.read_full(torch.full((buffer.layout.numel,), 7.0, dtype=buffer.dtype))
        assert torch.equal(buffer.read_shard(torch.full_like(full, 5.0)), full)  # a world of one: the shard is all
        used = torch.zeros(buffer.layout.numel, dtype=torch.bool)
        for slot, param in zip(buffer.layout.slots, buffer.params):
            assert param is params[slot.index]
            assert torch.equal(full[slot.span.slice].view(slot.shape), originals[slot.index])
            used[slot.span.slice] = True
        assert torch.all(full[~used] == 0)  # alignment gaps read as zeros
        with torch.no_grad():
            buffer.write_params(full + 1.0)
        for slot, param in zip(buffer.layout.slots, buffer.params):
            assert torch.equal(param.detach(), originals[slot.index] + 1.0)
    assert [p.data_ptr() for p in params] == storages  # written in place: the parameters keep their storage


def test_a_channels_last_parameter_lies_in_its_own_memory_order() -> None:
    weight = torch.nn.Parameter(torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last))
    (layout,) = plan_buffers(_specs_of([weight]), 1, bucket_cap_bytes=BIG_CAP)
    buffer = ShardedBuffer(layout, [weight], 0, 0, ())
    assert buffer.orders == [(0, 2, 3, 1)]
    full = buffer.read_full(torch.empty(layout.numel))
    # The span holds the elements as they lie in the weight's memory: N, H, W, C.
    assert torch.equal(full[: weight.numel()], weight.detach().permute(0, 2, 3, 1).reshape(-1))
    (view,) = buffer.views(full)
    assert view.stride() == weight.stride() and torch.equal(view, weight.detach())
    with torch.no_grad():
        buffer.write_params(full * 2)
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(weight.detach(), view * 2)
