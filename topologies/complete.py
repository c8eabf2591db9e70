"""The complete graph: every round is an exact average. The baseline to compare against."""

from __future__ import annotations

from topologies.base import Topology


class CompleteGraph(Topology):
    """Every rank pushes ``1/n`` of its mass to every other rank in every round.

    Each round equals an AllReduce average, at the cost of ``n-1`` messages per rank per round.
    Use it as a reference point, or for a handful of ranks on fast links.
    """

    name = "complete"

    def out_peers(self, rank: int, round: int) -> list[int]:
        rank, round = self._check(rank, round)
        return [peer for peer in range(self.world_size) if peer != rank]

    def in_peers(self, rank: int, round: int) -> list[int]:
        return self.out_peers(rank, round)

    @property
    def period(self) -> int:
        return 1

    @property
    def exact_rounds(self) -> int | None:
        """``1``: one round averages exactly (``0`` for a single rank)."""
        return 1 if self.world_size > 1 else 0
