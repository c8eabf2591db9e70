"""Bad arguments fail loudly with ValueError, naming the bad value."""

from __future__ import annotations

import numpy as np
import pytest

import topologies
from topologies import (
    BaseKGraph,
    BipartiteExponentialGraph,
    CompleteGraph,
    DirectedExponentialGraph,
    Mixing,
    RingGraph,
)

CLASSES = [
    DirectedExponentialGraph,
    RingGraph,
    CompleteGraph,
    BipartiteExponentialGraph,
    BaseKGraph,
]


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("world_size", [0, -3, 2.0, "4", None, True])
def test_bad_world_size(cls: type[topologies.Topology], world_size: object) -> None:
    with pytest.raises(ValueError, match="world_size"):
        cls(world_size)  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", CLASSES)
def test_bad_rank_and_round(cls: type[topologies.Topology]) -> None:
    topology = cls(6)
    for method in (topology.out_peers, topology.in_peers, topology.mixing):
        with pytest.raises(ValueError, match=r"rank 6 out of range \[0, 6\)"):
            method(6, 0)
        with pytest.raises(ValueError, match=r"rank -1 out of range"):
            method(-1, 0)
        with pytest.raises(ValueError, match="rank must be an int"):
            method(1.0, 0)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="round must be >= 0, got -1"):
            method(0, -1)
        with pytest.raises(ValueError, match="round must be an int"):
            method(0, "1")  # type: ignore[arg-type]


def test_numpy_integers_are_accepted() -> None:
    graph = DirectedExponentialGraph(np.int64(8))
    peers = graph.out_peers(np.int64(3), np.uint8(0))
    assert peers == [4]
    assert type(peers[0]) is int


@pytest.mark.parametrize(("n", "peers"), [(4, 0), (4, -1), (4, 4), (4, 5), (2, 2), (8, 1.5)])
def test_bad_peers_per_round(n: int, peers: object) -> None:
    with pytest.raises(ValueError, match="peers_per_round"):
        DirectedExponentialGraph(n, peers)  # type: ignore[arg-type]


def test_single_rank_accepts_any_peer_count() -> None:
    assert DirectedExponentialGraph(1, 5).out_peers(0, 0) == []


@pytest.mark.parametrize("k", [0, -2, 1.0])
def test_bad_k(k: object) -> None:
    with pytest.raises(ValueError, match="k must be"):
        BaseKGraph(5, k)  # type: ignore[arg-type]


def test_base_k_caps_large_k_at_the_complete_graph() -> None:
    graph = BaseKGraph(5, 100)
    assert graph.exact_rounds == 1
    assert graph.out_peers(0, 0) == [1, 2, 3, 4]


@pytest.mark.parametrize("n", [3, 5, 7, 69])
def test_bipartite_needs_even_world_size(n: int) -> None:
    with pytest.raises(ValueError, match=f"even world_size, got {n}"):
        BipartiteExponentialGraph(n)


def test_get_rejects_unknown_names_and_options() -> None:
    with pytest.raises(ValueError, match=r"unknown topology 'torus'.*exponential, ring"):
        topologies.get("torus", 4)
    with pytest.raises(ValueError, match="unknown options"):
        topologies.get("ring", 4, peers_per_round=1)
    with pytest.raises(ValueError, match="not both"):
        topologies.get("base-k", 4, k=1, peers_per_round=2)
    with pytest.raises(ValueError, match="peers_per_round"):
        topologies.get("exponential", 4, peers_per_round=4)


@pytest.mark.parametrize(
    ("self_weight", "out"),
    [(0.5, {1: 0.25}), (0.5, {1: 0.5, 2: 0.0}), (1.5, {1: -0.5}), (float("nan"), {})],
)
def test_mixing_must_conserve_mass(self_weight: float, out: dict[int, float]) -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        Mixing(self_weight, out)
