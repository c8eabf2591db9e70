"""The fault injector: drops, duplicates, delays and reordering, with exact books."""

from __future__ import annotations

import asyncio

import pytest
import torch

from gossip_sgp.message import Message
from transports import FaultSpec, FaultyTransport, InProcNetwork


def msg(seq: int) -> Message:
    return Message(sender=0, receiver=1, round=seq, seq=seq, weight=1.0, tensors=(torch.ones(1),))


async def pair(spec: FaultSpec, seed: int = 0) -> tuple[FaultyTransport, FaultyTransport]:
    net = InProcNetwork(2)
    a = FaultyTransport(net.transport(0), spec, seed=seed)
    b = FaultyTransport(net.transport(1), FaultSpec(), seed=seed)
    await a.start()
    await b.start()
    return a, b


async def drain(t: FaultyTransport, n: int) -> list[int]:
    return [(await asyncio.wait_for(t.recv(), 5)).seq for _ in range(n)]


@pytest.mark.asyncio
async def test_no_faults_is_transparent() -> None:
    a, b = await pair(FaultSpec())
    for s in range(20):
        await a.send(1, msg(s))
    assert await drain(b, 20) == list(range(20))
    assert not a.dropped
    assert not a.in_flight()
    await a.close()
    await b.close()


@pytest.mark.asyncio
async def test_drops_are_booked() -> None:
    a, b = await pair(FaultSpec(drop=0.3), seed=1)
    for s in range(200):
        await a.send(1, msg(s))
    delivered = await drain(b, 200 - len(a.dropped))
    assert 30 < len(a.dropped) < 90
    assert sorted(delivered + [m.seq for m in a.dropped]) == list(range(200))
    await a.close()
    await b.close()


@pytest.mark.asyncio
async def test_duplicates_and_reordering() -> None:
    a, b = await pair(FaultSpec(duplicate=0.2, reorder=0.3), seed=2)
    for s in range(100):
        await a.send(1, msg(s))
    await a.flush()
    got = await drain(b, 100 + a.duplicated)
    assert sorted(set(got)) == list(range(100))
    assert len(got) - len(set(got)) == a.duplicated > 0
    assert got != sorted(got)
    assert a.reordered > 0
    assert not a.in_flight()
    await a.close()
    await b.close()


@pytest.mark.asyncio
async def test_delay_holds_messages_in_flight() -> None:
    a, b = await pair(FaultSpec(delay=0.05, jitter=0.01))
    await a.send(1, msg(0))
    assert [m.seq for m in a.in_flight()] == [0]
    assert await drain(b, 1) == [0]
    assert not a.in_flight()
    await a.close()
    await b.close()


@pytest.mark.timeout(30)
@pytest.mark.asyncio
async def test_close_cancels_pending_deliveries() -> None:
    """A message still delayed when the sender closes is never delivered.

    Fails if ``close()`` does not cancel pending deliveries: e.g. the mutation that delivers
    them at once instead (``await self.inner.send(m.receiver, m)`` for each pending message
    before cancelling) makes it fail (the receiver gets message 0), and so does the
    mutation that removes the cancelling and the gather from ``FaultyTransport.close``
    (a delivery task is left running). The old version only bounded ``close()`` and passed
    under both.
    """
    a, b = await pair(FaultSpec(delay=10.0))
    tasks = asyncio.all_tasks()
    await a.send(1, msg(0))
    assert [m.seq for m in a.in_flight()] == [0]
    await asyncio.wait_for(a.close(), 2)  # long before the 10 s delay is up
    assert asyncio.all_tasks() == tasks, "a delivery is still pending after close()"
    # The in-process network delivers within this event loop at once: anything sent to
    # rank 1 by now would already be waiting in its queue.
    try:
        got = await asyncio.wait_for(b.recv(), 0.5)
    except asyncio.TimeoutError:
        pass
    else:
        pytest.fail(f"message {got.seq} was delivered after close()")
    # The books: never delivered in any copy, and not counted as dropped either.
    assert [m.seq for m in a.in_flight()] == [0]
    assert not a.dropped
    await b.close()


@pytest.mark.parametrize(
    "kwargs",
    [{"drop": 1.5}, {"duplicate": -0.1}, {"reorder": 2.0}, {"delay": -1.0}, {"jitter": -0.5}],
)
def test_spec_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        FaultSpec(**kwargs)
