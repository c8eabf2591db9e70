"""Rejoining a running job: who gives a restarted worker its mass, and who says "too late".

Real gossip nodes over the in-process transport, one thread each. The peer on the other
side is a bare ``GossipNode`` that records what it receives, so each test controls exactly
when a ``JOIN`` request or refusal arrives. The whole kill -9 and rejoin of a worker
process is in tests/test_failures.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import pytest
import torch

from gossip_sgp import SGP, GossipConfig, GossipNode, RejoinRefused
from gossip_sgp.message import Message, MessageKind
from transports import InProcNetwork

pytestmark = pytest.mark.timeout(30)


@contextmanager
def two_nodes() -> Iterator[tuple[GossipNode, GossipNode]]:
    """Started nodes of ranks 0 and 1 of a two-worker job on one in-process network."""
    net = InProcNetwork(2)
    with ExitStack() as stack:
        nodes = []
        for rank in range(2):
            config = GossipConfig.local(
                2, rank, ports=(40000, 40001), transport="inproc", timeout=10.0
            )
            nodes.append(stack.enter_context(GossipNode(config, transport=net.transport(rank))))
        yield nodes[0], nodes[1]


def make_sgp(node: GossipNode) -> SGP:
    x = torch.nn.Parameter(torch.arange(4, dtype=torch.float64))
    return SGP([x], torch.optim.SGD([x], lr=0.1), node, staleness=None)


def record(node: GossipNode, fingerprint: int) -> tuple[list[Message], threading.Event]:
    """Subscribe a list to ``node``'s messages; the event is set by every JOIN."""
    got: list[Message] = []
    join = threading.Event()

    def handler(message: Message) -> bool:
        got.append(message)
        if message.kind == MessageKind.JOIN:
            join.set()
        return True

    node.subscribe(handler, fingerprint=fingerprint)
    return got, join


def hold_consensus(sgp: SGP, body: Callable[[], None]) -> None:
    """Run ``sgp.consensus()`` with its gossip rounds replaced by ``body``: so the worker
    is in consensus, as far as anyone can see, exactly while ``body`` runs."""

    def rounds(max_rounds: int, tol: float) -> float:
        body()
        return 0.0

    sgp._consensus = rounds  # type: ignore[method-assign]
    assert sgp.consensus() == 0.0


def refusals(got: list[Message]) -> list[Message]:
    return [m for m in got if m.kind == MessageKind.JOIN and m.meta.get("refused") == 1]


def test_a_join_request_during_consensus_is_refused_at_once() -> None:
    with two_nodes() as (node0, node1):
        sgp = make_sgp(node0)
        got, join = record(node1, sgp.fingerprint)

        def ask() -> None:
            node1.send_join(0)  # rank 1, restarted, asks rank 0 (in consensus) for mass
            assert join.wait(5), "rank 0 neither refused nor answered"

        hold_consensus(sgp, ask)
        (refusal,) = refusals(got)
        assert (refusal.sender, refusal.weight, refusal.tensors) == (0, 0.0, ())
        assert sgp.weight == 1.0  # nothing given away
        assert not [m for m in got if m.kind == MessageKind.MASS]


def test_a_request_still_waiting_when_consensus_begins_is_refused() -> None:
    with two_nodes() as (node0, node1):
        sgp = make_sgp(node0)
        got, join = record(node1, sgp.fingerprint)
        node1.send_join(0)
        deadline = time.monotonic() + 5
        while not sgp._join_requests:  # arrived, to be served at rank 0's next step
            assert time.monotonic() < deadline, "the JOIN request did not arrive"
            time.sleep(0.01)
        hold_consensus(sgp, lambda: None)
        assert join.wait(5)
        assert len(refusals(got)) == 1
        assert sgp.weight == 1.0


def test_after_consensus_a_request_is_served_again() -> None:
    # consensus() may be followed by more training: the refusal ends with it.
    with two_nodes() as (node0, node1):
        sgp = make_sgp(node0)
        got, _ = record(node1, sgp.fingerprint)
        hold_consensus(sgp, lambda: None)
        node1.send_join(0)
        deadline = time.monotonic() + 5
        while not sgp._join_requests:
            assert time.monotonic() < deadline, "the JOIN request did not arrive"
            time.sleep(0.01)
        sgp._serve_joins(sgp.round)  # what the next step() does first
        deadline = time.monotonic() + 5
        while not [m for m in got if m.kind == MessageKind.MASS]:
            assert time.monotonic() < deadline, "no half of the mass came"
            time.sleep(0.01)
        (half,) = [m for m in got if m.kind == MessageKind.MASS]
        assert half.meta.get("join") == 1
        assert half.weight == 0.5
        assert sgp.weight == 0.5
        assert not refusals(got)


def test_rejoin_raises_rejoin_refused_when_every_neighbour_refuses() -> None:
    with two_nodes() as (node0, node1):
        sgp = make_sgp(node1)  # the restarted worker, rank 1; its only neighbour is rank 0
        got: list[Message] = []

        def refuse(message: Message) -> bool:
            got.append(message)
            if message.kind == MessageKind.JOIN:
                node0.send_join(message.sender, refused=True)
            return True

        node0.subscribe(refuse, fingerprint=sgp.fingerprint)
        started = time.monotonic()
        with pytest.raises(RejoinRefused, match="too late to rejoin"):
            sgp.rejoin(timeout=20)
        assert time.monotonic() - started < 10  # the refusal ends it, not the timeout
        assert sgp.weight == 0.0  # it holds no mass: nothing was created
        assert not sgp.rejoined


def test_a_neighbour_that_restarts_during_the_start_up_barrier_is_not_waited_for() -> None:
    # The kill -9 + rejoin test once hung here: rank 3 was killed before it sent its round-1
    # message, came back at a live worker's round, and rank 1 waited 120 s at round 1 of the
    # start-up barrier for a message that no life of rank 3 would ever send.
    with two_nodes() as (node0, node1):
        x = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
        sgp = SGP([x], torch.optim.SGD([x], lr=0.1), node0, staleness=None, timeout=8.0)
        deadline = time.monotonic() + 5
        while 1 not in node0.last_heard:  # rank 1's first life has been heard (a heartbeat)
            assert time.monotonic() < deadline, "rank 0 never heard rank 1"
            time.sleep(0.01)
        node1.incarnation += 1  # rank 1 "restarted" without ever stepping
        started = time.monotonic()
        sgp.step()  # round 0 is in the start-up barrier; rank 1's message will never come
        assert time.monotonic() - started < 5
        assert node0.restarted_peers() == {1}
        assert sgp.round == 1
