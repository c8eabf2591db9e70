"""Push-sum mass accounting over faulty in-process links, for the hypothesis tests.

Every round, the numerators and weights held by the nodes, received but not yet folded,
in flight and dropped must add up to the initial ones: push-sum moves mass, never makes or
loses it, whatever the links do.
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

import topologies
from gossip_sgp.compression import parse_codec
from gossip_sgp.protocol import PushSumProtocol
from gossip_sgp.pushsum import PushSumState
from transports import FaultSpec, FaultyTransport, InProcNetwork, iter_messages


async def account(
    n: int,
    rounds: int,
    spec: FaultSpec,
    seed: int,
    *,
    topology: str = "exponential",
    dim: int = 5,
    codec: str | None = None,
    tol: float = 1e-10,
) -> None:
    """Run ``rounds`` rounds on n nodes; check the mass every round, to ``tol`` relative.

    Without ``codec`` the messages go uncompressed and the receivers keep them as they came;
    with one, every message must carry it and the receivers decode them. Lost compressed
    messages count as what they decode to: difference-coded ones in sequence order, each
    against its link's reference as the one before it left it (the receivers' references
    are restored afterwards).
    """
    graph = topologies.get(topology, n)
    gen = torch.Generator().manual_seed(seed)
    initial = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    net = InProcNetwork(n)
    ts = [FaultyTransport(net.transport(r), spec, seed=seed + r) for r in range(n)]
    compression = "none" if codec is None else codec
    nodes = [
        PushSumProtocol(r, graph, PushSumState([initial[r].clone()]), compression=compression)
        for r in range(n)
    ]
    for t in ts:
        await t.start()

    async def receive(t: FaultyTransport, node: PushSumProtocol) -> None:
        async for m in iter_messages(t):
            node.mailbox.put(m if codec is None else node.decode(m))

    tasks = [asyncio.create_task(receive(t, node)) for t, node in zip(ts, nodes, strict=True)]
    try:
        for rnd in range(rounds):
            for t, node in zip(ts, nodes, strict=True):
                for m in node.emit(rnd):
                    if codec is not None:
                        assert m.codec == parse_codec(codec).spec
                    await t.send(m.receiver, m)
            await asyncio.sleep(0.002)  # let some delayed messages land, not all
            for node in nodes:
                node.absorb(None)
            while any(t.inner.queued() for t in ts):  # type: ignore[attr-defined]  # noqa: ASYNC110
                await asyncio.sleep(0)  # delivered but not yet received: let receivers run
            # From here to the asserts nothing awaits, so nothing moves.
            held = [node.state.numerator[0] for node in nodes]
            held_w = [node.state.weight for node in nodes]
            for node in nodes:
                for tensors, w in node.mailbox.pending():
                    held.append(tensors[0])
                    held_w.append(w)
            lost = [m for t in ts for m in t.in_flight() + t.dropped]
            if codec is None:
                for m in lost:
                    held.append(m.tensors[0])
                    held_w.append(m.weight)
            else:
                saved = [dict(node._references.inbound) for node in nodes]
                for m in sorted(lost, key=lambda m: (m.receiver, m.sender, m.seq)):
                    held.append(nodes[m.receiver].decode(m, commit=True).tensors[0])
                    held_w.append(m.weight)
                for node, inbound in zip(nodes, saved, strict=True):
                    node._references.inbound = inbound
            assert math.fsum(held_w) == pytest.approx(n, rel=1e-12)
            total = torch.stack(held).sum(0)
            torch.testing.assert_close(total, initial.sum(0), rtol=tol, atol=tol)
    finally:
        for t in ts:
            await t.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
