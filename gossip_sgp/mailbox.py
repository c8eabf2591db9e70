"""The receive side of push-sum: received mass waiting to be folded in.

The gossip thread :meth:`Mailbox.put`\\ s every valid message; the training thread waits for
the messages a round needs and :meth:`Mailbox.take`\\ s their summed mass at a step boundary
(invariant 4: parameters never change under a running forward/backward).

* Duplicates and replays are rejected by per-sender sequence numbers (invariant 2), also
  when messages arrive out of order.
* In the synchronous and overlap modes mass is kept per round and summed in sender order,
  so a run is deterministic whatever the arrival order. In the asynchronous mode
  (``coalesce=True``) everything is added into one running sum as it arrives: memory stays
  one model's worth however far a straggler falls behind (invariant 5; two with
  ``lag_limit``, below).
* With ``lag_limit`` (the asynchronous mode of ``SGP``), a share whose model is more than
  ``lag_limit`` training steps behind the receiver's (``Message.steps`` against the
  receiver's ``PushSumState.steps``) keeps only its weight, and one more than that ahead is
  summed apart, for the receiver to take its model (:meth:`Mailbox.take_mass`): two running
  sums then, two models' worth. Kept per round (``consensus()``), only the shares
  ``compared`` picks are compared, and only those far behind set apart.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection

import torch

from gossip_sgp.errors import WireError
from gossip_sgp.message import Message
from gossip_sgp.pushsum import Share

__all__ = ["Mailbox", "Receipt", "SequenceWindow", "Stored", "Taken"]

Receipt = tuple[int, int, int]
"""``(sender, seq, round)`` of a message whose mass has been folded in."""


class Stored(enum.Enum):
    """What :meth:`Mailbox.store` did with a message."""

    NEW = "new"
    """Its mass is stored, to be folded."""
    COPY_OF_WAITING = "copy of waiting"
    """A copy of a message still waiting to be folded: nothing stored; the fold of the
    original acknowledges it."""
    COPY_OF_FOLDED = "copy of folded"
    """A copy (or replay) of a message folded already: nothing stored; acknowledge it
    again, the first acknowledgement may have been lost."""


@dataclasses.dataclass
class Taken:
    """Mass taken from the mailbox for one fold (:meth:`Mailbox.take_mass`)."""

    share: Share | None = None
    """The mass to fold as usual."""
    steps: float | None = None
    """The training steps of ``share``'s model, the weighted average of its shares' (None:
    not known, count them as the receiver's own)."""
    ahead: Share | None = None
    """Mass whose model was more than ``lag_limit`` steps ahead of the receiver's."""
    ahead_steps: float = 0.0
    """The training steps of ``ahead``'s model."""
    behind: float = 0.0
    """Weight of shares whose model was more than ``lag_limit`` steps behind the
    receiver's: their models are dropped, their weight goes to the receiver's model."""

    def __bool__(self) -> bool:
        return self.share is not None or self.ahead is not None or self.behind > 0.0


class SequenceWindow:
    """Which sequence numbers of one sender have been seen; memory bounded by ``window``.

    Everything below ``floor`` counts as seen. A gap older than ``window`` messages is given
    up on (the message was lost); if it shows up later it is rejected as stale.
    """

    __slots__ = ("floor", "seen", "trusted", "window")

    def __init__(self, window: int = 4096) -> None:
        self.floor = 0
        self.seen: set[int] = set()
        self.window = window
        self.trusted = 0
        """Below this, numbers were given up on or seen, and which is not known."""

    def refuses(self, seq: int) -> bool:
        """Whether :meth:`accept` would refuse ``seq``: seen before, or too old to tell."""
        return seq < self.floor or seq in self.seen

    def accept(self, seq: int) -> bool:
        """Record ``seq``; False when it was seen before (or is too old to tell)."""
        if self.refuses(seq):
            return False
        self.seen.add(seq)
        while self.floor in self.seen:
            self.seen.remove(self.floor)
            self.floor += 1
        if len(self.seen) > self.window:
            oldest = sorted(self.seen)[: len(self.seen) - self.window]
            self.seen.difference_update(oldest)
            self.floor = oldest[-1] + 1
            while self.floor in self.seen:
                self.seen.remove(self.floor)
                self.floor += 1
            self.trusted = self.floor
        return True

    def has_seen(self, seq: int) -> bool:
        """Whether ``seq`` was accepted; False also where that is not known any more (a
        number below a gap given up on)."""
        return seq >= self.trusted and self.refuses(seq)


def _add(acc: Share | None, share: Share) -> Share:
    """``acc + share``, adding into ``acc``'s tensors (a copy of ``share`` when None)."""
    if acc is None:
        return _sum([share])
    for a, t in zip(acc[0], share[0], strict=True):
        a.add_(t)
    return acc[0], acc[1] + share[1]


def _sum(shares: list[Share]) -> Share:
    tensors = [t.clone() for t in shares[0][0]]
    weight = shares[0][1]
    for more, w in shares[1:]:
        for acc, t in zip(tensors, more, strict=True):
            acc.add_(t)
        weight += w
    return tuple(tensors), weight


class Mailbox:
    """Thread-safe store of received push-sum mass.

    Memory is bounded whatever peers send (see :meth:`admit`): in the coalescing mode by one
    running sum, otherwise by ``max_pending`` stored messages for rounds ahead of the
    receiver's own plus ``per_round`` per peer for its own round.
    """

    def __init__(
        self,
        *,
        coalesce: bool = False,
        window: int = 4096,
        horizon: int = 64,
        beyond: int = 16,
        max_pending: int = 1024,
        per_round: int = 4,
    ) -> None:
        if min(window, horizon, max_pending, per_round) < 1 or beyond < 0:
            raise ValueError("window, horizon, max_pending, per_round must be >= 1, beyond >= 0")
        self.coalesce = coalesce
        self._window = window
        self.horizon = horizon
        self.beyond = beyond
        self.max_pending = max_pending
        self.per_round = per_round
        self._stored = 0  # messages kept per round (not coalesced), not yet taken
        # Held with ``with self._lock`` (a C lock: its enter and exit are single calls), not
        # ``with self._cond``, whose enter and exit are Python frames: a KeyboardInterrupt
        # landing in one of them left the lock held, and the gossip thread, delivering the
        # next share, blocked on it forever (Ctrl-C then took the close timeouts, 10 s).
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._seqs: dict[int, SequenceWindow] = {}
        self._incarnations: dict[int, int] = {}  # sender -> latest incarnation heard
        # round -> sender -> shares (synchronous/overlap modes)
        self._by_round: dict[int, dict[int, list[tuple[Share, Receipt]]]] = {}
        self._acc: Share | None = None  # running sum (asynchronous mode)
        self._acc_steps = 0.0  # sum of steps * weight over the running sum's shares
        self._ahead: Share | None = None  # running sum of shares far ahead (lag_limit)
        self._ahead_steps = 0.0
        self._behind = 0.0  # weight of shares far behind (lag_limit): models dropped
        self._round_steps: dict[int, float] = {}  # round -> sum of steps * weight stored
        self.lag_limit: float | None = None
        """Asynchronous mode: how many training steps a share's model may be behind or
        ahead of the receiver's before it is set apart (see :class:`Taken`); None: never."""
        self.own_steps: Callable[[], float] | None = None
        """The receiver's training steps (``PushSumState.steps``), read at arrival."""
        self.compared: Callable[[Message], bool] | None = None
        """Per-round storage: which shares are compared with ``lag_limit`` (None: none),
        and then only to set apart those far behind; the coalescing mode compares all."""
        self.lagged: Counter[str] = Counter()
        """Shares set apart by ``lag_limit``: ``behind`` and ``ahead``."""
        self._acc_receipts: list[Receipt] = []
        self._receipts: list[Receipt] = []  # taken, not yet acknowledged
        self._unfolded: set[tuple[int, int]] = set()  # (sender, seq) stored, not yet taken
        self._arrived: set[tuple[int, int]] = set()  # (sender, round) not yet taken
        self._gauges: dict[int, float] = {}  # round -> largest gauge received
        self.closed = False
        self.rejected: Counter[str] = Counter()
        self.received = 0
        self.last_arrival: dict[int, float] = {}
        self.weight_from: dict[int, float] = {}
        """Push-sum weight accepted from each sender so far."""

    def admit(self, message: Message, round_now: int) -> None:
        """Raise ``WireError`` (counted) unless there is room to store ``message`` for a
        receiver at round ``round_now``; call it before decoding (gossip thread).

        Kept per round, a share waits until the receiver reaches its round, so a peer (or a
        forger) sending rounds far ahead could fill the memory. The receiver keeps at most
        ``per_round`` messages of one sender and round; for rounds after its own at most
        ``max_pending`` messages in all, of which at most ``beyond`` for rounds ``horizon``
        or more ahead (a synchronous peer is never that far ahead; a restarted or resumed
        worker hears a few of those before its own round is set). A refused message is not
        acknowledged, so its sender sends it again later: nothing is lost, and forged rounds
        ahead can neither fill the memory nor crowd out a real peer's message of the
        receiver's own round (reasons ``full`` and ``ahead``).
        """
        with self._lock:
            if self.coalesce:
                return  # one running sum, whatever the round
            r = message.round
            if len(self._by_round.get(r, {}).get(message.sender, ())) >= self.per_round:
                self.rejected["full"] += 1
                raise WireError(
                    "full", f"{self.per_round} messages of rank {message.sender}, round {r}"
                )
            if r <= round_now:
                return
            if self._stored >= self.max_pending:
                self.rejected["full"] += 1
                raise WireError("full", f"{self._stored} unfolded messages stored")
            far = round_now + self.horizon
            if r >= far and self.beyond <= sum(
                len(entries)
                for stored, senders in self._by_round.items()
                if stored >= far
                for entries in senders.values()
            ):
                self.rejected["ahead"] += 1
                raise WireError("ahead", f"round {r} is {self.horizon}+ rounds after {round_now}")

    def _window_of(self, sender: int, incarnation: int) -> SequenceWindow | None:
        """The sequence window of ``sender``'s life ``incarnation`` (under the lock); None
        for an earlier life than one already heard. A sender that restarted (a larger
        incarnation) numbers its messages from 0 again: its window starts over."""
        known = self._incarnations.get(sender, 0)
        if incarnation and incarnation < known:
            return None
        if incarnation > known:
            self._incarnations[sender] = incarnation
            if known:  # restarted: sequence numbers start again from 0
                self._seqs.pop(sender, None)
        seqs = self._seqs.get(sender)
        if seqs is None:
            seqs = self._seqs[sender] = SequenceWindow(self._window)
        return seqs

    def seen_elsewhere(self, sender: int, incarnation: int, seq: int) -> None:
        """Message ``seq`` of ``sender`` went to another mailbox of this worker (a sibling
        fragment of a ``StreamingSGP``: the fragments number the shares of one link in one
        series). Counted as seen here, so the window's floor moves over it; an audit asks
        every fragment and takes the owner's word (:meth:`folded` says "folded" of it
        here)."""
        with self._lock:
            seqs = self._window_of(sender, incarnation)
            if seqs is not None:
                seqs.accept(seq)

    def put(self, message: Message) -> bool:
        """Store a message's mass. A duplicate or replay is counted and not stored; False
        when its original has been folded already (acknowledge it again: the first
        acknowledgement may have been lost), True when the original still waits here (its
        fold acknowledges it). :meth:`store` says which of the three it was."""
        return self.store(message) is not Stored.COPY_OF_FOLDED

    def store(self, message: Message) -> Stored:
        """Store a message's mass, as :meth:`put`; say whether it was new or a copy.

        A sender that restarted (a larger ``Message.incarnation``) numbers its messages from
        0 again: its sequence window starts over. A message from an earlier incarnation
        than one already heard raises ``WireError("stale")`` (nothing is stored).
        """
        with self._lock:
            seqs = self._window_of(message.sender, message.incarnation)
            if seqs is None:
                self.rejected["stale"] += 1
                raise WireError("stale", f"from an earlier incarnation of rank {message.sender}")
            if not seqs.accept(message.seq):
                self.rejected["duplicate"] += 1
                # A copy of a message still waiting to be folded: the fold acknowledges it
                # (acknowledged now, its sender would count mass as folded that is not).
                if (message.sender, message.seq) in self._unfolded:
                    return Stored.COPY_OF_WAITING
                return Stored.COPY_OF_FOLDED
            share: Share = (message.tensors, message.weight)
            receipt = (message.sender, message.seq, message.round)
            self._unfolded.add((message.sender, message.seq))
            if self.coalesce:
                self._acc_receipts.append(receipt)
                self._place(share, message.steps)
            else:
                r = message.round
                compared = self.compared is not None and self.compared(message)
                if compared and self._side(message.steps) == "behind":
                    share = ((), share[1])  # its weight only: see take_mass
                    self.lagged["behind"] += 1
                else:
                    self._round_steps[r] = self._round_steps.get(r, 0.0) + message.steps * share[1]
                senders = self._by_round.setdefault(r, {})
                senders.setdefault(message.sender, []).append((share, receipt))
                self._stored += 1
            self._arrived.add((message.sender, message.round))
            if message.gauge:
                r = message.round
                self._gauges[r] = max(self._gauges.get(r, 0.0), message.gauge)
            self.received += 1
            self.last_arrival[message.sender] = time.monotonic()
            self.weight_from[message.sender] = self.weight_from.get(message.sender, 0.0) + share[1]
            self._cond.notify_all()
            return Stored.NEW

    def give_back(self, tensors: tuple[torch.Tensor, ...], weight: float, steps: int) -> None:
        """Add mass of this worker's own that never left (see ``GossipNode.on_take_back``),
        its model ``steps`` training steps in: folded at the next :meth:`take`, whatever
        its round, and acknowledged to nobody."""
        with self._lock:
            self._place((tensors, weight), steps)

    def _side(self, steps: int) -> str | None:
        """``behind`` or ``ahead`` for a model ``steps`` training steps in, more than
        ``lag_limit`` from the receiver's; else None."""
        limit = self.lag_limit
        if limit is None or self.own_steps is None:
            return None
        own = self.own_steps()
        if steps < own - limit:
            return "behind"
        return "ahead" if steps > own + limit else None

    def _place(self, share: Share, steps: int) -> None:
        """Add ``share`` into the running sum it belongs to (call with ``_lock`` held)."""
        side = self._side(steps)
        if side is not None:
            self.lagged[side] += 1
        if side == "behind":
            self._behind += share[1]
        elif side == "ahead":
            self._ahead = _add(self._ahead, share)
            self._ahead_steps += steps * share[1]
        else:
            self._acc = _add(self._acc, share)
            self._acc_steps += steps * share[1]

    def count_lagged(self, side: str) -> None:
        """Count a share set apart at fold-in (``behind`` or ``ahead``)."""
        with self._lock:
            self.lagged[side] += 1

    def count_reject(self, reason: str) -> int:
        """Count a message refused after it was stored (e.g. at fold-in); the new count."""
        with self._lock:
            self.rejected[reason] += 1
            return self.rejected[reason]

    def mark_arrived(self, sender: int, round: int) -> None:
        """Count ``(sender, round)`` as arrived without mass (the sender kept it)."""
        with self._lock:
            self._arrived.add((sender, round))
            self._cond.notify_all()

    def has(self, expected: Collection[tuple[int, int]]) -> bool:
        """Whether every ``(sender, round)`` in ``expected`` has arrived."""
        with self._lock:
            return self._arrived.issuperset(expected)

    def wait(self, expected: Collection[tuple[int, int]], timeout: float | None) -> bool:
        """Block until every ``(sender, round)`` in ``expected`` has arrived.

        Returns False on timeout, or at once when the mailbox is closed (no more deliveries).
        """
        with self._lock:
            self._cond.wait_for(lambda: self.closed or self._arrived.issuperset(expected), timeout)
            return self._arrived.issuperset(expected)

    def close(self) -> None:
        """No more messages will come: wake every waiter."""
        with self._lock:
            self.closed = True
            self._cond.notify_all()

    def take(self, max_round: int | None = None) -> Share | None:
        """Remove and return the summed mass of rounds ``<= max_round`` (all when None).

        Returns None when there is nothing to fold. Shares kept per round are summed in
        (round, sender) order, so the result does not depend on arrival order. The running
        sum of coalescing mode is always returned whole; arrivals of rounds ``> max_round``
        stay known to :meth:`wait` either way. Without ``lag_limit`` only: else see
        :meth:`take_mass`.
        """
        if self.lag_limit is not None:
            raise RuntimeError("a mailbox with lag_limit hands out its mass by take_mass()")
        return self.take_mass(max_round).share

    def take_mass(self, max_round: int | None = None) -> Taken:
        """Remove and return the mass of rounds ``<= max_round`` (all when None), as
        :meth:`take` does, with the training steps of its models and, with ``lag_limit``,
        the mass set apart as far ahead or behind (see :class:`Taken`)."""
        with self._lock:
            shares: list[Share] = []
            steps = 0.0
            taken = Taken(ahead=self._ahead, behind=self._behind)
            if self._ahead is not None:
                taken.ahead_steps = self._ahead_steps / self._ahead[1]
            self._ahead, self._ahead_steps, self._behind = None, 0.0, 0.0
            if self._acc is not None:
                shares.append(self._acc)
                steps += self._acc_steps
                self._acc, self._acc_steps = None, 0.0
            self._receipts.extend(self._acc_receipts)
            self._unfolded.difference_update((s, q) for s, q, _ in self._acc_receipts)
            self._acc_receipts.clear()
            rounds = sorted(r for r in self._by_round if max_round is None or r <= max_round)
            for r in rounds:
                senders = self._by_round.pop(r)
                steps += self._round_steps.pop(r, 0.0)
                for sender in sorted(senders):
                    for share, receipt in senders[sender]:
                        if share[0]:
                            shares.append(share)
                        else:  # a model far behind, dropped on arrival
                            taken.behind += share[1]
                        self._receipts.append(receipt)
                        self._unfolded.discard(receipt[:2])
                        self._stored -= 1
            self._arrived = {a for a in self._arrived if max_round is not None and a[1] > max_round}
            if shares:
                taken.share = _sum(shares)
                if taken.share[1] > 0.0:
                    taken.steps = steps / taken.share[1]
            return taken

    def is_duplicate(self, sender: int, seq: int) -> bool:
        """Whether :meth:`put` would take message ``seq`` of ``sender`` for a duplicate (of
        the sender's current incarnation)."""
        with self._lock:
            window = self._seqs.get(sender)
            return window is not None and window.refuses(seq)

    def folded(self, sender: int, seqs: Collection[int]) -> tuple[list[int], list[int]]:
        """Of ``sender``'s messages ``seqs``: (those whose mass has been folded in, those
        never received). A message received and still waiting is in neither (its fold
        acknowledges it), and so is one too old to tell. Answers a sender's audit of the
        shares it wrote off."""
        with self._lock:
            window = self._seqs.get(sender)
            folded, never = [], []
            for seq in seqs:
                if window is not None and seq < window.trusted:
                    continue
                if window is None or not window.has_seen(seq):
                    never.append(seq)
                elif (sender, seq) not in self._unfolded:
                    folded.append(seq)
            return folded, never

    def set_coalesce(self, coalesce: bool) -> None:
        """Switch between one running sum and per-round storage for messages from now on."""
        with self._lock:
            self.coalesce = coalesce

    def pop_receipts(self) -> list[Receipt]:
        """Receipts of the messages taken since the last call (to acknowledge them)."""
        with self._lock:
            receipts, self._receipts = self._receipts, []
            return receipts

    def take_gauge(self, max_round: int) -> float:
        """The largest ``gauge`` of rounds ``<= max_round`` (0.0 if none); forgets them."""
        with self._lock:
            rounds = [r for r in self._gauges if r <= max_round]
            return max((self._gauges.pop(r) for r in rounds), default=0.0)

    def pending(self) -> list[Share]:
        """Mass received but not yet taken (for accounting), less the weight of shares
        whose models were dropped (see :meth:`pending_weight`)."""
        with self._lock:
            running = [_sum([acc]) for acc in (self._acc, self._ahead) if acc is not None]
            return running + [  # the running sums: _sum copies, put() adds into them
                share
                for senders in self._by_round.values()
                for entries in senders.values()
                for share, _ in entries
                if share[0]
            ]

    def pending_weight(self) -> float:
        """Push-sum weight received but not yet taken."""
        with self._lock:  # the weights as they are: no copy of the running sums
            running = sum(acc[1] for acc in (self._acc, self._ahead) if acc is not None)
            kept = sum(  # the shares of models far behind too: their weight is pending
                share[1]
                for senders in self._by_round.values()
                for entries in senders.values()
                for share, _ in entries
            )
            return self._behind + running + kept
