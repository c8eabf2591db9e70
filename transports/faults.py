"""A fault-injecting wrapper around any transport, for tests and the simulator.

``FaultyTransport(inner, FaultSpec(drop=0.1, duplicate=0.05, delay=0.02, reorder=0.1), seed=0)``
drops, duplicates, delays and reorders outgoing messages at random (seeded). It keeps exact
books, so tests can check mass conservation: ``dropped`` lists every message it discarded,
:meth:`FaultyTransport.in_flight` the messages it holds that have not reached the inner
transport in any copy.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from gossip_sgp.errors import TransportClosed
from gossip_sgp.message import Message
from transports.base import HoldsBacklog, Transport, TransportStats

__all__ = ["FaultSpec", "FaultyTransport"]

_Key = tuple[int, int, int]


def _key(m: Message) -> _Key:
    return (m.sender, m.receiver, m.seq)


@dataclass(frozen=True, kw_only=True)
class FaultSpec:
    """What goes wrong, and how often."""

    drop: float = 0.0
    """Probability that a message is lost."""
    duplicate: float = 0.0
    """Probability that a message is delivered twice."""
    delay: float = 0.0
    """Mean extra one-way delay in seconds."""
    jitter: float = 0.0
    """Delay varies uniformly in ``delay +- jitter`` (never below 0)."""
    reorder: float = 0.0
    """Probability that a message is held back and overtaken by the next one to that peer."""
    max_hold: float = 0.05
    """Longest time (s) a reordered message waits for a message to overtake it."""

    def __post_init__(self) -> None:
        for name in ("drop", "duplicate", "reorder"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        for name in ("delay", "jitter", "max_hold"):
            if getattr(self, name) < 0.0:
                raise ValueError(f"{name} must be >= 0 seconds, got {getattr(self, name)}")


class FaultyTransport:
    """Wraps ``inner``; faults apply to messages this rank sends."""

    def __init__(self, inner: Transport, spec: FaultSpec, *, seed: int | None = None) -> None:
        self.inner = inner
        self.spec = spec
        self.rank = inner.rank
        self.stats: TransportStats = inner.stats
        self.dropped: list[Message] = []
        self.duplicated = 0
        self.reordered = 0
        self._rng = random.Random(seed)
        self._pending: dict[_Key, Message] = {}  # not yet delivered in any copy
        self._held: dict[int, tuple[Message, asyncio.TimerHandle]] = {}  # peer -> held message
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def start(self) -> None:
        await self.inner.start()

    def backlog(self, peer: int) -> int:
        """The inner transport's backlog (``transports.base.HoldsBacklog``; 0 if it keeps
        none): what this wrapper delays or holds back counts as on the network already."""
        return self.inner.backlog(peer) if isinstance(self.inner, HoldsBacklog) else 0

    def in_flight(self) -> list[Message]:
        """Messages sent through this wrapper that no copy of has reached the inner transport."""
        return list(self._pending.values())

    async def send(self, peer: int, message: Message) -> None:
        if self._closed:
            raise TransportClosed(f"transport of rank {self.rank} is closed")
        spec, rng = self.spec, self._rng
        if rng.random() < spec.drop:
            self.dropped.append(message)
            return
        copies = 1
        if rng.random() < spec.duplicate:
            copies = 2
            self.duplicated += 1
        self._pending[_key(message)] = message
        for _ in range(copies):
            await self._route(peer, message)

    async def _route(self, peer: int, message: Message) -> None:
        held = self._held.pop(peer, None)
        if self.spec.reorder and self._rng.random() < self.spec.reorder and held is None:
            loop = asyncio.get_running_loop()
            handle = loop.call_later(self.spec.max_hold, self._release, peer)
            self._held[peer] = (message, handle)
            self.reordered += 1
            return
        await self._delayed(peer, message)
        if held is not None:  # the held message goes after the one that overtook it
            held[1].cancel()
            await self._delayed(peer, held[0])

    def _release(self, peer: int) -> None:
        held = self._held.pop(peer, None)
        if held is not None:
            self._spawn(self._delayed(peer, held[0]))

    async def _delayed(self, peer: int, message: Message) -> None:
        spec = self.spec
        d = spec.delay + (self._rng.uniform(-spec.jitter, spec.jitter) if spec.jitter else 0.0)
        if d <= 0.0:
            await self._deliver(peer, message)
        else:
            self._spawn(self._deliver_after(d, peer, message))

    async def _deliver_after(self, seconds: float, peer: int, message: Message) -> None:
        await asyncio.sleep(seconds)
        await self._deliver(peer, message)

    async def _deliver(self, peer: int, message: Message) -> None:
        if self._closed:
            return
        self._pending.pop(_key(message), None)
        await self.inner.send(peer, message)

    def _spawn(self, coro: object) -> None:
        assert asyncio.iscoroutine(coro)
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        """Deliver everything held back or delayed, now-ish, then return."""
        for peer in list(self._held):
            message, handle = self._held.pop(peer)
            handle.cancel()
            await self._delayed(peer, message)
        while self._tasks:
            await asyncio.gather(*list(self._tasks))

    async def recv(self) -> Message:
        return await self.inner.recv()

    async def close(self) -> None:
        self._closed = True
        for _, handle in self._held.values():
            handle.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.inner.close()
