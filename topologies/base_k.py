"""The Base-(k+1) graph: exact averaging in finitely many rounds for any number of ranks.

Takezawa, Sato, Bao, Niwa and Yamada, "Beyond Exponential Graph: Communication-Efficient
Topologies for Decentralized Learning via Finite-time Convergence", NeurIPS 2023. The
construction is explained step by step in ``docs/topologies.md``; in brief:

* **Clique rounds** ("k-peer hyper-hypercube"): if every prime factor of ``m`` is at most
  ``k+1``, write ``m = f_1 * ... * f_L`` with factors in ``[2, k+1]`` and number the ranks in mixed
  radix. Round ``l`` averages each group of ranks that differ only in digit ``l`` (cliques of
  ``f_l <= k+1`` ranks). After ``L`` rounds every rank holds the exact average.
* **Simple Base-(k+1) graph**, any ``m``: write ``m`` in base ``k+1``,
  ``m = a_1 (k+1)^p_1 + ... + a_L (k+1)^p_L``, and split the ranks into blocks ``V_l`` of those
  sizes. Each block averages itself with clique rounds. Then, for ``l = 1 .. L-1``, every rank
  of the later blocks ``V_{l+1} ∪ ... ∪ V_L`` exchanges with one rank in each of the ``a_l``
  sub-blocks of ``V_l`` (size ``(k+1)^p_l``, always large enough), with weights that give the
  later ranks the right share of ``V_l``'s average; each sub-block of ``V_l`` then re-averages
  itself with clique rounds, landing on the global average.
* **Base-(k+1) graph**: split ``m = d * (m/d)`` with ``d`` a divisor whose prime factors are all
  at most ``k+1``; run the simple graph inside ``d`` rows of ``m/d`` ranks, then clique rounds
  down the ``m/d`` columns of ``d`` ranks. The split (including no split) with the fewest
  rounds wins.

All mixing matrices are symmetric and doubly stochastic, so in push-sum a rank sends
``W[j, i] * x_i`` to ``j``, in-peers equal out-peers, and the push-sum weights stay 1.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from topologies.base import Mixing, Topology, require_int

_Entry = tuple[float, tuple[int, ...], tuple[float, ...]]
"""One rank in one round: self weight, sorted peers, and the weight sent to each peer."""


class BaseKGraph(Topology):
    """Finite-time exact averaging for any ``world_size`` with at most ``k`` peers per round.

    After ``exact_rounds`` synchronous rounds from round 0 every rank holds the exact average,
    whatever ``n`` is; the 1-peer exponential graph manages that only for powers of two. Every
    exchange is symmetric (in-peers equal out-peers) and weights are not uniform. The schedule
    then repeats, which keeps mixing, though a window that does not start at a multiple of
    ``period`` carries no exactness guarantee.

    ``k`` is a cap on the degree, not a target: ranks are often idle or use fewer peers in a
    round, and ``k >= n - 1`` simply gives the complete graph (one round).
    """

    name = "base-k"

    def __init__(self, world_size: int, k: int = 1) -> None:
        super().__init__(world_size)
        self.k = require_int(k, "k", 1)
        self._table = _build(self.world_size, self.k)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(world_size={self.world_size}, k={self.k})"

    def out_peers(self, rank: int, round: int) -> list[int]:
        rank, round = self._check(rank, round)
        if not self._table:
            return []
        return list(self._table[round % len(self._table)][rank][1])

    def in_peers(self, rank: int, round: int) -> list[int]:
        return self.out_peers(rank, round)

    def mixing(self, rank: int, round: int) -> Mixing:
        rank, round = self._check(rank, round)
        if not self._table:
            return Mixing(1.0, {})
        self_weight, peers, weights = self._table[round % len(self._table)][rank]
        return Mixing(self_weight, dict(zip(peers, weights, strict=True)))

    @property
    def period(self) -> int:
        return max(len(self._table), 1)

    @property
    def exact_rounds(self) -> int | None:
        """The schedule's length: at most about ``2 log_{k+1} n + 2`` rounds."""
        return len(self._table)


class _Round:
    """A symmetric doubly stochastic mixing matrix under construction, one row per rank."""

    def __init__(self, n: int) -> None:
        self.self_weight = [1.0] * n
        self.links: list[dict[int, float]] = [{} for _ in range(n)]

    def clique(self, ranks: Sequence[int]) -> None:
        """Average ``ranks`` exactly: everyone keeps and sends ``1/len(ranks)``."""
        weight = 1.0 / len(ranks)
        for i in ranks:
            self.self_weight[i] = weight
            self.links[i].update((j, weight) for j in ranks if j != i)

    def freeze(self) -> tuple[_Entry, ...]:
        return tuple(
            (self_weight, tuple(sorted(links)), tuple(links[j] for j in sorted(links)))
            for self_weight, links in zip(self.self_weight, self.links, strict=True)
        )


def _build(n: int, k: int) -> tuple[tuple[_Entry, ...], ...]:
    """The whole schedule for ``n`` ranks: one frozen table per round."""
    columns, rows = _best_split(n, k)
    rounds = [_Round(n) for _ in range(_simple_length(rows, k) + _clique_length(columns, k))]
    for row in range(columns):
        _write_simple(rounds, 0, range(row * rows, (row + 1) * rows), k)
    for column in range(rows):
        _write_cliques(rounds, _simple_length(rows, k), range(column, n, rows), k)
    return tuple(r.freeze() for r in rounds)


def _best_split(n: int, k: int) -> tuple[int, int]:
    """``(d, n // d)`` with ``d`` a ``(k+1)``-smooth divisor of ``n`` giving the fewest rounds."""
    best = (_simple_length(n, k), 1)
    for d in range(2, n + 1):
        if n % d == 0 and _is_smooth(d, k):
            best = min(best, (_simple_length(n // d, k) + _clique_length(d, k), d))
    return best[1], n // best[1]


def _is_smooth(m: int, k: int) -> bool:
    """Whether every prime factor of ``m`` is at most ``k + 1``."""
    for factor in range(2, min(k + 1, m) + 1):
        while m % factor == 0:
            m //= factor
    return m == 1


@functools.lru_cache(maxsize=4096)
def _factors(m: int, k: int) -> tuple[int, ...]:
    """Fewest factors in ``[2, k+1]`` whose product is the smooth number ``m`` (``()`` for 1)."""
    if m == 1:
        return ()
    options = [(f, *_factors(m // f, k)) for f in range(min(k + 1, m), 1, -1) if m % f == 0]
    return min(options, key=len)


def _clique_length(m: int, k: int) -> int:
    return len(_factors(m, k))


def _digits(m: int, k: int) -> list[tuple[int, int]]:
    """Non-zero base-``(k+1)`` digits of ``m`` as ``(a, p)`` with ``p`` descending."""
    digits: list[tuple[int, int]] = []
    p = 0
    while m:
        m, a = divmod(m, k + 1)
        if a:
            digits.append((a, p))
        p += 1
    return digits[::-1]


def _simple_length(m: int, k: int) -> int:
    """Rounds of the simple Base-(k+1) graph on ``m`` ranks."""
    if _is_smooth(m, k):
        return _clique_length(m, k)
    a, p = _digits(m, k)[0]
    return _clique_length(a * (k + 1) ** p, k) + p + 1


def _write_cliques(rounds: list[_Round], start: int, ranks: Sequence[int], k: int) -> None:
    """Average the smooth-sized group ``ranks`` exactly in rounds ``start, start+1, ...``."""
    stride = 1
    for t, f in enumerate(_factors(len(ranks), k)):
        for base in range(len(ranks)):
            if (base // stride) % f == 0:
                rounds[start + t].clique([ranks[base + c * stride] for c in range(f)])
        stride *= f


def _write_simple(rounds: list[_Round], start: int, ranks: Sequence[int], k: int) -> None:
    """Average ``ranks`` (any count) exactly in rounds ``start, start+1, ...``."""
    if _is_smooth(len(ranks), k):
        _write_cliques(rounds, start, ranks, k)
        return
    blocks: list[tuple[int, int, Sequence[int]]] = []
    first = 0
    for a, p in _digits(len(ranks), k):
        blocks.append((a, (k + 1) ** p, ranks[first : first + a * (k + 1) ** p]))
        first += a * (k + 1) ** p
    # Every block averages itself; the first (largest) block takes longest.
    for _, _, block in blocks:
        _write_cliques(rounds, start, block, k)
    merge = start + _clique_length(len(blocks[0][2]), k)
    for index, (a, size, block) in enumerate(blocks[:-1]):
        later = [rank for _, _, rest in blocks[index + 1 :] for rank in rest]
        # Each later rank takes `share` of this block's average, split over one rank in each
        # sub-block: the later ranks' mean becomes the mean over block + later ranks, and each
        # sub-block's sum gains exactly what its re-averaging needs to reach that mean too.
        share = len(block) / (len(block) + len(later))
        mix = rounds[merge + index]
        for i, rank in enumerate(later):
            mix.self_weight[rank] = 1.0 - share
            for sub in range(a):
                partner = block[sub * size + i]
                mix.links[rank][partner] = mix.links[partner][rank] = share / a
                mix.self_weight[partner] = 1.0 - share / a
        for sub in range(a):
            _write_cliques(rounds, merge + index + 1, block[sub * size : (sub + 1) * size], k)
