"""Perfect even/odd matchings at exponential offsets, for pairwise (D-PSGD style) averaging."""

from __future__ import annotations

from topologies.base import Topology


class BipartiteExponentialGraph(Topology):
    """Each round, every even rank is paired with exactly one odd rank, and they average.

    Round ``t`` uses the odd offset ``o = 2**(t+1) - 1``: even rank ``r`` pairs with
    ``(r + o) % n``, odd rank ``r`` with ``(r - o) % n``. Because ``n`` is even and ``o`` odd, this
    is a perfect matching (each rank has exactly one partner, and the partner's partner is the
    rank itself), so ``in_peers == out_peers == [partner]`` and both keep half. Every exchange is a
    symmetric push-pull between two ranks, which is what pairwise gossip (D-PSGD, AD-PSGD)
    needs, and no rank ever receives more than one message per round.

    The offsets are chosen so that the even ranks see shifts ``1, 2, 4, ...`` between rounds;
    for ``n`` a power of two that makes ``log2 n`` rounds an exact average. The schedule has
    ``1 + (n/2 - 1).bit_length()`` rounds. ``world_size`` must be even, or 1 (a single rank has
    no partner, so single-process runs need no special configuration).
    """

    name = "bipartite"

    def __init__(self, world_size: int) -> None:
        super().__init__(world_size)
        n = self.world_size
        if n % 2 and n > 1:
            raise ValueError(f"bipartite graphs need an even world_size, got {n}")
        rounds = 1 + (n // 2 - 1).bit_length() if n > 1 else 1
        self._offsets = tuple((2 ** (t + 1) - 1) % n for t in range(rounds))
        self._exact = (n.bit_length() - 1) if n & (n - 1) == 0 else None

    def out_peers(self, rank: int, round: int) -> list[int]:
        rank, round = self._check(rank, round)
        if self.world_size == 1:
            return []
        offset = self._offsets[round % len(self._offsets)]
        return [(rank - offset if rank % 2 else rank + offset) % self.world_size]

    def in_peers(self, rank: int, round: int) -> list[int]:
        return self.out_peers(rank, round)

    @property
    def period(self) -> int:
        return len(self._offsets)

    @property
    def exact_rounds(self) -> int | None:
        """``log2 n`` when ``n`` is a power of two, else None."""
        return self._exact
