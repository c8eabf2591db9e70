"""ZeroMQ transport: PUSH/PULL over TCP, for Ethernet, WAN and cloud.

Each rank binds one PULL socket on its own address and connects two PUSH sockets to every
peer it sends to (created on first send): one for push-sum shares (and join requests), one
for control messages (acknowledgements and heartbeats, ``message.CONTROL_KINDS``). The PULL
socket takes whole messages from its connections in turn, so a heartbeat or an
acknowledgement arrives while a model of hundreds of megabytes is still on its way over a
slow link, instead of after it: a healthy sender of a long message is not taken for dead.
Messages travel as :mod:`gossip_sgp.wire` frames, the payload frames zero-copy on both
ends. Reconnection after a peer restarts or a link drops is ZeroMQ's job; messages queued
while a peer is away are delivered when it is back, those on the wire when the link broke
are lost (ZeroMQ does not retry them).

Bounded memory: at most ``sndhwm`` shares wait per peer and ``rcvhwm`` per connection on
the receive side (ZeroMQ high-water marks, counted in messages, so size them with the model:
16 queued sends of a 1 GiB model are 16 GiB). When a peer's queue is full,
:meth:`ZmqTransport.send` waits up to ``send_timeout`` seconds and then raises
:class:`~gossip_sgp.errors.SendTimeout` with the message not sent. Control messages (a header
each) never wait: when ``CONTROL_HWM`` of them are queued for a peer that takes nothing, the
next raises ``SendTimeout`` at once (each is repeated or answered again by its sender's
protocol, so dropping one loses nothing). :meth:`ZmqTransport.backlog` says how many shares
to a peer libzmq has not written out yet (their memory is still referenced).

Performance: libzmq's I/O thread mallocs a buffer for every incoming message, and glibc
serves blocks over 32 MiB with a fresh ``mmap`` that is faulted in page by page, which can
cost more than the transfer (on a VM, several times more). With ``tune_malloc=True`` (the
default) :meth:`ZmqTransport.start` sets glibc's malloc to serve large blocks from one
reused heap instead (:func:`_tune_malloc` says what that costs and when it cannot take
effect); ``benchmarks/zmq_throughput.py`` and ``docs/wire-format.md`` have the figures.

Shutdown: payload frames are sent zero-copy, so libzmq reads the tensors' memory until it has
written them out. :meth:`ZmqTransport.close` waits (briefly) until libzmq has let go of every
frame; otherwise pyzmq's clean-up at interpreter exit can release that memory under libzmq's
I/O thread (an abort, ``Bad address (src/tcp.cpp:...)``) or report ``pyzmq-gc send failed``.

Security: without CurveZMQ anyone who can reach the port can send, and the ``sender`` in a
header is not authenticated; validation keeps malformed input out, it does not stop a forged
share. With ``curve=CurveKeys(...)`` every connection is encrypted and authenticated
(CurveZMQ): a ZAP handler on the transport's own ZeroMQ context admits only the public keys
of the job's ranks (``stats.rejected["unknown_key"]`` counts refused handshakes), binds each
connection to the rank whose key it proved, and :meth:`ZmqTransport.recv` drops a message
whose header claims another rank (``stats.rejected["wrong_key"]``).
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import zmq
import zmq.asyncio
import zmq.utils.z85
from zmq.auth.asyncio import AsyncioAuthenticator

from gossip_sgp import wire
from gossip_sgp.errors import SendTimeout, TransportClosed, TransportError, WireError
from gossip_sgp.message import CONTROL_KINDS, Message
from transports.base import TransportStats

__all__ = ["CONTROL_HWM", "CurveKeys", "ZmqTransport"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_WARN_EVERY_S = 10.0
"""At most one warning per reject reason in this many seconds."""
_RECONNECT_IVL_MS = 100
_RECONNECT_IVL_MAX_MS = 5000
_RELEASE_TIMEOUT_S = 2.0
"""Longest ``close`` waits for libzmq to let go of zero-copy frames (normally milliseconds)."""
_RELEASE_POLL_S = 0.002
CONTROL_HWM = 1024
"""Control messages that may queue per peer (about 100 bytes each) before sends fail."""

# mallopt parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_INT_MAX = (1 << 31) - 1
_malloc_kept = 0
"""The ``M_TRIM_THRESHOLD`` this process has set so far (0: not tuned)."""


@dataclasses.dataclass(frozen=True)
class CurveKeys:
    """CurveZMQ keys of one rank: its own key pair and every rank's public key (Z85 bytes)."""

    public_key: bytes
    """This rank's public key, 40 Z85 characters."""
    secret_key: bytes
    """This rank's secret key, 40 Z85 characters."""
    peer_keys: tuple[bytes, ...]
    """``peer_keys[r]`` is rank ``r``'s public key (this rank's own included)."""

    def __post_init__(self) -> None:
        for what, key in [("public", self.public_key), ("secret", self.secret_key)]:
            _check_z85(f"{what} key", key)
        for r, key in enumerate(self.peer_keys):
            _check_z85(f"public key of rank {r}", key)
        if zmq.curve_public(self.secret_key) != self.public_key:
            raise ValueError("the secret key does not belong to the public key")
        if len(set(self.peer_keys)) != len(self.peer_keys):
            raise ValueError("two ranks have the same public key")

    def rank_of(self, key: bytes) -> int | None:
        """The rank whose public key is ``key`` (Z85), or None."""
        try:
            return self.peer_keys.index(key)
        except ValueError:
            return None


def _check_z85(what: str, key: object) -> None:
    if not isinstance(key, bytes) or len(key) != 40:
        raise ValueError(f"{what} must be 40 Z85 characters as bytes")
    try:
        zmq.utils.z85.decode(key)
    except (ValueError, KeyError):
        raise ValueError(f"{what} is not valid Z85") from None


class _RankAuthenticator(AsyncioAuthenticator):
    """ZAP handler: admits the job's public keys; the ZeroMQ User-Id becomes the rank."""

    def __init__(
        self,
        context: zmq.asyncio.Context,
        keys: CurveKeys,
        on_reject: Callable[[WireError], None],
    ) -> None:
        super().__init__(context, log=logging.getLogger(f"{__name__}.zap"))
        self._keys = keys
        self._on_reject = on_reject

    def callback(self, domain: str, key: bytes) -> bool:
        """Credentials provider (see ``configure_curve_callback``): is ``key`` a rank's?"""
        if self._keys.rank_of(key) is None:
            self._on_reject(WireError("unknown_key", f"CurveZMQ handshake from key {key!r}"))
            return False
        return True

    def curve_user_id(self, client_public_key: bytes) -> str:
        rank = self._keys.rank_of(zmq.utils.z85.encode(client_public_key))
        return str(rank)


class ZmqTransport:
    """One rank's ZeroMQ endpoint; create and use it inside one running event loop.

    Args:
        rank: this worker's rank.
        addresses: ``addresses[r]`` is rank ``r``'s endpoint, ``"tcp://host:port"``.
        fingerprint: model fingerprint every received message must carry; ``None`` accepts
            any and leaves the check to the caller.
        max_message_bytes: largest payload accepted (and sent); larger input is rejected.
        sndhwm: messages that may queue per peer before ``send`` waits.
        rcvhwm: received messages that may queue before ZeroMQ stops reading peers.
        bind: where to bind instead of ``addresses[rank]`` (e.g. ``"tcp://0.0.0.0:5555"``
            while peers connect to the public address).
        context: the ZeroMQ context; default ``zmq.asyncio.Context.instance()``.
        send_timeout: seconds ``send`` waits for room in a full queue; ``None`` waits
            until close.
        curve: CurveZMQ keys; ``None`` sends in the clear. With keys the transport uses a
            ZeroMQ context of its own (a ZAP handler serves one context), and ``context``
            must be None.
        tune_malloc: let :meth:`start` set glibc's malloc so that large messages are
            received into reused memory instead of freshly mapped pages (about twice the
            throughput for 64 MiB messages here). Process-wide and not free: see
            :func:`_tune_malloc`. ``False`` leaves malloc alone, and so does a malloc
            setting in the environment (``GLIBC_TUNABLES`` or ``MALLOC_*``).
    """

    def __init__(
        self,
        rank: int,
        addresses: Sequence[str],
        *,
        fingerprint: int | None,
        max_message_bytes: int = 1 << 30,
        sndhwm: int = 16,
        rcvhwm: int = 64,
        bind: str | None = None,
        context: zmq.asyncio.Context | None = None,
        send_timeout: float | None = 30.0,
        tune_malloc: bool = True,
        curve: CurveKeys | None = None,
    ) -> None:
        if not 0 <= rank < len(addresses):
            raise ValueError(f"rank {rank} out of range for {len(addresses)} addresses")
        if max_message_bytes < 1 or sndhwm < 1 or rcvhwm < 1:
            raise ValueError("max_message_bytes, sndhwm and rcvhwm must be >= 1")
        if send_timeout is not None and not send_timeout > 0:
            raise ValueError(f"send_timeout must be > 0 or None, got {send_timeout}")
        if curve is not None:
            if context is not None:
                raise ValueError("a transport with CurveZMQ keys uses its own context")
            if len(curve.peer_keys) != len(addresses):
                raise ValueError(
                    f"{len(curve.peer_keys)} public keys for {len(addresses)} addresses"
                )
            if curve.peer_keys[rank] != curve.public_key:
                raise ValueError(f"public key of rank {rank} in the key list is not this key")
        self.rank = rank
        self.addresses = tuple(addresses)
        self.world_size = len(self.addresses)
        self.fingerprint = fingerprint
        self.max_message_bytes = max_message_bytes
        self.stats = TransportStats()
        self._sndhwm, self._rcvhwm = sndhwm, rcvhwm
        self._bind = bind or self.addresses[rank]
        self._context = context
        self._send_timeout = send_timeout
        self._pull: zmq.asyncio.Socket | None = None
        self._push: dict[int, zmq.asyncio.Socket] = {}
        self._control: dict[int, zmq.asyncio.Socket] = {}
        self._pending: set[asyncio.Future[Any]] = set()
        self._in_flight: dict[int, list[zmq.MessageTracker]] = {}
        """Per peer: the zero-copy shares libzmq may still read from (see ``backlog``)."""
        self._closed = False
        self._warned_at: dict[str, float] = {}
        self._malloc_tuning = tune_malloc
        self._curve = curve
        self._auth: _RankAuthenticator | None = None
        self._owns_context = False

    async def start(self) -> None:
        """Bind the receive socket; raises ``TransportError`` naming the address on failure."""
        self._check_open()
        if self._pull is not None:
            return
        if self._malloc_tuning:
            # Right before the first socket starts ZeroMQ's threads: see _tune_malloc.
            _tune_malloc(2 * (self.max_message_bytes + wire.MAX_HEADER_BYTES))
        if self._curve is not None and self._context is None:
            self._context = zmq.asyncio.Context()
            self._owns_context = True
            self._auth = _RankAuthenticator(self._context, self._curve, self._reject)
            self._auth.start()
            self._auth.configure_curve_callback("*", credentials_provider=self._auth)
        sock = self._socket(zmq.PULL, self._bind)
        try:
            if self._curve is not None:
                sock.curve_server = True
                sock.curve_secretkey = self._curve.secret_key
                sock.curve_publickey = self._curve.public_key
            sock.setsockopt(zmq.RCVHWM, self._rcvhwm)
            # Per frame: libzmq drops the connection of a peer sending a larger frame.
            sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes + wire.MAX_HEADER_BYTES)
            sock.bind(self._bind)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise TransportError(f"rank {self.rank} cannot bind {self._bind!r}: {exc}") from exc
        self._pull = sock

    async def send(self, peer: int, message: Message) -> None:
        """Queue ``message`` for ``peer``; returns once ZeroMQ holds it, not when it arrived.

        Acknowledgements and heartbeats (``CONTROL_KINDS``) go on the peer's control
        connection, shares and join requests on its payload connection. Raises
        ``SendTimeout`` when the peer's queue stays full for ``send_timeout`` seconds (for a
        control message: when ``CONTROL_HWM`` are queued; the message is then not sent),
        ``WireError`` for a message that cannot be encoded.
        """
        self._check_open()
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise TransportError(f"rank {self.rank} cannot send to peer {peer}")
        if message.sender != self.rank or message.receiver != peer:
            raise TransportError(
                f"message {message.sender}->{message.receiver} sent by rank {self.rank} to {peer}"
            )
        if self.fingerprint is not None and message.fingerprint != self.fingerprint:
            raise TransportError(f"message fingerprint {message.fingerprint:#x} is not ours")
        if message.nbytes > self.max_message_bytes:
            raise WireError("oversized", f"{message.nbytes} bytes > {self.max_message_bytes}")
        if message.sent_at == 0.0:
            message = dataclasses.replace(message, sent_at=time.time())
        frames = wire.encode(message)
        nbytes = sum(memoryview(frame).nbytes for frame in frames)
        tracker = None
        if message.kind in CONTROL_KINDS:
            sock = self._control.get(peer) or self._connect(peer, control=True)
            sending = sock.send_multipart(frames, flags=zmq.NOBLOCK)
            timeout = f"{CONTROL_HWM} control messages are queued for it"
        else:
            sock = self._push.get(peer) or self._connect(peer)
            # Zero-copy: libzmq reads the tensors' memory, which pyzmq keeps alive until
            # libzmq releases each frame. The trackers tell close() and backlog() when libzmq
            # is done with them.
            parts = [zmq.Frame(frame, track=True) for frame in frames]
            tracked = self._in_flight.setdefault(peer, [])
            tracked[:] = [t for t in tracked if not t.done]
            tracker = zmq.MessageTracker(*parts)
            tracked.append(tracker)
            sending = sock.send_multipart(parts, copy=False)
            timeout = f"its send queue stayed full for {self._send_timeout} s"
        try:
            await self._track(sending)
        except zmq.Again:
            # Not sent: libzmq never took the frames, so they are no backlog (the copy of
            # this share sent again after the SendTimeout must not wait for them).
            if tracker is not None:
                self._in_flight[peer].remove(tracker)
            raise SendTimeout(
                f"rank {self.rank} cannot send to rank {peer}: {timeout}; message not sent"
            ) from None
        except zmq.ZMQError as exc:
            self._check_open()
            raise TransportError(f"rank {self.rank} failed to send to rank {peer}: {exc}") from exc
        self.stats.messages_sent[peer] += 1
        self.stats.bytes_sent[peer] += nbytes

    def backlog(self, peer: int) -> int:
        """Push-sum shares to ``peer`` that libzmq has not written out yet: queued, or being
        written (their frames are released once the last byte went to the kernel). Shares
        under ``zmq.COPY_THRESHOLD`` (64 KiB) are copied by pyzmq and never count: they
        take no time worth waiting for on any link."""
        tracked = self._in_flight.get(peer)
        if not tracked:
            return 0
        tracked[:] = [t for t in tracked if not t.done]
        return len(tracked)

    async def recv(self) -> Message:
        """The next valid message; invalid input is counted in ``stats.rejected`` and skipped."""
        while True:
            self._check_open()
            if self._pull is None:
                raise TransportError(f"transport of rank {self.rank} is not started")
            try:
                frames = await self._track(self._pull.recv_multipart(copy=False))
            except zmq.Again:
                # pyzmq saw POLLIN but the message was not readable yet (seen with CurveZMQ,
                # whose handshake and decryption run in libzmq's I/O thread): wait again.
                await asyncio.sleep(0)
                continue
            except zmq.ZMQError as exc:
                self._check_open()
                raise TransportError(f"rank {self.rank} failed to receive: {exc}") from exc
            buffers = [frame.buffer for frame in frames]
            try:
                message = wire.decode(
                    buffers,
                    rank=self.rank,
                    world_size=self.world_size,
                    fingerprint=self.fingerprint,
                    max_bytes=self.max_message_bytes,
                )
                if self._curve is not None:
                    proven = frames[0].get("User-Id")
                    if proven != str(message.sender):
                        raise WireError(
                            "wrong_key",
                            f"message claims rank {message.sender}, key is rank {proven}'s",
                        )
            except WireError as exc:
                self._reject(exc)
                await asyncio.sleep(0)  # a flood of garbage must not starve the event loop
                continue
            self.stats.messages_received[message.sender] += 1
            self.stats.bytes_received[message.sender] += sum(b.nbytes for b in buffers)
            return message

    async def close(self) -> None:
        """Close every socket (``linger=0``: unsent messages are dropped); idempotent.

        Pending ``send`` and ``recv`` calls raise ``TransportClosed``. Returns once libzmq
        has released the memory of every message sent (at most 2 s later at worst).
        """
        if self._closed:
            return
        self._closed = True
        for future in self._pending:
            if not future.done():
                future.set_exception(TransportClosed(f"transport of rank {self.rank} closed"))
        sockets = [*self._push.values(), *self._control.values()]
        sockets += [self._pull] if self._pull is not None else []
        self._push.clear()
        self._control.clear()
        self._pull = None
        for sock in sockets:
            sock.close(linger=0)
        await self._wait_released()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._owns_context and self._context is not None:
            self._context.destroy(linger=0)
            self._context = None

    async def _wait_released(self) -> None:
        """Wait until libzmq has let go of every zero-copy frame this transport sent.

        Closing with ``linger=0`` makes libzmq drop what it still holds, but asynchronously,
        in its own threads. Returning before that is done would let the process exit with
        frames in flight: pyzmq's exit handler then stops the thread that releases them and
        drops the buffers they point into while libzmq may still be writing them out. The
        trackers are ``threading.Event``s set by pyzmq's garbage-collector thread, with
        nothing to await, hence the polling.
        """
        deadline = time.monotonic() + _RELEASE_TIMEOUT_S
        while held := sum(self.backlog(peer) for peer in self._in_flight):
            if time.monotonic() > deadline:
                log.warning(
                    "rank %d: ZeroMQ still holds %d sent messages after close", self.rank, held
                )
                return
            await asyncio.sleep(_RELEASE_POLL_S)
        self._in_flight.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosed(f"transport of rank {self.rank} is closed")

    def _socket(self, kind: int, address: str) -> zmq.asyncio.Socket:
        context = self._context or zmq.asyncio.Context.instance()
        sock = context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if "[" in address:  # an IPv6 literal; names keep resolving to IPv4 as before
            sock.setsockopt(zmq.IPV6, 1)
        return sock

    def _connect(self, peer: int, *, control: bool = False) -> zmq.asyncio.Socket:
        address = self.addresses[peer]
        sock = self._socket(zmq.PUSH, address)
        try:
            if self._curve is not None:
                sock.curve_serverkey = self._curve.peer_keys[peer]
                sock.curve_publickey = self._curve.public_key
                sock.curve_secretkey = self._curve.secret_key
            sock.setsockopt(zmq.SNDHWM, CONTROL_HWM if control else self._sndhwm)
            sock.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_IVL_MS)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, _RECONNECT_IVL_MAX_MS)
            # zmq.asyncio turns SNDTIMEO into a timer that fails the pending send with Again.
            timeout = self._send_timeout
            sock.setsockopt(zmq.SNDTIMEO, -1 if timeout is None else math.ceil(timeout * 1000))
            sock.connect(address)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise TransportError(f"rank {self.rank} cannot connect to {address!r}: {exc}") from exc
        (self._control if control else self._push)[peer] = sock
        return sock

    async def _track(self, awaitable: Awaitable[_T]) -> _T:
        """Await a socket future; ``close()`` fails it with ``TransportClosed``."""
        future = asyncio.ensure_future(awaitable)
        if future.done():
            return future.result()
        self._pending.add(future)
        try:
            return await future
        finally:
            self._pending.discard(future)

    def _reject(self, exc: WireError) -> None:
        self.stats.rejected[exc.reason] += 1
        now = time.monotonic()
        if now - self._warned_at.get(exc.reason, -math.inf) >= _WARN_EVERY_S:
            self._warned_at[exc.reason] = now
            log.warning(
                "rank %d rejected a message (%s, %d so far): %s",
                self.rank,
                exc.reason,
                self.stats.rejected[exc.reason],
                exc.detail,
            )


def _tune_malloc(keep_bytes: int) -> None:
    """Make glibc serve large blocks from one heap and keep freed ones for reuse.

    libzmq's I/O thread mallocs a buffer for every incoming message. By default glibc maps
    blocks over 32 MiB with a fresh ``mmap`` and unmaps them on free, so each large message
    pays a page fault per 4 KiB: about 44 ms per 64 MiB on a VM, more than the transfer.
    ``M_MMAP_THRESHOLD`` is documented to stop at 32 MiB on 64-bit systems, and a thread's
    own arena is no way out either (its heaps hold 64 MiB at most). So, once per process:

    * ``M_ARENA_MAX=1``: a thread that allocates for the first time from now on shares an
      existing arena, and the first such thread gets the main one. Called right before the
      process's first ZeroMQ socket, that thread is libzmq's I/O thread (its reaper thread
      allocates only once sockets close). Threads that allocated before keep their arenas.
    * ``M_MMAP_MAX=0``: large blocks come from the main heap (``brk``), not from ``mmap``.
    * ``M_TRIM_THRESHOLD=keep_bytes``: up to that much free memory at the top of the heap
      stays mapped for the next message instead of going back to the system.

    The costs: freed large blocks stay in the process for reuse, so its resident size stays
    near its peak instead of shrinking after it (at the top of the heap, at most
    ``keep_bytes``, twice the largest message, is kept); threads created later share one
    arena's lock. It misses the I/O thread when the ZeroMQ context was already in use or the
    process had already reached glibc's arena limit (8 per core); the environment settings
    in ``docs/wire-format.md`` then still work, set when the process starts. Skipped outside
    glibc and when the environment configures malloc; failures are ignored.
    """
    global _malloc_kept
    keep_bytes = min(keep_bytes, _INT_MAX)
    if keep_bytes <= _malloc_kept or not _glibc_malloc_is_default():
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if not _malloc_kept:
        mallopt(_M_ARENA_MAX, 1)
        mallopt(_M_MMAP_MAX, 0)
    mallopt(_M_TRIM_THRESHOLD, keep_bytes)
    _malloc_kept = keep_bytes


def _glibc_malloc_is_default() -> bool:
    """True on glibc when neither ``GLIBC_TUNABLES`` nor ``MALLOC_*`` configure malloc."""
    if sys.platform != "linux":
        return False
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        return False
    if not libc.startswith("glibc"):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    return not any(name.startswith("MALLOC_") for name in os.environ)
