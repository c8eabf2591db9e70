"""ZmqTransport over real ZeroMQ sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import pytest
import torch
import zmq
import zmq.asyncio
import zmq.utils.garbage

from gossip_sgp import wire
from gossip_sgp.errors import SendTimeout, TransportClosed, TransportError, WireError
from gossip_sgp.message import Message, MessageKind
from transports import zmq as zmq_transport
from transports.base import Transport
from transports.zmq import ZmqTransport

FP = 0xFEED
pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


def free_addresses(n: int, host: str = "127.0.0.1") -> list[str]:
    """n distinct free TCP ports on ``host`` (held open together so none repeats)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = [socket.socket(family) for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        bracketed = f"[{host}]" if family == socket.AF_INET6 else host
        return [f"tcp://{bracketed}:{s.getsockname()[1]}" for s in socks]
    finally:
        for s in socks:
            s.close()


@asynccontextmanager
async def network(
    n: int, **kw: Any
) -> AsyncIterator[tuple[zmq.asyncio.Context, list[ZmqTransport]]]:
    """n started transports on their own context; everything is closed on the way out."""
    context = zmq.asyncio.Context()
    addresses = free_addresses(n)
    kw.setdefault("fingerprint", FP)
    transports = [ZmqTransport(r, addresses, context=context, **kw) for r in range(n)]
    try:
        for t in transports:
            await t.start()
        yield context, transports
    finally:
        for t in transports:
            await t.close()
        context.destroy(linger=0)


def message(sender: int, receiver: int, *tensors: torch.Tensor, **kw: Any) -> Message:
    fields: dict[str, Any] = dict(round=3, seq=0, weight=1 / 3, fingerprint=FP)
    return Message(sender=sender, receiver=receiver, tensors=tensors, **{**fields, **kw})


async def recv(t: ZmqTransport) -> Message:
    return await asyncio.wait_for(t.recv(), 10)


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8))


async def test_satisfies_the_transport_protocol() -> None:
    async with network(2) as (_, ts):
        assert isinstance(ts[0], Transport)


async def test_two_ranks_exchange_messages() -> None:
    x = torch.randn(1000, dtype=torch.float64)
    y = torch.randn(7, 3).to(torch.bfloat16)
    async with network(2) as (_, (t0, t1)):
        await t0.send(1, message(0, 1, x, y, incarnation=4))
        await t1.send(0, message(1, 0, y, weight=0.1 + 0.2))
        got1, got0 = await recv(t1), await recv(t0)
    assert_bit_equal(got1.tensors[0], x)
    assert_bit_equal(got1.tensors[1], y)
    assert (got1.sender, got1.weight, got1.incarnation, got1.round) == (0, 1 / 3, 4, 3)
    assert got1.sent_at > 0  # stamped by the transport
    assert (got0.sender, got0.weight) == (1, 0.1 + 0.2)
    assert_bit_equal(got0.tensors[0], y)
    wire_bytes = sum(memoryview(f).nbytes for f in wire.encode(got1))
    assert t0.stats.messages_sent == {1: 1}
    assert t1.stats.messages_received == {0: 1}
    assert t0.stats.bytes_sent[1] == t1.stats.bytes_received[0] == wire_bytes
    assert not t0.stats.rejected
    assert not t1.stats.rejected


async def test_four_ranks_all_to_all() -> None:
    async with network(4) as (_, ts):
        for t in ts:
            for peer in range(4):
                if peer != t.rank:
                    payload = torch.full((100,), float(10 * t.rank + peer))
                    await t.send(peer, message(t.rank, peer, payload, seq=peer))
        for t in ts:
            got = sorted([await recv(t) for _ in range(3)], key=lambda m: m.sender)
            assert [m.sender for m in got] == [r for r in range(4) if r != t.rank]
            for m in got:
                assert m.tensors[0].equal(torch.full((100,), float(10 * m.sender + t.rank)))
            assert t.stats.messages_received == {r: 1 for r in range(4) if r != t.rank}


async def test_messages_wait_for_a_peer_that_starts_late() -> None:
    context = zmq.asyncio.Context()
    addresses = free_addresses(2)
    early, late = (ZmqTransport(r, addresses, fingerprint=FP, context=context) for r in (0, 1))
    try:
        await early.start()
        await early.send(1, message(0, 1, torch.ones(3)))
        await late.start()
        assert (await recv(late)).tensors[0].equal(torch.ones(3))
    finally:
        await early.close()
        await late.close()
        context.destroy(linger=0)


async def test_ipv6_loopback() -> None:
    try:
        addresses = free_addresses(2, "::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    context = zmq.asyncio.Context()
    t0, t1 = (ZmqTransport(r, addresses, fingerprint=FP, context=context) for r in (0, 1))
    try:
        await t0.start()
        await t1.start()
        await t0.send(1, message(0, 1, torch.ones(3)))
        assert (await recv(t1)).sender == 0
    finally:
        await t0.close()
        await t1.close()
        context.destroy(linger=0)


async def test_large_message_outlives_its_sender_references() -> None:
    big = torch.randn(4 << 20, generator=torch.Generator().manual_seed(7))  # 16 MiB
    expected = big.clone()
    async with network(2) as (_, (t0, t1)):
        await t0.send(1, message(0, 1, big))
        del big  # libzmq may still be sending: the zero-copy frame keeps the storage alive
        gc.collect()
        got = await recv(t1)
    assert_bit_equal(got.tensors[0], expected)


async def test_garbage_is_rejected_counted_and_skipped(caplog: pytest.LogCaptureFixture) -> None:
    valid = wire.encode(message(0, 1, torch.ones(4)))
    header = msgpack.unpackb(valid[0])
    garbage: list[tuple[list[bytes], str]] = [
        ([b"junk"], "malformed"),
        ([b"more junk", b"x" * 100], "malformed"),
        ([msgpack.packb({**header, "v": 9}), bytes(valid[1])], "version"),
        ([msgpack.packb({**header, "receiver": 0}), bytes(valid[1])], "wrong_receiver"),
        ([msgpack.packb({**header, "sender": 7}), bytes(valid[1])], "unknown_sender"),
        ([msgpack.packb({**header, "fingerprint": 1}), bytes(valid[1])], "wrong_model"),
        ([valid[0], bytes(valid[1])[:-4]], "size_mismatch"),
        ([valid[0], b"\xff" * 16], "non_finite"),
        ([b"junk again"], "malformed"),
    ]
    async with network(2) as (context, (_t0, t1)):
        raw = context.socket(zmq.PUSH)  # one connection, so t1 gets the frames in this order
        raw.connect(t1.addresses[1])
        with caplog.at_level(logging.WARNING, logger="transports.zmq"):
            for frames, _ in garbage:
                await raw.send_multipart(frames)
            await raw.send_multipart(wire.encode(message(0, 1, torch.arange(5.0))))
            got = await recv(t1)
        raw.close(linger=0)
    assert got.tensors[0].equal(torch.arange(5.0))
    expected: dict[str, int] = {}
    for _, reason in garbage:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(t1.stats.rejected) == expected
    assert t1.stats.messages_received == {0: 1}
    warned = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(warned) == len(expected)  # one line per reason, not per message


async def test_close_wakes_a_pending_recv() -> None:
    async with network(2) as (_, (_t0, t1)):
        pending = asyncio.ensure_future(t1.recv())
        await asyncio.sleep(0)  # let recv block on the socket
        assert not pending.done()
        await t1.close()
        with pytest.raises(TransportClosed):
            await asyncio.wait_for(pending, 5)


async def test_send_and_recv_after_close_raise() -> None:
    async with network(2) as (_, (t0, _t1)):
        await t0.close()
        await t0.close()  # idempotent
        with pytest.raises(TransportClosed):
            await t0.send(1, message(0, 1, torch.ones(1)))
        with pytest.raises(TransportClosed):
            await t0.recv()
        with pytest.raises(TransportClosed):
            await t0.start()


async def test_send_to_an_unreachable_peer_times_out() -> None:
    context = zmq.asyncio.Context()
    nobody, me = free_addresses(2)
    t = ZmqTransport(1, [nobody, me], fingerprint=FP, sndhwm=1, send_timeout=0.2, context=context)
    try:
        await t.start()

        async def fill_the_queue() -> None:
            for seq in range(100):
                await t.send(0, message(1, 0, torch.ones(10), seq=seq))

        with pytest.raises(SendTimeout):
            await fill_the_queue()
        assert 1 <= t.stats.messages_sent[0] < 100
    finally:
        await t.close()
        context.destroy(linger=0)


async def test_control_messages_overtake_the_shares_queued_before_them() -> None:
    """Acknowledgements and heartbeats travel on a connection of their own: sent after 12
    shares of 2 MB that the receiver takes one at a time, they arrive among the first few
    messages, not after the shares (they would with one connection per peer: fails when
    ``send`` puts them on the payload socket). A JOIN stays behind the shares (fails when it
    takes the control connection)."""
    share = torch.ones(1 << 19)  # 2 MiB
    async with network(2, rcvhwm=1) as (_, (t0, t1)):
        # Both connections up first (each is made on the first send of its kind), as they
        # are between gossiping workers: heartbeats flow from the start.
        await t0.send(1, message(0, 1, share, seq=99))
        await t0.send(1, message(0, 1, kind=MessageKind.HEARTBEAT, weight=0.0))
        assert {(await recv(t1)).kind for _ in range(2)} == {
            MessageKind.MASS,
            MessageKind.HEARTBEAT,
        }
        for seq in range(12):
            await t0.send(1, message(0, 1, share, seq=seq))
        await t0.send(1, message(0, 1, kind=MessageKind.HEARTBEAT, weight=0.0))
        await t0.send(1, message(0, 1, kind=MessageKind.ACK, seq=5, weight=0.0))
        await t0.send(1, message(0, 1, kind=MessageKind.JOIN, weight=0.0, refused=True))
        kinds = [(await recv(t1)).kind for _ in range(15)]
    # The PULL socket takes one message from each connection in turn.
    assert kinds.index(MessageKind.HEARTBEAT) < kinds.index(MessageKind.ACK) <= 6, kinds
    assert kinds.count(MessageKind.MASS) == 12
    # A refusal to rejoin keeps its place behind the shares (the donated half among them).
    assert kinds[-1] == MessageKind.JOIN, kinds


async def test_backlog_counts_the_shares_libzmq_has_not_written_out() -> None:
    """Shares of 256 KiB (zero-copy: pyzmq copies frames under ``zmq.COPY_THRESHOLD``, and
    those leave our memory at once, so they never count). A share whose send timed out never
    reached libzmq and does not count either: the copy sent again must not wait for it
    (fails when its tracker stays listed)."""
    context = zmq.asyncio.Context()
    nobody, me = free_addresses(2)
    t = ZmqTransport(1, [nobody, me], fingerprint=FP, context=context, sndhwm=3, send_timeout=0.2)
    try:
        await t.start()
        for seq in range(3):
            await t.send(0, message(1, 0, torch.ones(1 << 16), seq=seq))
        await t.send(0, message(1, 0, kind=MessageKind.HEARTBEAT, weight=0.0))
        assert t.backlog(0) == 3  # nobody listens: all three wait; heartbeats do not count
        for seq in range(3, 20):  # until the queue is full
            before = t.backlog(0)
            try:
                await t.send(0, message(1, 0, torch.ones(1 << 16), seq=seq))
            except SendTimeout:
                break
        else:
            pytest.fail("the queue to a peer nobody is listening for never filled up")
        assert t.backlog(0) <= before
    finally:
        await t.close()
        context.destroy(linger=0)
    async with network(2) as (_, (t0, t1)):
        await t0.send(1, message(0, 1, torch.ones(1 << 16)))
        await recv(t1)
        for _ in range(500):  # pyzmq's garbage collector thread releases the frame soon after
            if not t0.backlog(1):
                break
            await asyncio.sleep(0.01)
        assert t0.backlog(1) == 0


async def test_a_full_control_queue_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Control messages to a peer that takes nothing never wait for room: the protocol
    repeats each (a heartbeat, a skip notice) or answers its copy again (an acknowledgement),
    so the one beyond ``CONTROL_HWM`` is refused at once, while shares wait for room."""
    monkeypatch.setattr(zmq_transport, "CONTROL_HWM", 4)
    context = zmq.asyncio.Context()
    nobody, me = free_addresses(2)
    t = ZmqTransport(1, [nobody, me], fingerprint=FP, send_timeout=30.0, context=context)
    try:
        await t.start()
        for _ in range(4):
            await t.send(0, message(1, 0, kind=MessageKind.HEARTBEAT, weight=0.0))
        with pytest.raises(SendTimeout, match="control messages are queued"):
            await asyncio.wait_for(
                t.send(0, message(1, 0, kind=MessageKind.HEARTBEAT, weight=0.0)), 1.0
            )
        assert t.stats.messages_sent[0] == 4
    finally:
        await t.close()
        context.destroy(linger=0)


async def test_close_fails_a_send_waiting_for_room() -> None:
    context = zmq.asyncio.Context()
    nobody, me = free_addresses(2)
    t = ZmqTransport(1, [nobody, me], fingerprint=FP, sndhwm=1, send_timeout=None, context=context)
    try:
        await t.start()
        sends = [asyncio.ensure_future(t.send(0, message(1, 0, seq=i))) for i in range(10)]
        await asyncio.sleep(0)
        await t.close()
        results = await asyncio.wait_for(asyncio.gather(*sends, return_exceptions=True), 5)
        assert any(isinstance(r, TransportClosed) for r in results)
        assert all(r is None or isinstance(r, TransportClosed) for r in results)
    finally:
        await t.close()
        context.destroy(linger=0)


async def test_bind_to_an_address_in_use_fails() -> None:
    async with network(2) as (context, (t0, _t1)):
        clash = ZmqTransport(0, t0.addresses, fingerprint=FP, context=context)
        with pytest.raises(TransportError, match=re.escape(t0.addresses[0])):
            await clash.start()
        await clash.close()


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:notaport", "bogus://x", "tcp://256.1.1.1:1"])
async def test_bind_to_a_bad_address_fails(address: str) -> None:
    context = zmq.asyncio.Context()
    t = ZmqTransport(0, [address, "tcp://127.0.0.1:1"], fingerprint=FP, context=context)
    try:
        with pytest.raises(TransportError, match="cannot bind"):
            await t.start()
    finally:
        await t.close()
        context.destroy(linger=0)


async def test_send_refuses_what_receivers_would_reject() -> None:
    async with network(2, max_message_bytes=1000) as (_, (t0, _t1)):
        with pytest.raises(TransportError):
            await t0.send(0, message(0, 0))  # to itself
        with pytest.raises(TransportError):
            await t0.send(1, message(0, 0))  # receiver is not the peer
        with pytest.raises(TransportError):
            await t0.send(1, message(0, 1, fingerprint=FP + 1))
        with pytest.raises(WireError, match="oversized"):
            await t0.send(1, message(0, 1, torch.ones(251)))
        with pytest.raises(WireError, match="bad_dtype"):
            await t0.send(1, message(0, 1, torch.ones(2, dtype=torch.bool)))
        assert not t0.stats.messages_sent


async def test_receiver_without_fingerprint_accepts_any_model() -> None:
    async with network(2, fingerprint=None) as (_, (t0, t1)):
        await t0.send(1, message(0, 1, torch.ones(2), fingerprint=42))
        assert (await recv(t1)).fingerprint == 42


async def test_close_returns_once_zeromq_has_released_every_zero_copy_frame() -> None:
    context = zmq.asyncio.Context()
    absent, t0_address, t1_address = free_addresses(3)
    addresses = [t0_address, t1_address, absent]
    t0, t1 = (ZmqTransport(r, addresses, fingerprint=FP, context=context) for r in (0, 1))
    # pyzmq holds each zero-copy buffer in its garbage collector's table until libzmq
    # releases the frame; at interpreter exit it drops them all, whatever libzmq does.
    held_before = set(zmq.utils.garbage.gc.refs)
    try:
        await t0.start()
        await t1.start()
        for seq in range(4):  # 4 MiB each, zero-copy: queued for an absent peer, or in flight
            await t0.send(1, message(0, 1, torch.ones(1 << 20), seq=seq))
            await t0.send(2, message(0, 2, torch.ones(1 << 20), seq=seq))
        await t0.close()
        assert not set(zmq.utils.garbage.gc.refs) - held_before
    finally:
        await t0.close()
        await t1.close()
        context.destroy(linger=0)


EXIT_SCRIPT = """
import asyncio, sys
import torch
from gossip_sgp.message import Message, MessageKind
from transports.zmq import ZmqTransport

async def main(addresses):
    t0, t1 = (ZmqTransport(r, addresses, fingerprint=1) for r in (0, 1))
    try:
        await t0.start()
        await t1.start()
        for seq in range(8):
            tensor = torch.ones(1 << 22)  # 16 MiB, sent zero-copy
            message = Message(
                sender=0, receiver=1, round=0, seq=seq, weight=0.5, tensors=(tensor,),
                fingerprint=1,
            )
            await t0.send(1, message)
        await asyncio.wait_for(t1.recv(), 10)  # the others are still on their way
    finally:
        await t0.close()
        await t1.close()

asyncio.run(main(sys.argv[1:]))
"""


async def run_python(script: str, *args: str, timeout: float = 60) -> tuple[int, str, str]:
    """Run ``script`` in a fresh interpreter; exit code, stdout, stderr; killed on timeout.

    Without malloc settings in its environment, so that the transport tunes malloc.
    """
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("MALLOC_") and name != "GLIBC_TUNABLES"
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


@pytest.mark.timeout(120)
async def test_a_process_exits_quietly_after_sending_large_messages() -> None:
    # Before close() waited for libzmq, about one run in three of this script ended in
    # "pyzmq-gc send failed: Context was terminated", "Bad address (src/tcp.cpp:...)" and an
    # abort, or a segfault; three at once make a regression likely to show.
    results = await asyncio.gather(*(run_python(EXIT_SCRIPT, *free_addresses(2)) for _ in range(3)))
    for code, _, err in results:
        assert (code, err) == (0, "")


MALLOC_SCRIPT = """
import asyncio, resource, sys
import torch
from gossip_sgp.message import Message, MessageKind
from transports.zmq import ZmqTransport

async def main(addresses):
    t0, t1 = (
        ZmqTransport(r, addresses, fingerprint=1, max_message_bytes=64 << 20) for r in (0, 1)
    )
    try:
        await t0.start()
        await t1.start()
        tensor = torch.ones(16 << 20)  # 64 MiB
        for seq in range(6):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            message = Message(
                sender=0, receiver=1, round=0, seq=seq, weight=0.5, tensors=(tensor,),
                fingerprint=1,
            )
            await t0.send(1, message)
            await asyncio.wait_for(t1.recv(), 10)
            print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    finally:
        await t0.close()
        await t1.close()

asyncio.run(main(sys.argv[1:]))
"""


@pytest.mark.skipif(
    not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"), reason="glibc only"
)
@pytest.mark.timeout(120)
async def test_tuned_malloc_receives_large_messages_into_reused_memory() -> None:
    code, out, err = await run_python(MALLOC_SCRIPT, *free_addresses(2))
    assert (code, err) == (0, "")
    faults = [int(line) for line in out.split()]
    # Untuned, each 64 MiB message is faulted in afresh: 16384 faults of 4 KiB pages.
    assert len(faults) == 6
    assert max(faults[2:]) < 1000


async def test_malloc_settings_in_the_environment_win(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("MALLOC_")] + ["GLIBC_TUNABLES"]:
        monkeypatch.delenv(name, raising=False)
    glibc = (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    assert zmq_transport._glibc_malloc_is_default() is glibc
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.rtld.optional_static_tls=1")
    assert zmq_transport._glibc_malloc_is_default() is glibc
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    assert not zmq_transport._glibc_malloc_is_default()
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert not zmq_transport._glibc_malloc_is_default()
