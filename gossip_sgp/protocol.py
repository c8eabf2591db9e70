"""One node's side of push-sum gossip, independent of threads and transports.

:class:`PushSumProtocol` turns a round of the topology into outgoing messages (splitting the
node's mass) and folds received mass back in. The simulator drives many of these in one
event loop; a training worker drives one from :class:`gossip_sgp.SGP`. Both run this code.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any

import torch

from gossip_sgp.compression import Codec, Layout, References, compress_share, parse_codec
from gossip_sgp.errors import WireError
from gossip_sgp.mailbox import Mailbox
from gossip_sgp.message import Message
from gossip_sgp.pushsum import PushSumState, Share
from gossip_sgp.wire import MAX_STEPS
from topologies import Topology

log = logging.getLogger(__name__)

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
        compression: str | Codec = "none",
        sequence: dict[int, int] | None = None,
    ) -> None:
        """``sequence``: the next sequence number per out-peer, shared with the other
        protocols that send over this node's links (the fragments of a ``StreamingSGP``):
        the links acknowledge and resend by sequence number, so one link numbers all its
        shares in one series. Default: this protocol's own."""
        if not 0 <= rank < topology.world_size:
            raise ValueError(f"rank {rank} out of range for world size {topology.world_size}")
        self.rank = rank
        self.topology = topology
        self.state = state
        self.fingerprint = fingerprint
        in_degree = max(
            (len(topology.in_peers(rank, r)) for r in range(topology.period)), default=0
        )
        mailbox = Mailbox(coalesce=coalesce)
        # Rounds ahead: room for a whole horizon of in-peers' shares, and those beyond it.
        mailbox.max_pending = max(1, mailbox.horizon * in_degree + mailbox.beyond)
        mailbox.own_steps = lambda: self.state.steps
        self.mailbox = mailbox
        self.codec = compression if isinstance(compression, Codec) else parse_codec(compression)
        """Codec of outgoing numerator shares (received messages name their own)."""
        self.layout: Layout = [(x.numel(), x.dtype, x.device) for x in state.numerator]
        """What received numerators must look like: this node's own numerator layout."""
        self._next_seq: dict[int, int] = {} if sequence is None else sequence
        self._references = References()

    def emit(self, round: int, *, gauge: float = 0.0, adpsgd: int = 0) -> list[Message]:
        """Split this node's mass for ``round`` and return one message per out-peer.

        ``gauge`` is a scalar piggybacked on every message (see ``SGP.consensus``);
        ``adpsgd`` marks the messages as AD-PSGD requests (``Message.adpsgd``).
        """
        mixing = self.topology.mixing(self.rank, round)
        self_weight, out = mixing.self_weight, mixing.out
        if self.codec.step != 1.0:  # a damped consensus step keeps more of the mass
            out = {peer: p * self.codec.step for peer, p in out.items()}
            self_weight = 1.0 - sum(out.values())
        return self._emit(round, self_weight, out, gauge=gauge, adpsgd=adpsgd)

    def give(
        self, out: dict[int, float], round: int, *, answer: bool = False, adpsgd: int = 0
    ) -> list[Message]:
        """Split off ``out[peer]`` of this node's mass for each peer, off the topology's
        schedule, as messages of ``round`` coded with the protocol's codec at the time (in
        ``consensus()`` that may be uncompressed) and numbered in their links' sequences.
        ``answer`` marks them as a finished worker's answers to one still training
        (``SGP.consensus``), ``adpsgd`` as AD-PSGD answers."""
        if not out or any(not 0.0 < p < 1.0 for p in out.values()) or sum(out.values()) >= 1.0:
            raise ValueError(f"fractions {out} must be in (0, 1) and sum to less than 1")
        return self._emit(
            round, 1.0 - sum(out.values()), out, gauge=0.0, answer=answer, adpsgd=adpsgd
        )

    def _emit(
        self,
        round: int,
        self_weight: float,
        out: dict[int, float],
        *,
        gauge: float,
        answer: bool = False,
        adpsgd: int = 0,
    ) -> list[Message]:
        shares = self.state.split(self_weight, out)
        now = time.time()
        messages = []
        codec = self.codec
        raw_bytes = None
        if codec.name != "none":
            raw_bytes = sum(n * dtype.itemsize for n, dtype, _ in self.layout)
        for peer, (tensors, weight) in shares.items():
            seq = self._next_seq.get(peer, 0)
            ref: tuple[int, bool] | None = None
            residual: tuple[torch.Tensor, ...] | None = None
            if codec.reference:
                tensors, residual, ref = self._references.encode(codec, peer, seq, tensors)
            else:
                # (consensus() sends uncompressed shares for a codec that cannot agree: the
                # receiver's reference does not follow them, so the next difference-coded
                # share of this link must be a key frame)
                self._references.forget_outbound(peer)
                if codec.name != "none":
                    tensors, residual = compress_share(codec, tensors)
            if residual is not None:
                # Error feedback: keep what the codec drops, so no mass is lost.
                self.state.fold(residual, 0.0)
            messages.append(
                self._message(
                    peer,
                    round,
                    tensors,
                    weight,
                    now,
                    gauge=gauge,
                    codec=codec.spec,
                    answer=answer,
                    adpsgd=adpsgd,
                    raw_bytes=raw_bytes,
                    ref=None if ref is None else ref[0],
                    key=ref is not None and ref[1],
                )
            )
        return messages

    def _message(
        self,
        peer: int,
        round: int,
        tensors: tuple[torch.Tensor, ...],
        weight: float,
        sent_at: float,
        **fields: Any,
    ) -> Message:
        """A MASS message to ``peer`` with the link's next sequence number."""
        seq = self._next_seq.get(peer, 0)
        self._next_seq[peer] = seq + 1
        return Message(
            sender=self.rank,
            receiver=peer,
            round=round,
            seq=seq,
            weight=weight,
            tensors=tensors,
            fingerprint=self.fingerprint,
            sent_at=sent_at,
            steps=min(max(0, int(self.state.steps + 0.5)), MAX_STEPS),
            **fields,
        )

    def peer_restarted(self, peer: int, *, inbound: bool = True, outbound: bool = True) -> None:
        """``peer`` is a new life of its worker, with no references (codec option ``ref``):
        forget this node's references of the links to it (``outbound``: the next message to
        it is a key frame) and from it (``inbound``: its own first message is one). Call
        ``outbound`` from the thread that emits, ``inbound`` from the one that decodes."""
        if outbound:
            self._references.forget_outbound(peer)
        if inbound:
            self._references.forget_inbound(peer)

    def give_half(self, peer: int, round: int) -> Message:
        """Split off half of this node's mass for ``peer`` (a worker that rejoins the job),
        as one uncompressed message of ``round`` marked ``join``."""
        ((tensors, weight),) = self.state.split(0.5, {peer: 0.5}).values()
        return self._message(peer, round, tensors, weight, time.time(), join=True)

    def receive(self, message: Message) -> bool:
        """Decode a received message and store its mass; False for a duplicate.

        Raises ``WireError`` (nothing is stored) for a payload that does not decode.
        """
        return self.mailbox.put(self.decode(message))

    def passed(self, sender: int, seq: int) -> None:
        """Share ``seq`` from ``sender`` went to a sibling protocol numbering the link's
        shares in the same series (``sequence=``): difference coding (``ref``) of this
        protocol's shares from ``sender`` goes on after it (gossip thread)."""
        self._references.passed(sender, seq)

    def references_of(self, message: Message) -> bool:
        """Whether ``message`` is difference-coded (codec option ``ref``); False for a codec
        spec that does not parse."""
        try:
            return _codec(message.codec).reference
        except ValueError:
            return False

    def decode(self, message: Message, *, commit: bool = True) -> Message:
        """``message`` with its numerator decoded and checked against this node's layout.

        Call it once per received message, then hand the result to the mailbox. A
        difference-coded message (codec option ``ref``) decodes against the reference of
        its link, which ``commit`` then advances (``commit=False`` only looks, e.g. to count
        the mass of messages in flight); one already applied comes back as it is, for the
        mailbox to reject as a duplicate by its sequence number, and one older than the
        link's reference that the mailbox never saw is a ``no_reference`` reject. Raises
        ``WireError`` for an unknown codec or a payload that does not fit.
        """
        try:
            codec = _codec(message.codec)
        except ValueError as exc:
            raise WireError("bad_codec", str(exc)) from None
        if codec.reference and self._references.applied(message):
            if self.mailbox.is_duplicate(message.sender, message.seq):
                return message
            # Older than its link's reference but never received: a late copy of a message
            # a key frame overtook. Its payload is a difference from a reference gone by:
            # it cannot be placed (and must not reach the mailbox as it is).
            raise WireError("no_reference", f"message {message.seq} of a link already past it")
        try:
            if codec.reference:
                tensors = self._references.decode(codec, message, self.layout, commit=commit)
            else:
                tensors = codec.decode(message.tensors, self.layout, message.raw_bytes)
        except WireError:
            raise
        except Exception as exc:  # nothing a peer sends may raise anything but a WireError
            why = f"{type(exc).__name__}: {exc}"
            raise WireError("malformed", f"payload does not decode ({why})") from None
        if len(tensors) == len(message.tensors) and all(
            a is b for a, b in zip(tensors, message.tensors, strict=True)
        ):
            return message  # uncompressed, already on this node's device
        return dataclasses.replace(message, tensors=tensors)

    def expected(self, round: int) -> list[tuple[int, int]]:
        """The ``(sender, round)`` pairs that reach this node in ``round``."""
        return [(peer, round) for peer in self.topology.in_peers(self.rank, round)]

    def absorb(self, max_round: int | None = None) -> bool:
        """Fold received mass of rounds ``<= max_round`` (all when None); True if any.

        With the mailbox's ``lag_limit``: first the mass far ahead of this node's model,
        whose model this node takes (``PushSumState.adopt``), however light (mixed in by
        weight, a light share would leave a blend of the old model and the current one),
        then the rest as usual, less the models of the mass far behind
        (``PushSumState.fold_weight``): a model never mixes with one more than
        ``lag_limit`` training steps away. A step that would overflow folds as usual, or
        (the weight of a model far behind) is counted as ``non_finite`` and left out."""
        taken = self.mailbox.take_mass(max_round)
        if not taken:
            return False
        state, limit = self.state, self.mailbox.lag_limit
        adopted = False
        if taken.ahead is not None:
            tensors, weight = taken.ahead
            if state.weight > 0.0:
                adopted = state.adopt(tensors, weight, taken.ahead_steps)
            self.fold(taken.ahead, max_round, taken.ahead_steps)
        if taken.share is not None:
            steps = taken.steps
            if adopted and limit is not None and steps is not None and steps < state.steps - limit:
                # Behind the model this node just took from the mass far ahead.
                taken.behind += taken.share[1]
                self.mailbox.count_lagged("behind")
            else:
                self.fold(taken.share, max_round, steps)
        if taken.behind > 0.0 and not state.fold_weight(taken.behind):
            self._overflowed(taken.behind, max_round)  # (a forger's values or weights)
        return True

    def fold(self, share: Share, max_round: int | None, steps: float | None = None) -> None:
        """Fold a share taken from the mailbox (rounds ``<= max_round``, its model ``steps``
        training steps in, None: as many as this node's) into the state; one that would
        make ``x`` non-finite is taken out again, counted and logged."""
        if not self.state.fold_finite(*share, steps):
            self._overflowed(share[1], max_round)

    def _overflowed(self, weight: float, max_round: int | None) -> None:
        """Count and log mass that would have made ``x`` non-finite (left out)."""
        # Only shares with values near the dtype's largest get here (a forger's): x would
        # have become infinite for good.
        count = self.mailbox.count_reject("non_finite")
        if count & (count - 1) == 0:  # 1, 2, 4, ...
            log.warning(
                "rank %d: received mass of rounds <= %s overflowed the model; taken out "
                "again (weight %.4g lost, %d times so far)",
                self.rank,
                max_round,
                weight,
                count,
            )

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
        self._references.out.clear()  # difference coding restarts with key frames


@functools.lru_cache(maxsize=64)
def _codec(spec: str) -> Codec:
    return parse_codec(spec)
