"""The directed ring: the sparsest connected schedule, and the slowest to mix."""

from __future__ import annotations

from topologies.base import Topology


class RingGraph(Topology):
    """Rank ``r`` pushes to ``r+1`` and receives from ``r-1`` (mod ``n``) in every round.

    One message per rank per round, always to the same neighbour, which suits a physical ring
    of links; but information needs ``n-1`` rounds to go around, so mixing slows linearly with
    ``n``. Prefer the exponential graph unless links to far ranks are expensive. With two ranks
    the peer is the same in both directions and one round averages exactly.
    """

    name = "ring"

    def out_peers(self, rank: int, round: int) -> list[int]:
        rank, round = self._check(rank, round)
        n = self.world_size
        return [(rank + 1) % n] if n > 1 else []

    def in_peers(self, rank: int, round: int) -> list[int]:
        rank, round = self._check(rank, round)
        n = self.world_size
        return [(rank - 1) % n] if n > 1 else []

    @property
    def period(self) -> int:
        return 1

    @property
    def exact_rounds(self) -> int | None:
        """``1`` for two ranks (a pairwise average), None for three or more."""
        return {1: 0, 2: 1}.get(self.world_size)
