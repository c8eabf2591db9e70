"""The delaying TCP relay of the WAN emulator (:mod:`gossip_sgp.wan` starts it; not a tool).

It runs inside the emulator's router namespace, where an nftables ``redirect`` rule sends
every TCP connection between two emulated hosts to its listening port. For each accepted
connection it reads the original destination (``SO_ORIGINAL_DST``), waits the one-way delay
of the link, connects to that destination itself, and from then on carries the bytes of
both directions, each chunk handed on one one-way delay (plus jitter) after it arrived. A
chunk is never handed on before an earlier chunk of the same direction, so jitter keeps
TCP's byte order, and each direction holds at most ``limit`` bytes: beyond that it stops
reading, and TCP's flow control slows the sender down (bounded memory).

    python -m gossip_sgp.wan.relay '{"hosts": {"10.1.0.2": [0.05, 0.0, null], ...}}'

``hosts`` maps each host's address to ``[delay_s, jitter_s, rate_bytes_per_s or null]``;
the delay of a connection from host a to host b is the mean of theirs. ``seed`` seeds the
jitter's draws; ``"realtime": true`` asks for real-time priority (``SCHED_FIFO``). The
relay prints ``ready PORT`` once it listens and exits when its standard input closes (the
emulator holds the other end, so the relay never outlives it) or on SIGTERM.

Only the standard library (and uvloop where installed): this file runs as a script.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

SO_ORIGINAL_DST = 80
"""``linux/netfilter_ipv4.h``: the destination a connection had before NAT."""

MIN_LIMIT = 1 << 20
MAX_LIMIT = 64 << 20
ASSUMED_RATE = 2.5e9 / 8
"""Bytes per second assumed for a link without a rate limit, to size its buffer: about
what the relay itself carries (it is the bottleneck of such a link)."""


class Link:
    """Delay, jitter and buffer limit of one direction of one connection."""

    def __init__(self, delay: float, jitter: float, rate: float | None, rng: random.Random):
        self.delay = delay
        self.jitter = jitter
        self.rng = rng
        # Twice the bandwidth-delay product, so a flow can fill its link.
        self.limit = int(min(MAX_LIMIT, max(MIN_LIMIT, 2 * (rate or ASSUMED_RATE) * delay)))

    def sample(self) -> float:
        """One draw of the one-way delay, uniform in [delay - jitter, delay + jitter]."""
        if self.jitter == 0:
            return self.delay
        return max(0.0, self.delay + self.rng.uniform(-self.jitter, self.jitter))


def at(
    loop: asyncio.AbstractEventLoop, when: float, callback: Callable[..., None], *args: Any
) -> asyncio.TimerHandle:
    """``callback(*args)`` at ``when`` on ``time.monotonic()``'s clock.

    Not ``loop.call_at``: uvloop's ``loop.time()`` is libuv's millisecond clock, cached
    when the loop last woke up, so a chunk stamped with it could leave up to a few
    milliseconds early. Timers may still fire early by libuv's rounding; ``Pipe.flush``
    then waits on.
    """
    return loop.call_later(max(0.0, when - time.monotonic()), callback, *args)


class _Mark:
    """An end-of-stream marker queued after the data that preceded it."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


EOF = _Mark("EOF")
"""The source closed its sending side: hand on a FIN."""
RESET = _Mark("RESET")
"""The source's connection broke: hand on a TCP reset."""

Item = bytes | _Mark


def reset(transport: asyncio.Transport) -> None:
    """Close ``transport`` with a TCP reset (RST) rather than a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class Pipe:
    """One direction of a relayed connection: timestamped chunks waiting for their time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, link: Link, on_done: Callable[[], None]):
        self.loop = loop
        self.link = link
        self.on_done = on_done
        self.source: asyncio.Transport | None = None
        self.target: asyncio.Transport | None = None
        self.queue: deque[tuple[float, Item]] = deque()
        self.queued = 0  # bytes in the queue
        self.last = 0.0  # when the newest queued item is due
        self.timer: asyncio.TimerHandle | None = None
        self.reading_paused = False
        self.target_paused = False
        self.ended = False  # EOF or RESET queued (or dropped): nothing more to queue
        self.done = False  # EOF or RESET handed on (or dropped)

    def stamp(self) -> float:
        """When something arriving now is due; never before anything queued earlier."""
        self.last = max(self.last, time.monotonic() + self.link.sample())
        return self.last

    def hold(self, until: float) -> None:
        """Nothing queued from now on is due before ``until``."""
        self.last = max(self.last, until)

    def push(self, item: Item) -> None:
        if self.ended:
            return  # the target is gone: discard
        self.queue.append((self.stamp(), item))
        if isinstance(item, _Mark):
            self.ended = True
        else:
            self.queued += len(item)
        self._check()
        if self.timer is None:
            self.flush()

    def attach(self, target: asyncio.Transport) -> None:
        self.target = target
        target.set_write_buffer_limits(high=self.link.limit, low=self.link.limit // 2)
        self.flush()

    def flush(self) -> None:
        self.timer = None
        target = self.target
        if target is None or self.done:
            return
        now = time.monotonic()
        ready: list[bytes] = []
        while self.queue and self.queue[0][0] <= now:
            _, item = self.queue.popleft()
            if isinstance(item, _Mark):
                if ready:
                    target.writelines(ready)
                    ready = []
                if item is RESET:
                    reset(target)
                elif target.can_write_eof() and not target.is_closing():
                    target.write_eof()
                self._finish()
                return
            ready.append(item)
            self.queued -= len(item)
        if ready:
            target.writelines(ready)
        if self.queue:
            self.timer = at(self.loop, self.queue[0][0], self.flush)
        self._check()

    def set_target_paused(self, paused: bool) -> None:
        self.target_paused = paused
        self._check()

    def _check(self) -> None:
        """Stop reading the source while this direction holds more than its limit."""
        source = self.source
        if source is None or source.is_closing():
            return
        full = self.target_paused or self.queued > self.link.limit
        if full and not self.reading_paused:
            self.reading_paused = True
            source.pause_reading()
        elif self.reading_paused and not full and self.queued <= self.link.limit // 2:
            self.reading_paused = False
            source.resume_reading()

    def drop(self) -> None:
        """Discard everything: the target is gone."""
        self.ended = True
        self.queue.clear()
        self.queued = 0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.reading_paused and self.source is not None and not self.source.is_closing():
            self.reading_paused = False
            self.source.resume_reading()  # keep reading (and discarding) until it ends
        self._finish()

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            self.on_done()


class Side(asyncio.Protocol):
    """One of the two TCP connections of a relayed flow."""

    def __init__(self, flow: Flow):
        self.flow = flow

    def data_received(self, data: bytes) -> None:
        self.flow.outgoing(self).push(data)

    def eof_received(self) -> bool:
        self.flow.outgoing(self).push(EOF)
        return True  # keep the other direction open (half-close)

    def pause_writing(self) -> None:
        self.flow.incoming(self).set_target_paused(True)

    def resume_writing(self) -> None:
        self.flow.incoming(self).set_target_paused(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.flow.lost(self, exc)


class Flow:
    """A relayed connection: the accepted side (client) and the one we open (server)."""

    def __init__(self, relay: Relay, client: asyncio.Transport, server: tuple[str, int]):
        self.relay = relay
        self.loop = relay.loop
        forward, backward = relay.links(client.get_extra_info("peername")[0], server[0])
        self.client_side = Side(self)
        self.server_side = Side(self)
        self.client = client
        self.server: asyncio.Transport | None = None
        self.up = Pipe(self.loop, forward, self._maybe_close)
        self.down = Pipe(self.loop, backward, self._maybe_close)
        self.up.source = client
        self.down.attach(client)
        self.closed = False
        # TCP's three-way handshake, one draw of the link's delay per trip. The client's
        # kernel completed it with us at once, so its connect() returned at once; what it
        # sends before its connect() would have returned leaves then, so that the first
        # request and the first answer arrive when they would over the real link.
        now = time.monotonic()
        syn = now + forward.sample()  # the server gets the request: we connect to it
        self.synack = syn + backward.sample()  # the client would learn of a refusal
        ack = self.synack + forward.sample()  # the server's accept() would return
        self.up.hold(ack)
        self.down.hold(ack + backward.sample())
        at(self.loop, syn, self._connect, server, syn)

    def outgoing(self, side: Side) -> Pipe:
        return self.up if side is self.client_side else self.down

    def incoming(self, side: Side) -> Pipe:
        return self.down if side is self.client_side else self.up

    def _connect(self, server: tuple[str, int], due: float) -> None:
        if time.monotonic() < due:  # the timer fired early (see ``at``)
            at(self.loop, due, self._connect, server, due)
            return
        task = self.loop.create_task(self._open(server))
        self.relay.tasks.add(task)
        task.add_done_callback(self.relay.tasks.discard)

    async def _open(self, server: tuple[str, int]) -> None:
        try:
            transport, _ = await self.loop.create_connection(lambda: self.server_side, *server)
        except OSError:
            # Refused or unreachable: the client learns it with the SYN-ACK's timing.
            at(self.loop, self.synack, self._refuse)
            return
        self.server = transport
        self.down.source = transport
        self.up.attach(transport)
        self._maybe_close()

    def _refuse(self) -> None:
        self.up.drop()
        self.down.drop()
        reset(self.client)

    def lost(self, side: Side, exc: Exception | None) -> None:
        self.incoming(side).drop()  # nobody left to hand that direction to
        self.outgoing(side).push(EOF if exc is None else RESET)

    def _maybe_close(self) -> None:
        """Close both connections once both directions have ended."""
        if self.closed or not (self.up.done and self.down.done):
            return
        self.closed = True
        self.client.close()
        if self.server is not None:
            self.server.close()
        self.relay.flows.discard(self)


class Relay:
    def __init__(self, loop: asyncio.AbstractEventLoop, config: dict[str, Any]):
        self.loop = loop
        self.hosts: dict[str, tuple[float, float, float | None]] = {
            address: (float(d), float(j), None if r is None else float(r))
            for address, (d, j, r) in config["hosts"].items()
        }
        self.rng = random.Random(config.get("seed"))
        self.flows: set[Flow] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    def links(self, source: str, target: str) -> tuple[Link, Link]:
        ds, js, rs = self.hosts[source]
        dt, jt, rt = self.hosts[target]
        rates = [r for r in (rs, rt) if r is not None]
        rate = min(rates) if rates else None
        delay, jitter = (ds + dt) / 2, (js + jt) / 2
        return Link(delay, jitter, rate, self.rng), Link(delay, jitter, rate, self.rng)

    def accept(self) -> asyncio.Protocol:
        return Acceptor(self)


class Acceptor(asyncio.Protocol):
    """Protocol of a freshly accepted client connection; hands it to a ``Flow``."""

    def __init__(self, relay: Relay):
        self.relay = relay
        self.side: Side | None = None

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)  # uvloop's are not subclasses
        sock = transport.get_extra_info("socket")
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack_from("!H", raw, 2)[0]
        address = socket.inet_ntoa(raw[4:8])
        source = transport.get_extra_info("peername")[0]
        if source not in self.relay.hosts or address not in self.relay.hosts:
            transport.abort()  # not between two emulated hosts: nothing to relay
            return
        flow = Flow(self.relay, transport, (address, port))
        self.relay.flows.add(flow)
        self.side = flow.client_side

    def data_received(self, data: bytes) -> None:
        if self.side is not None:
            self.side.data_received(data)

    def eof_received(self) -> bool:
        if self.side is not None:
            return self.side.eof_received()
        return False

    def pause_writing(self) -> None:
        if self.side is not None:
            self.side.pause_writing()

    def resume_writing(self) -> None:
        if self.side is not None:
            self.side.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.side is not None:
            self.side.connection_lost(exc)


async def serve(config: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    relay = Relay(loop, config)
    server = await loop.create_server(relay.accept, "0.0.0.0", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    stop = asyncio.Event()

    def stdin_readable() -> None:
        if not os.read(0, 4096):
            stop.set()

    loop.add_reader(0, stdin_readable)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print(f"ready {port}", flush=True)
    await stop.wait()
    server.close()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    config = json.loads(argv[0])
    if config.get("realtime"):
        # A real network does not wait for a CPU: without this, a relay that shares busy
        # cores with the emulated workers wakes up late (measured: 1-3 ms per chunk at a
        # load average of 15 on 2 cores, against 0.1 ms). It uses no more CPU this way,
        # only gets it sooner; the kernel keeps 5% of each second for the others anyway.
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        except OSError as exc:
            print(
                f"relay: no real-time priority ({exc}); delays suffer under load", file=sys.stderr
            )
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
