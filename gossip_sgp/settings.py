"""The tunables of the gossip node and its links, in one place.

    node = GossipNode(config, settings=LinkSettings(heartbeat_s=0.1, suspect_floor_s=1.0))

The defaults suit Ethernet, cloud and WAN links alike (see docs/reliability.md for how
each was measured); tests and unusual deployments pass their own. A
:class:`~gossip_sgp.link.OutLink` reads the retransmission and memory bounds, the
:class:`~gossip_sgp.node.GossipNode` the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

__all__ = ["LinkSettings"]


@dataclass(frozen=True, kw_only=True, slots=True)
class LinkSettings:
    """Liveness, retransmission and memory bounds of a node's links (all times in seconds)."""

    heartbeat_s: float = 0.5
    """A neighbour that has been sent nothing for this long gets a heartbeat."""
    suspect_floor_s: float = 5.0
    """The shortest silence after which a peer heard before is suspected down (above it the
    timeout adapts to the gaps observed, see :class:`~gossip_sgp.liveness.FailureDetector`);
    ten missed heartbeats, so a worker whose gossip thread stalls for a few seconds on an
    overloaded machine is not taken for dead."""
    suspect_initial_s: float = 15.0
    """The suspicion timeout while too few gaps have been observed to adapt it."""
    retry_min_s: float = 0.01
    """The shortest wait before a share is sent again, however short the round trips."""
    retry_rtts: float = 4.0
    """A share is sent again after this many median round trips without an acknowledgement."""
    retry_first_s: float = 1.0
    """Before any round trip is known: this long, plus the share's size at
    ``assumed_bytes_per_s``."""
    assumed_bytes_per_s: float = 12.5e6
    """The rate assumed for a link whose round trip is not known yet (100 Mbit/s)."""
    retry_max_s: float = 120.0
    """The longest wait between two copies of a share (after exponential back-off)."""
    max_unacked: int = 1024
    """Unacknowledged shares kept per link; older ones are written off as lost."""
    max_skips: int = 64
    """Skip notices awaiting acknowledgement kept per link; older ones are not sent again."""
    max_early: int = 4096
    """Messages kept for a subscriber that has not subscribed yet; beyond that the oldest
    go."""

    @classmethod
    def field_types(cls) -> dict[str, type]:
        """Each field's type, ``int`` or ``float`` (the peer list's ``[link]`` table is
        checked against it)."""
        return {f.name: int if f.type == "int" else float for f in fields(cls)}

    def __post_init__(self) -> None:
        types = self.field_types()
        for name, kind in types.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"LinkSettings.{name} must be a number, got {value!r}")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"LinkSettings.{name} must be finite and > 0, got {value!r}")
            if kind is int and not isinstance(value, int):
                raise TypeError(f"LinkSettings.{name} must be an integer, got {value!r}")
        if self.suspect_initial_s < self.suspect_floor_s:
            raise ValueError(
                f"LinkSettings.suspect_initial_s ({self.suspect_initial_s}) must be at least "
                f"suspect_floor_s ({self.suspect_floor_s})"
            )
        if self.retry_max_s < self.retry_min_s:
            raise ValueError(
                f"LinkSettings.retry_max_s ({self.retry_max_s}) must be at least "
                f"retry_min_s ({self.retry_min_s})"
            )

    def retry_after(self, rtt: float | None, nbytes: int, copies: int) -> float:
        """Seconds without an acknowledgement after which a share of ``nbytes`` bytes that
        was sent ``copies`` times again already is sent once more.

        ``rtt`` is the median of the link's recent round trips (None while none is known),
        timed from shares never sent again (Karn's rule: an acknowledgement of a share sent
        twice does not say which copy it answers). Each copy doubles the wait (exponential
        back-off), so a slow link gets a few copies, not a storm, and a dead one ever fewer
        until it is suspected.
        """
        if rtt is not None:
            first = max(self.retry_min_s, self.retry_rtts * rtt)
        else:
            first = self.retry_first_s + nbytes / self.assumed_bytes_per_s
        return min(self.retry_max_s, math.ldexp(first, min(copies, 32)))
