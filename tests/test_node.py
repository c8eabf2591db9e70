"""The gossip node's lifecycle: start, close, signals, failures, early and late messages.

ZeroMQ tests bind to 127.0.0.1 on free ports; the others run over the in-process transport.
Every node a test starts is closed by the ``nodes`` fixture, which then checks that no
gossip thread is left and that SIGTERM has its default action again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import gossip_sgp.node as node_module
from gossip_sgp import GossipConfig, GossipError, GossipNode, Message, PeerSpec, TransportError
from gossip_sgp.config import ENV_PEERS, ENV_RANK
from gossip_sgp.errors import ConfigError, SendTimeout
from gossip_sgp.launch import find_free_ports
from gossip_sgp.message import MessageKind
from gossip_sgp.settings import LinkSettings
from tests.threads import wait_until
from transports import FaultSpec, FaultyTransport, InProcNetwork, InProcTransport
from transports.base import HoldsBacklog

FP = 0x5EED
THREAD_PREFIX = "gossip-sgp-rank"

Nodes = Callable[..., GossipNode]


# ------------------------------------------------------------------------------ helpers
def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1."""
    return find_free_ports("127.0.0.1", n)


def gossip_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def tcp_ports_in_use() -> set[int]:
    """Local and remote ports of this process's TCP sockets (from /proc, no psutil)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # listdir's own descriptor is gone by now
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
                    ports.add(int(fields[2].rsplit(":", 1)[1], 16))
    return ports


class VirtualClock:
    """Stands in for the ``time`` module in node.py: ``monotonic()`` reads a virtual clock
    that only ``sleep()`` moves, and the sleeps are recorded."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def mass(sender: int, receiver: int, seq: int, *, fp: int = FP, size: int = 4) -> Message:
    return Message(
        sender=sender,
        receiver=receiver,
        round=seq,
        seq=seq,
        weight=0.5,
        tensors=(torch.full((size,), float(seq)),),
        fingerprint=fp,
    )


def local_config(world_size: int, rank: int, ports: list[int], **kw: Any) -> GossipConfig:
    return GossipConfig.local(world_size, rank, ports=ports, **kw)


@pytest.fixture
def nodes() -> Iterator[Nodes]:
    """``nodes(config, transport=None)``: a started node, closed after the test."""
    started: list[GossipNode] = []
    sigterm = signal.getsignal(signal.SIGTERM)

    def start(
        config: GossipConfig,
        transport: InProcTransport | None = None,
        settings: LinkSettings | None = None,
    ) -> GossipNode:
        node = GossipNode(config, transport=transport, settings=settings)
        started.append(node)
        return node.start()

    try:
        yield start
    finally:
        # linger=0: what a test checks is done by now, and waiting for acknowledgements a
        # test's fake peer never sends would only cost 1.5 s a node (the tests of close()
        # itself call it with its defaults).
        for node in started:
            node.close(linger=0.0)
    assert not gossip_threads()
    assert signal.getsignal(signal.SIGTERM) is sigterm


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port whose listener accepts connections in the kernel, never reads."""
    silent = socket.socket()
    try:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        yield silent.getsockname()[1]
    finally:
        silent.close()


@pytest.fixture
def inproc(nodes: Nodes) -> Callable[[int], list[GossipNode]]:
    """``inproc(n, settings=None)``: n started nodes on one in-process network."""

    def start(n: int, settings: LinkSettings | None = None) -> list[GossipNode]:
        net = InProcNetwork(n)
        ports = list(range(40000, 40000 + n))
        return [
            nodes(local_config(n, r, ports, transport="inproc"), net.transport(r), settings)
            for r in range(n)
        ]

    return start


@pytest.mark.timeout(30)
def test_round_trips_are_not_timed_from_messages_sent_again(
    inproc: Callable[[int], list[GossipNode]],
) -> None:
    """Karn's rule: the acknowledgement of a message sent twice does not say which copy it
    answers, so it gives no round-trip sample (timed from the first send it would count the
    copy's wait; from the latest, a late answer to the first copy as a short trip)."""
    a, b = inproc(2)
    received: queue.Queue[Message] = queue.Queue()
    b.subscribe(received.put, fingerprint=FP)
    a.send([mass(0, 1, 0)])
    first = received.get(timeout=10)
    assert wait_until(lambda: a.retransmitted >= 1, timeout=10)  # no acknowledgement: a copy
    b.acknowledge([(first.sender, first.seq, first.round)])
    assert wait_until(lambda: a.outstanding(1) == 0)
    assert not a.rtt.get(1)
    a.send([mass(0, 1, 1)])
    second = received.get(timeout=10)
    while second.seq != 1:  # the copy of seq 0 came first
        second = received.get(timeout=10)
    b.acknowledge([(second.sender, second.seq, second.round)])
    assert wait_until(lambda: a.outstanding(1) == 0)
    assert len(a.rtt[1]) == 1


# ----------------------------------------------------------------------- ZeroMQ, in process
@pytest.mark.timeout(20)
def test_two_nodes_exchange_a_message_and_its_acknowledgement(nodes: Nodes) -> None:
    ports = free_ports(2)
    a = nodes(local_config(2, 0, ports))
    b = nodes(local_config(2, 1, ports))
    received: queue.Queue[Message] = queue.Queue()
    b.subscribe(received.put, fingerprint=FP)
    a.send([mass(0, 1, 0, size=1000)])
    assert a.outstanding(1) == 1
    got = received.get(timeout=10)
    assert (got.sender, got.seq, got.weight) == (0, 0, 0.5)
    assert torch.equal(got.tensors[0], torch.zeros(1000))
    b.acknowledge([(got.sender, got.seq, got.round)])
    assert wait_until(lambda: a.outstanding(1) == 0)
    assert len(a.rtt[1]) == 1
    assert 0 < a.rtt[1][0] < 10
    assert a.stats.messages_sent[1] == 1
    assert b.stats.messages_received[0] == 1
    assert not a.dropped
    assert not b.dropped


@pytest.mark.timeout(20)
def test_close_leaves_no_thread_and_no_socket(nodes: Nodes) -> None:
    ports = free_ports(2)
    a = nodes(local_config(2, 0, ports))
    b = nodes(local_config(2, 1, ports))
    received: queue.Queue[Message] = queue.Queue()
    b.subscribe(received.put, fingerprint=FP)
    a.send([mass(0, 1, 0)])  # a connects to b: sockets on both ports
    received.get(timeout=10)
    assert len(gossip_threads()) == 2
    assert set(ports) <= tcp_ports_in_use()
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # the node's, until closed
    a.close()
    b.close()
    assert not a.running
    assert not b.running
    assert a.closed
    assert not gossip_threads()
    # libzmq's reaper thread closes the file descriptors just after the sockets close.
    assert wait_until(lambda: not set(ports) & tcp_ports_in_use()), tcp_ports_in_use()
    with GossipNode(local_config(2, 0, ports)):  # the port is free again
        pass


@pytest.mark.timeout(20)
def test_port_in_use_is_a_clear_error_and_leaves_no_thread() -> None:
    blocker = socket.socket()
    try:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        node = GossipNode(local_config(1, 0, [port]))
        with pytest.raises(TransportError, match=f"127.0.0.1:{port}.*in use"):
            node.start()
        assert not gossip_threads()
        assert not node.running
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        with pytest.raises(GossipError, match="starts only once"):
            node.start()
        assert not gossip_threads()
        node.close()  # harmless
    finally:
        blocker.close()


@pytest.mark.timeout(20)
def test_close_is_prompt_with_a_peer_that_never_reads(
    nodes: Nodes,
    silent_port: int,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first close() is bounded by the shutdown budget (5 s, ``_STOP_TIMEOUT``: that
    limit is the behaviour); a second close() does not wait at all. Fails if
    ``wait_acknowledged`` waits on a node whose thread has stopped (its ``not
    thread.is_alive()`` test dropped and ``while not self._closed`` made ``while True``):
    the second close then sleeps its 1.5 s linger on the virtual clock."""
    node = nodes(local_config(2, 0, [free_ports(1)[0], silent_port]))
    node.send([mass(0, 1, seq, size=1 << 14) for seq in range(64)])
    assert not node.flush(timeout=0.2)
    flushed: list[bool] = []
    flusher = threading.Thread(target=lambda: flushed.append(node.flush(timeout=30)))
    flusher.start()
    started = time.monotonic()
    node.close()
    assert time.monotonic() - started < 5.0
    flusher.join(5)
    assert flushed == [False]  # the close cut the flush short
    assert not node.running
    assert node.dropped["closed"] > 0  # the node's queue; ZeroMQ's queue is not counted
    assert "messages unsent; their mass is lost" in caplog.text
    # Closing again returns at once: no linger for acknowledgements (the 64 messages are
    # still unacknowledged), no drain. Timed on a virtual clock, not the machine's: any
    # wait in node.py would be a sleep on it (or a deadline read from it).
    clock = VirtualClock()
    monkeypatch.setattr(node_module, "time", clock)
    node.close()
    assert clock.slept == []
    assert clock.now == 0.0


@pytest.mark.timeout(20)
def test_no_copies_pile_up_behind_a_peer_that_takes_nothing(nodes: Nodes, silent_port: int) -> None:
    # A peer that is dead but not suspected yet (or just slow) takes nothing: the first
    # copies are still queued, so sending more would only lengthen the queue that its
    # acknowledgements and new messages must wait behind once it is back (measured: dozens
    # of copies of every message reached a restarted worker and starved its gossip).
    node = nodes(local_config(2, 0, [free_ports(1)[0], silent_port]))
    node.send([mass(0, 1, seq, size=1 << 14) for seq in range(64)])
    # No round trip is known yet: a copy would be due after 1 s; give it three.
    assert wait_until(lambda: node.retransmits_held >= 2, timeout=6.0)
    assert node.retransmitted == 0
    assert node.outstanding(1) == 64


# ------------------------------------------------------------------- in-process transport
class _FailingSends(InProcTransport):
    """Its first ``failures`` push-sum sends raise ``error`` (then it sends normally)."""

    def __init__(self, net: InProcNetwork, rank: int, error: Exception, failures: int) -> None:
        super().__init__(net, rank)
        self.error, self.failures = error, failures

    async def send(self, peer: int, message: Message) -> None:
        if message.kind == MessageKind.MASS and self.failures:
            self.failures -= 1
            raise self.error
        await super().send(peer, message)


def two_nodes_sending_through(
    transport: InProcTransport, nodes: Nodes
) -> tuple[GossipNode, GossipNode, queue.Queue[Message]]:
    """Rank 0 on ``transport``, rank 1 beside it, and the queue of what rank 1 is given."""
    ports = [40000, 40001]
    a = nodes(local_config(2, 0, ports, transport="inproc"), transport)
    b = nodes(local_config(2, 1, ports, transport="inproc"), transport.network.transport(1))
    delivered: queue.Queue[Message] = queue.Queue()
    b.subscribe(lambda m: delivered.put(m) is None, fingerprint=FP)
    return a, b, delivered


class _LosesFirstSkip(InProcTransport):
    """Loses the first skip notice it is given to send."""

    lost = 0

    async def send(self, peer: int, message: Message) -> None:
        if message.kind == MessageKind.HEARTBEAT and message.skip and not self.lost:
            self.lost += 1
            return
        await super().send(peer, message)


class _SlowLink(InProcTransport):
    """A slow link with room for one push-sum share: the first is kept "on the wire" (the
    send returns; it counts in ``backlog``, as ZmqTransport's do while libzmq writes a large
    message out); a send of another waits for room, as on a full ZeroMQ queue. ``release()``
    delivers them. Control messages are handed over at once."""

    def __init__(self, net: InProcNetwork, rank: int) -> None:
        super().__init__(net, rank)
        self.held: list[tuple[int, Message]] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.room: asyncio.Event | None = None

    async def start(self) -> None:
        self.loop, self.room = asyncio.get_running_loop(), asyncio.Event()
        await super().start()

    async def send(self, peer: int, message: Message) -> None:
        if message.kind != MessageKind.MASS:
            await super().send(peer, message)
            return
        assert self.room is not None
        if self.held:
            await self.room.wait()
        self.held.append((peer, message))

    def backlog(self, peer: int) -> int:
        return sum(p == peer for p, _ in self.held)

    def release(self) -> None:
        async def deliver() -> None:
            assert self.room is not None
            self.room.set()
            await asyncio.sleep(0.1)  # the waiting send takes its place
            held, self.held = self.held, []
            for peer, message in held:
                await super(_SlowLink, self).send(peer, message)

        assert self.loop is not None
        asyncio.run_coroutine_threadsafe(deliver(), self.loop).result(5)


@pytest.mark.timeout(20)
def test_a_slow_link_delays_no_acknowledgement_and_gets_no_copies(nodes: Nodes) -> None:
    """While rank 0's shares to rank 1 are on their way: rank 0 sends no copy of them
    however long that takes (an acknowledgement cannot be overdue before its share has left
    the transport), and its acknowledgement of rank 1's share goes out at once although a
    share waits for room ahead of it (control messages have a queue of their own); once the
    shares arrive, each is folded and acknowledged once. Fails when the retransmitter
    ignores the transport's backlog (a copy after about 1 s), and when control messages share
    the payload's queue (the acknowledgement waits behind the share)."""
    slow = _SlowLink(InProcNetwork(2), 0)
    a, b, to_b = two_nodes_sending_through(slow, nodes)
    a.subscribe(lambda m: a.acknowledge([(m.sender, m.seq, m.round)]) is None, fingerprint=FP)
    a.send([mass(0, 1, 0)])
    assert wait_until(lambda: slow.backlog(1) == 1)
    # The retransmitter looks every 0.5 s; a copy would be due 1 s after the send.
    assert wait_until(lambda: a.retransmits_held >= 4, timeout=10)
    assert a.retransmitted == 0
    a.send([mass(0, 1, 1)])  # waits for room in the transport
    b.send([mass(1, 0, 0)])
    assert wait_until(lambda: b.acked_weight == {0: 0.5})  # past rank 0's waiting share
    assert slow.backlog(1) == 1
    slow.release()
    shares = [to_b.get(timeout=10) for _ in range(2)]
    assert [m.seq for m in shares] == [0, 1]
    b.acknowledge([(m.sender, m.seq, m.round) for m in shares])
    assert wait_until(lambda: a.acked_weight == {1: 1.0})
    assert a.retransmitted == 0
    assert to_b.empty()


@pytest.mark.timeout(20)
def test_a_lost_skip_notice_is_sent_again_until_acknowledged(nodes: Nodes) -> None:
    """A synchronous peer waits for a skip notice as for a share: one lost on the way made
    it wait out its whole timeout. Fails when skip notices are sent once (nothing of round
    7 arrives) or are never acknowledged (rank 0 keeps it)."""
    transport = _LosesFirstSkip(InProcNetwork(2), 0)
    a, _b, delivered = two_nodes_sending_through(transport, nodes)
    a.subscribe(lambda m: True, fingerprint=FP)  # its notices name the model, as SGP's do
    a.send_skip([1], 7)
    notice = delivered.get(timeout=10)  # the copy sent again (after 1 s: no round trip yet)
    assert (notice.kind, notice.round, notice.skip) == (MessageKind.HEARTBEAT, 7, True)
    assert transport.lost == 1
    assert a.retransmitted >= 1
    assert wait_until(lambda: not a._links[1].skips)  # acknowledged: not sent again


@pytest.mark.timeout(20)
def test_a_send_that_found_the_queue_full_is_sent_again_and_not_lost(nodes: Nodes) -> None:
    # A full queue may drain (a slow peer): the message stays owed and the retransmitter
    # sends it again. Its weight used to count as lost as well, so that the ledger of a
    # kill -9 came out with more lost than was.
    transport = _FailingSends(InProcNetwork(2), 0, SendTimeout("queue stayed full"), 1)
    a, b, delivered = two_nodes_sending_through(transport, nodes)
    a.send([mass(0, 1, 0)])
    message = delivered.get(timeout=10)  # the copy sent again (after 1 s)
    b.acknowledge([(message.sender, message.seq, message.round)])
    assert wait_until(lambda: a.acked_weight == {1: 0.5})
    assert a.send_errors == {1: 1}
    assert a.lost_weight == 0.0
    assert a.retransmitted >= 1


@pytest.mark.timeout(20)
def test_a_send_that_failed_for_good_is_lost_once(nodes: Nodes) -> None:
    """Any other failure would repeat: the message is not sent again, and its weight is
    lost once (it used to stay owed too, so each copy sent again added it to the loss again).

    "Not sent again" needs no fixed sleep: a second message, sent after the first had
    failed and left unacknowledged, is a witness. The retransmitter copies the messages of a
    peer oldest first in one pass, so once the witness's copy has arrived, a copy of the
    failed message would have arrived before it. Fails if ``_lose`` leaves the message
    owed (``.pop(message.seq, None)`` made ``.get(message.seq)``), and, with the
    ``wait_acknowledged`` assertion taken out, on the copy of seq 0 delivered."""
    transport = _FailingSends(InProcNetwork(2), 0, TransportError("cannot encode"), 1)
    a, b, delivered = two_nodes_sending_through(transport, nodes)
    a.send([mass(0, 1, 0)])
    assert wait_until(lambda: a.lost_weight == 0.5)
    assert a.wait_acknowledged(0.0)  # nothing owed: the retransmitter has nothing to send
    a.send([mass(0, 1, 1)])  # the witness: goes through, not acknowledged until the end
    # the witness and then its copy (after 1 s: no round trip is known)
    assert delivered.get(timeout=10).seq == 1
    assert delivered.get(timeout=10).seq == 1
    assert a.retransmitted >= 1
    assert a.send_errors == {1: 1}
    assert a.lost_weight == 0.5
    b.acknowledge([(0, 1, 1)])  # the witness is done with (and close() need not linger)
    assert a.wait_acknowledged(5.0)
    assert a.lost_weight == 0.5


@pytest.mark.timeout(20)
def test_send_flush_and_acknowledge_after_close(inproc: Callable[[int], list[GossipNode]]) -> None:
    a, _ = inproc(2)
    a.send([mass(0, 1, 0)])
    assert a.flush(timeout=5)
    a.close()
    with pytest.raises(GossipError, match="rank 0 is closed"):
        a.send([mass(0, 1, 1)])
    assert not a.flush(timeout=5)
    a.acknowledge([(1, 0, 0)])  # nobody to tell: no error
    a.close()
    fresh = GossipNode(local_config(2, 0, [1, 2], transport="inproc"))
    with pytest.raises(GossipError, match="has not been started"):
        fresh.send([mass(0, 1, 0)])


@pytest.mark.timeout(20)
def test_a_failing_handler_does_not_stop_later_deliveries(
    inproc: Callable[[int], list[GossipNode]], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = inproc(2)
    delivered: queue.Queue[int] = queue.Queue()

    def handler(message: Message) -> bool:
        if message.seq == 0:
            raise RuntimeError("bug in the handler")
        delivered.put(message.seq)
        return True

    b.subscribe(handler, fingerprint=FP)
    a.send([mass(0, 1, seq) for seq in range(3)])
    assert sorted(delivered.get(timeout=5) for _ in range(2)) == [1, 2]
    assert b.dropped == {"handler_error": 1}
    assert "bug in the handler" in caplog.text
    assert b.running


@pytest.mark.timeout(20)
def test_a_message_the_node_fails_on_does_not_stop_its_receiver(
    inproc: Callable[[int], list[GossipNode]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A bug met while booking one message (here in the failure detector) loses that
    # message, counted and logged; the receiver goes on (before, it ended without a word,
    # and the node never heard anyone again).
    a, b = inproc(2)
    delivered: queue.Queue[int] = queue.Queue()
    b.subscribe(lambda m: delivered.put(m.seq) is None, fingerprint=FP)
    heard = node_module.FailureDetector.heard
    failures = [RuntimeError("bug in the detector")]

    def flaky_heard(self: node_module.FailureDetector, peer: int, now: float) -> bool:
        if failures:
            raise failures.pop()
        return heard(self, peer, now)

    monkeypatch.setattr(node_module.FailureDetector, "heard", flaky_heard)
    a.send([mass(0, 1, seq) for seq in range(3)])
    assert sorted(delivered.get(timeout=5) for _ in range(2)) == [1, 2]
    assert b.dropped == {"dispatch_error": 1}
    assert b.lost_weight == 0.5
    assert "bug in the detector" in caplog.text
    assert b.running


@pytest.mark.timeout(20)
def test_messages_that_arrive_before_subscribe_are_delivered_then(
    inproc: Callable[[int], list[GossipNode]],
) -> None:
    a, b = inproc(2)
    a.send([mass(0, 1, 0), mass(0, 1, 1), mass(0, 1, 2, fp=FP + 1)])
    assert wait_until(lambda: b.stats.messages_received[0] == 3)
    delivered: list[int] = []
    b.subscribe(lambda m: delivered.append(m.seq), fingerprint=FP)
    assert wait_until(lambda: b.rejected["wrong_model"] == 1)
    assert delivered == [0, 1]
    assert not b.dropped


@pytest.mark.timeout(20)
def test_early_duplicates_are_acknowledged_again(
    inproc: Callable[[int], list[GossipNode]],
) -> None:
    a, b = inproc(2)
    a.send([mass(0, 1, 0), mass(0, 1, 0)])  # the second looks like a retry
    assert wait_until(lambda: b.stats.messages_received[0] == 2)
    seen: set[int] = set()

    def handler(message: Message) -> bool:
        fresh = message.seq not in seen
        seen.add(message.seq)
        return fresh

    b.subscribe(handler, fingerprint=FP)  # delivers both in this thread
    assert wait_until(lambda: a.outstanding(1) == 0)


@pytest.mark.timeout(20)
def test_early_buffer_overflow_is_counted(
    inproc: Callable[[int], list[GossipNode]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = inproc(2, LinkSettings(max_early=4))
    a.send([mass(0, 1, seq) for seq in range(6)])
    assert wait_until(lambda: b.dropped["early_overflow"] == 2)
    delivered: list[int] = []
    b.subscribe(lambda m: delivered.append(m.seq), fingerprint=FP)
    assert delivered == [2, 3, 4, 5]
    assert "early_overflow" in caplog.text


@pytest.mark.timeout(20)
def test_close_from_another_thread_wakes_the_subscriber(
    inproc: Callable[[int], list[GossipNode]],
) -> None:
    (node,) = inproc(1)
    woken = threading.Event()
    node.subscribe(lambda m: True, fingerprint=FP, on_close=woken.set)
    closer = threading.Thread(target=node.close)
    closer.start()
    assert woken.wait(5)
    closer.join(5)
    assert not closer.is_alive()
    assert not node.running
    late = threading.Event()
    (other,) = inproc(1)
    other.close()
    other.subscribe(lambda m: True, fingerprint=FP, on_close=late.set)
    assert late.is_set()  # subscribed to a stopped node: told at once


@pytest.mark.timeout(20)
def test_close_from_the_handler_does_not_deadlock(
    inproc: Callable[[int], list[GossipNode]],
) -> None:
    a, b = inproc(2)
    woken = threading.Event()
    b.subscribe(lambda m: b.close(), fingerprint=FP, on_close=woken.set)
    a.send([mass(0, 1, 0)])
    assert woken.wait(5)
    assert b.closed
    assert wait_until(lambda: not b.running)


class _BrokenTransport(InProcTransport):
    async def recv(self) -> Message:
        raise TransportError("socket exploded")


@pytest.mark.timeout(20)
def test_a_node_that_cannot_receive_stops_and_says_why(
    nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    assert_stops_and_says_why(_BrokenTransport(InProcNetwork(2), 0), "socket exploded")
    assert "cannot receive" in caplog.text


def assert_stops_and_says_why(
    transport: InProcTransport, cause: str, settings: LinkSettings | None = None
) -> None:
    """Rank 0 of two, on ``transport``, stops by itself (its subscriber is woken) and its
    next send raises ``GossipError`` naming ``cause``."""
    woken = threading.Event()
    config = local_config(2, 0, [1, 2], transport="inproc")
    node = GossipNode(config, transport=transport, settings=settings)
    node.subscribe(lambda m: True, fingerprint=FP, on_close=woken.set)
    node.start()
    try:
        assert woken.wait(5)
        with pytest.raises(GossipError, match=f"rank 0 stopped: {cause}"):
            node.send([mass(0, 1, 0)])
    finally:
        node.close()


@pytest.mark.timeout(20)
def test_a_node_whose_failure_detector_fails_stops_and_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Without its failure detector a worker would wait for a silent peer until its
    # GossipTimeout: the node stops instead, and the next send names the cause.
    def broken_check(self: object, now: float) -> list[int]:
        raise RuntimeError("detector exploded")

    monkeypatch.setattr(node_module.FailureDetector, "check", broken_check)
    fast = LinkSettings(heartbeat_s=0.01)
    assert_stops_and_says_why(InProcNetwork(2).transport(0), "detector exploded", fast)
    assert "failure detector failed" in caplog.text
    assert not gossip_threads()


@pytest.mark.timeout(20)
def test_sigterm_handler_only_when_default_and_in_the_main_thread(
    inproc: Callable[[int], list[GossipNode]],
) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be set in the main thread")

    def mine(signum: int, frame: object) -> None:
        raise AssertionError("not called")

    (node,) = inproc(1)
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    node.close()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        inproc(1)[0].close()
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
    started: list[GossipNode] = []
    thread = threading.Thread(target=lambda: started.extend(inproc(1)))
    thread.start()
    thread.join(10)
    assert started
    assert started[0].running
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# --------------------------------------------------------------------------- subprocesses
WORKER = textwrap.dedent(
    """
    import sys, time
    import torch
    from gossip_sgp import GossipConfig, GossipNode, Message

    busy = sys.argv[1] == "busy"
    with GossipNode(GossipConfig.from_env()) as node:
        for seq in range(64 if busy else 0):  # rank 1 never reads: they stay unsent
            node.send([Message(sender=0, receiver=1, round=seq, seq=seq, weight=0.5,
                               tensors=(torch.ones(4096),))])
        print("ready", flush=True)
        while True:
            time.sleep(0.01)
    """
)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("signum", "mode"),
    [(signal.SIGTERM, "idle"), (signal.SIGTERM, "busy"), (signal.SIGINT, "idle")],
)
def test_worker_exits_promptly_on_a_signal(
    tmp_path: Path, signum: signal.Signals, mode: str
) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    silent = socket.socket()  # rank 1: accepts connections, never reads
    try:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        peers = f"127.0.0.1:{free_ports(1)[0]},127.0.0.1:{silent.getsockname()[1]}"
        env = {**os.environ, ENV_PEERS: peers, ENV_RANK: "0"}
        process = subprocess.Popen(
            [sys.executable, "-W", "default", str(script), mode],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stdout is not None
            assert process.stdout.readline() == "ready\n", process.communicate()[1]
            process.send_signal(signum)
            started = time.monotonic()
            _, stderr = process.communicate(timeout=10)
            elapsed = time.monotonic() - started
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    finally:
        silent.close()
    assert elapsed < 5.0
    lines = stderr.splitlines()
    if signum == signal.SIGTERM:
        assert process.returncode == 128 + signal.SIGTERM  # SystemExit(143): no traceback
        expected = ["messages unsent; their mass is lost"] if mode == "busy" else []
        assert len(lines) == len(expected), stderr
        for line, text in zip(lines, expected, strict=True):
            assert text in line
    else:
        # KeyboardInterrupt unwinds the with block (the node closes), then Python ends the
        # process with SIGINT itself, as shells expect (exit status 130).
        assert process.returncode == -signal.SIGINT
        assert lines[0] == "Traceback (most recent call last):", stderr
        assert lines[-1] == "KeyboardInterrupt", stderr
        assert stderr.count("Traceback") == 1, stderr
        assert "gossip_sgp" not in stderr, stderr


@pytest.mark.timeout(10)
def test_logging_is_quiet_for_a_clean_run(
    inproc: Callable[[int], list[GossipNode]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="gossip_sgp")
    a, b = inproc(2)
    b.subscribe(lambda m: True, fingerprint=FP)
    a.send([mass(0, 1, 0)])
    assert wait_until(lambda: b.stats.messages_received[0] == 1)
    a.close()
    b.close()
    assert not caplog.records


@pytest.mark.timeout(30)
def test_curve_security_needs_zeromq_and_its_own_key(tmp_path: Path) -> None:
    import zmq

    public, secret = zmq.curve_keypair()
    other, _ = zmq.curve_keypair()
    key_file = tmp_path / "secret.key"
    key_file.write_bytes(secret)
    key_file.chmod(0o600)
    ports = free_ports(2)

    def config(**kw: object) -> GossipConfig:
        peers = [
            PeerSpec(rank=r, host="127.0.0.1", port=p, public_key=k.decode())
            for r, (p, k) in enumerate(zip(ports, [public, other], strict=True))
        ]
        fields: dict[str, object] = dict(security="curve", secret_key_file=str(key_file))
        return GossipConfig(rank=0, peers=tuple(peers), **{**fields, **kw})  # type: ignore[arg-type]

    with pytest.raises(GossipError, match="needs transport = 'zmq'"):
        GossipNode(config(transport="torch")).start()
    assert not gossip_threads()
    key_file.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        GossipNode(config()).start()
    assert not gossip_threads()


@pytest.mark.timeout(20)
def test_an_acknowledgement_for_an_earlier_life_is_ignored(
    inproc: Callable[[int], list[GossipNode]],
) -> None:
    """A restarted worker that binds its old address can receive acknowledgements queued
    for its previous life, for sequence numbers its new life uses again. Each ACK names the
    life it answers (``to_incarnation``): one for another life leaves the share outstanding
    (so it is sent again if lost) and is counted. Fails with the check in
    ``GossipNode._dispatch`` removed (the stale ACK clears the share), or with
    ``GossipNode._enqueue`` naming another life than the one last heard (the real ACK is
    then refused too)."""
    a, b = inproc(2)
    received: queue.Queue[Message] = queue.Queue()
    b.subscribe(received.put, fingerprint=FP)
    a.send([mass(0, 1, 0)])
    got = received.get(timeout=10)
    stale = Message(
        sender=1,
        receiver=0,
        round=got.round,
        seq=got.seq,
        weight=0.0,
        tensors=(),
        fingerprint=FP,
        kind=MessageKind.ACK,
        incarnation=b.incarnation,
        to_incarnation=a.incarnation - 1,
    )
    a._dispatch(stale)
    assert a.outstanding(1) == 1
    assert a.rejected["stale_ack"] == 1
    b.acknowledge([(got.sender, got.seq, got.round)])  # the real one names a's life
    assert wait_until(lambda: a.outstanding(1) == 0)
    assert a.rejected["stale_ack"] == 1


def test_the_fault_injector_passes_the_transports_backlog_through() -> None:
    """The simulator runs the node over ``FaultyTransport``: without ``backlog`` there, a
    node over it would take a share still held by ZeroMQ for one that left (copies sent
    behind it, no heartbeat beside it). Fails with ``FaultyTransport.backlog`` removed."""
    slow = _SlowLink(InProcNetwork(2), 0)
    slow.held.append((1, mass(0, 1, 0)))
    faulty = FaultyTransport(slow, FaultSpec(drop=0.5))
    assert isinstance(faulty, HoldsBacklog)
    assert (faulty.backlog(1), faulty.backlog(0)) == (1, 0)
    plain = FaultyTransport(InProcNetwork(2).transport(0), FaultSpec())
    assert plain.backlog(1) == 0  # an inner transport that holds nothing back


@pytest.mark.timeout(30)
def test_a_second_close_does_not_wait_again_for_a_gossip_thread_that_would_not_stop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An interrupted worker closes its node twice (``close(linger=0)`` on the way out, then
    ``close()`` in a ``finally``); a gossip thread that does not stop is waited for once."""
    monkeypatch.setattr(node_module, "_STOP_TIMEOUT", 0.5)
    config = local_config(2, 0, [1, 2], transport="inproc")
    node = GossipNode(config, transport=InProcNetwork(2).transport(0)).start()
    release = threading.Event()
    loop = node._loop
    assert loop is not None
    loop.call_soon_threadsafe(release.wait, 20.0)  # the loop is stuck in a blocking call
    try:
        with caplog.at_level(logging.WARNING, logger="gossip_sgp"):
            node.close(linger=0.0)
            node.close()
            node.close()
    finally:
        release.set()
    stuck = [r for r in caplog.records if "did not stop in time" in r.getMessage()]
    assert len(stuck) == 1, [r.getMessage() for r in caplog.records]
    assert wait_until(lambda: not gossip_threads(), timeout=10)  # it stops once unblocked
