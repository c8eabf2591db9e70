"""Push-sum simulator: N nodes in one process, the same code as the training workers.

Every node is a :class:`~gossip_sgp.protocol.PushSumProtocol` on an
:class:`~transports.inproc.InProcTransport` (optionally behind a
:class:`~transports.faults.FaultyTransport`), all in one asyncio event loop. Nodes start from
random vectors; after every round the simulator reports the max relative consensus error
``max_i ||z_i - mean|| / ||mean||`` against the true mean of the initial vectors.

    gossip-sgp simulate --nodes 1024 --rounds 12 --dim 10000
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

import topologies
from gossip_sgp.compression import parse_codec
from gossip_sgp.errors import WireError
from gossip_sgp.protocol import PushSumProtocol
from gossip_sgp.pushsum import PushSumState
from transports.base import Transport, iter_messages
from transports.faults import FaultSpec, FaultyTransport
from transports.inproc import InProcNetwork, InProcTransport

__all__ = ["SimulationConfig", "SimulationResult", "simulate"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True)
class SimulationConfig:
    """What to simulate."""

    nodes: int
    """Number of push-sum nodes (world size)."""
    rounds: int
    """Gossip rounds to run."""
    topology: str = "exponential"
    """Topology name, see ``topologies.NAMES``."""
    peers_per_round: int = 1
    """Out-peers per round (exponential and base-k graphs)."""
    dim: int = 1000
    """Length of each node's vector."""
    dtype: str = "float64"
    """Numerator dtype: float64, float32 or bfloat16."""
    mode: str = "sync"
    """``sync``: each round waits for its messages (those not dropped); ``async``: never waits."""
    drop: float = 0.0
    """Probability that a message is lost."""
    duplicate: float = 0.0
    """Probability that a message is delivered twice (the duplicate is rejected)."""
    delay_ms: float = 0.0
    """Extra one-way message delay in milliseconds."""
    jitter_ms: float = 0.0
    """Delay varies uniformly by this many milliseconds either way."""
    reorder: float = 0.0
    """Probability that a message is overtaken by the next one on its link."""
    seed: int = 0
    """Seed for the initial vectors and the fault injector."""
    compression: str = "none"
    """Codec of the numerator messages, see :mod:`gossip_sgp.compression`."""

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {self.nodes}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.mode not in ("sync", "async"):
            raise ValueError(f"mode must be 'sync' or 'async', got {self.mode!r}")
        self.faults()  # validates the probabilities and delays
        parse_codec(self.compression)  # validates the codec spec

    def faults(self) -> FaultSpec | None:
        """The fault injector's settings, or None when the network is perfect."""
        spec = FaultSpec(
            drop=self.drop,
            duplicate=self.duplicate,
            delay=self.delay_ms / 1000.0,
            jitter=self.jitter_ms / 1000.0,
            reorder=self.reorder,
        )
        return None if spec == FaultSpec() else spec


@dataclass
class SimulationResult:
    """Per-round consensus error and the books of the run."""

    config: SimulationConfig
    errors: list[float] = field(default_factory=list)
    """``errors[t]``: max relative consensus error after round ``t + 1``."""
    seconds: float = 0.0
    messages: int = 0
    bytes_sent: int = 0
    """Numerator payload bytes of all messages, as sent (compressed)."""
    raw_bytes_sent: int = 0
    """The same payload uncompressed."""
    dropped: int = 0
    duplicates_rejected: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    """Messages that did not decode, per reason (difference coding after a lost message)."""
    weight_total: float = 0.0
    """Sum of push-sum weights held by nodes at the end (n minus dropped and in-flight weight)."""

    def as_dict(self) -> dict[str, object]:
        return {
            "nodes": self.config.nodes,
            "topology": self.config.topology,
            "rounds": [{"round": t + 1, "max_rel_error": e} for t, e in enumerate(self.errors)],
            "seconds": self.seconds,
            "compression": self.config.compression,
            "messages": self.messages,
            "bytes_sent": self.bytes_sent,
            "raw_bytes_sent": self.raw_bytes_sent,
            "dropped": self.dropped,
            "duplicates_rejected": self.duplicates_rejected,
            "rejected": dict(self.rejected),
            "weight_total": self.weight_total,
        }


def simulate(config: SimulationConfig) -> SimulationResult:
    """Run the simulation described by ``config`` and return its result."""
    return asyncio.run(_simulate(config))


def max_relative_error(estimates: torch.Tensor, mean: torch.Tensor) -> float:
    """``max_i ||estimates[i] - mean|| / ||mean||`` in double precision."""
    diff = torch.linalg.vector_norm(estimates.double() - mean, dim=1).max().item()
    return float(diff / max(torch.linalg.vector_norm(mean).item(), 1e-300))


async def _simulate(cfg: SimulationConfig) -> SimulationResult:
    n = cfg.nodes
    topo = topologies.get(cfg.topology, n, **_topology_options(cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    initial = torch.randn(n, cfg.dim, generator=gen, dtype=torch.float64)
    values = initial.to(_DTYPES[cfg.dtype])
    mean = values.double().mean(dim=0)  # the average of what the nodes actually start from
    network = InProcNetwork(n)
    spec = cfg.faults()
    transports: list[Transport] = []
    nodes: list[PushSumProtocol] = []
    for rank in range(n):
        base = network.transport(rank)
        t: Transport = (
            base if spec is None else FaultyTransport(base, spec, seed=cfg.seed * 7919 + rank)
        )
        transports.append(t)
        state = PushSumState([values[rank].clone()])
        nodes.append(
            PushSumProtocol(
                rank, topo, state, coalesce=cfg.mode == "async", compression=cfg.compression
            )
        )
    for t in transports:
        await t.start()
    result = SimulationResult(config=cfg)
    refused: set[_Key] = set()  # messages that arrived but did not decode
    receivers = [
        asyncio.create_task(_receive(t, node, result, refused))
        for t, node in zip(transports, nodes, strict=True)
    ]
    started = time.perf_counter()
    try:
        for rnd in range(cfg.rounds):
            for t, node in zip(transports, nodes, strict=True):
                for m in node.emit(rnd):
                    await t.send(m.receiver, m)
                    result.messages += 1
                    result.bytes_sent += m.nbytes
                    result.raw_bytes_sent += m.raw_nbytes
            if cfg.mode == "sync":
                await _wait_round(rnd, transports, nodes, refused)
            await _settle(transports)
            for node in nodes:
                node.absorb(rnd if cfg.mode == "sync" else None)
            z = torch.stack([node.state.debias()[0] for node in nodes])
            result.errors.append(max_relative_error(z, mean))
        result.seconds = time.perf_counter() - started
    finally:
        for t in transports:
            await t.close()
        for task in receivers:
            task.cancel()
        await asyncio.gather(*receivers, return_exceptions=True)
    result.dropped = sum(len(t.dropped) for t in transports if isinstance(t, FaultyTransport))
    result.duplicates_rejected = sum(node.mailbox.rejected["duplicate"] for node in nodes)
    result.weight_total = math.fsum(node.state.weight for node in nodes)
    return result


_Key = tuple[int, int, int]
"""``(sender, receiver, round)`` of a message."""


def _topology_options(cfg: SimulationConfig) -> dict[str, int]:
    if cfg.topology == "exponential":
        return {"peers_per_round": cfg.peers_per_round}
    if cfg.topology == "base-k":
        return {"k": cfg.peers_per_round}
    return {}


async def _receive(
    transport: Transport, node: PushSumProtocol, result: SimulationResult, refused: set[_Key]
) -> None:
    async for message in iter_messages(transport):
        try:
            node.receive(message)  # decoded on receipt, as in SGP
        except WireError as exc:
            result.rejected[exc.reason] += 1
            refused.add((message.sender, message.receiver, message.round))


async def _settle(transports: list[Transport]) -> None:
    """Let the receive tasks take in everything already delivered."""
    await asyncio.sleep(0)
    # Not a timed wait: each sleep(0) hands the loop to the receive tasks once.
    while any(_inner(t).queued() for t in transports):  # noqa: ASYNC110
        await asyncio.sleep(0)


def _inner(t: Transport) -> InProcTransport:
    inner = t.inner if isinstance(t, FaultyTransport) else t
    assert isinstance(inner, InProcTransport)
    return inner


async def _wait_round(
    rnd: int, transports: list[Transport], nodes: list[PushSumProtocol], refused: set[_Key]
) -> None:
    """Synchronous mode: wait until each node has every message of ``rnd`` that was not lost."""
    dropped = {
        (m.sender, m.receiver, m.round)
        for t in transports
        if isinstance(t, FaultyTransport)
        for m in t.dropped
    }
    while True:
        await _settle(transports)
        lost = dropped | refused  # refused grows as messages arrive
        if all(
            node.mailbox.has(
                [(s, r) for s, r in node.expected(rnd) if (s, node.rank, r) not in lost]
            )
            for node in nodes
        ):
            return
        await asyncio.sleep(0.0005)
