"""Peer tables: the worked examples, and the structural invariants of every schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

import topologies
from topologies import (
    BaseKGraph,
    BipartiteExponentialGraph,
    CompleteGraph,
    DirectedExponentialGraph,
    RingGraph,
    Topology,
)

Factory = Callable[[int], Topology]

# (factory, world sizes, peers per round as a function of n: exact count or cap)
CONFIGS: dict[str, tuple[Factory, range, Callable[[int], int], bool]] = {
    "exponential-1": (DirectedExponentialGraph, range(1, 71), lambda n: min(1, n - 1), True),
    "exponential-2": (lambda n: DirectedExponentialGraph(n, 2), range(3, 71), lambda n: 2, True),
    "exponential-3": (lambda n: DirectedExponentialGraph(n, 3), range(4, 71), lambda n: 3, True),
    "ring": (RingGraph, range(1, 71), lambda n: min(1, n - 1), True),
    "complete": (CompleteGraph, range(1, 71), lambda n: n - 1, True),
    "bipartite": (BipartiteExponentialGraph, range(2, 71, 2), lambda n: 1, True),
    "base-1": (BaseKGraph, range(1, 71), lambda n: 1, False),
    "base-2": (lambda n: BaseKGraph(n, 2), range(1, 71), lambda n: 2, False),
    "base-3": (lambda n: BaseKGraph(n, 3), range(1, 71), lambda n: 3, False),
    "base-4": (lambda n: BaseKGraph(n, 4), range(1, 71), lambda n: 4, False),
}


def peer_table(topology: Topology, round: int) -> list[tuple[list[int], list[int]]]:
    n = topology.world_size
    return [(topology.out_peers(r, round), topology.in_peers(r, round)) for r in range(n)]


@pytest.mark.parametrize(
    ("rank", "expected"),
    [
        (0, [(1, 7), (2, 6), (4, 4), (1, 7)]),
        (5, [(6, 4), (7, 3), (1, 1), (6, 4)]),
    ],
)
def test_exponential_worked_examples_n8(rank: int, expected: list[tuple[int, int]]) -> None:
    graph = DirectedExponentialGraph(8)
    got = [(graph.out_peers(rank, t), graph.in_peers(rank, t)) for t in range(4)]
    assert got == [([out], [into]) for out, into in expected]
    assert graph.period == 3


def test_exponential_worked_example_n6() -> None:
    graph = DirectedExponentialGraph(6)
    got = [(graph.out_peers(0, t), graph.in_peers(0, t)) for t in range(4)]
    assert got == [([1], [5]), ([2], [4]), ([4], [2]), ([1], [5])]


def test_exponential_matches_the_formula_for_large_n() -> None:
    for n in (2, 3, 5, 100, 1000, 1024, 1025):
        graph = DirectedExponentialGraph(n)
        levels = (n - 1).bit_length()
        assert graph.period == levels
        for r in (0, 1, n // 2, n - 1):
            for t in range(2 * levels):
                assert graph.out_peers(r, t) == [(r + 2 ** (t % levels)) % n]
                assert graph.in_peers(r, t) == [(r - 2 ** (t % levels)) % n]


def test_exponential_k_peers_cycle_through_offsets() -> None:
    # n=10, k=2: offsets 1, 2, 3, 6, 9 (18 would wrap past n and is left out), two per round.
    graph = DirectedExponentialGraph(10, peers_per_round=2)
    assert graph.period == 5
    assert [graph.out_peers(0, t) for t in range(6)] == [
        [1, 2],
        [3, 6],
        [1, 9],
        [2, 3],
        [6, 9],
        [1, 2],
    ]
    # n=9, k=2: one power of three per round.
    graph = DirectedExponentialGraph(9, peers_per_round=2)
    assert [graph.out_peers(0, t) for t in range(3)] == [[1, 2], [3, 6], [1, 2]]


def test_exponential_k_peers_has_no_self_edge_where_the_reference_has_one() -> None:
    # The reference builds offset 6 for n=6, k=2: a self-edge that loses mass.
    graph = DirectedExponentialGraph(6, peers_per_round=2)
    for t in range(graph.period):
        for r in range(6):
            assert r not in graph.out_peers(r, t)
            assert len(graph.out_peers(r, t)) == 2


def test_ring_and_two_ranks() -> None:
    assert RingGraph(5).out_peers(4, 7) == [0]
    assert RingGraph(5).in_peers(0, 7) == [4]
    assert RingGraph(2).out_peers(0, 0) == RingGraph(2).in_peers(0, 0) == [1]
    assert DirectedExponentialGraph(2).out_peers(1, 3) == [0]


def test_complete_graph_is_uniform() -> None:
    mixing = CompleteGraph(4).mixing(2, 9)
    assert mixing.self_weight == 0.25
    assert mixing.out == {0: 0.25, 1: 0.25, 3: 0.25}


def test_bipartite_pairs_even_with_odd() -> None:
    graph = BipartiteExponentialGraph(8)
    assert graph.period == 3
    assert [graph.out_peers(0, t) for t in range(4)] == [[1], [3], [7], [1]]
    for n in range(2, 71, 2):
        graph = BipartiteExponentialGraph(n)
        for t in range(graph.period):
            partners = [graph.out_peers(r, t)[0] for r in range(n)]
            assert all(partners[partners[r]] == r for r in range(n)), (n, t)
            assert all((r + partners[r]) % 2 == 1 for r in range(n)), (n, t)
            assert graph.mixing(0, t).out == {partners[0]: 0.5}


def test_base_k_weights_are_symmetric() -> None:
    for k in (1, 2, 3):
        for n in (5, 6, 7, 11, 23, 48):
            graph = BaseKGraph(n, k)
            for t in range(graph.period):
                rows = [graph.mixing(r, t) for r in range(n)]
                for i, row in enumerate(rows):
                    for j, weight in row.out.items():
                        assert rows[j].out[i] == pytest.approx(weight, abs=1e-15)


def test_single_rank_has_no_peers() -> None:
    for name in topologies.NAMES:
        graph = topologies.get(name, 1)
        for t in range(3):
            assert graph.out_peers(0, t) == graph.in_peers(0, t) == []
            assert graph.mixing(0, t) == topologies.Mixing(1.0, {})
        assert graph.exact_rounds == 0
        assert graph.period >= 1


@pytest.mark.parametrize("config", list(CONFIGS))
def test_schedule_invariants(config: str) -> None:
    factory, sizes, degree, exact_degree = CONFIGS[config]
    for n in sizes:
        topology = factory(n)
        assert topology.period >= 1
        tables = [peer_table(topology, t) for t in range(3 * topology.period)]
        for t, table in enumerate(tables):
            assert table == tables[t % topology.period], (n, t)
            edges_out = {(r, j) for r, (out, _) in enumerate(table) for j in out}
            edges_in = {(j, r) for r, (_, into) in enumerate(table) for j in into}
            assert edges_out == edges_in, (n, t)
            for r, (out, into) in enumerate(table):
                where = (config, n, r, t)
                for peers in (out, into):
                    assert peers == sorted(set(peers)), where
                    assert r not in peers, where
                    assert all(type(p) is int and 0 <= p < n for p in peers), where
                if exact_degree:
                    assert len(out) == degree(n), where
                else:
                    assert len(out) <= degree(n), where
                mixing = topology.mixing(r, t)
                assert set(mixing.out) == set(out), where
                assert mixing.self_weight > 0, where
                assert all(w > 0 for w in mixing.out.values()), where
                assert math.fsum([mixing.self_weight, *mixing.out.values()]) == pytest.approx(
                    1.0, abs=1e-12
                ), where


@given(
    name=st.sampled_from(["exponential", "ring", "bipartite"]),
    half=st.integers(1, 50_000),
    peers=st.integers(1, 4),
    rank_seed=st.integers(0, 2**32),
    round=st.integers(0, 10**9),
)
def test_in_peers_invert_out_peers_for_large_n(
    name: str, half: int, peers: int, rank_seed: int, round: int
) -> None:
    n = 2 * half
    options = {"peers_per_round": min(peers, n - 1)} if name == "exponential" else {}
    topology = topologies.get(name, n, **options)
    rank = rank_seed % n
    for peer in topology.out_peers(rank, round):
        assert rank in topology.in_peers(peer, round)
    for peer in topology.in_peers(rank, round):
        assert rank in topology.out_peers(peer, round)


def test_lookup_by_name() -> None:
    assert topologies.NAMES == ("exponential", "ring", "complete", "bipartite", "base-k")
    assert isinstance(topologies.get("exponential", 8), DirectedExponentialGraph)
    assert topologies.get("exponential", 8, peers_per_round=3).out_peers(0, 0) == [1, 2, 3]
    assert isinstance(topologies.get("ring", 3), RingGraph)
    assert isinstance(topologies.get("complete", 3), CompleteGraph)
    assert isinstance(topologies.get("bipartite", 4), BipartiteExponentialGraph)
    for options, k in (({"k": 3}, 3), ({"peers_per_round": 2}, 2), ({}, 1)):
        graph = topologies.get("base-k", 10, **options)
        assert isinstance(graph, BaseKGraph)
        assert graph.k == k
    for name in topologies.NAMES:
        assert topologies.get(name, 4).name == name
