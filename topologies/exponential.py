"""The time-varying directed exponential graph of Stochastic Gradient Push (Assran et al., 2019)."""

from __future__ import annotations

import math

from topologies.base import Topology, require_int


class DirectedExponentialGraph(Topology):
    """Each round, push to ``peers_per_round`` ranks at exponentially growing offsets.

    With one peer per round and ``L = (n-1).bit_length()``, rank ``r`` pushes to
    ``(r + 2**(t % L)) % n`` in round ``t`` and receives from ``(r - 2**(t % L)) % n``: every rank
    sends and receives exactly one message, and information from any rank reaches all others
    within ``L`` rounds. That is why it is SGP's default. For ``n`` a power of two, ``L`` rounds
    give the exact average; for other ``n`` push-sum converges geometrically instead.

    With ``k = peers_per_round > 1`` the offsets are ``j * (k+1)**i`` for ``i = 0, 1, ...`` and
    ``j = 1..k`` (in that order), keeping only offsets below ``n``; round ``t`` uses the next
    ``k`` of them, cycling through the list. Every round has exactly ``k`` distinct out-peers.
    Unlike the reference implementation no offset wraps past ``n``, so there are never
    self-edges (which lose mass) or duplicate peers. For ``n = (k+1)**L`` this is exact after
    ``L`` rounds.

    ``peers_per_round`` must be in ``[1, n)``. A single rank (``n = 1``) has no peers and
    accepts any ``peers_per_round >= 1``, so single-process runs need no special configuration.
    """

    name = "exponential"

    def __init__(self, world_size: int, peers_per_round: int = 1) -> None:
        super().__init__(world_size)
        n = self.world_size
        k = require_int(peers_per_round, "peers_per_round", 1)
        if n > 1 and k >= n:
            raise ValueError(f"peers_per_round must be < world_size ({n}), got {k}")
        self.peers_per_round = k
        offsets = _offsets(n, k)
        rounds = len(offsets) // math.gcd(len(offsets), k) if offsets else 1
        self._offsets = tuple(
            tuple(offsets[(t * k + i) % len(offsets)] for i in range(k)) if offsets else ()
            for t in range(rounds)
        )
        power, exponent = 1, 0
        while power < n:
            power, exponent = power * (k + 1), exponent + 1
        self._exact = exponent if power == n else None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(world_size={self.world_size}, "
            f"peers_per_round={self.peers_per_round})"
        )

    def out_peers(self, rank: int, round: int) -> list[int]:
        rank, round = self._check(rank, round)
        n = self.world_size
        return sorted((rank + offset) % n for offset in self._offsets[round % len(self._offsets)])

    def in_peers(self, rank: int, round: int) -> list[int]:
        rank, round = self._check(rank, round)
        n = self.world_size
        return sorted((rank - offset) % n for offset in self._offsets[round % len(self._offsets)])

    @property
    def period(self) -> int:
        return len(self._offsets)

    @property
    def exact_rounds(self) -> int | None:
        """``L`` when ``n == (k+1)**L`` (one peer: ``log2 n`` for ``n`` a power of 2), else None."""
        return self._exact


def _offsets(n: int, k: int) -> list[int]:
    """All offsets ``j * (k+1)**i < n`` with ``j = 1..k``, ``i`` ascending then ``j`` ascending."""
    offsets: list[int] = []
    scale = 1
    while scale < n:
        offsets.extend(j * scale for j in range(1, k + 1) if j * scale < n)
        scale *= k + 1
    return offsets
