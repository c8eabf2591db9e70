"""Threads for the in-process tests: run one function per rank, fail loudly if one hangs.

``run_workers`` gives each thread a started GossipNode over the in-process transport,
exactly as a worker process would have over ZeroMQ.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry

from gossip_sgp import GossipConfig, GossipNode
from gossip_sgp.settings import LinkSettings
from transports import FaultSpec, FaultyTransport, InProcNetwork, Transport

T = TypeVar("T")


def run_threads(n: int, fn: Callable[[int], T], *, join: float = 60.0) -> list[T]:
    """Run ``fn(rank)`` for ranks 0..n-1, each on a daemon thread; return the results by rank.

    Each thread gets ``join`` seconds to finish once the previous ones have been waited for.
    A thread still running after that fails the test ("a worker hung"); otherwise the first
    exception any rank raised is raised again here.
    """
    results: dict[int, T] = {}
    errors: list[BaseException] = []

    def worker(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(join)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    if errors:
        raise errors[0]
    return [results[rank] for rank in range(n)]


Worker = Callable[[int, GossipNode], Any]


def run_workers(
    n: int,
    fn: Worker,
    *,
    timeout: float = 20.0,
    join: float = 60.0,
    faults: FaultSpec | None = None,
    metrics_ports: list[int] | None = None,
    registries: Sequence[CollectorRegistry] | None = None,
    wrap: Callable[[int, Transport], Transport] | None = None,
    settings: LinkSettings | None = None,
) -> list[Any]:
    """Run ``fn(rank, node)`` on n threads, each with its own started node; return results.

    The nodes gossip over one in-process network (through a ``FaultyTransport`` seeded with
    the rank if ``faults`` is given, then through ``wrap(rank, transport)`` if given);
    ``registries[rank]`` is rank's metrics registry; every node gets ``settings``.
    """
    net = InProcNetwork(n)

    def worker(rank: int) -> Any:
        config = GossipConfig.local(
            n,
            rank,
            ports=range(40000, 40000 + n),
            transport="inproc",
            timeout=timeout,
            metrics_ports=metrics_ports,
        )
        transport: Transport = net.transport(rank)
        if faults is not None:
            transport = FaultyTransport(transport, faults, seed=rank)
        if wrap is not None:
            transport = wrap(rank, transport)
        registry = None if registries is None else registries[rank]
        with GossipNode(config, transport=transport, registry=registry, settings=settings) as node:
            return fn(rank, node)

    return run_threads(n, worker, join=join)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes (for state with no event)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
