"""Failure detection: which peers are alive, with timeouts that adapt to the network.

Every gossip node hears from its neighbours regularly: push-sum messages, acknowledgements,
and heartbeats the node sends when it has sent a neighbour nothing for a while. The detector
keeps, per peer, the recent gaps between two things heard and suspects a peer when its
silence exceeds ``median + k * MAD`` of those gaps (median absolute deviation: robust to the
odd long gap), but never less than ``floor`` seconds. So the timeout follows the network:
a LAN peer heard every few milliseconds is suspected after a fraction of a second of silence
beyond its heartbeat rhythm, a WAN peer with jittery delivery gets a longer timeout, and no
constant needs tuning to the network. Before ``min_samples`` gaps are known, ``initial``
seconds apply.

A suspected peer that is heard again is re-admitted at once.

:func:`lost_weight` adds up, from the surviving workers' :meth:`gossip_sgp.SGP.mass_report`,
the push-sum weight a job lost with its dead workers.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Collection, Mapping
from typing import Any

__all__ = ["FailureDetector", "lost_weight"]


def lost_weight(reports: Mapping[int, Mapping[str, Any]], dead: Collection[int]) -> float:
    """The push-sum weight lost with the workers ``dead`` (and with the earlier life of a
    worker that rejoined), from the reports of the workers alive at the end.

    ``reports[rank]`` is survivor ``rank``'s :meth:`gossip_sgp.SGP.mass_report`. A dead
    worker took with it what it held, its messages that never arrived, and the messages sent
    to it that it never folded in. The survivors' ledgers give the first two together: it
    started with weight 1, plus the weight each survivor sent it and it acknowledged, minus
    the weight each survivor received from it. The third is what each survivor wrote off as
    lost when it suspected it (``lost_weight``, which also holds what the survivor dropped
    itself). A worker that rejoined (``"rejoined"`` in its report) started its new life with
    no weight; what its own ledger says it gained since is taken out again, and the rest is
    what its earlier life took with it. With ``n`` workers, the weights of the workers alive
    at the end add up to ``n`` minus this.
    """
    lost = math.fsum(float(r["lost_weight"]) for r in reports.values())
    rejoined = [rank for rank, r in reports.items() if r.get("rejoined")]
    for rank in [*dead, *rejoined]:
        own = reports[rank]["net_weight_to"].values() if rank in reports else ()
        lost += 1.0 + math.fsum(
            [float(r["net_weight_to"].get(str(rank), 0.0)) for r in reports.values()]
            + [float(v) for v in own]
        )
    return lost


class FailureDetector:
    """Per-peer adaptive timeouts (not thread-safe: use it from one thread).

    Args:
        floor: the shortest timeout, in seconds (a few heartbeat intervals).
        initial: the timeout before ``min_samples`` gaps have been observed.
        k: how many median absolute deviations above the median gap a silence may last.
        history: gaps kept per peer.
        min_samples: gaps needed before the adaptive timeout applies.
    """

    def __init__(
        self,
        *,
        floor: float,
        initial: float,
        k: float = 8.0,
        history: int = 64,
        min_samples: int = 8,
    ) -> None:
        if not 0 < floor <= initial:
            raise ValueError(f"need 0 < floor <= initial, got floor={floor}, initial={initial}")
        if k <= 0 or history < 2 or not 2 <= min_samples <= history:
            raise ValueError("need k > 0 and 2 <= min_samples <= history")
        self.floor, self.initial, self.k = floor, initial, k
        self.min_samples = min_samples
        self._history = history
        self._last: dict[int, float] = {}
        self._gaps: dict[int, deque[float]] = {}
        self.down: set[int] = set()
        """Peers suspected now."""

    def heard(self, peer: int, now: float) -> bool:
        """Record that ``peer`` was heard at ``now``; True if it was down and is back."""
        last = self._last.get(peer)
        if last is not None and now > last:
            gaps = self._gaps.get(peer)
            if gaps is None:
                gaps = self._gaps[peer] = deque(maxlen=self._history)
            gaps.append(now - last)
        self._last[peer] = max(now, last or now)
        if peer in self.down:
            self.down.discard(peer)
            # The silence was an outage, not a gap of the normal rhythm.
            gaps = self._gaps.get(peer)
            if gaps:
                gaps.pop()
            return True
        return False

    def timeout(self, peer: int) -> float:
        """Seconds of silence after which ``peer`` is suspected."""
        gaps = self._gaps.get(peer)
        if gaps is None or len(gaps) < self.min_samples:
            return self.initial
        median = statistics.median(gaps)
        mad = statistics.median(abs(g - median) for g in gaps)
        return max(self.floor, median + self.k * mad)

    def check(self, now: float) -> list[int]:
        """Peers that have just become suspected (silent longer than their timeout)."""
        newly = [
            peer
            for peer, last in self._last.items()
            if peer not in self.down and now - last > self.timeout(peer)
        ]
        self.down.update(newly)
        return sorted(newly)
