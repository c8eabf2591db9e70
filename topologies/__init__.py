"""Peer schedules for push-sum gossip: who sends to whom in each round, and with what weights.

Every schedule is a pure function of ``(world_size, rank, round)``, so all ranks agree on it
without talking. See ``docs/topologies.md`` for when to use which.
"""

from topologies.base import Mixing, Topology
from topologies.base_k import BaseKGraph
from topologies.bipartite import BipartiteExponentialGraph
from topologies.complete import CompleteGraph
from topologies.exponential import DirectedExponentialGraph
from topologies.registry import NAMES, get
from topologies.ring import RingGraph

__all__ = [
    "NAMES",
    "BaseKGraph",
    "BipartiteExponentialGraph",
    "CompleteGraph",
    "DirectedExponentialGraph",
    "Mixing",
    "RingGraph",
    "Topology",
    "get",
]
