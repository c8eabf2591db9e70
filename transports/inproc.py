"""In-process transport: ranks of one job living in one Python process.

Used by the simulator (many ranks in one event loop) and by tests (ranks in threads, each
with its own event loop). Messages are handed over as objects, no copy: the sender never
writes to a message's tensors after sending (see :mod:`gossip_sgp.message`).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from gossip_sgp.errors import TransportClosed, TransportError
from gossip_sgp.message import Message
from transports.base import TransportStats

__all__ = ["InProcNetwork", "InProcTransport"]

_CLOSED = object()


class InProcNetwork:
    """The shared switchboard of one in-process job of ``world_size`` ranks."""

    def __init__(self, world_size: int) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self._lock = threading.Lock()
        self._inboxes: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue[object]]] = {}
        # Messages for ranks that have not started yet wait here, like ZeroMQ queues them.
        self._early: dict[int, deque[Message]] = {r: deque() for r in range(world_size)}

    def transport(self, rank: int) -> InProcTransport:
        """The transport of ``rank`` (start it inside its own event loop)."""
        return InProcTransport(self, rank)

    def _register(
        self, rank: int, loop: asyncio.AbstractEventLoop, q: asyncio.Queue[object]
    ) -> None:
        with self._lock:
            if rank in self._inboxes:
                raise TransportError(f"rank {rank} is already started on this network")
            self._inboxes[rank] = (loop, q)
            while self._early[rank]:
                q.put_nowait(self._early[rank].popleft())

    def _unregister(self, rank: int) -> None:
        with self._lock:
            inbox = self._inboxes.pop(rank, None)
        if inbox is not None:
            loop, q = inbox
            _call_in(loop, q.put_nowait, _CLOSED)

    def _deliver(self, peer: int, message: Message) -> None:
        with self._lock:
            inbox = self._inboxes.get(peer)
            if inbox is None:
                self._early[peer].append(message)
                return
        loop, q = inbox
        _call_in(loop, q.put_nowait, message)


def _call_in(loop: asyncio.AbstractEventLoop, fn: object, arg: object) -> None:
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    assert callable(fn)
    if running is loop:
        fn(arg)
    elif not loop.is_closed():
        loop.call_soon_threadsafe(fn, arg)


class InProcTransport:
    """One rank's endpoint on an :class:`InProcNetwork`."""

    def __init__(self, network: InProcNetwork, rank: int) -> None:
        if not 0 <= rank < network.world_size:
            raise ValueError(f"rank {rank} out of range for world size {network.world_size}")
        self.network = network
        self.rank = rank
        self.stats = TransportStats()
        self._queue: asyncio.Queue[object] | None = None
        self._closed = False

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self.network._register(self.rank, asyncio.get_running_loop(), self._queue)

    async def send(self, peer: int, message: Message) -> None:
        if self._closed:
            raise TransportClosed(f"transport of rank {self.rank} is closed")
        if not 0 <= peer < self.network.world_size or peer == self.rank:
            raise TransportError(f"rank {self.rank} cannot send to peer {peer}")
        if message.receiver != peer or message.sender != self.rank:
            raise TransportError(
                f"message {message.sender}->{message.receiver} sent by rank {self.rank} to {peer}"
            )
        self.stats.messages_sent[peer] += 1
        self.stats.bytes_sent[peer] += message.nbytes
        self.network._deliver(peer, message)

    async def recv(self) -> Message:
        if self._queue is None or self._closed:
            raise TransportClosed(f"transport of rank {self.rank} is not running")
        item = await self._queue.get()
        if not isinstance(item, Message):
            self._closed = True
            raise TransportClosed(f"transport of rank {self.rank} is closed")
        self.stats.messages_received[item.sender] += 1
        self.stats.bytes_received[item.sender] += item.nbytes
        return item

    def queued(self) -> int:
        """Messages delivered to this rank and not yet received."""
        return 0 if self._queue is None else self._queue.qsize()

    async def close(self) -> None:
        if self._queue is not None and not self._closed:
            self.network._unregister(self.rank)
        self._closed = True
