"""The sending side of one directed gossip link, as a state machine with no I/O.

Everything a worker knows about what it sent to one peer lives in an :class:`OutLink`: the
push-sum shares not acknowledged yet, the skip notices not acknowledged yet, the shares
written off as lost (an acknowledgement that comes after all takes one back), the round-trip
times (Karn's rule) and the retransmission timing (``LinkSettings.retry_after``), the weight
the peer acknowledged, the incarnation of the peer last heard, and the written-off shares
whose fate the peer has not told yet (an audit asks it, once it is heard again). Its
methods take the time ``now`` (monotonic seconds) as an argument and return what to do -
which messages to send again, which shares are now written off - as
:class:`~gossip_sgp.liveness.FailureDetector` does for liveness.
:class:`~gossip_sgp.node.GossipNode` drives one per peer under its lock: it owns the event
loop, the transport, the timers, the logging and the weight ledger. So the rules
of a link are tested in one process, without threads or sockets
(``tests/test_link.py``: hypothesis schedules of sends, losses, duplicate and late
acknowledgements, suspicions and restarts against an exact ledger).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import deque

from gossip_sgp.message import Message, MessageKind
from gossip_sgp.settings import LinkSettings

__all__ = ["AUDIT_LIMIT", "OutLink", "Sent"]

AUDIT_LIMIT = 64
"""Sequence numbers one audit asks about, at most (:meth:`OutLink.audit`): the peer answers
each with one acknowledgement, so an audit from the network costs it at most this many."""


@dataclasses.dataclass(slots=True)
class Sent:
    """A message sent and not acknowledged yet."""

    message: Message
    first_sent: float
    """Monotonic time of the first send (round trips are timed from it)."""
    last_sent: float
    """Monotonic time of the latest copy (the next copy is due ``retry_after`` later,
    see :class:`~gossip_sgp.settings.LinkSettings`),
    moved forward by the time the link was busy since (see ``OutLink.due``)."""
    copies: int = 0
    """Times it was sent again."""


Written = dict[int, Sent]
"""Shares written off as lost, by sequence number."""


class OutLink:
    """What one worker knows of the link to one peer (see the module docstring).

    Not thread-safe: its driver calls it under one lock.
    """

    def __init__(
        self, peer: int, *, settings: LinkSettings | None = None, max_rtts: int = 64
    ) -> None:
        if max_rtts < 1:
            raise ValueError("max_rtts must be >= 1")
        self.peer = peer
        self.settings = LinkSettings() if settings is None else settings
        self.unacked: dict[int, Sent] = {}
        """Shares sent and neither acknowledged nor written off, by sequence number."""
        self.skips: dict[tuple[int, int], Sent] = {}
        """Skip notices sent and not acknowledged, by (round, model fingerprint): the
        fragments of a ``StreamingSGP`` number their rounds apart."""
        self.written_off: dict[int, float] = {}
        """Weight of the shares written off (at most ``max_unacked`` remembered), by
        sequence number: an acknowledgement that comes after all takes one back."""
        self.unaudited: set[int] = set()
        """Written-off shares the peer has not said it folded or never received (see
        :meth:`audit`)."""
        self.rtts: deque[float] = deque(maxlen=max_rtts)
        """Recent send-to-fold-in round trips, in seconds, of shares never sent again."""
        self.acked_weight = 0.0
        """Push-sum weight of the shares the peer acknowledged."""
        self.acks = 0
        """Shares the peer acknowledged (copies of an acknowledgement count once)."""
        self.incarnation = 0
        """The peer's incarnation last heard (0: none yet)."""
        self.overflows = 0
        """Times a share was written off because ``max_unacked`` were outstanding."""
        self._last_look: float | None = None  # the previous call of due()

    # ------------------------------------------------------------------ sending
    def sent(self, share: Message, now: float, *, down: bool = False) -> Written:
        """Book a push-sum share handed over for sending; returns the shares this writes off.

        To a peer suspected ``down`` the share still goes out but is written off at once (an
        acknowledgement takes it back). Beyond ``max_unacked`` outstanding shares, the
        oldest is written off (a peer that takes and acknowledges nothing).
        """
        if share.kind != MessageKind.MASS or share.receiver != self.peer:
            raise ValueError("OutLink.sent takes push-sum shares to its own peer")
        entry = Sent(share, now, now)
        if down:
            return self._write_off({share.seq: entry})
        self.unacked[share.seq] = entry
        if len(self.unacked) <= self.settings.max_unacked:
            return {}
        self.overflows += 1
        oldest = next(iter(self.unacked))
        return self._write_off({oldest: self.unacked.pop(oldest)})

    def skip_sent(self, notice: Message, now: float) -> None:
        """Book a skip notice ("no mass from me in ``notice.round``"), sent again until
        acknowledged; beyond ``max_skips`` the oldest is no longer sent."""
        self.skips[notice.round, notice.fingerprint] = Sent(notice, now, now)
        while len(self.skips) > self.settings.max_skips:
            del self.skips[next(iter(self.skips))]

    def due(self, now: float, *, busy: bool = False) -> tuple[list[Message], float]:
        """The messages whose acknowledgement is overdue (each now counts one more copy),
        and the seconds until the next one is.

        ``busy``: shares to the peer are still waiting to leave (in the sender's queue or
        its transport's). The time since the previous look then does not count towards any
        share's wait (its ``last_sent`` moves forward by it): on a slow link an
        acknowledgement cannot come before the shares queued ahead of it have gone out, and a
        copy would only queue behind them. The waits pause, they do not start again: on a
        link busy most of the time, a lost share is still sent again once the idle moments
        add up to its wait. Skip notices travel beside the shares and are not held.
        """
        rtt = self.rtt_median()
        due: list[Message] = []
        wait = math.inf
        previous, self._last_look = self._last_look, now
        if busy:  # no share is due now: each one was not due at the previous look
            for entry in self.unacked.values():
                since = entry.last_sent if previous is None else max(previous, entry.last_sent)
                entry.last_sent += max(0.0, now - since)
        for entry in (*self.unacked.values(), *self.skips.values()):
            # One comparison for both answers: with ``now - last_sent >= after`` a share
            # could be not due and yet have ``last_sent + after - now`` round to 0.0.
            due_at = entry.last_sent + self.settings.retry_after(
                rtt, entry.message.nbytes, entry.copies
            )
            if now >= due_at:
                due.append(entry.message)
                entry.last_sent, entry.copies = now, entry.copies + 1
            else:
                wait = min(wait, due_at - now)
        return due, wait

    def lost(self, seq: int) -> Written:
        """A share that will not reach the peer (its send failed for good, or the node
        closed before sending it): written off, unless acknowledged or written off already."""
        entry = self.unacked.pop(seq, None)
        return {} if entry is None else self._write_off({seq: entry})

    # ---------------------------------------------------------------- receiving
    def acked(self, seq: int, now: float) -> tuple[float, bool] | None:
        """The peer acknowledged share ``seq``: ``(weight, taken_back)``, ``taken_back``
        when the share had been written off (the peer was suspected by mistake); None when
        ``seq`` is neither outstanding nor remembered as written off (a copy of an
        acknowledgement already counted, or a forged one)."""
        entry = self.unacked.pop(seq, None)
        if entry is not None:
            if not entry.copies:  # Karn's rule: see LinkSettings.retry_after
                self.rtts.append(now - entry.first_sent)
            weight, taken_back = entry.message.weight, False
        elif seq in self.written_off:
            weight, taken_back = self.written_off.pop(seq), True
            self.unaudited.discard(seq)
        else:
            return None
        self.acked_weight += weight
        self.acks += 1
        return weight, taken_back

    def audit(self, limit: int = AUDIT_LIMIT) -> tuple[int, int] | None:
        """The range ``(first, last)`` of sequence numbers to ask the peer about, or None.

        A share written off when its peer was suspected by mistake may have been folded:
        its acknowledgement was lost, or came after the write-off and was lost too, and
        nothing is sent again to a suspected peer. Once the peer is heard again, its
        driver asks (at most ``limit`` numbers at a time, from the oldest not answered):
        the peer acknowledges the shares it folded, which takes them back, and says which
        it never received (:meth:`never_received`; they stay written off, and are taken back
        if an acknowledgement comes after all). A share still waiting in the peer's inbox is
        acknowledged by its fold; until then it is asked about again.
        """
        if not self.unaudited:
            return None
        first = min(self.unaudited)
        last = max(seq for seq in self.unaudited if seq < first + limit)
        return first, last

    def never_received(self, seq: int) -> None:
        """The peer says share ``seq`` never reached it: no need to ask again."""
        self.unaudited.discard(seq)

    def skip_acked(self, round: int, fingerprint: int) -> None:
        """The peer acknowledged the skip notice of ``round`` (for the model of
        ``fingerprint``): not sent again."""
        self.skips.pop((round, fingerprint), None)

    def suspected(self) -> Written:
        """The peer is suspected down: every outstanding share is written off (returned);
        skip notices wait, in case it is alive after all."""
        lost, self.unacked = self.unacked, {}
        return self._write_off(lost)

    def heard(self, incarnation: int) -> Written | None:
        """The peer spoke with ``incarnation``: when that is a new life of a peer heard
        before, the shares sent to its previous life are written off (returned) and its skip
        notices dropped; otherwise None."""
        known = self.incarnation
        if incarnation <= known:
            return None
        self.incarnation = incarnation
        if not known:
            return None
        self.skips.clear()
        lost, self.unacked = self.unacked, {}
        return self._write_off(lost)

    # ------------------------------------------------------------------- reading
    def outstanding(self) -> int:
        """Shares sent and neither acknowledged nor written off."""
        return len(self.unacked)

    def outstanding_weight(self) -> float:
        """Their push-sum weight."""
        return math.fsum(entry.message.weight for entry in self.unacked.values())

    def unacknowledged(self, before_round: int) -> int:
        """Outstanding shares of rounds before ``before_round``."""
        return sum(entry.message.round < before_round for entry in self.unacked.values())

    def rtt_median(self) -> float | None:
        """The median of the recent round trips (None while none is known)."""
        return statistics.median(self.rtts) if self.rtts else None

    def _write_off(self, lost: Written) -> Written:
        self.written_off.update((seq, entry.message.weight) for seq, entry in lost.items())
        self.unaudited.update(lost)
        while len(self.written_off) > self.settings.max_unacked:
            oldest = next(iter(self.written_off))
            del self.written_off[oldest]
            self.unaudited.discard(oldest)
        return lost
