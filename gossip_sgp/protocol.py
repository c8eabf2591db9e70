"""One node's side of push-sum gossip, independent of threads and transports.

:class:`PushSumProtocol` turns a round of the topology into outgoing messages (splitting the
node's mass) and folds received mass back in. The simulator drives many of these in one
event loop; a training worker drives one from :class:`gossip_sgp.SGP`. Both run this code.
"""

from __future__ import annotations

import time

from gossip_sgp.mailbox import Mailbox
from gossip_sgp.message import Message
from gossip_sgp.pushsum import PushSumState
from topologies import Topology

__all__ = ["PushSumProtocol"]


class PushSumProtocol:
    """Push-sum gossip for node ``rank`` of ``topology`` over ``state``."""

    def __init__(
        self,
        rank: int,
        topology: Topology,
        state: PushSumState,
        *,
        fingerprint: int = 0,
        coalesce: bool = False,
    ) -> None:
        if not 0 <= rank < topology.world_size:
            raise ValueError(f"rank {rank} out of range for world size {topology.world_size}")
        self.rank = rank
        self.topology = topology
        self.state = state
        self.fingerprint = fingerprint
        self.mailbox = Mailbox(coalesce=coalesce)
        self._next_seq: dict[int, int] = {}

    def emit(self, round: int, *, gauge: float = 0.0) -> list[Message]:
        """Split this node's mass for ``round`` and return one message per out-peer.

        ``gauge`` is a scalar piggybacked on every message (see ``SGP.consensus``).
        """
        mixing = self.topology.mixing(self.rank, round)
        shares = self.state.split(mixing.self_weight, mixing.out)
        now = time.time()
        messages = []
        for peer, (tensors, weight) in shares.items():
            seq = self._next_seq.get(peer, 0)
            self._next_seq[peer] = seq + 1
            messages.append(
                Message(
                    sender=self.rank,
                    receiver=peer,
                    round=round,
                    seq=seq,
                    weight=weight,
                    tensors=tensors,
                    fingerprint=self.fingerprint,
                    sent_at=now,
                    gauge=gauge,
                )
            )
        return messages

    def expected(self, round: int) -> list[tuple[int, int]]:
        """The ``(sender, round)`` pairs that reach this node in ``round``."""
        return [(peer, round) for peer in self.topology.in_peers(self.rank, round)]

    def absorb(self, max_round: int | None = None) -> bool:
        """Fold received mass of rounds ``<= max_round`` (all when None); True if any."""
        share = self.mailbox.take(max_round)
        if share is None:
            return False
        self.state.fold(*share)
        return True

    def sequence_numbers(self) -> dict[int, int]:
        """Next sequence number per out-peer (saved in checkpoints)."""
        return dict(self._next_seq)

    def restore_sequence_numbers(self, next_seq: dict[int, int]) -> None:
        """Continue numbering from a checkpoint, so peers do not reject new messages.

        Numbers never move backwards: peers have seen every number this node already used,
        and would reject a reused one as a replay.
        """
        for peer, seq in next_seq.items():
            self._next_seq[int(peer)] = max(self._next_seq.get(int(peer), 0), int(seq))
