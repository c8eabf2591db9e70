"""The receive side: duplicates rejected, deterministic sums, waiting, coalescing."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
from collections.abc import Iterator
from types import FrameType

import pytest
import torch

from gossip_sgp.errors import WireError
from gossip_sgp.mailbox import Mailbox, SequenceWindow, Stored
from gossip_sgp.message import Message


def msg(sender: int, seq: int, rnd: int, value: float, weight: float = 0.5) -> Message:
    return Message(
        sender=sender,
        receiver=0,
        round=rnd,
        seq=seq,
        weight=weight,
        tensors=(torch.full((3,), value, dtype=torch.float64),),
    )


def test_sequence_window_rejects_repeats_in_any_order() -> None:
    w = SequenceWindow(window=8)
    assert [w.accept(s) for s in (2, 0, 1, 1, 2, 3, 0)] == [
        True,
        True,
        True,
        False,
        False,
        True,
        False,
    ]
    assert w.floor == 4
    assert not w.seen


def test_sequence_window_memory_is_bounded() -> None:
    w = SequenceWindow(window=4)
    for s in range(1, 100, 2):  # every even number lost
        assert w.accept(s)
        assert len(w.seen) <= 4
    assert not w.accept(1)  # long given up on: stale


def test_sequence_window_knows_what_it_saw_and_never_guesses_past_a_gap_given_up() -> None:
    w = SequenceWindow(window=4)
    for s in (0, 1, 3):
        w.accept(s)
    assert [w.has_seen(s) for s in range(5)] == [True, True, False, True, False]
    for s in range(5, 12, 2):  # 2 and every even number from 4 on lost: gaps given up
        w.accept(s)
    assert w.trusted == w.floor > 3
    assert not w.has_seen(0)  # seen once, but below what it still knows: not claimed
    assert w.has_seen(11)
    assert not w.has_seen(12)


def test_an_audit_is_answered_folded_never_received_or_not_at_all() -> None:
    """``Mailbox.folded``: what a sender's audit of its write-offs is told."""
    box = Mailbox(coalesce=False)
    for seq in (0, 1):
        assert box.put(msg(0, seq, 0, 1.0))
    assert box.take() is not None  # 0 and 1 folded
    assert box.put(msg(0, 3, 1, 1.0))  # 3 waits: its fold acknowledges it
    assert box.folded(0, range(5)) == ([0, 1], [2, 4])
    assert box.folded(7, range(2)) == ([], [0, 1])  # nothing ever came from rank 7


@pytest.mark.parametrize("coalesce", [False, True])
def test_duplicate_is_rejected_and_counted(coalesce: bool) -> None:
    """A copy is never stored. While its original waits to be folded, put() says True (no
    acknowledgement now: the fold sends it); once the original is folded, False
    (acknowledge again: the first acknowledgement may have been lost). Fails if a copy of a
    waiting message asks for an acknowledgement: its sender would count unfolded mass as
    folded and open its window for more."""
    box = Mailbox(coalesce=coalesce)
    assert box.put(msg(1, 0, 0, 1.0))
    assert box.put(msg(1, 0, 0, 1.0))  # its original still waits
    assert box.rejected["duplicate"] == 1
    share = box.take()
    assert share is not None
    assert share[1] == 0.5
    assert share[0][0].tolist() == [1.0, 1.0, 1.0]
    assert box.pop_receipts() == [(1, 0, 0)]
    assert not box.put(msg(1, 0, 0, 1.0))  # its original is folded
    assert box.rejected["duplicate"] == 2
    assert box.take() is None


def test_take_by_round_leaves_newer_rounds() -> None:
    box = Mailbox()
    box.put(msg(1, 0, 0, 1.0))
    box.put(msg(1, 1, 1, 2.0))
    box.put(msg(2, 0, 0, 4.0))
    share = box.take(max_round=0)
    assert share is not None
    assert share[0][0].tolist() == [5.0] * 3
    assert share[1] == 1.0
    assert box.has([(1, 1)])
    assert not box.has([(1, 0)])
    assert box.pending_weight() == 0.5
    assert box.take(max_round=0) is None


def test_sum_does_not_depend_on_arrival_order() -> None:
    values = [0.1, 1e16, -1e16, 0.3]  # float addition is not associative
    a, b = Mailbox(), Mailbox()
    for s, v in enumerate(values):
        a.put(msg(s + 1, 0, 0, v))
    for s, v in reversed(list(enumerate(values))):
        b.put(msg(s + 1, 0, 0, v))
    sa, sb = a.take(), b.take()
    assert sa is not None
    assert sb is not None
    assert torch.equal(sa[0][0], sb[0][0])


def test_wait_wakes_on_arrival_and_times_out() -> None:
    box = Mailbox()
    assert not box.wait([(3, 0)], timeout=0.01)
    timer = threading.Timer(0.05, box.put, args=(msg(3, 0, 0, 1.0),))
    timer.start()
    try:
        assert box.wait([(3, 0)], timeout=10.0)
    finally:
        timer.cancel()


def test_a_skip_notice_counts_as_arrived_without_mass() -> None:
    box = Mailbox()
    timer = threading.Timer(0.05, box.mark_arrived, args=(3, 4))
    timer.start()
    try:
        assert box.wait([(3, 4)], timeout=10.0)
    finally:
        timer.cancel()
    assert box.take(4) is None  # nothing to fold
    assert box.pop_receipts() == []  # and nothing to acknowledge


def test_coalescing_keeps_one_buffer_and_all_mass() -> None:
    box = Mailbox(coalesce=True)
    for seq in range(100):
        box.put(msg(1, seq, seq, 1.0, weight=0.25))
    assert len(box.pending()) == 1
    assert box.pending_weight() == 25.0
    share = box.take(max_round=49)
    assert share is not None
    assert share[0][0].tolist() == [100.0] * 3
    # arrivals of rounds after 49 are still known to waiters
    assert box.has([(1, 50), (1, 99)])
    assert not box.has([(1, 49)])


def test_gauge_is_tracked_per_round() -> None:
    box = Mailbox()
    box.put(Message(sender=1, receiver=0, round=0, seq=0, weight=0.5, tensors=(), gauge=0.3))
    box.put(Message(sender=2, receiver=0, round=1, seq=0, weight=0.5, tensors=(), gauge=0.7))
    assert box.take_gauge(0) == 0.3
    assert box.take_gauge(0) == 0.0
    assert box.take_gauge(5) == 0.7


class _Watched(list[tuple[int, int]]):
    """``expected`` for ``Mailbox.wait`` that sets ``looked`` whenever the wait checks it."""

    def __init__(self, items: list[tuple[int, int]], looked: threading.Event) -> None:
        super().__init__(items)
        self.looked = looked

    def __iter__(self) -> Iterator[tuple[int, int]]:
        self.looked.set()
        return super().__iter__()


@pytest.mark.timeout(30)
def test_close_wakes_a_waiter_at_once() -> None:
    """Fails if ``close()`` does not wake a waiter: e.g. the mutation that removes
    ``self._cond.notify_all()`` from ``Mailbox.close`` makes it fail ("the waiter is still
    blocked 5 s after close()"). The waiter waits with no timeout at all, so only a
    notification ends its wait (the old version waited 30 s and passed either way).

    ``close()`` comes only after the waiter has checked its condition, which it does
    holding the mailbox's lock until it blocks: so the waiter is blocked by then, and
    cannot see ``closed`` without being woken."""
    box = Mailbox()
    looked = threading.Event()
    results: list[bool] = []
    thread = threading.Thread(
        target=lambda: results.append(box.wait(_Watched([(3, 0)], looked), timeout=None)),
        daemon=True,
    )
    thread.start()
    try:
        assert looked.wait(5), "the waiter did not start waiting"
        box.close()
        thread.join(5.0)
        assert not thread.is_alive(), "the waiter is still blocked 5 s after close()"
        assert results == [False]  # woken by close, not by an arrival
        assert box.closed
    finally:
        if thread.is_alive():  # do not leave it blocked: an arrival ends any wait
            box.put(msg(3, 0, 0, 1.0))
            thread.join(5.0)


def test_a_restarted_sender_numbers_from_zero_and_its_earlier_life_is_stale() -> None:
    box = Mailbox()
    first, second = {"incarnation": 100}, {"incarnation": 200}  # two lives of rank 1
    assert box.put(dataclasses.replace(msg(1, 0, 0, 1.0), **first))
    assert box.put(dataclasses.replace(msg(1, 1, 1, 1.0), **first))
    # restarted: sequence numbers start again, and are not taken for replays
    assert box.put(dataclasses.replace(msg(1, 0, 5, 2.0), **second))
    assert box.put(dataclasses.replace(msg(1, 0, 5, 2.0), **second))  # a copy, not stored
    with pytest.raises(WireError) as caught:  # a late message of the earlier life
        box.put(dataclasses.replace(msg(1, 2, 2, 3.0), **first))
    assert caught.value.reason == "stale"
    assert box.rejected == {"duplicate": 1, "stale": 1}
    assert box.weight_from == {1: 1.5}
    assert box.pending_weight() == 1.5


def admitted(box: Mailbox, message: Message, round_now: int) -> bool:
    """Admit and store ``message`` as the gossip thread does; False when refused for room."""
    refused = sum(box.rejected[r] for r in ("full", "ahead"))
    try:
        box.admit(message, round_now)
    except WireError:
        assert sum(box.rejected[r] for r in ("full", "ahead")) == refused + 1
        return False
    assert box.put(message)
    return True


def test_rounds_far_ahead_cannot_fill_the_memory_or_crowd_out_the_next_round() -> None:
    """Forged rounds far ahead take at most ``beyond`` places; a real share of the next
    round still gets in, and so does one far ahead once the receiver has caught up. Fails
    with an ``admit`` that does not look at the round (every forged message is stored)."""
    box = Mailbox(horizon=8, beyond=3, max_pending=100)
    forged = [msg(1, seq, 10**9 + seq, 1.0) for seq in range(100, 110)]
    assert [admitted(box, m, round_now=0) for m in forged] == [True] * 3 + [False] * 7
    assert box.rejected["ahead"] == 7
    assert admitted(box, msg(1, 0, 1, 2.0), round_now=0)  # the real next round
    assert admitted(box, msg(2, 0, 7, 2.0), round_now=0)  # within the horizon
    assert not admitted(box, msg(2, 1, 8, 2.0), round_now=0)  # beyond it: no room left
    assert admitted(box, msg(2, 1, 8, 2.0), round_now=1)  # sent again later: in
    share = box.take(8)
    assert share is not None
    assert share[1] == pytest.approx(1.5)  # rounds 1, 7, 8
    assert box.pending_weight() == pytest.approx(1.5)  # the three forged ones wait


def test_the_mailbox_holds_at_most_max_pending_rounds_ahead_but_always_its_own_round() -> None:
    """Fails if ``max_pending`` also refused the receiver's own round (a forger filling the
    mailbox with future rounds would then stall a synchronous worker)."""
    box = Mailbox(horizon=64, beyond=0, max_pending=5, per_round=2)
    assert all(admitted(box, msg(1, seq, 1 + seq, 1.0), round_now=0) for seq in range(5))
    assert not admitted(box, msg(2, 0, 1, 1.0), round_now=0)
    assert box.rejected["full"] == 1
    assert admitted(box, msg(2, 0, 0, 1.0), round_now=0)  # its own round
    assert admitted(box, msg(2, 1, 0, 1.0), round_now=0)
    assert not admitted(box, msg(2, 2, 0, 1.0), round_now=0)  # per_round=2 of (2, 0)
    box.take(1)  # rounds 0 and 1: three messages
    assert admitted(box, msg(2, 2, 6, 1.0), round_now=2)  # taking made room
    assert not admitted(box, msg(2, 3, 7, 1.0), round_now=2)


def test_coalescing_keeps_one_running_sum_whatever_the_round() -> None:
    box = Mailbox(coalesce=True, horizon=1, beyond=0, max_pending=1)
    assert all(admitted(box, msg(1, seq, 10**6 * seq, 1.0), round_now=0) for seq in range(10))
    assert box.pending_weight() == pytest.approx(5.0)


def test_store_tells_a_new_share_from_copies_of_waiting_and_folded_ones() -> None:
    """``Mailbox.store`` says what ``put``'s True/False folds together: a copy of a share
    still waiting is not acknowledged (its fold will be), a copy of a folded one is
    acknowledged again, and only a new share reaches a policy's ``received``."""
    box = Mailbox(coalesce=True)
    assert box.store(msg(1, 0, 0, 1.0)) is Stored.NEW
    assert box.store(msg(1, 0, 0, 1.0)) is Stored.COPY_OF_WAITING
    assert box.put(msg(1, 0, 0, 1.0))  # put: True, nothing to acknowledge now
    assert box.take() is not None
    assert box.pop_receipts() == [(1, 0, 0)]
    assert box.store(msg(1, 0, 0, 1.0)) is Stored.COPY_OF_FOLDED
    assert not box.put(msg(1, 0, 0, 1.0))  # put: False, acknowledge it again
    assert box.rejected["duplicate"] == 4


@pytest.mark.timeout(30)
@pytest.mark.parametrize("frame_name", ["__exit__", "notify_all"])
def test_an_interrupt_in_the_training_thread_leaves_the_mailbox_lock_free(
    frame_name: str,
) -> None:
    """Ctrl-C raises KeyboardInterrupt in the training thread between two Python frames. One
    landing in ``threading.Condition.__exit__`` (a Python frame) left the mailbox's lock
    held, so the gossip thread blocked on its next share for good and Ctrl-C took the close
    timeouts. The mailbox takes its lock directly (C calls, no Python frame to land in), so
    there is no ``__exit__`` frame of the threading module to interrupt any more; an
    interrupt in one that remains, ``Condition.notify_all`` under the lock, must leave the
    lock free too. (Before the change the ``__exit__`` case failed.)"""
    box = Mailbox()
    injected: list[str] = []

    def tracer(frame: FrameType, event: str, arg: object) -> None:
        code = frame.f_code
        in_threading = code.co_filename == threading.__file__
        if event == "call" and in_threading and code.co_name == frame_name and not injected:
            injected.append(code.co_name)
            raise KeyboardInterrupt

    previous = sys.gettrace()
    sys.settrace(tracer)  # type: ignore[arg-type]
    try:
        with contextlib.suppress(KeyboardInterrupt):
            for _ in range(3):
                box.mark_arrived(0, 0)  # notify_all under the lock
                box.pop_receipts()
    finally:
        sys.settrace(previous)
    if frame_name == "notify_all":
        assert injected == ["notify_all"]  # the interrupt did land under the lock
    other = threading.Thread(target=box.pending_weight, daemon=True)  # as the gossip thread
    other.start()
    other.join(5.0)
    assert not other.is_alive(), f"the mailbox lock stayed held (interrupt in {injected})"
