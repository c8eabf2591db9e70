"""How ``SGP.consensus`` cuts its gossip-only rounds into blocks (pure functions, no I/O).

A block must let every live worker hear, indirectly, from every other, and every worker
must end its blocks on the same rounds: each decides at a block's end whether to stop, and
one that stops a round before another leaves that one waiting for its message until
``GossipTimeout`` (found with a kill -9 of one of four asynchronous workers: the survivor
that had not suspected the dead worker yet planned 2-round blocks, the others 3-round ones).
"""

from __future__ import annotations

import pytest

import topologies
from gossip_sgp import GossipError
from gossip_sgp.sgp import _block_length, _broadcast_rounds
from topologies import Topology


def heard_after(topology: Topology, start: int, down: set[int]) -> int:
    """Rounds from ``start`` until every live node has heard from every live node, by
    plain sets (an independent version of ``_broadcast_rounds``)."""
    n = topology.world_size
    live = [i for i in range(n) if i not in down]
    heard = {i: {i} for i in live}
    for t in range(start, start + 10 * n):
        senders = {
            j
            for j in live
            if not any(p in down for p in topology.out_peers(j, t))  # keeps its mass
        }
        heard = {
            i: heard[i].union(*(heard[j] for j in topology.in_peers(i, t) if j in senders))
            for i in live
        }
        if all(heard[i] >= set(live) for i in live):
            return t - start + 1
    raise AssertionError("never")


CASES = [
    ("exponential", 4),
    ("exponential", 5),
    ("exponential", 8),
    ("exponential", 16),
    ("bipartite", 8),
    ("base-k", 5),
    ("base-k", 9),
    ("ring", 6),
    ("complete", 5),
]


@pytest.mark.parametrize(("name", "n"), CASES)
def test_broadcast_rounds_agree_with_a_plain_simulation(name: str, n: int) -> None:
    topology = topologies.get(name, n)
    for start in range(2 * topology.period):
        assert _broadcast_rounds(topology, start) == heard_after(topology, start, set())
        for dead in range(n):
            try:
                rounds = _broadcast_rounds(topology, start, frozenset({dead}))
            except GossipError:
                continue  # checked below: the loss of `dead` cuts the graph
            assert rounds == heard_after(topology, start, {dead}), (start, dead)


def test_the_known_graphs_take_the_known_number_of_rounds() -> None:
    assert [_broadcast_rounds(topologies.get("exponential", 2**k), 0) for k in (1, 2, 3, 4)] == [
        1,
        2,
        3,
        4,
    ]
    assert _broadcast_rounds(topologies.get("ring", 6), 0) == 5
    assert _broadcast_rounds(topologies.get("complete", 6), 0) == 1
    # Rank 3 of 4 down: ranks 1 and 2 keep their mass in the rounds that pair them with 3.
    assert _broadcast_rounds(topologies.get("exponential", 4), 0, frozenset({3})) == 3


@pytest.mark.parametrize(("name", "n"), CASES)
def test_workers_whose_views_differ_by_one_suspicion_end_blocks_on_the_same_rounds(
    name: str, n: int
) -> None:
    """The block length is the same whether a worker suspects nobody or any one peer, and
    every block is long enough for what that worker knows. (With the block length of the
    worker's own view, ``_broadcast_rounds(topology, round, down)``, 4 exponential workers
    plan 2 rounds with nobody down and 3 with rank 3 down, and this fails.)"""
    topology = topologies.get(name, n)
    length = _block_length(topology, frozenset())
    for dead in range(n):
        try:
            assert _block_length(topology, frozenset({dead})) == length, dead
        except GossipError:
            continue  # without `dead` the graph falls apart: consensus cannot run at all
        for start in range(topology.period):
            assert _broadcast_rounds(topology, start, frozenset({dead})) <= length
    for start in range(topology.period):
        assert _broadcast_rounds(topology, start) <= length


def test_a_graph_cut_by_the_workers_down_is_reported() -> None:
    # A directed ring without one node no longer connects; on the complete graph every
    # node keeps its mass while any peer is down. Both fail at once with a clear error.
    with pytest.raises(GossipError, match="does not connect all its nodes without the ranks"):
        _block_length(topologies.get("ring", 8), frozenset({3}))
    with pytest.raises(GossipError, match=r"without the ranks \[5\] suspected down"):
        _block_length(topologies.get("complete", 64), frozenset({5}))
