"""Look topologies up by the short names used in configs and on the command line."""

from __future__ import annotations

from topologies.base import Topology
from topologies.base_k import BaseKGraph
from topologies.bipartite import BipartiteExponentialGraph
from topologies.complete import CompleteGraph
from topologies.exponential import DirectedExponentialGraph
from topologies.ring import RingGraph

_CLASSES: dict[str, type[Topology]] = {
    cls.name: cls
    for cls in (
        DirectedExponentialGraph,
        RingGraph,
        CompleteGraph,
        BipartiteExponentialGraph,
        BaseKGraph,
    )
}
_OPTIONS: dict[str, tuple[str, ...]] = {
    "exponential": ("peers_per_round",),
    "base-k": ("k", "peers_per_round"),
}

NAMES: tuple[str, ...] = tuple(_CLASSES)
"""Every name ``get`` accepts."""


def get(name: str, world_size: int, **options: int) -> Topology:
    """Build the topology called ``name`` for ``world_size`` ranks.

    Options: ``peers_per_round`` for "exponential"; ``k`` (or its alias ``peers_per_round``, so
    one config key serves both) for "base-k". The other topologies take none.
    """
    if name not in _CLASSES:
        raise ValueError(f"unknown topology {name!r}; valid names: {', '.join(NAMES)}")
    allowed = _OPTIONS.get(name, ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        accepted = ", ".join(allowed) if allowed else "none"
        raise ValueError(f"topology {name!r} got unknown options {unknown}; accepted: {accepted}")
    if name == "base-k" and "peers_per_round" in options:
        if "k" in options:
            raise ValueError("give base-k either k or its alias peers_per_round, not both")
        options["k"] = options.pop("peers_per_round")
    return _CLASSES[name](world_size, **options)
