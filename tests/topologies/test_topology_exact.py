"""Exact averaging: which schedules reach the exact average, and after how many rounds.

A tiny synchronous simulation: each round builds the column-stochastic matrix ``P`` with
``P[j, i] = p_ji`` from the ``Mixing`` weights and applies ``X <- P @ X``, starting from the
identity (every basis vector at once). The exact average for every input means ``X == 1/n``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

import topologies
from topologies import (
    BaseKGraph,
    BipartiteExponentialGraph,
    CompleteGraph,
    DirectedExponentialGraph,
    RingGraph,
    Topology,
)


def mixing_matrix(topology: Topology, round: int) -> np.ndarray:
    n = topology.world_size
    matrix = np.zeros((n, n))
    for i in range(n):
        mixing = topology.mixing(i, round)
        matrix[i, i] = mixing.self_weight
        for j, weight in mixing.out.items():
            matrix[j, i] = weight
    np.testing.assert_allclose(matrix.sum(axis=0), 1.0, atol=1e-12)
    return matrix


def gossip(topology: Topology, rounds: int) -> np.ndarray:
    """Synchronous push-sum from round 0: row i of the result holds node i's numerator."""
    x = np.eye(topology.world_size)
    for t in range(rounds):
        x = mixing_matrix(topology, t) @ x
    return x


def max_error(x: np.ndarray) -> float:
    return float(np.abs(x - 1.0 / x.shape[0]).max())


@pytest.mark.parametrize("levels", range(1, 11))
def test_one_peer_exponential_is_exact_for_powers_of_two(levels: int) -> None:
    n = 2**levels
    graph = DirectedExponentialGraph(n)
    assert graph.exact_rounds == levels
    assert max_error(gossip(graph, levels)) * n <= 1e-6


def test_one_peer_exponential_is_not_exact_for_six_ranks() -> None:
    graph = DirectedExponentialGraph(6)
    assert graph.exact_rounds is None
    error = max_error(gossip(graph, 3))
    assert error > 1e-3
    assert error == pytest.approx(1 / 12)  # entries are multiples of 1/8, the average is 1/6


@pytest.mark.parametrize(("k", "levels"), [(2, 4), (2, 5), (3, 3), (3, 4), (4, 3), (5, 2)])
def test_k_peer_exponential_is_exact_for_powers_of_k_plus_one(k: int, levels: int) -> None:
    graph = DirectedExponentialGraph((k + 1) ** levels, peers_per_round=k)
    assert graph.exact_rounds == levels
    assert max_error(gossip(graph, levels)) <= 1e-12


@pytest.mark.parametrize("levels", range(1, 11))
def test_bipartite_is_exact_for_powers_of_two(levels: int) -> None:
    graph = BipartiteExponentialGraph(2**levels)
    assert graph.exact_rounds == levels
    assert max_error(gossip(graph, levels)) <= 1e-12


def test_complete_graph_is_exact_in_one_round() -> None:
    for n in range(2, 40):
        graph = CompleteGraph(n)
        assert graph.exact_rounds == 1
        assert max_error(gossip(graph, 1)) <= 1e-12


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_base_k_is_exact_for_every_world_size(k: int) -> None:
    for n in range(2, 65):
        graph = BaseKGraph(n, k)
        rounds = graph.exact_rounds
        assert rounds is not None
        assert rounds == graph.period
        assert rounds <= 2 * math.log(n, k + 1) + 2, n  # the bound the paper proves
        assert max_error(gossip(graph, rounds)) <= 1e-9, (n, k)


@pytest.mark.parametrize("n", [100, 127, 200, 243, 250])
def test_base_k_is_exact_beyond_the_sweep(n: int) -> None:
    for k in (1, 2):
        graph = BaseKGraph(n, k)
        assert max_error(gossip(graph, graph.exact_rounds or 0)) <= 1e-9, (n, k)


def test_base_k_beats_the_exponential_graph_on_six_ranks() -> None:
    # One peer per round: exact after 4 rounds, where the exponential graph never is.
    graph = BaseKGraph(6)
    assert graph.exact_rounds == 4
    assert max_error(gossip(graph, 4)) <= 1e-12


TOPOLOGIES: dict[str, Callable[[int], Topology | None]] = {
    "exponential-1": lambda n: DirectedExponentialGraph(n),
    "exponential-2": lambda n: DirectedExponentialGraph(n, 2) if n > 2 else None,
    "exponential-3": lambda n: DirectedExponentialGraph(n, 3) if n > 3 else None,
    "exponential-4": lambda n: DirectedExponentialGraph(n, 4) if n > 4 else None,
    "ring": RingGraph,
    "complete": CompleteGraph,
    "bipartite": lambda n: BipartiteExponentialGraph(n) if n % 2 == 0 else None,
}


@pytest.mark.parametrize("name", list(TOPOLOGIES))
def test_exact_rounds_is_truthful(name: str) -> None:
    """exact_rounds rounds give the exact average (and one round fewer does not); None means
    one period does not, which proves it never will: the exponential, ring and complete
    schedules are circulant, their matrices commute, and each Fourier mode must be zeroed by
    some round of the period. The bipartite schedule's None cases are world sizes with an odd
    factor, out of reach of weights 1/2 (every entry stays a dyadic fraction; 1/n is not).
    """
    for n in range(2, 71):
        topology = TOPOLOGIES[name](n)
        if topology is None:
            continue
        rounds = topology.exact_rounds
        if rounds is None:
            assert max_error(gossip(topology, topology.period)) > 1e-9, (name, n)
        else:
            assert max_error(gossip(topology, rounds)) <= 1e-12, (name, n)
            if rounds > 0:
                assert max_error(gossip(topology, rounds - 1)) > 1e-9, (name, n)


def test_lookup_by_name_keeps_the_guarantee() -> None:
    graph = topologies.get("base-k", 37, peers_per_round=2)
    assert max_error(gossip(graph, graph.exact_rounds or 0)) <= 1e-9
