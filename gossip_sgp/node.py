"""The gossip node: one event-loop thread per worker that moves push-sum messages.

The training thread calls :meth:`GossipNode.send` (non-blocking, thread-safe) and receives
through a handler registered with :meth:`GossipNode.subscribe`, which the gossip thread calls
for every valid message (the :class:`~gossip_sgp.SGP` wrapper puts them in its mailbox).
Everything that touches sockets runs in the gossip thread; push-sum math stays in the
training thread.

    with GossipNode(GossipConfig.from_env()) as node:
        sgp = SGP(model.parameters(), optimizer, node)
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
import types
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any

from gossip_sgp.config import GossipConfig
from gossip_sgp.errors import GossipError, TransportClosed, TransportError
from gossip_sgp.mailbox import Receipt
from gossip_sgp.message import Message, MessageKind
from transports.base import Transport, TransportStats

__all__ = ["GossipNode"]

log = logging.getLogger(__name__)

Handler = Callable[[Message], object]

_MAX_UNACKED = 1024
"""Unacknowledged messages remembered per peer; older ones are forgotten (peer is gone)."""

_STOP_TIMEOUT = 5.0
"""Seconds the node gives its thread to drain and close (the issue's shutdown budget)."""


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it exists
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def make_transport(config: GossipConfig) -> Transport:
    """The transport ``config.transport`` names, built from the config."""
    if config.transport == "zmq":
        from transports.zmq import ZmqTransport

        return ZmqTransport(
            config.rank,
            config.addresses,
            fingerprint=None,
            max_message_bytes=config.max_message_bytes,
            bind=config.bind_address,
        )
    raise GossipError(
        f"transport {config.transport!r} needs an explicit transport object: "
        "GossipNode(config, transport=...)"
    )


class GossipNode:
    """A worker's gossip runtime: event-loop thread, transport, send queues.

    Use it as a context manager (or call :meth:`start` and :meth:`close`). On exit, SIGINT
    or SIGTERM it drains what it can within a few seconds, closes its sockets and joins its
    thread. While running in the main thread it turns SIGTERM into ``SystemExit(143)`` so
    ``with`` blocks unwind and sockets close.
    """

    def __init__(self, config: GossipConfig, *, transport: Transport | None = None) -> None:
        self.config = config
        self.rank = config.rank
        self.world_size = config.world_size
        self._transport = transport
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._stopped: asyncio.Event | None = None
        self._queues: dict[int, asyncio.Queue[Message]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = threading.Lock()
        self._handler: Handler | None = None
        self._fingerprint: int | None = None
        self._early: deque[Message] = deque(maxlen=4096)
        self._old_sigterm: Any = None
        # peer -> seq -> monotonic send time of MASS messages not yet acknowledged
        self._unacked: dict[int, dict[int, float]] = {}
        self.rtt: dict[int, deque[float]] = {}
        """Recent send-to-fold-in round-trip times per peer, in seconds."""
        self.send_errors: Counter[int] = Counter()
        """Failed sends per peer (the mass of a failed send is lost with it)."""
        self.rejected: Counter[str] = Counter()
        """Messages the node rejected after the transport accepted them, per reason."""

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> GossipNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            raise GossipError("the node has not been started")
        return self._transport

    @property
    def stats(self) -> TransportStats:
        """The transport's counters (messages and bytes per peer, rejections)."""
        return self.transport.stats

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> GossipNode:
        """Start the gossip thread and the transport; raises if the transport cannot start."""
        if self._thread is not None:
            raise GossipError("GossipNode.start() called twice")
        if self._transport is None:
            self._transport = make_transport(self.config)
        self._thread = threading.Thread(
            target=self._run, name=f"gossip-sgp-rank{self.rank}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(30.0):
            raise GossipError("the gossip thread did not start within 30 s")
        if self._start_error is not None:
            self._thread.join(_STOP_TIMEOUT)
            self._thread = None
            if isinstance(self._start_error, GossipError):
                raise self._start_error
            raise TransportError(f"transport failed to start: {self._start_error}") from (
                self._start_error
            )
        self._install_sigterm()
        return self

    def close(self) -> None:
        """Drain pending sends (bounded), close the transport, join the thread. Idempotent."""
        self._restore_sigterm()
        thread, loop = self._thread, self._loop
        if thread is None or loop is None or not thread.is_alive():
            return
        stopped = self._stopped
        if stopped is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stopped.set)
        thread.join(_STOP_TIMEOUT + 1.0)
        if thread.is_alive():
            log.warning("gossip thread of rank %d did not stop in time", self.rank)

    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return  # the application handles SIGTERM itself

        def _on_sigterm(signum: int, frame: types.FrameType | None) -> None:
            raise SystemExit(128 + signum)

        self._old_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)

    def _restore_sigterm(self) -> None:
        if self._old_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    # ------------------------------------------------------------ gossip thread
    def _run(self) -> None:
        loop = _new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to start() or logged
            if not self._ready.is_set():
                self._start_error = exc
            else:
                log.exception("gossip thread of rank %d failed", self.rank)
        finally:
            self._ready.set()
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _main(self) -> None:
        self._stopped = asyncio.Event()
        transport = self.transport
        await transport.start()
        receiver = asyncio.create_task(self._receive(transport))
        self._ready.set()
        try:
            await self._stopped.wait()
            await self._drain(_STOP_TIMEOUT / 2)
        finally:
            for task in [receiver, *self._tasks]:
                task.cancel()
            await asyncio.gather(receiver, *self._tasks, return_exceptions=True)
            await transport.close()

    async def _drain(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(
                asyncio.gather(*(q.join() for q in self._queues.values())), timeout
            )
        except asyncio.TimeoutError:
            unsent = sum(q.qsize() for q in self._queues.values())
            log.warning("rank %d closing with %d unsent messages", self.rank, unsent)

    async def _receive(self, transport: Transport) -> None:
        while True:
            try:
                message = await transport.recv()
            except TransportClosed:
                return
            self._dispatch(message)

    def _dispatch(self, message: Message) -> None:
        if message.kind == MessageKind.ACK:
            self._acknowledged(message)
            return
        with self._lock:
            handler, fp = self._handler, self._fingerprint
            if handler is None:
                self._early.append(message)
        if handler is None:
            return
        if message.fingerprint != fp:
            self._reject("wrong_model", message)
            return
        if handler(message) is False:  # a duplicate: our acknowledgement may have been lost
            self._enqueue(self._acks([(message.sender, message.seq, message.round)]))

    def _acks(self, receipts: Sequence[Receipt]) -> list[Message]:
        return [
            Message(
                sender=self.rank,
                receiver=sender,
                round=round,
                seq=seq,
                weight=0.0,
                tensors=(),
                fingerprint=self._fingerprint or 0,
                kind=MessageKind.ACK,
            )
            for sender, seq, round in receipts
        ]

    def _acknowledged(self, ack: Message) -> None:
        with self._lock:
            sent = self._unacked.get(ack.sender, {}).pop(ack.seq, None)
            if sent is not None:
                rtts = self.rtt.setdefault(ack.sender, deque(maxlen=64))
                rtts.append(time.monotonic() - sent)

    def _reject(self, reason: str, message: Message) -> None:
        self.rejected[reason] += 1
        if self.rejected[reason] in (1, 10, 100, 1000) or self.rejected[reason] % 10000 == 0:
            log.warning(
                "rank %d rejected a message from rank %d: %s (%d so far)",
                self.rank,
                message.sender,
                reason,
                self.rejected[reason],
            )

    def _enqueue(self, messages: Sequence[Message]) -> None:
        for m in messages:
            q = self._queues.get(m.receiver)
            if q is None:
                q = self._queues[m.receiver] = asyncio.Queue()
                task = asyncio.get_running_loop().create_task(self._sender(m.receiver, q))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            q.put_nowait(m)

    async def _sender(self, peer: int, q: asyncio.Queue[Message]) -> None:
        transport = self.transport
        while True:
            message = await q.get()
            try:
                await transport.send(peer, message)
            except TransportClosed:
                return
            except GossipError as exc:
                self.send_errors[peer] += 1
                log.warning("rank %d failed to send to rank %d: %s", self.rank, peer, exc)
            finally:
                q.task_done()

    # ---------------------------------------------------------- training thread
    def subscribe(self, handler: Handler, *, fingerprint: int) -> None:
        """Deliver every valid message for a model with ``fingerprint`` to ``handler``.

        ``handler`` runs in the gossip thread and must be quick and thread-safe. Messages
        that arrived before anyone subscribed are delivered now.
        """
        with self._lock:
            if self._handler is not None:
                raise GossipError("this node already has a subscriber (one SGP per node)")
            self._handler, self._fingerprint = handler, fingerprint
            early = list(self._early)
            self._early.clear()
        for message in early:
            self._dispatch(message)

    def send(self, messages: Sequence[Message]) -> None:
        """Queue ``messages`` for sending (thread-safe, returns at once)."""
        loop = self._loop
        if loop is None or not self.running:
            raise GossipError("the gossip node is not running")
        now = time.monotonic()
        with self._lock:
            for m in messages:
                unacked = self._unacked.setdefault(m.receiver, {})
                unacked[m.seq] = now
                if len(unacked) > _MAX_UNACKED:  # a dead peer: forget the oldest
                    del unacked[next(iter(unacked))]
        try:
            loop.call_soon_threadsafe(self._enqueue, list(messages))
        except RuntimeError as exc:  # loop closed under us
            raise GossipError("the gossip node is not running") from exc

    def acknowledge(self, receipts: Sequence[Receipt]) -> None:
        """Tell the senders that these messages' mass has been folded in (thread-safe).

        A sender counts a message as outstanding until then, so in the asynchronous mode a
        fast worker cannot pour its mass into a slow worker faster than it is consumed.
        """
        loop = self._loop
        if receipts and loop is not None and self.running:
            with contextlib.suppress(RuntimeError):  # loop closed under us: nothing to tell
                loop.call_soon_threadsafe(self._enqueue, self._acks(receipts))

    def outstanding(self, peer: int) -> int:
        """Messages sent to ``peer`` whose mass it has not folded in yet (thread-safe)."""
        with self._lock:
            return len(self._unacked.get(peer, ()))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued message has been handed to the transport."""
        loop = self._loop
        if loop is None or not self.running:
            return False

        async def _wait() -> None:
            for q in list(self._queues.values()):
                await q.join()

        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(_wait(), timeout), loop)
        try:
            future.result(timeout + 1.0)
        except (TimeoutError, asyncio.TimeoutError):
            return False
        return True
