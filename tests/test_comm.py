"""comm.py's collectives on real gloo worlds: each way of moving the bytes gives the same result."""

from __future__ import annotations

import itertools

import pytest
import torch

from shardopt.collectives import ring
from shardopt.collectives.comm import Comm
from shardopt.collectives.span import Span
from tests.world import run_world


def collectives(rings: bool, numel: int, piece_bytes: int) -> dict[str, list[torch.Tensor] | torch.Tensor]:
    """Three reduce-scatters in flight at once (rings waited in issue order, as the reducer does),
    then in-place and out-of-place all-gathers, by gloo's own collectives or by the rings."""
    import torch.distributed as dist

    comm = Comm(None, timeout=60)
    comm._rings = rings
    saved, ring.PIECE_BYTES = ring.PIECE_BYTES, piece_bytes
    try:
        rank, world = comm.rank, comm.world_size
        generator = torch.Generator().manual_seed(rank)
        fulls = [torch.randn(numel * world, generator=generator) for _ in range(3)]
        inputs = [full.clone() for full in fulls]
        shards = [torch.empty(numel) for _ in fulls]
        pending = [comm.reduce_scatter(shard, full, "test reduce-scatter") for shard, full in zip(shards, fulls)]
        for each in pending:
            each.wait()
        flat = torch.zeros(numel * world)
        flat[rank * numel : (rank + 1) * numel] = torch.arange(numel) + 100 * rank
        in_place = comm.all_gather(flat, flat[rank * numel : (rank + 1) * numel], "test all-gather")
        separate = torch.full((numel * world,), -1.0)
        out_of_place = comm.all_gather(separate, torch.full((numel,), float(rank)), "test all-gather")
        in_place.wait()
        out_of_place.wait()
    finally:
        ring.PIECE_BYTES = saved
    assert dist.get_world_size() == world
    return {"inputs": inputs, "shards": shards, "in_place": flat, "separate": separate}


@pytest.mark.parametrize(
    ("world_size", "numel", "piece_bytes"),
    [(2, 5, 1 << 20), (2, 1000, 400), (3, 7, 8), (3, 1000, 1000), (4, 33, 40)],
    ids=["2-one-piece", "2-pieces", "3-pieces-of-2", "3-pieces", "4-pieces"],
)
@pytest.mark.parametrize("rings", [False, True], ids=["native", "ring"])
def test_reduce_scatter_and_all_gather(world_size: int, numel: int, piece_bytes: int, rings: bool) -> None:
    per_rank = run_world(collectives, world_size, rings, numel, piece_bytes)
    expected_gather = (torch.arange(numel) + 100 * torch.arange(world_size)[:, None]).flatten().float()
    for which in range(3):
        total = torch.stack([result["inputs"][which] for result in per_rank]).double().sum(0)
        for rank, result in enumerate(per_rank):
            mine = total[rank * numel : (rank + 1) * numel].float()
            torch.testing.assert_close(result["shards"][which], mine)
    for result in per_rank:
        assert torch.equal(result["in_place"], expected_gather)
        assert torch.equal(result["separate"], torch.arange(world_size).repeat_interleave(numel).float())


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_a_reduce_scatter_ring_ends_with_each_chunk_summed_once_per_rank(world_size: int) -> None:
    """Simulated without processes: each rank's partial sums, as sets of the ranks they hold."""
    partial = [[{rank} for _ in range(world_size)] for rank in range(world_size)]
    for step in range(world_size - 1):
        sent = [ring.reduce_scatter_chunks(rank, world_size, step) for rank in range(world_size)]
        outgoing = [set(partial[rank][chunk]) for rank, (chunk, _) in enumerate(sent)]
        for rank in range(world_size):
            previous = (rank - 1) % world_size
            receive = sent[rank][1]
            assert receive == sent[previous][0], "a rank adds the chunk its left neighbour sends"
            partial[rank][receive] |= outgoing[previous]
    for rank in range(world_size):
        assert partial[rank][rank] == set(range(world_size))


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_an_all_gather_ring_brings_every_chunk_to_every_rank(world_size: int) -> None:
    held = [{rank} for rank in range(world_size)]
    for step in range(world_size - 1):
        sent = [ring.all_gather_chunks(rank, world_size, step) for rank in range(world_size)]
        for rank, (chunk, _) in enumerate(sent):
            assert chunk in held[rank], "a rank only forwards what it holds"
        for rank in range(world_size):
            previous = (rank - 1) % world_size
            assert sent[rank][1] == sent[previous][0]
            held[rank].add(sent[rank][1])
    assert all(chunks == set(range(world_size)) for chunks in held)


@pytest.mark.parametrize(("numel", "itemsize", "piece_bytes"), [(0, 4, 8), (1, 4, 8), (10, 4, 8), (10, 4, 1 << 20)])
def test_pieces_cover_the_chunk_in_order(numel: int, itemsize: int, piece_bytes: int) -> None:
    parts = ring.pieces(numel, itemsize, piece_bytes)
    assert parts[0].start == 0 and parts[-1].stop == numel
    assert all(a.stop == b.start for a, b in itertools.pairwise(parts))
    assert all((part.stop - part.start) * itemsize <= piece_bytes + itemsize for part in parts)
    assert all(part.stop > part.start for part in parts) or numel == 0


def test_a_world_of_one_needs_no_process_group() -> None:
    comm = Comm(None, timeout=1)
    assert (comm.rank, comm.world_size) == (0, 1)
    full, shard = torch.arange(4.0), torch.empty(4)
    comm.reduce_scatter(shard, full, "x").wait()
    assert torch.equal(shard, full)


PAIR_SPANS = [
    [(0, 10)],  # one part, no gap
    [(0, 3), (4, 9), (12, 13)],  # gaps between parts and padding at the end
    [(2, 7), (7, 8), (8, 20)],  # a gap before the first part; one part crosses the chunk boundary
]


def _spans(bounds: list[tuple[int, int]]) -> list[Span]:
    return [Span(start, end) for start, end in bounds]


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("bounds", PAIR_SPANS, ids=["one", "gaps", "crossing"])
@pytest.mark.parametrize("piece_bytes", [8, 1 << 20], ids=["pieces-of-2", "whole"])
def test_a_parts_plan_carries_every_covered_element_of_each_chunk_once(
    bounds: list[tuple[int, int]], piece_bytes: int, world_size: int
) -> None:
    spans = _spans(bounds)
    numel = world_size * -(-max(end for _, end in bounds) // world_size)
    plan = ring.held_plan(spans, numel, world_size, 4, piece_bytes)
    chunk = numel // world_size
    assert len(plan.messages) == len(plan.uncovered) == world_size
    for index in range(world_size):
        carried = []  # (where in the chunk, which flat element) per element a message carries
        for message in plan.messages[index]:
            span = spans[message.part]
            assert 0 < message.size and message.size * 4 <= max(piece_bytes, 4)
            assert message.start + message.size <= span.size, "a message stays inside its part"
            flat = span.start + message.start
            carried += [(message.at + i, flat + i) for i in range(message.size)]
        assert all(at + index * chunk == flat for at, flat in carried), "an element lands where it lies"
        covered = {at for at, _ in carried}
        assert len(covered) == len(carried), "no element travels twice"
        gaps = {at for gap in plan.uncovered[index] for at in range(gap.start, gap.stop)}
        assert covered | gaps == set(range(chunk)) and not covered & gaps
        in_spans = {e - index * chunk for span in spans for e in range(span.start, span.end)}
        assert covered == in_spans & set(range(chunk))


def pair_reduce_scatters(bounds: list[tuple[int, int]], piece_bytes: int) -> dict[str, list[torch.Tensor]]:
    """Three reduce-scatters of parts in flight at once; each shard starts as NaN (the gaps must end as zeros)."""
    comm = Comm(None, timeout=60)
    spans, numel = _spans(bounds), 2 * -(-max(end for _, end in bounds) // 2)
    plan = ring.held_plan(spans, numel, 2, 4, piece_bytes)
    generator = torch.Generator().manual_seed(comm.rank)
    parts = [[torch.randn(span.size, generator=generator) for span in spans] for _ in range(3)]
    before = [[part.clone() for part in each] for each in parts]
    shards = [torch.full((numel // 2,), float("nan")) for _ in parts]
    pending = [comm.reduce_scatter_held(shard, each, plan, "test") for shard, each in zip(shards, parts)]
    for each in pending:
        each.wait()
    for each, kept in zip(parts, before):
        assert all(torch.equal(part, old) for part, old in zip(each, kept)), "the parts are only read"
    fulls = []
    for each in parts:
        full = torch.zeros(numel)
        for span, part in zip(spans, each):
            full[span.start : span.end] = part
        fulls.append(full)
    return {"fulls": fulls, "shards": shards}


@pytest.mark.parametrize("bounds", PAIR_SPANS, ids=["one", "gaps", "crossing"])
@pytest.mark.parametrize("piece_bytes", [8, 1 << 20], ids=["pieces-of-2", "whole"])
def test_a_reduce_scatter_of_parts_sums_each_chunk_and_zeros_its_gaps(
    bounds: list[tuple[int, int]], piece_bytes: int
) -> None:
    per_rank = run_world(pair_reduce_scatters, 2, bounds, piece_bytes)
    for which in range(3):
        total = per_rank[0]["fulls"][which] + per_rank[1]["fulls"][which]
        for rank, result in enumerate(per_rank):
            chunk = total.numel() // 2
            torch.testing.assert_close(result["shards"][which], total[rank * chunk : (rank + 1) * chunk])
