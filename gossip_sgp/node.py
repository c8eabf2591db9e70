"""The gossip node: one event-loop thread per worker that moves push-sum messages.

The training thread calls :meth:`GossipNode.send` (non-blocking, thread-safe) and receives
through a handler registered with :meth:`GossipNode.subscribe`, which the gossip thread calls
for every valid message (the :class:`~gossip_sgp.SGP` wrapper puts them in its mailbox).
Everything that touches sockets runs in the gossip thread; push-sum math stays in the
training thread.

    with GossipNode(GossipConfig.from_env()) as node:
        sgp = SGP(model.parameters(), optimizer, node)
        ...

Shutdown (:meth:`GossipNode.close`, the end of the ``with`` block, SIGINT or SIGTERM) takes
at most 5 seconds: queued messages get a second to reach the transport, then every task of
the loop is cancelled, the transport closes its sockets and the thread ends. Messages whose
mass the node could not send are counted in ``GossipNode.dropped`` and logged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import ipaddress
import logging
import math
import signal
import threading
import time
import types
from collections import Counter, deque
from collections.abc import Callable, Collection, Coroutine, Sequence
from typing import Any, NoReturn

from prometheus_client import CollectorRegistry

from gossip_sgp.config import GossipConfig
from gossip_sgp.errors import (
    GossipError,
    SendTimeout,
    TransportClosed,
    TransportError,
    WireError,
)
from gossip_sgp.link import AUDIT_LIMIT, OutLink, Written
from gossip_sgp.liveness import FailureDetector
from gossip_sgp.mailbox import Receipt
from gossip_sgp.message import CONTROL_KINDS, Message, MessageKind
from gossip_sgp.metrics import GossipMetrics, MetricsServer
from gossip_sgp.settings import LinkSettings
from gossip_sgp.stats import NodeStats, TrafficStats
from transports.base import HoldsBacklog, PlansRounds, Transport, TransportStats

__all__ = ["GossipNode"]

log = logging.getLogger(__name__)

Handler = Callable[[Message], object]

_START_TIMEOUT = 30.0
"""Seconds the transport gets to start (bind, connect)."""

_STOP_TIMEOUT = 5.0
"""Seconds the node gives its thread to drain and close (the issue's shutdown budget)."""

_ACK_LINGER = 1.5
"""Seconds close() waits for the receivers to fold in the last messages sent."""

_DRAIN_TIMEOUT = 1.0
"""Seconds queued messages get to reach the transport on close. Longer would gain little:
a queue that does not drain in a second is held up by a slow or dead peer. The rest of the
budget goes to closing the transport and, in a worker, to the interpreter's own exit (about
a second with torch loaded)."""

_CANCEL_TIMEOUT = 0.5
"""Seconds cancelled tasks get to finish during shutdown."""

_CLOSE_TIMEOUT = 1.0
"""Seconds the transport gets to close its sockets (and release what it sent)."""


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it exists
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def _exit_on_sigterm(signum: int, frame: types.FrameType | None) -> NoReturn:
    raise SystemExit(128 + signum)


def _worth_logging(count: int) -> bool:
    """Log the 1st, 10th, 100th, ... occurrence of a repeated event, then every 10000th."""
    return count in (1, 10, 100, 1000) or count % 10000 == 0


def _is_loopback(address: str) -> bool:
    """Whether a ``tcp://host:port`` endpoint is on the loopback interface."""
    host = address.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_transport(config: GossipConfig) -> Transport:
    """The transport ``config.transport`` names, built from the config."""
    if config.security == "curve" and config.transport != "zmq":
        raise GossipError(
            f"security = 'curve' is CurveZMQ: it needs transport = 'zmq', not {config.transport!r}"
        )
    if config.transport == "zmq":
        from gossip_sgp.keys import transport_keys
        from transports.zmq import CurveKeys, ZmqTransport

        curve = CurveKeys(*transport_keys(config)) if config.security == "curve" else None
        if curve is None and not _is_loopback(config.bind_address):
            log.warning(
                "rank %d: gossip on %s is NOT encrypted or authenticated: anyone who can "
                "reach this port can read the model and send forged updates. Use "
                "security = 'curve' (gossip-sgp keys generate) outside a trusted network.",
                config.rank,
                config.bind_address,
            )
        return ZmqTransport(
            config.rank,
            config.addresses,
            fingerprint=None,
            max_message_bytes=config.max_message_bytes,
            bind=config.bind_address,
            curve=curve,
        )
    if config.transport == "torch":
        from transports.torchdist import TorchDistTransport

        return TorchDistTransport(
            config.rank,
            config.world_size,
            max_message_bytes=config.max_message_bytes,
            timeout=config.timeout,
        )
    raise GossipError(
        f"transport {config.transport!r} needs an explicit transport object: "
        "GossipNode(config, transport=...)"
    )


class GossipNode:
    """A worker's gossip runtime: event-loop thread, transport, send queues.

    Use it as a context manager (or call :meth:`start` and :meth:`close`); a node starts
    once. On exit, SIGINT or SIGTERM it drains what it can within a few seconds, closes its
    sockets and joins its thread. Started in the main thread while SIGTERM has its default
    action, it turns SIGTERM into ``SystemExit(143)`` until closed, so ``with`` blocks
    unwind and sockets close; SIGINT raises ``KeyboardInterrupt`` as usual.

    Metrics: with ``config.metrics_port`` set, the node serves Prometheus metrics on
    ``http://{config.metrics_host}:{port}/metrics`` from start to close. ``registry``
    collects them into a ``prometheus_client.CollectorRegistry`` of your own (one per node)
    whether or not they are served; with neither, metrics cost nothing.

    ``settings``: the liveness, retransmission and memory bounds of the links
    (:class:`~gossip_sgp.settings.LinkSettings`; default ``config.link``, the peer list's
    ``[link]`` table, whose defaults suit most networks).
    """

    def __init__(
        self,
        config: GossipConfig,
        *,
        transport: Transport | None = None,
        registry: CollectorRegistry | None = None,
        settings: LinkSettings | None = None,
    ) -> None:
        self.config = config
        self.settings = config.link if settings is None else settings
        self.rank = config.rank
        self.world_size = config.world_size
        self._transport = transport
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._stopped: asyncio.Event | None = None
        self._queues: dict[int, asyncio.Queue[Message]] = {}
        """Per peer, the push-sum shares waiting to be handed to the transport."""
        self._control_queues: dict[int, asyncio.Queue[Message]] = {}
        """Per peer, the acknowledgements and heartbeats (skip notices included): a lane of
        their own, never behind a share that takes seconds to send."""
        self._queued_mass: Counter[int] = Counter()
        """Push-sum messages per peer in its send queue or being sent (gossip thread)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = threading.Lock()
        self._abandoned = False  # close() gave up waiting for the gossip thread
        # Under _lock: close() was called or the loop is shutting down; sends are refused.
        self._closed = False
        self._failure: BaseException | None = None  # why the node stopped on its own
        self._finished = False  # under _lock: the gossip thread is done (on_close has run)
        self._handler: Handler | None = None
        self._on_close: Callable[[], object] | None = None
        self._fingerprint: int | None = None
        self._fingerprints: frozenset[int] = frozenset()  # every one the subscriber takes
        self._early: deque[Message] = deque(maxlen=self.settings.max_early)
        self._sigterm_installed = False
        self._hurry = False
        # What this node sent to each peer and has not had acknowledged, its write-offs,
        # round trips and incarnation: one state machine per link (gossip_sgp/link.py).
        self._links: dict[int, OutLink] = {}
        self._detector = FailureDetector(
            floor=self.settings.suspect_floor_s, initial=self.settings.suspect_initial_s
        )
        self._neighbours: frozenset[int] = frozenset(range(self.world_size)) - {self.rank}
        self._last_sent: dict[int, float] = {}  # per peer: a share queued (gossip thread)
        self._last_control: dict[int, float] = {}  # per peer: a control message queued
        self._backlog: Callable[[int], int] = lambda peer: 0  # see transports.base.HoldsBacklog
        self._write_off_handlers: list[Callable[[int, int], object]] = []
        self._take_back: Callable[[Message], bool] | None = None
        self._audit: Callable[[int, range], tuple[list[int], list[int]]] | None = None
        self.returned = 0
        """Shares taken back unsent when their peer was suspected (see ``on_take_back``)."""
        self.returned_weight = 0.0
        """Their push-sum weight (not lost: back in the sender's own mass)."""
        self.retransmitted = 0
        """Messages sent again because no acknowledgement came (see ``_retransmit``)."""
        self.retransmits_held = 0
        """Times a peer's retransmissions were put off because its send queue was not empty
        (earlier copies still waiting to leave: the peer is slow, or dead and not yet
        suspected)."""
        self.peers_lost: Counter[int] = Counter()
        """How often each peer was suspected down (a peer heard again is re-admitted)."""
        self.peers_restarted: Counter[int] = Counter()
        """Per peer, how often it was heard with a new incarnation (a restarted worker)."""
        self.send_errors: Counter[int] = Counter()
        """Failed sends per peer. The mass of a message whose send timed out on a full
        queue is sent again (ZeroMQ); after any other failure it is lost."""
        self.rejected: Counter[str] = Counter()
        """Messages the node rejected after the transport accepted them, per reason."""
        self.dropped: Counter[str] = Counter()
        """Push-sum messages whose mass the node lost, per reason: ``handler_error`` (the
        subscriber raised), ``early_overflow`` (more than ``settings.max_early`` arrived before
        anyone subscribed), ``closed`` (still unsent when the node closed)."""
        self.lost_weight = 0.0
        """Push-sum weight of the messages in ``dropped`` and of failed sends not sent again,
        and of those a peer had not acknowledged when it was suspected down or that were
        sent to it while suspected (an acknowledgement that comes after all takes a
        message's weight back out)."""
        self.last_heard: dict[int, float] = {}
        """Monotonic time of the last message (acknowledgements included) per sender."""
        self.payload_bytes_sent = 0
        """Numerator bytes of the push-sum messages handed to the transport, as encoded."""
        self.payload_raw_bytes_sent = 0
        """The same before compression (a codec's ``Message.raw_bytes``)."""
        self.incarnation = time.time_ns()
        """This node's incarnation, sent with every message (``Message.incarnation``): the
        wall-clock time it was created, in ns. A worker restarted with the same rank has a
        larger one, so its peers know that its sequence numbers start again from 0."""
        self.metrics: GossipMetrics | None = None
        """This worker's metrics; None when off (no ``metrics_port``, no ``registry``)."""
        if registry is not None or config.metrics_port:
            self.metrics = GossipMetrics(self.rank, self.snapshot, registry)
        self._metrics_server: MetricsServer | None = None

    def _link(self, peer: int) -> OutLink:
        """The state machine of the link to ``peer`` (call with ``_lock`` held)."""
        link = self._links.get(peer)
        if link is None:
            link = self._links[peer] = OutLink(peer, settings=self.settings)
        return link

    @property
    def acked_weight(self) -> dict[int, float]:
        """Push-sum weight of the messages each peer acknowledged (folded in): with the
        weight received from a peer, the net weight that moved to it (see docs/reliability.md:
        what a dead worker held). A copy, thread-safe."""
        with self._lock:
            return {peer: link.acked_weight for peer, link in self._links.items() if link.acks}

    @property
    def written_off(self) -> dict[int, int]:
        """Shares written off as lost per peer and not taken back by a late acknowledgement
        (see :class:`~gossip_sgp.link.OutLink`). A copy, thread-safe."""
        with self._lock:
            return {p: len(link.written_off) for p, link in self._links.items() if link.written_off}

    @property
    def rtt(self) -> dict[int, list[float]]:
        """Recent send-to-fold-in round-trip times per peer, in seconds (a copy)."""
        with self._lock:
            return {peer: list(link.rtts) for peer, link in self._links.items() if link.rtts}

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> GossipNode:
        self.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # Leaving on an exception (Ctrl-C, SIGTERM, a failed step): the peers are most
        # likely stopping too, so do not wait for their acknowledgements.
        self.close(linger=_ACK_LINGER if exc_type is None else 0.0)

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

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called or the node stopped on its own."""
        return self._closed

    def start(self) -> GossipNode:
        """Start the gossip thread and the transport.

        Raises ``TransportError`` (naming the address, for example a port already in use)
        when the transport cannot start; no thread is left behind then.
        """
        if self._thread is not None or self._closed:
            raise GossipError("a GossipNode starts only once; make a new one to start again")
        if self._transport is None:
            self._transport = make_transport(self.config)
        self._thread = threading.Thread(
            target=self._run, name=f"gossip-sgp-rank{self.rank}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT + _STOP_TIMEOUT):
            raise TransportError(f"rank {self.rank}: the gossip thread is stuck in start()")
        if self._start_error is not None:
            self._thread.join(_STOP_TIMEOUT)
            if isinstance(self._start_error, GossipError):
                raise self._start_error
            raise TransportError(
                f"rank {self.rank}: transport failed to start: {self._start_error!r}"
            ) from self._start_error
        self._serve_metrics()
        self._install_sigterm()
        return self

    def _serve_metrics(self) -> None:
        port, host = self.config.metrics_port, self.config.metrics_host
        if not port or self.metrics is None:
            return
        try:
            self._metrics_server = MetricsServer(self.metrics.registry, host, port).start()
        except OSError as exc:
            self.close(linger=0.0)
            raise TransportError(
                f"rank {self.rank}: cannot serve metrics on {host} port {port}: "
                f"{exc.strerror or exc}; choose another metrics port"
            ) from None
        log.info("rank %d serves metrics on %s", self.rank, self._metrics_server.url)

    def close(self, *, linger: float = _ACK_LINGER) -> None:
        """Drain pending sends (bounded), close the transport, join the thread.

        Idempotent and callable from any thread. It first waits up to ``linger`` s (default
        ``_ACK_LINGER``) for the last messages sent to be folded in by their receivers, then
        stops within ``_STOP_TIMEOUT`` s. Leaving a ``with`` block on an exception skips the
        wait.
        Messages still unsent are counted in ``dropped["closed"]`` and logged.
        """
        self._restore_sigterm()
        self._hurry = self._hurry or linger == 0.0  # also skip draining the send queues
        self.wait_acknowledged(linger)
        server, self._metrics_server = self._metrics_server, None
        if server is not None:
            server.stop()
        with self._lock:
            self._closed = True
        thread, loop, stopped = self._thread, self._loop, self._stopped
        if thread is None or loop is None or stopped is None or not thread.is_alive():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(stopped.set)
        if thread is threading.current_thread():
            return  # called by a handler: the thread stops once the handler returns
        if self._abandoned:
            return  # an earlier close() waited its _STOP_TIMEOUT already
        thread.join(_STOP_TIMEOUT)
        if thread.is_alive():
            self._abandoned = True  # a daemon thread: it ends with the process
            log.warning("gossip thread of rank %d did not stop in time", self.rank)

    def wait_acknowledged(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s until every message sent has been acknowledged (messages
        written off for a peer suspected down do not count); False if some are still not.

        ``close`` uses it to give a peer that is still gossiping (say, in its last consensus
        round) the last messages; a peer that has already stopped never acknowledges, hence
        the bound.
        """
        thread = self._thread
        if thread is None or thread is threading.current_thread() or not thread.is_alive():
            return False
        deadline = time.monotonic() + timeout
        while not self._closed:
            with self._lock:
                if not any(link.unacked for link in self._links.values()):
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return False

    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return  # the application handles SIGTERM itself
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        self._sigterm_installed = True

    def _restore_sigterm(self) -> None:
        # Only the main thread may set handlers; closed from another thread, the handler
        # stays (SIGTERM then still ends the process with 143, as the default would).
        if self._sigterm_installed and threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) is _exit_on_sigterm:  # nobody replaced it
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self._sigterm_installed = False

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
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            with self._lock:
                self._closed = self._finished = True
                on_close = self._on_close
            self._ready.set()
            if on_close is not None:
                self._call_on_close(on_close)

    async def _main(self) -> None:
        self._stopped = asyncio.Event()
        transport = self.transport
        try:
            await asyncio.wait_for(transport.start(), _START_TIMEOUT)
        except BaseException as exc:
            await self._close_transport(transport)
            if isinstance(exc, asyncio.TimeoutError):
                raise TransportError(
                    f"rank {self.rank}: the transport did not start within {_START_TIMEOUT:g} s"
                ) from None
            raise
        self._tasks.add(asyncio.create_task(self._receive(transport)))
        if isinstance(transport, HoldsBacklog):
            self._backlog = transport.backlog
        if not self.plans_rounds:  # round-by-round transports: no heartbeats, no retries
            for loop, name in (
                (self._watch_peers(), "failure detector"),
                (self._retransmit(), "retransmitter"),
            ):
                self._tasks.add(asyncio.create_task(self._supervised(loop, name)))
        self._ready.set()
        try:
            await self._stopped.wait()
            await self._drain(_DRAIN_TIMEOUT if not self._hurry else 0.0)
        finally:
            await self._shutdown(transport)

    async def _drain(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):  # what is left is counted as dropped
            await asyncio.wait_for(self._all_sent(), timeout)

    def _all_sent(self) -> asyncio.Future[list[None]]:
        """Done when every message queued so far has been handed to the transport."""
        return asyncio.gather(*(q.join() for q in self._every_queue()))

    def _every_queue(self) -> list[asyncio.Queue[Message]]:
        """The send queues of both lanes, every peer (gossip thread)."""
        return [*self._queues.values(), *self._control_queues.values()]

    async def _shutdown(self, transport: Transport) -> None:
        """Cancel every task of the loop (receiver, senders, flushes); close the transport."""
        with self._lock:
            self._closed = True
        # Sends and flushes accepted before that are scheduled callbacks: let them run, so
        # that the tasks they create are cancelled below and their messages counted.
        await asyncio.sleep(0)
        tasks = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_CANCEL_TIMEOUT)
        for q in self._every_queue():
            while not q.empty():
                message = q.get_nowait()
                if message.kind == MessageKind.MASS:
                    self._count(self.dropped, "closed")
                    self._lose(message)
        if self.dropped["closed"]:
            log.warning(
                "rank %d closed with %d messages unsent; their mass is lost",
                self.rank,
                self.dropped["closed"],
            )
        await self._close_transport(transport)

    async def _close_transport(self, transport: Transport) -> None:
        try:
            await asyncio.wait_for(transport.close(), _CLOSE_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning(
                "rank %d: the transport did not close within %g s", self.rank, _CLOSE_TIMEOUT
            )
        except Exception:
            log.exception("rank %d: closing the transport failed", self.rank)

    def _call_on_close(self, on_close: Callable[[], object]) -> None:
        try:
            on_close()
        except Exception:
            log.exception("the on_close callback of rank %d failed", self.rank)

    async def _supervised(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run one of the node's background loops; if it fails, stop the node.

        Without heartbeats and failure detection a worker would wait for silent peers until
        its ``GossipTimeout``, and without retransmissions lost mass would stay lost: a
        node that lost either loop stops (like one that cannot receive), so that the
        training thread gets a ``GossipError`` naming the cause instead of a hang.
        """
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failure = exc
            log.exception("rank %d: the gossip thread's %s failed, stopping", self.rank, name)
            assert self._stopped is not None
            self._stopped.set()

    async def _receive(self, transport: Transport) -> None:
        while True:
            try:
                message = await transport.recv()
            except TransportClosed:
                return
            except Exception as exc:
                # A node that cannot receive must not keep pouring its mass out: stop it,
                # so that sends fail and waiters wake up with the reason.
                self._failure = exc
                log.error(
                    "rank %d cannot receive, stopping: %s",
                    self.rank,
                    exc,
                    exc_info=not isinstance(exc, GossipError),  # a bug: show where
                )
                assert self._stopped is not None
                self._stopped.set()
                return
            try:
                self._dispatch(message)
            except Exception:  # a bug: lose this message (counted, logged), not the receiver
                self.lost_weight += message.weight if message.kind == MessageKind.MASS else 0.0
                self._drop("dispatch_error", exc_info=True)

    def _dispatch(self, message: Message) -> None:
        """Hand ``message`` to the subscriber (gossip thread, or subscribe()'s caller)."""
        now = time.monotonic()
        self.last_heard[message.sender] = now
        for_subscriber = message.kind in (MessageKind.MASS, MessageKind.JOIN) or (
            message.kind == MessageKind.HEARTBEAT and message.skip  # see SGP._send
        )
        overflow, lost, handler, taken_back = False, 0.0, None, False
        fps: frozenset[int] = frozenset()
        stale_ack = False
        incarnation = message.incarnation
        with self._lock:  # one lock per message on this hot path
            back = self._detector.heard(message.sender, now)
            link = self._link(message.sender)
            previous_life = link.heard(incarnation)
            if previous_life is not None:
                self.peers_restarted[message.sender] += 1
            if message.kind == MessageKind.ACK and message.to_incarnation not in (
                None,
                self.incarnation,
            ):
                stale_ack = True  # meant for an earlier life of this worker
            elif message.kind == MessageKind.ACK and message.skip:
                link.skip_acked(message.round, message.fingerprint)
            elif message.kind == MessageKind.ACK and message.never:
                link.never_received(message.seq)  # the answer to an audit: see OutLink.audit
            elif message.kind == MessageKind.ACK:
                acked = link.acked(message.seq, now)
                if acked is not None and acked[1]:  # written off by mistake: taken back
                    taken_back = True
                    self.lost_weight -= acked[0]
            elif for_subscriber:
                handler, fps = self._handler, self._fingerprints
                if handler is None:
                    overflow = len(self._early) == self._early.maxlen
                    lost = self._early[0].weight if overflow else 0.0
                    self._early.append(message)  # when full, the deque drops the oldest
        if previous_life is not None:
            self._report_write_off(message.sender, previous_life, "restarted (a new incarnation)")
        if back:
            log.warning("rank %d: rank %d is alive again; re-admitted", self.rank, message.sender)
        if taken_back:
            self._written_off_changed(message.sender, -1)
        if stale_ack:
            self._reject("stale_ack", message)
        if message.kind == MessageKind.HEARTBEAT and message.audit is not None:
            self._answer_audit(message)
        if not for_subscriber:
            return  # an acknowledgement, or a heartbeat: liveness only
        if overflow:
            self.lost_weight += lost
            self._drop("early_overflow")
        if handler is None:
            return
        if message.fingerprint not in fps:
            self._reject("wrong_model", message)
            return
        try:
            fresh = handler(message)
        except WireError as exc:  # e.g. a compressed payload that does not decode
            self._reject(exc.reason, message)
            return
        except Exception:
            self.lost_weight += message.weight
            self._drop("handler_error", exc_info=True)
            return
        if fresh is False and message.kind == MessageKind.MASS:
            # a duplicate: our acknowledgement may have been lost
            self.acknowledge([(message.sender, message.seq, message.round)])
        elif message.kind == MessageKind.HEARTBEAT and not self.plans_rounds:
            # a skip notice, noted (or a copy of one): say so, or it comes again; the
            # receipt names the notice's model (a StreamingSGP fragment's, say)
            ack = self._heartbeat(message.sender, message.round, skip=True)
            receipt = dataclasses.replace(
                ack, kind=MessageKind.ACK, fingerprint=message.fingerprint
            )
            self._queue_control([receipt])

    def _answer_audit(self, query: Message) -> None:
        """A peer asks which of the shares it wrote off this node folded (``OutLink.audit``):
        acknowledge those, say "never received" of those that never came (gossip thread)."""
        first, last = query.audit or (-1, -1)
        if not 0 <= first <= last < first + AUDIT_LIMIT:
            self._reject("bad_audit", query)
            return
        handler = self._audit
        if handler is None:  # nothing folds here yet
            return
        folded, never = handler(query.sender, range(first, last + 1))
        answers = self._acks([(query.sender, seq, 0) for seq in folded])
        answers += [
            dataclasses.replace(ack, never=True)
            for ack in self._acks([(query.sender, seq, 0) for seq in never])
        ]
        if answers:
            self._queue_control(answers)

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

    def rtt_medians(self) -> dict[int, float]:
        """Median of the recent round-trip times per peer, in seconds (thread-safe)."""
        with self._lock:
            medians = {peer: link.rtt_median() for peer, link in self._links.items()}
        return {peer: m for peer, m in medians.items() if m is not None}

    def _count(self, counter: Counter[str], reason: str) -> int:
        """Add one to ``counter[reason]`` (thread-safe); returns the new count."""
        with self._lock:
            counter[reason] += 1
            return counter[reason]

    def _drop(self, reason: str, *, exc_info: bool = False) -> None:
        count = self._count(self.dropped, reason)
        if _worth_logging(count):
            log.warning(
                "rank %d dropped a message (%s, %d so far): its mass is lost",
                self.rank,
                reason,
                count,
                exc_info=exc_info,
            )

    def _reject(self, reason: str, message: Message) -> None:
        count = self._count(self.rejected, reason)
        if _worth_logging(count):
            log.warning(
                "rank %d rejected a message from rank %d: %s (%d so far)",
                self.rank,
                message.sender,
                reason,
                count,
            )

    def _enqueue(self, messages: Sequence[Message]) -> None:
        """Queue messages for their peers: acknowledgements and heartbeats on one lane,
        shares and join requests on another (``CONTROL_KINDS``)."""
        now = time.monotonic()
        for m in messages:
            mass = m.kind == MessageKind.MASS
            control = m.kind in CONTROL_KINDS
            queues = self._control_queues if control else self._queues
            q = queues.get(m.receiver)
            if q is None:
                q = queues[m.receiver] = asyncio.Queue()
                task = asyncio.get_running_loop().create_task(self._sender(m.receiver, q))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            to_incarnation = m.to_incarnation
            if m.kind == MessageKind.ACK:
                # Which life of the receiver this acknowledges: a restarted peer that binds
                # the old address ignores what was queued for its previous life (otherwise
                # matched to its new shares of the same sequence numbers). The peer's last
                # incarnation heard: it is set by this thread, so reading it needs no lock.
                link = self._links.get(m.receiver)
                if link is not None and link.incarnation:
                    to_incarnation = link.incarnation
            m = dataclasses.replace(m, incarnation=self.incarnation, to_incarnation=to_incarnation)
            q.put_nowait(m)
            (self._last_control if control else self._last_sent)[m.receiver] = now
            if mass:
                self._queued_mass[m.receiver] += 1

    def _needs_heartbeat(self, peer: int, now: float) -> bool:
        """Whether ``peer`` has heard nothing from us for a heartbeat period (gossip thread).

        A control message queued within the period counts, and so does a share that has
        left (not in our queue, not held by the transport) - one still on its way over a
        slow link may take longer than the peer's suspicion timeout. At most one heartbeat
        waits in this node's queue per peer (the transport may hold more for a dead one:
        ``CONTROL_HWM`` over ZeroMQ).
        """
        if now - self._last_control.get(peer, -math.inf) < self.settings.heartbeat_s:
            return False
        control = self._control_queues.get(peer)
        if control is not None and control.qsize():
            return False
        recent = now - self._last_sent.get(peer, -math.inf) < self.settings.heartbeat_s
        return not (recent and not self._queued_mass[peer] and not self._backlog(peer))

    async def _watch_peers(self) -> None:
        """Heartbeats to quiet neighbours; suspect peers that went silent (gossip thread).

        A tick that comes late means this process itself was not running (an overloaded
        machine, a long pause of the interpreter): what the peers sent meanwhile may still
        wait unread in the socket, so that tick suspects nobody and the receiver catches up
        first. Without this, a worker starved for a few seconds would suspect every peer at
        once and keep its mass to itself.
        """
        previous = time.monotonic()
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            now = time.monotonic()
            stalled, previous = now - previous > 2 * self.settings.heartbeat_s, now
            with self._lock:
                down = [] if stalled else self._detector.check(now)
            for peer in down:
                self._return_unsent(peer)
            with self._lock:
                lost = {peer: self._link(peer).suspected() for peer in down}
            # Suspected peers too: one suspected by mistake hears from us and does not
            # suspect us in turn (the queue check keeps a dead peer's backlog at one).
            beats = [
                self._heartbeat(peer, 0)
                for peer in self._neighbours
                if self._needs_heartbeat(peer, now)
            ]
            with self._lock:  # written-off shares to peers heard again: see OutLink.audit
                audits = {
                    peer: asked
                    for peer, link in self._links.items()
                    if peer not in self._detector.down and (asked := link.audit()) is not None
                }
            beats += [
                dataclasses.replace(self._heartbeat(peer, 0), audit=(first, last))
                for peer, (first, last) in audits.items()
            ]
            if beats:
                self._enqueue(beats)
            for peer in down:
                self.peers_lost[peer] += 1
                silent = now - self.last_heard.get(peer, now)
                timeout = self._detector.timeout(peer)
                self._report_write_off(
                    peer,
                    lost[peer],
                    f"is silent for {silent:.1f} s (timeout {timeout:.1f} s): suspected down",
                )

    async def _retransmit(self) -> None:
        """Send again what a live peer has not acknowledged in time (``settings.retry_after``:
        4 median round trips, at least 10 ms; before any round trip is known 1 s plus the
        message's size at 100 Mbit/s; doubled for every copy): the message or its
        acknowledgement was lost on the way. The receiver folds a message
        once, whatever the number of copies (sequence numbers), and acknowledges every copy.
        So a lost message costs a synchronous worker a few round trips of waiting instead of
        a ``GossipTimeout``, and an asynchronous one gets its send credit back."""
        while True:
            due: list[Message] = []
            wait = self.settings.heartbeat_s
            with self._lock:
                now = time.monotonic()
                for peer, link in self._links.items():
                    if peer in self._detector.down or not (link.unacked or link.skips):
                        continue
                    # Shares still waiting to leave, in our queue or the transport's (the
                    # link is slow, or the peer takes nothing): no share's acknowledgement is
                    # overdue before the link has sent what it holds, and a copy would only
                    # wait behind it. Skip notices go on the control lane: not held.
                    busy = self._queued_mass[peer] + self._backlog(peer) > 0
                    if busy and link.unacked:
                        self.retransmits_held += 1
                    copies, until = link.due(now, busy=busy)
                    due.extend(copies)
                    wait = min(wait, until)
            if due:
                self.retransmitted += len(due)
                self._enqueue(due)
            await asyncio.sleep(max(wait, self.settings.retry_min_s))

    def _return_unsent(self, peer: int) -> None:
        """Give the ``on_take_back`` handler the shares to ``peer`` (just suspected down)
        that wait in its send queue and were never handed to the transport (gossip thread).

        Such a share provably never left: its mass is not lost but still this worker's. A
        share sent before (a copy waits in the queue) may have arrived, so it stays owed and
        is written off with the others, as is one the handler does not take back.
        """
        q, handler = self._queues.get(peer), self._take_back
        if q is None or handler is None or not q.qsize():
            return
        queued: list[Message] = []
        while not q.empty():
            queued.append(q.get_nowait())
            q.task_done()
        with self._lock:
            link = self._link(peer)
            unsent = {
                m.seq: link.unacked.pop(m.seq)
                for m in queued
                if m.kind == MessageKind.MASS
                and m.seq in link.unacked
                and not link.unacked[m.seq].copies
            }
        taken = {seq for seq, entry in unsent.items() if handler(entry.message)}
        with self._lock:
            for seq in unsent.keys() - taken:  # as if never claimed: written off, and sent
                link.unacked[seq] = unsent[seq]
        for m in queued:
            if m.kind == MessageKind.MASS and m.seq in taken:
                self._queued_mass[peer] -= 1
                self.returned += 1
                self.returned_weight += m.weight
            else:
                q.put_nowait(m)
        if taken:
            log.info(
                "rank %d: %d shares to rank %d never left; their mass is back in this worker's",
                self.rank,
                len(taken),
                peer,
            )

    def _report_write_off(self, peer: int, lost: Written, why: str, *, loud: bool = True) -> None:
        weight = math.fsum(s.message.weight for s in lost.values())
        self.lost_weight += weight
        if loud:
            log.warning(
                "rank %d: rank %d %s; %d unacknowledged messages (weight %.4g) to it count as lost",
                self.rank,
                peer,
                why,
                len(lost),
                weight,
            )
        self._written_off_changed(peer, len(lost))

    def _written_off_changed(self, peer: int, count: int) -> None:
        for handler in list(self._write_off_handlers):
            try:
                handler(peer, count)
            except Exception:
                log.exception("rank %d: a write-off handler failed", self.rank)

    def _heartbeat(self, peer: int, round: int, *, skip: bool = False) -> Message:
        return Message(
            sender=self.rank,
            receiver=peer,
            round=round,
            seq=0,
            weight=0.0,
            tensors=(),
            fingerprint=self._fingerprint or 0,
            kind=MessageKind.HEARTBEAT,
            skip=skip,
        )

    def _lose(self, message: Message) -> None:
        """Count a push-sum message that will not reach its peer as lost, once: not a copy
        of one that was acknowledged, nor one written off already (gossip thread). An
        earlier copy may have arrived after all: its acknowledgement takes the loss back."""
        with self._lock:
            lost = self._link(message.receiver).lost(message.seq)
        if lost:  # the send's failure or the closing was logged already
            self._report_write_off(message.receiver, lost, "was not sent", loud=False)

    async def _sender(self, peer: int, q: asyncio.Queue[Message]) -> None:
        transport = self.transport
        while True:
            message = await q.get()
            try:
                await transport.send(peer, message)
            except asyncio.CancelledError:
                if message.kind == MessageKind.MASS:
                    self._count(self.dropped, "closed")
                    self._lose(message)
                raise
            except Exception as exc:
                self.send_errors[peer] += 1
                # A full queue (SendTimeout) may drain: the retransmitter sends the message
                # again, or it is written off with the peer. Any other error would repeat.
                mass = message.kind == MessageKind.MASS
                again = mass and isinstance(exc, SendTimeout) and not self.plans_rounds
                if mass and not again:
                    self._lose(message)
                # A peer that takes nothing fails every heartbeat and acknowledgement to it
                # (each is repeated or answered again by the protocol): log a few of those.
                if mass or _worth_logging(self.send_errors[peer]):
                    log.warning(
                        "rank %d failed to send to rank %d: %s%s",
                        self.rank,
                        peer,
                        exc,
                        " (it is sent again)" if again else "",
                        exc_info=not isinstance(exc, GossipError),  # a bug: show where
                    )
            else:
                if message.kind == MessageKind.MASS:
                    self.payload_bytes_sent += message.nbytes
                    self.payload_raw_bytes_sent += message.raw_nbytes
            finally:
                q.task_done()
                if message.kind == MessageKind.MASS:
                    self._queued_mass[peer] -= 1

    # ---------------------------------------------------------- training thread
    def subscribe(
        self,
        handler: Handler,
        *,
        fingerprint: int,
        on_close: Callable[[], object] | None = None,
        also: Collection[int] = (),
    ) -> None:
        """Deliver every valid message for a model with ``fingerprint`` to ``handler``.

        ``also``: more fingerprints whose messages go to ``handler`` (a
        :class:`~gossip_sgp.streaming.StreamingSGP` gossips each fragment of its model as
        a model of its own); this node's acknowledgements and heartbeats carry
        ``fingerprint``.

        ``handler`` runs in the gossip thread and must be quick and thread-safe; it returns
        False for a copy of a share it folded (the node then acknowledges it again; None: a
        copy whose acknowledgement the subscriber holds back). If it raises
        ``WireError`` (a payload that does not decode), the message is counted in
        ``rejected[reason]``; any other exception counts in ``dropped["handler_error"]``.
        Delivery goes on either way. Messages
        that arrived before anyone subscribed are delivered now, in the calling thread.

        ``on_close`` is called once, after the last delivery, when the node stops (closed
        or failed): a subscriber blocked waiting for messages can wake up. It runs in the
        gossip thread, or at once when the node has stopped already.
        """
        with self._lock:
            if self._handler is not None:
                raise GossipError("this node already has a subscriber (one SGP per node)")
            self._handler, self._fingerprint = handler, fingerprint
            self._fingerprints = frozenset((fingerprint, *also))
            self._on_close = on_close
            early = list(self._early)
            self._early.clear()
            finished = self._finished
        for message in early:
            self._dispatch(message)
        if finished and on_close is not None:
            self._call_on_close(on_close)

    def send(self, messages: Sequence[Message]) -> None:
        """Queue ``messages`` for sending (thread-safe, returns at once).

        Raises ``GossipError`` when the node is not running (never started, closed, or
        stopped because it could not receive); the messages are then not sent. Mass sent
        to a peer suspected down goes out but counts as lost at once (``lost_weight``,
        :meth:`on_write_off`) until the peer acknowledges it.
        """
        now = time.monotonic()
        late: dict[int, Written] = {}  # to peers suspected down
        old: dict[int, Written] = {}  # beyond settings.max_unacked: the oldest
        with self._lock:
            loop = self._running_loop()
            for m in messages:
                if m.kind != MessageKind.MASS:
                    continue
                # To a peer suspected since the caller looked (SGP keeps a round's mass when
                # an out-peer is down), the write-off of the peer's unacknowledged messages
                # is over: this one is written off now. It still goes out; an
                # acknowledgement takes it back.
                down = m.receiver in self._detector.down
                written = self._link(m.receiver).sent(m, now, down=down)
                if written:
                    (late if down else old).setdefault(m.receiver, {}).update(written)
            # Under the lock: close() cannot slip in between, so these messages are queued
            # before the loop sees the stop request and drains.
            loop.call_soon_threadsafe(self._enqueue, list(messages))
            why = "is suspected down (a message sent to it since)"
            for peer, lost in late.items():
                loop.call_soon_threadsafe(self._report_write_off, peer, lost, why)
            why = f"has not acknowledged {self.settings.max_unacked} messages"
            for peer, lost in old.items():
                loud = _worth_logging(self._links[peer].overflows)  # a peer that takes nothing
                loop.call_soon_threadsafe(
                    functools.partial(self._report_write_off, peer, lost, why, loud=loud)
                )

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop, while it accepts work; else raise (call with ``_lock`` held)."""
        if self._failure is not None:
            raise GossipError(f"the gossip node of rank {self.rank} stopped: {self._failure}")
        if self._closed:
            raise GossipError(f"the gossip node of rank {self.rank} is closed")
        if self._loop is None or not self._ready.is_set():
            raise GossipError(f"the gossip node of rank {self.rank} has not been started")
        return self._loop

    def acknowledge(self, receipts: Sequence[Receipt]) -> None:
        """Tell the senders that these messages' mass has been folded in (thread-safe).

        A sender counts a message as outstanding until then (:meth:`outstanding`, ``rtt``,
        and the wait for the last messages in :meth:`close`). After close there is nobody
        to tell, and this does nothing.
        """
        if receipts:
            self._queue_control(self._acks(receipts))

    def _queue_control(self, messages: list[Message]) -> None:
        """Queue acknowledgements (thread-safe); a stopped node has nobody to tell."""
        with self._lock, contextlib.suppress(GossipError):
            self._running_loop().call_soon_threadsafe(self._enqueue, messages)

    # ------------------------------------------------------------------- liveness
    def is_down(self, peer: int) -> bool:
        """Whether ``peer`` is suspected down now (thread-safe)."""
        with self._lock:
            return peer in self._detector.down

    def down_peers(self) -> set[int]:
        """The peers suspected down now (thread-safe)."""
        with self._lock:
            return set(self._detector.down)

    def unacknowledged(self, *, before_round: int) -> int:
        """How many push-sum messages of rounds before ``before_round`` were sent and are
        neither acknowledged nor written off yet (thread-safe)."""
        with self._lock:
            return sum(link.unacknowledged(before_round) for link in self._links.values())

    def describe_peer(self, peer: int) -> str:
        """What this node knows of ``peer``, in one line for error messages (thread-safe)."""
        with self._lock:
            heard = self.last_heard.get(peer)
            unacked = self._link(peer).outstanding()
            suspected = peer in self._detector.down
        queued = [
            q.qsize() if (q := queues.get(peer)) else 0
            for queues in (self._queues, self._control_queues)
        ]
        received = self._transport.stats.messages_received[peer] if self._transport else 0
        when = "never heard" if heard is None else f"heard {time.monotonic() - heard:.1f} s ago"
        return (
            f"rank {peer}: {when}, {received} messages received from it, to it {queued[0]} "
            f"shares and {queued[1]} control messages queued, {unacked} shares "
            f"unacknowledged{', suspected down' if suspected else ''}"
        )

    def restarted_peers(self) -> set[int]:
        """The peers heard with a new incarnation since this node started (thread-safe)."""
        return set(self.restarts())

    def restarts(self) -> dict[int, int]:
        """How often each peer was heard with a new incarnation (thread-safe copy)."""
        with self._lock:
            return {peer: count for peer, count in self.peers_restarted.items() if count}

    def restarts_of(self, peer: int) -> int:
        """How often ``peer`` was heard with a new incarnation (thread-safe; no copy)."""
        with self._lock:
            return self.peers_restarted[peer]

    def peer_timeout(self, peer: int) -> float:
        """Seconds of silence after which ``peer`` is suspected (adapts; thread-safe)."""
        with self._lock:
            return self._detector.timeout(peer)

    def snapshot(self) -> NodeStats:
        """A copy of this node's counters and link states, for the metrics (thread-safe)."""
        traffic = None
        if self._transport is not None:
            t = self._transport.stats
            traffic = TrafficStats(
                messages_sent=dict(t.messages_sent),
                bytes_sent=dict(t.bytes_sent),
                messages_received=dict(t.messages_received),
                bytes_received=dict(t.bytes_received),
                rejected=dict(t.rejected),
            )
        neighbours = self.neighbours
        with self._lock:
            outstanding = {peer: self._link(peer).outstanding() for peer in neighbours}
            down = frozenset(self._detector.down)
        return NodeStats(
            rank=self.rank,
            traffic=traffic,
            send_errors=dict(self.send_errors),
            payload_bytes_sent=self.payload_bytes_sent,
            payload_raw_bytes_sent=self.payload_raw_bytes_sent,
            neighbours=neighbours,
            rtt_medians=self.rtt_medians(),
            outstanding=outstanding,
            last_heard=dict(self.last_heard),
            down=down,
            rejected=dict(self.rejected),
            dropped=dict(self.dropped),
            lost_weight=self.lost_weight,
        )

    @property
    def neighbours(self) -> frozenset[int]:
        """The peers heartbeats flow to: every other rank, or those SGP's topology pairs."""
        return self._neighbours

    def set_neighbours(self, peers: Collection[int]) -> None:
        """The peers to keep heartbeats flowing to (default: every other rank)."""
        self._neighbours = frozenset(peers) - {self.rank}

    def on_write_off(self, handler: Callable[[int, int], object]) -> None:
        """Call ``handler(peer, count)`` in the gossip thread when ``count`` messages to
        ``peer`` are written off as lost (it was suspected down before acknowledging them),
        and with ``count = -1`` when one of them is acknowledged after all (a mistaken
        suspicion: its weight leaves ``lost_weight`` again)."""
        self._write_off_handlers.append(handler)

    def on_audit(self, handler: Callable[[int, range], tuple[list[int], list[int]]]) -> None:
        """Answer a peer's audit with ``handler(peer, seqs)``, called in the gossip thread:
        (the shares of ``seqs`` from ``peer`` folded, those never received); see
        ``OutLink.audit``. ``SGP`` asks its mailbox."""
        self._audit = handler

    def on_take_back(self, handler: Callable[[Message], bool]) -> None:
        """When a peer is suspected down, call ``handler(share)`` in the gossip thread for
        each share to it still in its send queue that never left; True means the handler
        took the share's mass back (SGP adds it to its own mass), and it is not sent.
        Otherwise the share is written off and sent, as every other share to that peer."""
        self._take_back = handler

    def send_join(self, peer: int, *, refused: bool = False) -> None:
        """Ask ``peer`` for half of its mass (a restarted worker; see ``SGP.rejoin``), or,
        with ``refused``, answer such a request with "too late, the job is finishing"."""
        join = dataclasses.replace(self._heartbeat(peer, 0), kind=MessageKind.JOIN, refused=refused)
        self.send([join])

    def send_skip(
        self, peers: Sequence[int], round: int, *, fingerprint: int | None = None
    ) -> None:
        """Tell ``peers`` that this node sends them no mass in ``round`` (thread-safe).

        A synchronous peer waits for this notice as it would for a share, so it is sent
        again, as a share is, until the peer acknowledges it (at most ``settings.max_skips`` rounds
        kept per peer). ``fingerprint``: the model whose round it is (default the
        subscriber's; a :class:`~gossip_sgp.streaming.StreamingSGP` fragment names its own).
        """
        notices = [self._heartbeat(peer, round, skip=True) for peer in peers]
        if fingerprint is not None:
            notices = [dataclasses.replace(n, fingerprint=fingerprint) for n in notices]
        if not self.plans_rounds:  # round-by-round transports: no retries
            now = time.monotonic()
            with self._lock:
                for notice in notices:
                    self._link(notice.receiver).skip_sent(notice, now)
        self.send(notices)

    @property
    def plans_rounds(self) -> bool:
        """Whether the transport exchanges messages only in rounds planned with
        :meth:`plan_round` (torch.distributed): it cannot run asynchronous SGP."""
        if self._transport is None:
            return self.config.transport == "torch"
        return isinstance(self._transport, PlansRounds)

    def plan_round(self, round: int, receive_from: Sequence[int], send_to: Sequence[int]) -> None:
        """Tell a round-by-round transport whom ``round`` pairs this rank with (thread-safe).

        Call it before sending the round's messages. Other transports need no plan, and
        then nothing happens. Raises ``GossipError`` when the node is not running.
        """
        if not self.plans_rounds:
            return
        transport = self._transport
        if not isinstance(transport, PlansRounds):
            raise GossipError(f"the gossip node of rank {self.rank} has not been started")
        plan = transport.plan_round
        with self._lock:
            self._running_loop().call_soon_threadsafe(
                self._plan, plan, round, list(receive_from), list(send_to)
            )

    def _plan(self, plan: Callable[..., object], *args: object) -> None:
        try:
            plan(*args)
        except Exception as exc:  # the round's sends then fail and are counted
            log.warning("rank %d cannot plan a round: %s", self.rank, exc)

    def outstanding(self, peer: int) -> int:
        """Messages sent to ``peer`` whose mass it has not folded in yet (thread-safe)."""
        with self._lock:
            return self._link(peer).outstanding()

    def is_outstanding(self, peer: int, seq: int) -> bool:
        """Whether share ``seq`` to ``peer`` was sent and is neither acknowledged nor
        written off yet (thread-safe)."""
        with self._lock:
            return seq in self._link(peer).unacked

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued message has been handed to the transport.

        Returns False when that takes longer than ``timeout`` seconds or the node stops
        first. Handed over is not delivered: only an acknowledgement (:meth:`outstanding`)
        shows that a peer folded a message in.
        """
        if threading.current_thread() is self._thread:
            raise GossipError("flush() cannot run in the gossip thread: it would wait for itself")
        with self._lock:
            try:
                loop = self._running_loop()
            except GossipError:
                return False
            future = asyncio.run_coroutine_threadsafe(self._flushed(timeout), loop)
        try:
            return future.result(timeout + _STOP_TIMEOUT)
        except (concurrent.futures.CancelledError, concurrent.futures.TimeoutError):
            future.cancel()
            return False

    async def _flushed(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._all_sent(), timeout)
        except asyncio.TimeoutError:
            return False
        return True
