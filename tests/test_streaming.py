"""``StreamingSGP``: local steps whose outer steps average one fragment of the model at a time.

As in ``tests/test_local_steps.py``, worker ``i`` minimises ``0.5 * ||x - c_i||^2`` for each
parameter with plain SGD, so each fragment's outer steps can be computed by hand: a fragment
averaged after ``k`` inner steps from ``x0`` has the pseudo-gradient
``(x0 - mean(c)) * (1 - (1 - lr)**k)``.
"""

from __future__ import annotations

import copy
import math
import queue
import time
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from gossip_sgp import GossipConfig, GossipError, GossipNode, StreamingSGP
from gossip_sgp.mailbox import Mailbox
from gossip_sgp.message import Message, MessageKind
from gossip_sgp.streaming import first_outer_step, fragment_slices
from tests.test_liveness import FAST
from tests.test_local_steps import LR, outer_update
from tests.threads import run_workers, wait_until
from transports import InProcNetwork

SIZES = (3, 2, 4)
"""The test model: three parameters, 9 elements (3 fragments: elements 0-2, 3-5, 6-8, the
second cutting through the parameters)."""


def target(rank: int, p: int) -> torch.Tensor:
    return torch.arange(SIZES[p], dtype=torch.float64) * (rank + 1) - 2.0 * p * rank + 0.5


def targets(rank: int) -> torch.Tensor:
    """Worker ``rank``'s targets of all parameters, flat."""
    return torch.cat([target(rank, p) for p in range(len(SIZES))])


def hand(outer: str, n: int, periods: list[int], tail: int, rank: int) -> torch.Tensor:
    """Worker ``rank``'s parameters (flat) had every element taken outer steps after each
    of ``periods`` inner steps (as the papers write them), then ``tail`` inner steps of
    its own."""
    c = sum(targets(r) for r in range(n)) / n
    x0 = torch.zeros(sum(SIZES), dtype=torch.float64)
    u = torch.zeros(sum(SIZES), dtype=torch.float64)
    for k in periods:
        x0, u = outer_update(outer, x0, (x0 - c) * (1 - (1 - LR) ** k), u)
    t = targets(rank)
    return t + (x0 - t) * (1 - LR) ** tail


def model() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(size, dtype=torch.float64)) for size in SIZES]


def train(steps: int, **kw: Any) -> Any:
    def fn(rank: int, node: GossipNode) -> dict[str, Any]:
        params = model()
        opt = torch.optim.SGD(params, lr=LR)
        sgp = StreamingSGP(params, opt, node, **kw)
        for _ in range(steps):
            opt.zero_grad()
            sum(0.5 * (x - target(rank, p)).pow(2).sum() for p, x in enumerate(params)).backward()
            sgp.step()
        return {
            "params": [x.detach().clone() for x in params],
            "weights": [part.weight for part in sgp.parts],
            "outer_steps": [part.outer_steps for part in sgp.parts],
            "snapshot": sgp.snapshot(),
        }

    return fn


def assert_one_model_and_no_mass_lost(
    results: list[dict[str, Any]], n: int, *, tol: float, rtol: float
) -> None:
    """Every fragment's weights (taken before ``consensus()``) add up to ``n``; each
    worker's ``consensus()`` reached ``tol``, and its parameters are the first worker's to
    ``rtol`` (and 1e-6 absolute)."""
    for p in range(len(results[0]["weights"])):
        assert math.fsum(r["weights"][p] for r in results) == pytest.approx(n, abs=1e-9)
    for r in results:
        assert r["disagreement"] <= tol
        for x, y in zip(r["params"], results[0]["params"], strict=True):
            torch.testing.assert_close(x, y, rtol=rtol, atol=1e-6)


def test_fragments_are_equal_pieces_of_the_flat_buffers() -> None:
    """Views (writes go through to the buffers), of equal size to an element, in order; a
    piece spanning two buffers (two dtypes) is a view of each."""
    a, b = torch.arange(7.0), torch.arange(5.0, dtype=torch.float64)
    pieces = fragment_slices([a, b], 3)
    assert [[t.numel() for t in piece] for piece in pieces] == [[4], [3, 1], [4]]
    assert torch.equal(torch.cat([torch.cat([t.double() for t in p]) for p in pieces]),
                       torch.cat([a.double(), b]))  # fmt: skip
    pieces[1][1].fill_(-1.0)
    assert b[0] == -1.0
    assert [t.numel() for t in fragment_slices([a], 7)[6]] == [1]
    with pytest.raises(ValueError, match="non-empty"):
        fragment_slices([a], 8)
    # the outer steps spread over every H steps, the last fragment's on step H
    assert [first_outer_step(f, 4, 16) for f in range(4)] == [4, 8, 12, 16]
    assert [first_outer_step(f, 3, 8) for f in range(3)] == [3, 5, 8]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("outer", ["average", "slowmo", "diloco"])
def test_each_fragment_takes_the_papers_outer_steps_on_its_own_staggered_steps(
    outer: str,
) -> None:
    """3 fragments of 3 elements, H=6, 4 workers, 14 steps: fragment f's outer steps on
    steps 2, 4 and 6 (mod 6); after step 14 each fragment's elements are what its own
    schedule of outer steps gives, exactly (a power-of-two exponential graph)."""
    n, h, steps = 4, 6, 14
    results = run_workers(n, train(steps, local_steps=h, fragments=3, outer=outer))
    schedule = {0: ([2, 6, 6], 0), 1: ([4, 6], 4), 2: ([6, 6], 2)}  # (periods, tail) by hand
    for rank, r in enumerate(results):
        got = torch.cat(r["params"])
        for f, (periods, tail) in schedule.items():
            want = hand(outer, n, periods, tail, rank)
            torch.testing.assert_close(
                got[3 * f : 3 * f + 3], want[3 * f : 3 * f + 3], rtol=0, atol=1e-12
            )
        assert r["outer_steps"] == [3, 2, 2]
        assert r["snapshot"].outer_steps == 7
        assert r["snapshot"].outer_gradient_norm > 0
    for p in range(3):  # every fragment's weights still add up to n
        assert math.fsum(r["weights"][p] for r in results) == pytest.approx(n, abs=1e-12)


@pytest.mark.timeout(60)
def test_the_link_carries_one_fragment_at_a_time_and_as_many_bytes_in_all() -> None:
    """Two fragments of 1,000 elements: per-step bytes peak at half of what the whole
    model's outer step sends, on twice as many steps; the same bytes in all."""
    n, h, steps = 4, 4, 12

    def fn(fragments: int) -> Any:
        def run(rank: int, node: GossipNode) -> list[int]:
            params = [torch.nn.Parameter(torch.zeros(1000)) for _ in range(2)]
            opt = torch.optim.SGD(params, lr=LR)
            sgp = StreamingSGP(params, opt, node, local_steps=h, fragments=fragments)
            sent = []
            send = node.send

            def counted(messages: Sequence[Message]) -> None:  # the shares' payload bytes
                sent[-1] += sum(m.nbytes for m in messages if m.kind == MessageKind.MASS)
                send(messages)

            node.send = counted  # type: ignore[method-assign]
            for _ in range(steps):
                opt.zero_grad()
                sum((x - rank).pow(2).sum() for x in params).backward()
                sent.append(0)
                sgp.step()
            return sent

        return run

    whole = run_workers(n, fn(1))
    streamed = run_workers(n, fn(2))
    model_bytes = 2 * 1000 * 4
    rounds = 2  # log2(4) push-sum rounds per outer step, one share each
    for a, b in zip(whole, streamed, strict=True):
        # step 1 averages every fragment at the start (start-up rounds): left out here
        assert [s > 0 for s in a[1:]] == [(t + 1) % h == 0 for t in range(1, steps)]
        assert [s > 0 for s in b[1:]] == [(t + 1) % (h // 2) == 0 for t in range(1, steps)]
        assert max(a[1:]) == rounds * model_bytes
        assert max(b[1:]) == rounds * model_bytes // 2
        assert sum(a[1:]) == sum(b[1:]) == 3 * rounds * model_bytes  # steps 4, 8, 12


@pytest.mark.timeout(60)
def test_a_streamed_checkpoint_resumes_bit_identically() -> None:
    n, h = 2, 4
    saved: dict[int, dict[str, Any]] = {}

    def step(params: list[torch.nn.Parameter], sgp: StreamingSGP, rank: int) -> None:
        sgp.zero_grad()
        sum(0.5 * (x - target(rank, p)).pow(2).sum() for p, x in enumerate(params)).backward()
        sgp.step()

    def first(rank: int, node: GossipNode) -> list[torch.Tensor]:
        params = model()
        opt = torch.optim.SGD(params, lr=LR, momentum=0.5)
        sgp = StreamingSGP(params, opt, node, local_steps=h, fragments=2, outer="diloco")
        for s in range(11):
            if s == 5:  # fragment 0 three steps past its outer step (step 2), fragment 1 one
                saved[rank] = copy.deepcopy(sgp.state_dict())
            step(params, sgp, rank)
        return [x.detach().clone() for x in params]

    def resumed(rank: int, node: GossipNode) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(x.detach() + 7.0) for x in model()]
        opt = torch.optim.SGD(params, lr=LR, momentum=0.5)
        sgp = StreamingSGP(params, opt, node, local_steps=h, fragments=2, outer="diloco")
        sgp.load_state_dict(saved[rank])
        assert sgp.steps == 5
        for _ in range(6):
            step(params, sgp, rank)
        return [x.detach().clone() for x in params]

    want = run_workers(n, first)
    assert [s["local"]["inner"] for s in saved[0]["fragments"]] == [3, 1]
    got = run_workers(n, resumed)
    for a, b in zip(want, got, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)

    def refused(rank: int, node: GossipNode) -> None:
        params = model()
        opt = torch.optim.SGD(params, lr=LR, momentum=0.5)
        sgp = StreamingSGP(params, opt, node, local_steps=h, fragments=3, outer="diloco")
        with pytest.raises(GossipError, match="number of fragments"):
            sgp.load_state_dict(saved[rank])

    def corrupt(rank: int, node: GossipNode) -> None:
        """The last fragment's outer optimizer differs: refused before the first loads."""
        params = model()
        opt = torch.optim.SGD(params, lr=LR, momentum=0.5)
        sgp = StreamingSGP(params, opt, node, local_steps=h, fragments=2, outer="diloco")
        other = copy.deepcopy(saved[rank])
        other["fragments"][1]["local"]["outer"]["param_groups"][0]["lr"] = 0.5
        with pytest.raises(GossipError, match="other settings"):
            sgp.load_state_dict(other)
        other = copy.deepcopy(saved[rank])
        del other["fragments"][1]["next_seq"]
        with pytest.raises(GossipError, match="lacks next_seq"):
            sgp.load_state_dict(other)
        assert (sgp.steps, sgp.parts[0].round, opt.state_dict()["state"]) == (0, 0, {})

    run_workers(1, refused)
    run_workers(1, corrupt)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "codec", ["none", "int8:4,min=0", "int8:4,min=0,ref", "int8:4,min=0,ref=3"]
)
def test_overlapped_streaming_on_six_workers_loses_no_mass_and_ends_in_one_model(
    codec: str,
) -> None:
    """Approximate averages (6 workers), overlapped, compressed: no fragment loses weight,
    and ``consensus()`` makes every fragment agree (``min=0``: the test model's pieces are
    quantized, not sent raw as tensors under 64 elements are by default). Difference
    coding (``ref``) keeps one reference per fragment and link, whose shares are numbered
    in the link's one series with the other fragments' (``References.passed``; before it,
    every difference-coded share after a link's first was refused and the job timed out);
    nothing is refused but copies."""
    n, h = 6, 4

    def fn(rank: int, node: GossipNode) -> dict[str, Any]:
        params = model()
        opt = torch.optim.SGD(params, lr=LR)
        sgp = StreamingSGP(
            params, opt, node, local_steps=h, fragments=3, outer="slowmo",
            outer_overlap=True, compression=codec,
        )  # fmt: skip
        for _ in range(13):
            opt.zero_grad()
            sum(0.5 * (x - target(rank, p)).pow(2).sum() for p, x in enumerate(params)).backward()
            sgp.step()
        sgp.outer_wait()
        weights = [part.weight for part in sgp.parts]
        disagreement = sgp.consensus()
        # (copies of shares sent again while their acknowledgement was on its way are
        # refused as duplicates, as they should be)
        assert not node.snapshot().rejected, node.snapshot().rejected
        assert set(sgp.snapshot().rejected) <= {"duplicate"}, sgp.snapshot().rejected
        return {
            "weights": weights,
            "params": [x.detach().clone() for x in params],
            "disagreement": disagreement,
        }

    results = run_workers(n, fn)
    # consensus() stops once a round changes the models by at most 1e-6 (relative): seen
    # 2e-6 apart with int8 differences (the targets differ by whole units)
    assert_one_model_and_no_mass_lost(results, n, tol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"fragments": 0, "local_steps": 4}, "fragments must be"),
        ({"fragments": 2.0, "local_steps": 4}, "fragments must be"),
        ({"fragments": 10, "local_steps": 16}, "only 9 elements"),
        ({"fragments": 3, "local_steps": 2}, "needs a step of its own"),
        ({"fragments": 2, "local_steps": 0}, "local_steps must be"),
        ({"fragments": 2, "local_steps": 4, "outer_rounds": 0}, "outer_rounds must be"),
    ],
)
def test_bad_streaming_arguments_are_refused(kw: dict[str, Any], match: str) -> None:
    def fn(rank: int, node: GossipNode) -> None:
        params = model()
        with pytest.raises(ValueError, match=match):
            StreamingSGP(params, torch.optim.SGD(params, lr=LR), node, **kw)

    run_workers(1, fn)


@pytest.mark.timeout(30)
def test_a_fragments_skip_notice_is_acknowledged_under_its_own_fingerprint() -> None:
    """A fragment's skip notice ("no mass for you in round k") reaches the receiver under
    the fragment's fingerprint, and the receipt names it: the sender's link, which keeps
    notices by (round, fingerprint), stops sending it again. A receipt under the node's
    own fingerprint would leave it to be sent again for ever."""
    net = InProcNetwork(2)
    configs = [
        GossipConfig.local(2, r, ports=range(40000, 40002), transport="inproc") for r in range(2)
    ]
    notices: queue.Queue[Message] = queue.Queue()
    with (
        GossipNode(configs[0], transport=net.transport(0), settings=FAST) as n0,
        GossipNode(configs[1], transport=net.transport(1), settings=FAST) as n1,
    ):
        n0.subscribe(lambda m: True, fingerprint=1, also=[7])
        n1.subscribe(notices.put, fingerprint=1, also=[7])
        n0.send_skip([1], 5, fingerprint=7)
        notice = notices.get(timeout=5)
        assert (notice.skip, notice.round, notice.fingerprint) == (True, 5, 7)
        assert wait_until(lambda: not n0._links[1].skips), n0._links[1].skips


@pytest.mark.timeout(60)
def test_a_fragment_may_span_two_dtypes() -> None:
    """A float32 and a float64 parameter, 3 fragments: the middle one is a slice of each
    buffer. Every outer step of 4 workers averages each fragment exactly; no weight lost."""
    n, h = 4, 3

    def fn(rank: int, node: GossipNode) -> dict[str, Any]:
        params = [
            torch.nn.Parameter(torch.full((4,), float(rank))),
            torch.nn.Parameter(torch.full((4,), -float(rank), dtype=torch.float64)),
        ]
        opt = torch.optim.SGD(params, lr=LR)
        sgp = StreamingSGP(params, opt, node, local_steps=h, fragments=3, compression="bf16")
        layouts = [[dtype for _, dtype, _ in part.protocol.layout] for part in sgp.parts]
        for _ in range(2 * h):
            opt.zero_grad()
            sum(((x - rank) ** 2).sum() for x in params).backward()
            sgp.step()
        return {
            "layouts": layouts,
            "weights": [part.weight for part in sgp.parts],
            "disagreement": sgp.consensus(tol=1e-9),
            "params": [x.detach().clone() for x in params],
        }

    results = run_workers(n, fn)
    assert results[0]["layouts"] == [
        [torch.float32],
        [torch.float32, torch.float64],
        [torch.float64],
    ]
    assert_one_model_and_no_mass_lost(results, n, tol=1e-9, rtol=1e-6)
    assert results[0]["params"][0].dtype == torch.float32


def test_fragments_mailboxes_count_their_siblings_numbers_as_seen() -> None:
    """Two mailboxes share one sender's sequence numbers, alternately: each counts the
    other's as seen (its floor moves on instead of a gap per number), and an audit takes
    "never received" from both and "folded" only where the owner folded."""
    a, b = Mailbox(), Mailbox()

    def share(seq: int) -> Message:
        return Message(sender=1, receiver=0, round=seq, seq=seq, weight=0.5, tensors=())

    for seq in range(6):
        owner, other = (a, b) if seq % 2 == 0 else (b, a)
        owner.put(share(seq))
        other.seen_elsewhere(1, 0, seq)
    for box in (a, b):
        window = box._seqs[1]
        assert (window.floor, window.seen) == (6, set())
    a.take_mass(max_round=2)  # a folds seqs 0 and 2; 4 waits
    folded_a, never_a = a.folded(1, range(8))
    folded_b, never_b = b.folded(1, range(8))
    assert never_a == never_b == [6, 7]
    assert sorted(set(folded_a) & set(folded_b)) == [0, 2]  # 4 waits in a; b folded none


@pytest.mark.timeout(30)
def test_an_audit_is_answered_for_the_shares_of_every_fragment() -> None:
    """A peer audits shares it wrote off (``OutLink.audit``) by sequence number, whatever
    fragment each belonged to: every share this worker folded is named folded (each
    fragment's mailbox counts its siblings' numbers as seen, and the owner folded it), the
    numbers never sent are named never received."""
    n, steps = 2, 8

    def fn(rank: int, node: GossipNode) -> tuple[int, list[int], list[int]]:
        params = model()
        opt = torch.optim.SGD(params, lr=LR)
        sgp = StreamingSGP(params, opt, node, local_steps=4, fragments=3)
        for _ in range(steps):
            opt.zero_grad()
            sum(0.5 * (x - target(rank, p)).pow(2).sum() for p, x in enumerate(params)).backward()
            sgp.step()
        peer = 1 - rank
        sent = sgp.parts[0].protocol.sequence_numbers()[peer]  # the link's one series
        assert all(part.protocol.sequence_numbers()[peer] == sent for part in sgp.parts)
        node.flush()
        folded, never = sgp._audited(peer, range(sent + 3))
        # a share of fragment 1 that came and waits to be folded: neither (its fold
        # acknowledges it), though fragments 0 and 2 count its number as seen
        part = sgp.parts[1]
        ones = tuple(torch.ones(numel, dtype=dtype) for numel, dtype, _ in part.protocol.layout)
        waiting = Message(
            sender=peer, receiver=rank, round=part.round, seq=sent + 2, weight=0.25,
            tensors=ones, fingerprint=part.fingerprint,
        )  # fmt: skip
        assert sgp._receive(waiting) is True
        assert sgp._audited(peer, [sent + 2]) == ([], [])
        return sent, folded, never

    results = run_workers(n, fn)
    for rank, (_, folded, never) in enumerate(results):
        peer_sent = results[1 - rank][0]
        # every share of the peer's came (synchronous rounds wait for them) and was folded
        assert folded == list(range(peer_sent)), (rank, folded)
        assert never == list(range(peer_sent, peer_sent + 3))
    # the start averages 3 fragments over 2 rounds (1 share each per round on 2 workers),
    # then fragments 0, 1, 2 on steps 1, 3, 4 (mod 4) of 8: 6 outer steps of 1 round each
    assert results[0][0] == 3 * 2 + 6


@pytest.mark.timeout(90)
def test_streaming_workers_detect_a_dead_peer_and_finish_without_it() -> None:
    """Rank 3 of 4 stops dead after 60 steps; the others suspect it, keep the mass of the
    rounds routed to it in every fragment, train on and agree."""
    n, dies, at, steps = 4, 3, 60, 300

    def fn(rank: int, node: GossipNode) -> dict[str, Any]:
        params = model()
        opt = torch.optim.SGD(params, lr=0.05)
        sgp = StreamingSGP(params, opt, node, local_steps=4, fragments=3, timeout=20.0)
        for step in range(steps):
            if rank == dies and step == at:
                node.close(linger=0.0)  # as if killed: no goodbye, its mass is gone
                return {"died": True}
            opt.zero_grad()
            sum(0.5 * (x - target(rank, p)).pow(2).sum() for p, x in enumerate(params)).backward()
            sgp.step()
            time.sleep(0.005)
        suspected = dict(node.peers_lost)
        disagreement = sgp.consensus(tol=1e-10)
        return {
            "died": False,
            "params": [x.detach().clone() for x in params],
            "weights": [part.weight for part in sgp.parts],
            "kept": [part.kept_rounds for part in sgp.parts],
            "disagreement": disagreement,
            "suspected": suspected,
            "mass": sgp.mass_report(),
        }

    results = run_workers(n, fn, join=80, settings=FAST)
    survivors = [r for rank, r in enumerate(results) if rank != dies]
    assert results[dies]["died"]
    for r in survivors:
        assert r["suspected"] == {dies: 1}
        assert r["disagreement"] <= 1e-10
        for x, y in zip(r["params"], survivors[0]["params"], strict=True):
            torch.testing.assert_close(x, y, atol=1e-8, rtol=0)
        assert r["mass"]["suspected"] == [dies]
    for p in range(3):  # each fragment: mass lost with rank 3, never created
        total = math.fsum(r["weights"][p] for r in survivors)
        assert 0 < total < n
        assert any(r["kept"][p] > 0 for r in survivors)  # rounds routed to rank 3 kept
    # the survivors' optimum: the mean of ranks 0-2's targets, pulled a little towards
    # rank 3's by its first 60 steps
    for p in range(3):
        c = sum(target(r, p) for r in range(3)) / 3
        assert bool((survivors[0]["params"][p] - c).abs().max() < 1.0)
    # mass_report: weights and losses as means over the fragments, which add up
    held = math.fsum(r["mass"]["weight"] for r in survivors)
    assert held == pytest.approx(math.fsum(math.fsum(r["weights"]) / 3 for r in survivors))
