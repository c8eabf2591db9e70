"""Snapshots of a worker's state, as plain values: what the metrics layer reads.

:meth:`GossipNode.snapshot() <gossip_sgp.node.GossipNode.snapshot>` and
:meth:`SGP.snapshot() <gossip_sgp.sgp.SGP.snapshot>` copy their counters into these frozen
dataclasses, so :mod:`gossip_sgp.metrics` depends on this module only, not on the node or
the optimizer wrapper (which build the metrics: the dependency runs one way), and a scrape
reads one consistent copy instead of reaching through live objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["NodeStats", "TrafficStats", "TrainingStats"]


@dataclass(frozen=True, kw_only=True, slots=True)
class TrafficStats:
    """A copy of the transport's counters (``transports.base.TransportStats``)."""

    messages_sent: dict[int, int]
    """Messages handed to the wire, per destination rank."""
    bytes_sent: dict[int, int]
    """Bytes handed to the wire (header and payload), per destination rank."""
    messages_received: dict[int, int]
    """Valid messages received, per source rank."""
    bytes_received: dict[int, int]
    """Bytes of valid messages received, per source rank."""
    rejected: dict[str, int]
    """Messages the transport rejected before use, per reason."""


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeStats:
    """What a :class:`~gossip_sgp.node.GossipNode` knows of its links, at one moment."""

    rank: int
    """This worker's rank."""
    traffic: TrafficStats | None
    """The transport's counters; None before the node has started."""
    send_errors: dict[int, int]
    """Failed sends per peer."""
    payload_bytes_sent: int
    """Numerator bytes of the push-sum messages handed to the transport, as encoded."""
    payload_raw_bytes_sent: int
    """The same before compression."""
    neighbours: frozenset[int]
    """The ranks this worker exchanges mass with."""
    rtt_medians: dict[int, float]
    """Median send-to-fold-in round trip per peer, in seconds."""
    outstanding: dict[int, int]
    """Shares sent to each neighbour and not acknowledged as folded yet."""
    last_heard: dict[int, float]
    """Monotonic time of the last message from each peer."""
    down: frozenset[int]
    """Peers suspected down now."""
    rejected: dict[str, int]
    """Messages the node rejected after the transport accepted them, per reason."""
    dropped: dict[str, int]
    """Push-sum messages whose mass the node lost, per reason."""
    lost_weight: float
    """Push-sum weight written off or dropped (see ``GossipNode.lost_weight``)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainingStats:
    """What an :class:`~gossip_sgp.sgp.SGP` wrapper knows of its training, at one moment."""

    steps: int
    """``SGP.step()`` calls."""
    step_seconds: float
    """Time spent in them, in seconds."""
    round: int
    """Gossip rounds run (training and consensus)."""
    skipped_rounds: int
    """Asynchronous rounds in which the worker kept its mass."""
    answered: int
    """Shares of peers still training that it answered while in ``consensus()``."""
    outer_steps: int
    """Outer steps taken (local-steps mode; 0 otherwise)."""
    outer_gradient_norm: float | None
    """The last outer step's pseudo-gradient norm relative to the reference point's."""
    weight: float
    """Push-sum weight at the end of the last round."""
    loss: float | None
    """The training loss last reported with ``SGP.report()``."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Received shares the mailbox refused, per reason."""
    lagged: dict[str, int] = field(default_factory=dict)
    """Asynchronous mode: received shares whose model was more than ``lag_limit`` steps
    ``behind`` (weight kept, model dropped) or ``ahead`` (model taken) of this worker's."""
