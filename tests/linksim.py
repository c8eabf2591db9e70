"""The link layer of a gossip job in virtual time: a discrete-event simulation for property
tests.

Each worker drives the state machines a :class:`~gossip_sgp.node.GossipNode` drives - an
:class:`~gossip_sgp.link.OutLink` per peer (acknowledgements, Karn round trips,
retransmission, write-offs), a :class:`~gossip_sgp.liveness.FailureDetector` (heartbeats,
adaptive timeouts) and a :class:`~gossip_sgp.mailbox.SequenceWindow` per sender
(duplicates) - with the node's rules around them: an asynchronous push-sum round every
``step`` seconds (fold what arrived and acknowledge it, then send half of the weight to the
round's out-peer on the exponential graph, or keep it while that peer is suspected, as SGP
does), and every ``tick`` seconds heartbeats to the neighbours, suspicions (their
unacknowledged shares written off), audits of the shares written off to peers heard again
(``OutLink.audit``; the peer acknowledges those it folded and says which never came) and
copies of what is overdue. Messages cross a network
that loses, duplicates and delays them as a :class:`~transports.faults.FaultSpec` says (its
jitter reorders them). Workers die at given times:
from then on they neither send nor fold. Workers pause at given times, for given lengths (a
process stopped or starved): meanwhile nothing of theirs runs, and what reaches them waits
until they resume - long pauses get them suspected by mistake.

Only push-sum weights travel (the numerators follow the same splits and folds; their
arithmetic is tested elsewhere). Weights are halved at every send, so for a few dozen rounds
every sum is exact in floating point and the books can be checked with ``==``.

One event heap, no threads, no sockets, no sleeping: a job of minutes of virtual time runs in
milliseconds, and hypothesis can try hundreds of fault schedules.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fractions import Fraction

import topologies
from gossip_sgp.link import OutLink
from gossip_sgp.liveness import FailureDetector
from gossip_sgp.mailbox import SequenceWindow
from gossip_sgp.message import Message, MessageKind
from transports.faults import FaultSpec


@dataclass
class Worker:
    rank: int
    weight: float = 1.0
    alive: bool = True
    round: int = 0
    links: dict[int, OutLink] = field(default_factory=dict)
    detector: FailureDetector = field(
        default_factory=lambda: FailureDetector(floor=0.5, initial=1.0)
    )
    windows: dict[int, SequenceWindow] = field(default_factory=dict)
    inbox: list[Message] = field(default_factory=list)
    """Shares received and not folded yet (folded at the next step)."""
    next_seq: dict[int, int] = field(default_factory=dict)
    standing: dict[tuple[int, int], float] = field(default_factory=dict)
    """Shares written off and not taken back: ``(receiver, seq) -> weight``."""
    paused_until: float = 0.0
    last_tick: float = 0.0

    def link(self, peer: int) -> OutLink:
        if peer not in self.links:
            self.links[peer] = OutLink(peer)
        return self.links[peer]


class Job:
    """``n`` workers of an asynchronous gossip job; :meth:`run` plays it out."""

    def __init__(
        self,
        n: int,
        *,
        network: FaultSpec,
        deaths: dict[int, float] | None = None,
        pauses: dict[int, tuple[float, float]] | None = None,
        step: float = 0.01,
        tick: float = 0.05,
        seed: int = 0,
    ) -> None:
        if network.reorder:
            raise ValueError("jitter reorders messages here; reorder is not simulated")
        self.n, self.network, self.step, self.tick = n, network, step, tick
        self.deaths = dict(deaths or {})
        self.pauses = dict(pauses or {})
        self.topology = topologies.get("exponential", n)
        self.workers = [Worker(rank) for rank in range(n)]
        self.neighbours = [
            {
                peer
                for r in range(self.topology.period)
                for peer in (*self.topology.out_peers(rank, r), *self.topology.in_peers(rank, r))
            }
            - {rank}
            for rank in range(n)
        ]
        self.now = 0.0
        self.rounds = 0
        self._rng = random.Random(seed)
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self.shares: dict[tuple[int, int, int], float] = {}
        """Every share sent: ``(sender, receiver, seq) -> weight``."""
        self.folded: set[tuple[int, int, int]] = set()
        self._unfolded = 0  # the weight of the shares sent and not folded, in 2**-64 units
        self._on_the_way = 0  # shares and acknowledgements sent and not taken in yet
        self.acked: set[tuple[int, int, int]] = set()
        """Shares whose sender got an acknowledgement (of any copy)."""
        self.held_at_death: dict[int, float] = {}
        self.checks: list[Callable[[], None]] = []
        """Called after every event (the invariants under test)."""

    # ------------------------------------------------------------------ the clock
    def _at(self, time: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (time, next(self._order), action))

    def run(self, rounds: int, *, settle: float = 60.0) -> None:
        """``rounds`` asynchronous rounds on every worker (starting a little apart), then
        up to ``settle`` more seconds of folding, heartbeats and copies, until every live
        link has delivered what it owes and every dead neighbour is suspected."""
        self.rounds = rounds
        for w in self.workers:
            start = self._rng.uniform(0, self.step)
            self._at(start, lambda w=w: self._step(w))
            self._at(start, lambda w=w: self._tick(w))
        for rank, when in self.deaths.items():
            self._at(when, lambda rank=rank: self._die(self.workers[rank]))
        for rank, (when, length) in self.pauses.items():
            self._at(when, lambda rank=rank, length=length: self._pause(rank, length))
        end = (rounds + 1) * self.step + settle
        training = (rounds + 1) * self.step
        while self._events:
            time, _, action = heapq.heappop(self._events)
            if time > end or (time > training and self.settled()):
                break
            self.now = time
            action()
            for check in self.checks:
                check()

    def settled(self) -> bool:
        """Nothing on the way and nothing waiting to be folded; every share between live
        workers acknowledged or written off (a worker suspected by mistake); every live
        worker suspects its dead neighbours, and none of its live ones."""
        if self._on_the_way:
            return False
        for w in self.workers:
            if not w.alive:
                continue
            if w.inbox or self.now < w.paused_until:
                return False
            for peer, link in w.links.items():
                if self.workers[peer].alive and (link.outstanding() or link.unaudited):
                    return False
            dead = {p for p in self.neighbours[w.rank] if not self.workers[p].alive}
            if w.detector.down != dead:
                return False
        return True

    # ----------------------------------------------------------------- a worker
    def _pause(self, rank: int, length: float) -> None:
        self.workers[rank].paused_until = self.now + length

    def _later(self, w: Worker, action: Callable[[], None]) -> bool:
        """While ``w`` is paused its events wait (in order) until it resumes."""
        if self.now >= w.paused_until:
            return False
        self._at(w.paused_until, action)
        return True

    def _die(self, w: Worker) -> None:
        w.alive = False
        self.held_at_death[w.rank] = w.weight

    def _step(self, w: Worker) -> None:
        """A round: fold what arrived and acknowledge it, then gossip. After the last round
        the worker goes on folding (as ``consensus()`` does before its own rounds)."""
        if not w.alive or self._later(w, lambda: self._step(w)):
            return
        self._at(self.now + self.step, lambda: self._step(w))
        for m in w.inbox:
            before, w.weight = w.weight, w.weight + m.weight
            if Fraction(w.weight) != Fraction(before) + Fraction(m.weight):
                raise OverflowError("a fold was not exact: run fewer rounds")
            key = (m.sender, w.rank, m.seq)
            assert key not in self.folded  # the harness's own books: folded once
            self.folded.add(key)
            self._unfolded -= _units(m.weight)
            self._send(w, self._control(w, m.sender, MessageKind.ACK, seq=m.seq))
        w.inbox.clear()
        if w.round >= self.rounds:
            return
        (peer,) = self.topology.out_peers(w.rank, w.round)
        if peer not in w.detector.down:  # SGP keeps a round's mass from a suspected peer
            seq = w.next_seq.get(peer, 0)
            w.next_seq[peer] = seq + 1
            w.weight /= 2
            share = Message(w.rank, peer, w.round, seq, w.weight, tensors=(), fingerprint=1)
            self.shares[(w.rank, peer, seq)] = w.weight
            self._unfolded += _units(w.weight)
            assert not w.link(peer).sent(share, self.now)  # far below settings.max_unacked
            self._send(w, share)
        w.round += 1

    def _tick(self, w: Worker) -> None:
        if not w.alive or self._later(w, lambda: self._tick(w)):
            return
        # A tick that comes late means this worker was not running: what its peers sent
        # meanwhile may not be read yet, so it suspects nobody now (as GossipNode does).
        stalled, w.last_tick = self.now - w.last_tick > 2 * self.tick, self.now
        for peer in [] if stalled else w.detector.check(self.now):
            for seq, entry in w.link(peer).suspected().items():
                w.standing[(peer, seq)] = entry.message.weight
        for peer in sorted(self.neighbours[w.rank]):
            self._send(w, self._control(w, peer, MessageKind.HEARTBEAT))
        for peer, link in sorted(w.links.items()):
            asked = None if peer in w.detector.down else link.audit()
            if asked is not None:
                audit = self._control(w, peer, MessageKind.HEARTBEAT)
                self._send(w, dataclasses.replace(audit, audit=asked))
        for peer, link in sorted(w.links.items()):
            if peer not in w.detector.down:
                for copy in link.due(self.now)[0]:
                    self._send(w, copy)
        self._at(self.now + self.tick, lambda: self._tick(w))

    @staticmethod
    def _control(w: Worker, peer: int, kind: MessageKind, seq: int = 0) -> Message:
        return Message(w.rank, peer, w.round, seq, 0.0, tensors=(), fingerprint=1, kind=kind)

    def _send(self, w: Worker, message: Message) -> None:
        net = self.network
        if self._rng.random() < net.drop:
            return
        for _ in range(2 if self._rng.random() < net.duplicate else 1):
            self._on_the_way += message.kind != MessageKind.HEARTBEAT
            delay = max(0.0, net.delay + self._rng.uniform(-net.jitter, net.jitter))
            self._at(self.now + delay, lambda: self._deliver(message))

    def _deliver(self, m: Message) -> None:
        w = self.workers[m.receiver]
        if w.alive and self._later(w, lambda: self._deliver(m)):
            return
        self._on_the_way -= m.kind != MessageKind.HEARTBEAT
        if not w.alive:
            return
        w.detector.heard(m.sender, self.now)
        if m.kind == MessageKind.ACK and m.never:
            w.link(m.sender).never_received(m.seq)
        elif m.kind == MessageKind.ACK:
            # An acknowledgement says "folded": never sent for a share still waiting.
            assert (w.rank, m.sender, m.seq) in self.folded, ("acknowledged unfolded", m)
            acked = w.link(m.sender).acked(m.seq, self.now)
            if acked is not None:
                self.acked.add((w.rank, m.sender, m.seq))
                if acked[1]:  # written off by mistake: taken back
                    del w.standing[(m.sender, m.seq)]
        elif m.kind == MessageKind.MASS:
            window = w.windows.setdefault(m.sender, SequenceWindow())
            if window.accept(m.seq):
                w.inbox.append(m)
            elif not any(x.sender == m.sender and x.seq == m.seq for x in w.inbox):
                # A copy of a folded share: our acknowledgement may have been lost. (A copy
                # of one still in the inbox is acknowledged by its fold, as the mailbox does.)
                self._send(w, self._control(w, m.sender, MessageKind.ACK, seq=m.seq))
        elif m.kind == MessageKind.HEARTBEAT and m.audit is not None:
            # As GossipNode answers an audit from its mailbox: acknowledge what was folded,
            # say what never came; a share still in the inbox is acknowledged by its fold.
            window = w.windows.get(m.sender)
            waiting = {x.seq for x in w.inbox if x.sender == m.sender}
            for seq in range(m.audit[0], m.audit[1] + 1):
                if window is None or not window.has_seen(seq):
                    never = self._control(w, m.sender, MessageKind.ACK, seq=seq)
                    self._send(w, dataclasses.replace(never, never=True))
                elif seq not in waiting:
                    self._send(w, self._control(w, m.sender, MessageKind.ACK, seq=seq))

    # ------------------------------------------------------------------ the books
    # Sums of weights kept exact: each weight is an exact double, but a float sum of two
    # may need more bits than a double has.
    def held(self) -> Fraction:
        """Weight the workers hold (the dead: what they held when they died)."""
        return exact(w.weight if w.alive else self.held_at_death[w.rank] for w in self.workers)

    def unfolded(self) -> Fraction:
        """Weight of the shares sent and never folded (on the way, lost, in an inbox, or
        sent to a worker that died)."""
        return Fraction(self._unfolded, _UNIT)


def exact(weights: Iterable[float]) -> Fraction:
    """The exact sum of ``weights``."""
    return Fraction(sum(_units(w) for w in weights), _UNIT)


def _units(weight: float) -> int:
    """``weight`` in units of 2**-64 (exact: every weight here is a multiple of it)."""
    units = weight * _UNIT
    if units != int(units):
        raise ValueError(f"weight {weight!r} is finer than 2**-64")
    return int(units)


_UNIT = 2**64
