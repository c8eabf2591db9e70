"""The push-sum message: what one node hands to another in one gossip round.

A message carries a share of the sender's numerator (one flat tensor per parameter group)
and, always, its share of the push-sum weight. Transports move ``Message`` objects; the
ZeroMQ transport turns them into frames with :mod:`gossip_sgp.wire`, the in-process
transport hands the object over as it is.

Ownership: once a message is sent, its tensors belong to the transport and the receiver.
The sender builds fresh tensors for every message and never writes to them again.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["Message", "MessageKind", "fingerprint"]


class MessageKind(enum.IntEnum):
    """What a message is for."""

    MASS = 0
    """A push-sum share: numerator tensors plus weight, to be folded in by the receiver."""
    ACK = 1
    """Receipt of the MASS message with the same ``seq`` on the reverse link; no tensors,
    weight 0. Lets a sender bound the mass it has in flight and measure round trips."""
    HEARTBEAT = 2
    """No tensors, weight 0: "I am alive", sent to a neighbour that has heard nothing else
    from this node for a while. With ``skip`` set it also says "no mass for you in
    ``round``" (the sender kept its mass because it suspects the receiver is down), so
    a receiver that is in fact alive does not wait for that round's message."""
    JOIN = 3
    """No tensors, weight 0: "I restarted, give me half of your mass" (see ``SGP.rejoin``).
    The receiver answers, at its next step, with a MASS message of half its numerator and
    weight, its ``round`` telling the joiner where the job is. With ``refused`` set it is
    the answer "too late": the sender is in ``consensus()``, the job is finishing."""


CONTROL_KINDS = frozenset({MessageKind.ACK, MessageKind.HEARTBEAT})
"""Kinds that travel on a link's control lane, never queued behind shares (see
``GossipNode`` and ``ZmqTransport``). ``JOIN`` stays on the share lane: a refusal must not
overtake the half-share its sender donated before (the joiner would give up while the share
is still on its way)."""


@dataclass(frozen=True, slots=True)
class Message:
    """One push-sum message from ``sender`` to ``receiver``.

    ``seq`` numbers the messages of one (sender, receiver) pair from 0 upwards; the receiver
    uses it to reject duplicates and replays, so mass is never applied twice.
    """

    sender: int
    """Rank of the sending node."""
    receiver: int
    """Rank of the node the message is addressed to."""
    round: int
    """Gossip round in which the sender produced this share."""
    seq: int
    """Per (sender, receiver) sequence number, starting at 0."""
    weight: float
    """The push-sum weight share. Always sent, never compressed."""
    tensors: tuple[torch.Tensor, ...]
    """Numerator share: one flat tensor per parameter group."""
    fingerprint: int = 0
    """64-bit fingerprint of the model layout (names, shapes, dtypes); see ``fingerprint()``."""
    sent_at: float = 0.0
    """Sender's wall-clock time (``time.time()``) when the message was handed to the transport."""
    kind: MessageKind = MessageKind.MASS
    """What the message is for."""
    codec: str = "none"
    """Name of the codec that encoded ``tensors``."""
    gauge: float = 0.0
    """A scalar the sender piggybacks (``SGP.consensus`` spreads its disagreement estimate)."""
    # The header fields below are optional: on the wire, one whose value is its default is
    # left out (the wire format's ``meta`` map, see docs/wire-format.md).
    incarnation: int = 0
    """The sender's incarnation: 0 at its first start, larger after each restart. A sender
    that restarted numbers its messages from 0 again (see ``Mailbox``)."""
    to_incarnation: int | None = None
    """On control messages (``CONTROL_KINDS``): the receiver's incarnation as the sender
    knows it, so an acknowledgement meant for a previous life is not taken by this one.
    None: not said."""
    skip: bool = False
    """``HEARTBEAT``: "no mass for you in ``round``" (a skip notice); ``ACK``: receipt of
    a skip notice."""
    never: bool = False
    """``ACK`` answering an audit: message ``seq`` was never received (see ``OutLink``)."""
    audit: tuple[int, int] | None = None
    """``HEARTBEAT``: "which of my messages ``first..last`` did you receive?" (inclusive),
    asked about shares written off while the receiver was suspected."""
    join: bool = False
    """``MASS``: half of the sender's mass for a worker that rejoins (``SGP.rejoin``)."""
    refused: bool = False
    """``JOIN``: the answer "too late": the sender is finishing the job."""
    answer: bool = False
    """``MASS``: a share off the schedule, answering a worker still training while the
    sender is in ``consensus()``; never answered itself."""
    raw_bytes: int | None = None
    """Compressed ``MASS``: the payload's size before compression (codecs check it)."""
    ref: int | None = None
    """Difference-coded ``MASS`` (codec option ``ref``): the sequence number of the key
    frame the link's reference started from."""
    key: bool = False
    """Difference-coded ``MASS``: this message is a key frame (its reference restarts)."""
    adpsgd: int = 0
    """AD-PSGD exchanges (``gossip_sgp.baselines``): 1 a request, 2 an answer; 0 neither."""
    steps: int = 0
    """``MASS``: the training steps the share's model carries (``PushSumState.steps``,
    rounded): the asynchronous mode folds only the weight of a share far behind the
    receiver's model, and a receiver far behind takes the share's model."""

    @property
    def nbytes(self) -> int:
        """Payload size in bytes (tensor data only)."""
        return sum(t.numel() * t.element_size() for t in self.tensors)

    @property
    def raw_nbytes(self) -> int:
        """Payload size before compression: ``raw_bytes`` if a codec set it, else ``nbytes``."""
        return self.nbytes if self.raw_bytes is None else self.raw_bytes


def fingerprint(layout: Iterable[tuple[str, tuple[int, ...], torch.dtype]]) -> int:
    """A stable 63-bit fingerprint of a model layout: (name, shape, dtype) triples in order.

    Two workers exchange messages only when their fingerprints match, so a worker started
    with another model (or another parameter order) is rejected instead of corrupting the run.
    """
    h = hashlib.blake2b(digest_size=8)
    for name, shape, dtype in layout:
        h.update(f"{name}|{','.join(map(str, shape))}|{dtype}\n".encode())
    return int.from_bytes(h.digest(), "big") >> 1
