"""The interface every peer schedule implements, and the mixing weights it hands out.

A topology is a pure function of ``(world_size, rank, round)``: every rank computes the same
schedule locally, so no coordination is ever needed to agree on who talks to whom. Peer lists
are returned sorted ascending; they never contain duplicates or the rank itself.
"""

from __future__ import annotations

import abc
import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

_SUM_TOLERANCE = 1e-9


@dataclass(frozen=True, slots=True)
class Mixing:
    """One column of a column-stochastic mixing matrix: how a rank splits its mass in a round.

    Push-sum keeps ``self_weight * (x, w)`` and sends ``out[j] * (x, w)`` to each out-peer ``j``.
    The weights sum to one, so mass only moves and is never created or lost.
    """

    self_weight: float
    """``p_ii``: the share a rank keeps."""
    out: dict[int, float]
    """Out-peer rank -> ``p_ji``, the share sent to that peer."""

    def __post_init__(self) -> None:
        total = self.self_weight + math.fsum(self.out.values())
        if (
            not 0.0 <= self.self_weight <= 1.0
            or any(not weight > 0.0 for weight in self.out.values())
            or abs(total - 1.0) > _SUM_TOLERANCE
        ):
            raise ValueError(
                "mixing weights must be positive (self_weight may be 0) and sum to 1, got "
                f"self_weight={self.self_weight!r} and out={self.out!r} (sum {total!r})"
            )


def require_int(value: object, what: str, minimum: int | None = None) -> int:
    """Return ``value`` as an ``int`` if it is an integer ``>= minimum``, else raise ValueError.

    Internal helper shared by the topology modules (not re-exported).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an int, got {value!r}")
    number = int(value)
    if minimum is not None and number < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {number}")
    return number


class Topology(abc.ABC):
    """A time-varying peer schedule for ``world_size`` ranks, indexed by gossip round.

    ``out_peers`` are the ranks this rank pushes to in a round; ``in_peers`` the ranks that push
    to it, which is exactly what a synchronous receiver must wait for. The schedule repeats
    every ``period`` rounds.
    """

    name: ClassVar[str]
    """The short name ``topologies.get`` knows this topology by."""

    world_size: int
    """Number of ranks ``n``; ranks are ``0 .. n-1``."""

    def __init__(self, world_size: int) -> None:
        self.world_size = require_int(world_size, "world_size", 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(world_size={self.world_size})"

    @abc.abstractmethod
    def out_peers(self, rank: int, round: int) -> list[int]:
        """Ranks that ``rank`` sends to in ``round``, sorted ascending."""

    @abc.abstractmethod
    def in_peers(self, rank: int, round: int) -> list[int]:
        """Ranks that send to ``rank`` in ``round``, sorted ascending."""

    def mixing(self, rank: int, round: int) -> Mixing:
        """How ``rank`` splits its mass in ``round``: uniformly, ``1/(d+1)`` for ``d`` out-peers."""
        peers = self.out_peers(rank, round)
        weight = 1.0 / (len(peers) + 1)
        return Mixing(weight, dict.fromkeys(peers, weight))

    @property
    @abc.abstractmethod
    def period(self) -> int:
        """Rounds after which the schedule repeats (at least 1)."""

    @property
    @abc.abstractmethod
    def exact_rounds(self) -> int | None:
        """Rounds after which synchronous gossip started at round 0 holds the exact average.

        ``None`` when no number of rounds gives the exact average for every input (push-sum
        still converges, geometrically). ``0`` for a single rank.
        """

    def _check(self, rank: int, round: int) -> tuple[int, int]:
        """``(rank, round)`` as ints; ValueError unless ``0 <= rank < n`` and ``round >= 0``."""
        if type(rank) is int and type(round) is int and 0 <= rank < self.world_size and round >= 0:
            return rank, round
        rank = require_int(rank, "rank")
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} out of range [0, {self.world_size})")
        return rank, require_int(round, "round", 0)
