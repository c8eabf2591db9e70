"""The link layer's books under random faults and deaths, in virtual time (tests/linksim.py):
the same OutLink, FailureDetector and SequenceWindow state machines GossipNode drives, one
event heap, hundreds of fault schedules in seconds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.linksim import Job, exact
from transports.faults import FaultSpec

ROUNDS = 16
"""Weights halve at every send and a worker folds shares of its peers' rounds, so a weight
gains a few bits a round: for 16 rounds every fold is exact in double precision (the
harness raises OverflowError when one is not; at 20 rounds 5 of 180 jobs of 3-8 workers
had one)."""


def close_books(job: Job) -> None:
    """Nothing is created or applied twice: held + never folded = n, exactly; and what a
    worker counts as lost was never acknowledged to it."""
    assert job.held() + job.unfolded() == job.n
    for w in job.workers:
        assert not any((w.rank, receiver, seq) in job.acked for receiver, seq in w.standing)


@st.composite
def jobs(draw: st.DrawFn) -> Case:
    n = draw(st.sampled_from([2, 3, 4, 5, 8]))
    network = FaultSpec(
        drop=draw(st.sampled_from([0.0, 0.02, 0.1])),
        duplicate=draw(st.sampled_from([0.0, 0.05, 0.2])),
        delay=draw(st.sampled_from([0.001, 0.005, 0.02])),
        jitter=draw(st.sampled_from([0.0, 0.005, 0.02])),
    )
    dead = draw(st.sets(st.integers(0, n - 1), max_size=max(0, n - 2)))
    # While the others still train (ROUNDS steps of 0.01 s), once they have heard it.
    deaths = {rank: draw(st.floats(0.08, ROUNDS * 0.01)) for rank in sorted(dead)}
    live = [rank for rank in range(n) if rank not in dead]
    paused = draw(st.sets(st.sampled_from(live), max_size=len(live) - 1))
    pauses = {rank: (draw(st.floats(0.1, 0.3)), draw(st.floats(0.2, 3.0))) for rank in paused}
    return n, network, deaths, pauses, draw(st.integers(0, 2**16))


Case = tuple[int, FaultSpec, dict[int, float], dict[int, tuple[float, float]], int]


@settings(max_examples=150, deadline=None)
@given(case=jobs())
def test_the_books_close_under_loss_duplicates_reordering_pauses_and_deaths(case: Case) -> None:
    """After every event: weight held + weight of shares never folded = n, exactly (no
    share is folded twice, whatever the copies and duplicates). Once the job has settled
    (live workers suspect exactly their dead neighbours, every share between live workers
    is acknowledged or written off, and every write-off to a live peer audited): when the
    network loses nothing, every share a live worker still counts as lost is to a dead peer
    - a worker suspected by mistake (a long pause) folds its shares late, acknowledges
    them, and its senders take the write-offs back. With losses too, a write-off to a live
    peer stands only for a share that peer never folded (lost on the way): one it folded
    and whose acknowledgement was lost (nothing is sent again to a suspected peer) is
    acknowledged when the sender audits the peer it hears again (``OutLink.audit``). What a
    live worker wrote off to a dead peer is exactly what it sent the peer and never had
    acknowledged.

    And (in the harness, on every delivery) an acknowledgement is only ever sent for a share
    that was folded: a copy of a share still waiting in the inbox is acknowledged by that
    share's fold, as ``Mailbox.put`` does.

    Fails (checked) when no audit is sent (the write-off of a folded share whose
    acknowledgement was lost stands), when a duplicate is folded again
    (``SequenceWindow.accept`` ignoring what it has seen), when an acknowledgement that
    comes after a write-off does not forget it (``OutLink.acked`` taking it back on every
    copy), when shares to a suspected peer are not written off (``OutLink.suspected``
    returning nothing), and when a copy of a waiting share is acknowledged at once (the old
    receiver rule)."""
    n, network, deaths, pauses, seed = case
    job = Job(n, network=network, deaths=deaths, pauses=pauses, seed=seed)
    job.checks.append(lambda: close_books(job))
    job.run(ROUNDS)
    assert job.settled(), "the job did not settle within a minute of virtual time"
    dead = set(deaths)
    for w in (w for w in job.workers if w.alive):
        if network.drop == 0:
            assert all(receiver in dead for receiver, _ in w.standing)
        folded_by_live = [
            (receiver, seq)
            for receiver, seq in w.standing
            if receiver not in dead and (w.rank, receiver, seq) in job.folded
        ]
        assert not folded_by_live, "written off, though a live peer folded them"
        to_dead = {
            (receiver, seq): weight
            for (sender, receiver, seq), weight in job.shares.items()
            if sender == w.rank and receiver in dead and (sender, receiver, seq) not in job.acked
        }
        assert {key: v for key, v in w.standing.items() if key[0] in dead} == to_dead
        assert not any(link.outstanding() for link in w.links.values())


@pytest.mark.parametrize("drop", [0.0, 0.1])
def test_a_job_without_deaths_loses_nothing(drop: float) -> None:
    job = Job(8, network=FaultSpec(drop=drop, duplicate=0.1, delay=0.005, jitter=0.005), seed=3)
    job.checks.append(lambda: close_books(job))
    job.run(ROUNDS)
    assert job.settled()
    assert exact(w.weight for w in job.workers) == 8
    assert job.unfolded() == 0.0
    assert not any(w.standing for w in job.workers)
    assert not any(w.detector.down for w in job.workers)
