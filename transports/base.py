"""The transport interface: the one thing every backend implements.

A transport moves :class:`~gossip_sgp.message.Message` objects between ranks of one job.
It is created and used inside one running asyncio event loop (the node's gossip thread).

* ``await start()`` binds/connects; ``await send(peer, message)`` hands a message over
  (it may return before the peer has it); ``await recv()`` returns the next valid message
  addressed to this rank; ``await close()`` releases everything and wakes pending ``recv``
  calls with :class:`~gossip_sgp.errors.TransportClosed`.
* Invalid input from the network never reaches the caller: the transport rejects it and
  counts the reason in ``stats.rejected``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from gossip_sgp.errors import TransportClosed
from gossip_sgp.message import Message

__all__ = ["HoldsBacklog", "PlansRounds", "Transport", "TransportStats", "iter_messages"]


@dataclass
class TransportStats:
    """Counters a transport keeps; the metrics layer reads them at scrape time."""

    messages_sent: Counter[int] = field(default_factory=Counter)
    """Messages handed to the wire, per destination rank."""
    bytes_sent: Counter[int] = field(default_factory=Counter)
    """Bytes handed to the wire (header and payload), per destination rank."""
    messages_received: Counter[int] = field(default_factory=Counter)
    """Valid messages received, per source rank."""
    bytes_received: Counter[int] = field(default_factory=Counter)
    """Bytes of valid messages received, per source rank."""
    rejected: Counter[str] = field(default_factory=Counter)
    """Messages rejected before use, per reason."""


@runtime_checkable
class Transport(Protocol):
    """What the gossip node needs from a backend."""

    rank: int
    stats: TransportStats

    async def start(self) -> None:
        """Bind, connect, allocate. Called once, inside the running event loop."""

    async def send(self, peer: int, message: Message) -> None:
        """Hand ``message`` to the wire for ``peer``. Raises ``TransportClosed`` after close."""

    async def recv(self) -> Message:
        """The next valid message for this rank. Raises ``TransportClosed`` after close."""

    async def close(self) -> None:
        """Release sockets and buffers; idempotent."""


@runtime_checkable
class HoldsBacklog(Protocol):
    """An optional capability: a transport that can say what it has not written out yet.

    The node uses it on slow links: a push-sum share still held by the transport has not
    left, so its acknowledgement cannot be overdue (no copy is queued behind it), and a share
    that did leave a moment ago will arrive soon (no heartbeat needed beside it).
    """

    def backlog(self, peer: int) -> int:
        """Push-sum messages to ``peer`` handed to :meth:`Transport.send` and not yet
        written out to the network."""


@runtime_checkable
class PlansRounds(Protocol):
    """An optional capability: a transport that exchanges messages only in rounds planned
    ahead (torch.distributed: both ends of a send must post it). Such a transport carries
    no heartbeats, acknowledgements or copies, so it cannot run asynchronous SGP."""

    def plan_round(self, round: int, receive_from: Sequence[int], send_to: Sequence[int]) -> None:
        """Round ``round`` receives from ``receive_from`` and sends to ``send_to``; called
        in the event loop's thread, rounds in increasing order, each before its sends."""


async def iter_messages(transport: Transport) -> AsyncIterator[Message]:
    """Async-iterate over received messages until the transport is closed."""
    while True:
        try:
            yield await transport.recv()
        except TransportClosed:
            return
