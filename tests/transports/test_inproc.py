"""The in-process transport: delivery, early messages, close, cross-thread use."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from gossip_sgp.errors import TransportClosed, TransportError
from gossip_sgp.message import Message
from transports import InProcNetwork, Transport


def msg(sender: int, receiver: int, seq: int = 0) -> Message:
    return Message(
        sender=sender, receiver=receiver, round=0, seq=seq, weight=0.5, tensors=(torch.ones(4),)
    )


@pytest.mark.asyncio
async def test_send_and_receive() -> None:
    net = InProcNetwork(3)
    a, b = net.transport(0), net.transport(1)
    assert isinstance(a, Transport)
    await a.start()
    await b.start()
    m = msg(0, 1)
    await a.send(1, m)
    assert await asyncio.wait_for(b.recv(), 5) is m
    assert a.stats.messages_sent[1] == 1
    assert a.stats.bytes_sent[1] == 16
    assert b.stats.messages_received[0] == 1
    await a.close()
    await b.close()


@pytest.mark.asyncio
async def test_messages_wait_for_a_late_starter() -> None:
    net = InProcNetwork(2)
    a, b = net.transport(0), net.transport(1)
    await a.start()
    await a.send(1, msg(0, 1, 0))
    await a.send(1, msg(0, 1, 1))
    await b.start()
    got = [await asyncio.wait_for(b.recv(), 5) for _ in range(2)]
    assert [m.seq for m in got] == [0, 1]
    await a.close()
    await b.close()


@pytest.mark.asyncio
async def test_close_wakes_pending_recv_and_blocks_send() -> None:
    net = InProcNetwork(2)
    a = net.transport(0)
    await a.start()
    pending = asyncio.ensure_future(a.recv())
    await asyncio.sleep(0)
    await a.close()
    with pytest.raises(TransportClosed):
        await asyncio.wait_for(pending, 5)
    with pytest.raises(TransportClosed):
        await a.send(1, msg(0, 1))


@pytest.mark.asyncio
async def test_misaddressed_messages_are_refused() -> None:
    net = InProcNetwork(3)
    a = net.transport(0)
    await a.start()
    with pytest.raises(TransportError):
        await a.send(2, msg(0, 1))  # message says receiver 1
    with pytest.raises(TransportError):
        await a.send(0, msg(0, 0))  # no self-sends
    with pytest.raises(TransportError):
        await a.send(5, msg(0, 5))
    await a.close()


def test_bad_rank_and_double_start() -> None:
    net = InProcNetwork(2)
    with pytest.raises(ValueError, match="out of range"):
        net.transport(2)
    with pytest.raises(ValueError, match="world_size"):
        InProcNetwork(0)

    async def twice() -> None:
        t1, t2 = net.transport(0), net.transport(0)
        await t1.start()
        try:
            with pytest.raises(TransportError, match="already started"):
                await t2.start()
        finally:
            await t1.close()

    asyncio.run(twice())


@pytest.mark.timeout(30)
def test_across_threads_with_their_own_loops() -> None:
    net = InProcNetwork(2)
    received: list[int] = []
    ready = threading.Event()

    def receiver() -> None:
        async def main() -> None:
            t = net.transport(1)
            await t.start()
            ready.set()
            for _ in range(50):
                received.append((await asyncio.wait_for(t.recv(), 10)).seq)
            await t.close()

        asyncio.run(main())

    thread = threading.Thread(target=receiver)
    thread.start()
    try:
        assert ready.wait(10)

        async def send() -> None:
            t = net.transport(0)
            await t.start()
            for seq in range(50):
                await t.send(1, msg(0, 1, seq))
            await t.close()

        asyncio.run(send())
    finally:
        thread.join(20)
    assert not thread.is_alive()
    assert received == list(range(50))
