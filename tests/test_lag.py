"""Asynchronous SGP: a model that fell far behind does not mix into current ones.

Every model carries how many training steps it holds (``PushSumState.steps``, the push-sum
average of the step counts, sent as ``Message.steps``). With ``lag_limit`` a share more than
that many steps behind the receiver gives its weight but not its model, and a receiver that
fell behind takes the model of a share far ahead (docs/design.md, "Models that fell
behind").
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

import topologies
from gossip_sgp import SGP, GossipNode, Message, wire
from gossip_sgp.errors import WireError
from gossip_sgp.mailbox import Mailbox
from gossip_sgp.protocol import PushSumProtocol
from gossip_sgp.pushsum import PushSumState
from gossip_sgp.wire import MAX_STEPS, all_finite
from tests.threads import run_workers


def test_fold_averages_the_steps_as_it_averages_the_models() -> None:
    state = PushSumState([torch.tensor([3.0, 6.0])], weight=1.0)
    state.steps = 10.0
    state.fold((torch.tensor([9.0, 9.0]),), 3.0, steps=30.0)  # a model at (3, 3), 30 steps
    assert state.steps == pytest.approx(25.0)  # (1 * 10 + 3 * 30) / 4
    torch.testing.assert_close(state.debias()[0], torch.tensor([3.0, 3.75]))
    state.fold((torch.tensor([0.0, 0.0]),), 0.0)  # error feedback: no weight, no steps
    assert state.steps == pytest.approx(25.0)


def test_fold_weight_keeps_the_model_and_adopt_replaces_it() -> None:
    state = PushSumState([torch.tensor([2.0, 4.0])], weight=0.5)  # the model (4, 8)
    state.steps = 100.0
    assert state.fold_weight(1.5)  # a share far behind: its weight, not its model
    assert state.weight == 2.0
    assert state.steps == 100.0
    torch.testing.assert_close(state.debias()[0], torch.tensor([4.0, 8.0]))
    assert state.adopt((torch.tensor([1.0, 1.0]),), 0.25, steps=300.0)  # the model (4, 4)
    assert (state.weight, state.steps) == (2.0, 300.0)
    torch.testing.assert_close(state.debias()[0], torch.tensor([4.0, 4.0]))
    huge = torch.tensor([3e38, 3e38])
    assert not state.adopt((huge,), 1e-3, steps=400.0)  # x would overflow: nothing changes
    assert state.steps == 300.0
    torch.testing.assert_close(state.debias()[0], torch.tensor([4.0, 4.0]))
    big = PushSumState([huge.clone()], weight=1.0)
    assert not big.fold_weight(1.0)  # 2 * 3e38 does not fit a float32: nothing changes
    assert big.weight == 1.0
    torch.testing.assert_close(big.numerator[0], huge)
    tiny = PushSumState([torch.zeros(3)], weight=5e-324)  # (1 + 5e-324) / 5e-324 is inf
    assert not tiny.fold_weight(1.0)
    assert all_finite(tiny.numerator[0])
    assert tiny.weight == 5e-324


def _message(sender: int, seq: int, value: float, weight: float, steps: int) -> Message:
    return Message(
        sender=sender,
        receiver=0,
        round=seq,
        seq=seq,
        weight=weight,
        tensors=(torch.full((2,), value * weight),),
        steps=steps,
    )


def test_the_mailbox_sets_apart_shares_far_behind_and_far_ahead() -> None:
    box = Mailbox(coalesce=True)
    box.lag_limit = 50
    box.own_steps = lambda: 200.0
    box.put(_message(1, 0, 5.0, 0.5, 120))  # 80 behind: weight only
    box.put(_message(2, 0, 7.0, 0.25, 180))  # 20 behind: mixes
    box.put(_message(3, 0, 9.0, 0.5, 300))  # 100 ahead: set apart
    box.put(_message(3, 1, 11.0, 0.5, 320))
    assert box.lagged == {"behind": 1, "ahead": 2}
    assert box.pending_weight() == pytest.approx(1.75)
    with pytest.raises(RuntimeError, match="take_mass"):
        box.take()
    taken = box.take_mass()
    assert taken.behind == 0.5
    assert taken.share is not None
    assert (taken.share[1], taken.steps) == (0.25, 180.0)
    torch.testing.assert_close(taken.share[0][0], torch.full((2,), 7.0 * 0.25))
    assert taken.ahead is not None
    assert (taken.ahead[1], taken.ahead_steps) == (1.0, 310.0)
    torch.testing.assert_close(taken.ahead[0][0], torch.full((2,), 10.0))  # (4.5 + 5.5)
    assert len(box.pop_receipts()) == 4  # all four are folded, so acknowledged
    assert not box.take_mass()


def test_a_protocol_behind_takes_the_model_ahead_and_keeps_it_from_one_behind() -> None:
    """Two shares into rank 0 (at 100 steps, model 1): one ahead takes over the model, and
    the one that mixed before is now far behind the new model: it gives its weight only."""
    topology = topologies.get("exponential", 4)
    state = PushSumState([torch.full((2,), 1.0)], weight=1.0)
    state.steps = 100.0
    protocol = PushSumProtocol(0, topology, state, coalesce=True)
    protocol.mailbox.lag_limit = 50
    protocol.receive(_message(1, 0, 3.0, 0.5, 120))  # within 50 of 100: mixes
    protocol.receive(_message(2, 0, 8.0, 0.5, 400))  # 300 ahead: its model is taken
    assert protocol.absorb()
    assert state.weight == pytest.approx(2.0)
    assert state.steps == 400.0
    torch.testing.assert_close(state.debias()[0], torch.full((2,), 8.0))
    assert protocol.mailbox.lagged == {"ahead": 1, "behind": 1}


def test_a_light_share_far_ahead_is_taken_too_and_steps_are_capped() -> None:
    """Mass far ahead replaces the model however light (mixed by weight, it would leave a
    blend of the old model and the current one); a step count beyond what the wire carries
    is refused there, and a node's own is capped when it sends."""
    state = PushSumState([torch.full((2,), 1.0)], weight=1.0)
    state.steps = 100.0
    protocol = PushSumProtocol(0, topologies.get("exponential", 4), state, coalesce=True)
    protocol.mailbox.lag_limit = 50
    protocol.receive(_message(1, 0, 65.0, 1.0 / 1024, 400))
    assert protocol.absorb()
    assert state.steps == 400.0
    assert state.weight == pytest.approx(1.0 + 1.0 / 1024)
    torch.testing.assert_close(state.debias()[0], torch.full((2,), 65.0))
    with pytest.raises(WireError):
        wire.encode(_message(1, 1, 1.0, 0.5, MAX_STEPS + 1))
    protocol.receive(_message(1, 1, 2.0, 0.5, MAX_STEPS))  # heavy enough: taken
    assert protocol.absorb()
    assert state.steps == MAX_STEPS
    state.steps += 10.0
    for message in protocol.emit(5):
        assert message.steps == MAX_STEPS
        wire.encode(message)


def test_kept_per_round_only_picked_shares_far_behind_are_set_apart() -> None:
    """In ``consensus()`` (per-round storage): a peer's training share far behind gives its
    weight only; the consensus rounds' shares, and shares far ahead, mix as usual."""
    box = Mailbox(coalesce=False)
    box.lag_limit = 50
    box.own_steps = lambda: 200.0
    box.compared = lambda message: message.round < 10  # "sent while it trained"
    box.put(_message(1, 3, 5.0, 0.5, 120))  # a training share, 80 behind: weight only
    box.put(_message(2, 4, 7.0, 0.25, 400))  # a training share far ahead: mixes
    box.put(_message(3, 12, 9.0, 0.5, 100))  # a consensus round's share: mixes
    assert box.lagged == {"behind": 1}
    assert box.pending_weight() == pytest.approx(1.25)
    taken = box.take_mass()
    assert taken.behind == 0.5
    assert taken.ahead is None
    assert taken.share is not None
    assert taken.share[1] == pytest.approx(0.75)
    torch.testing.assert_close(taken.share[0][0], torch.full((2,), 7.0 * 0.25 + 9.0 * 0.5))
    assert taken.steps == pytest.approx((400 * 0.25 + 100 * 0.5) / 0.75)
    assert len(box.pop_receipts()) == 3


@pytest.mark.timeout(90)
@pytest.mark.parametrize("lag_limit", [50, None])
def test_a_worker_stopped_for_100_steps_does_not_pull_the_others_back(
    lag_limit: int | None,
) -> None:
    """Asynchronous, 4 workers; each step adds 1 to every parameter, so a model's value
    counts the steps it carries. Rank 3 stops after the start-up barrier while ranks 0-2
    take 100 steps, then all go on for 60 more. Among ranks 0-2 a fold mixes models no
    lower than the lowest of theirs at step 100 (less the few steps a share in flight is
    old). Rank 3's first shares carry its model of step ~5 and much of the job's weight
    (its own and the shares that waited for it): mixed in, they would set a worker back by
    tens of steps; with ``lag_limit`` their weight comes without the model, and rank 3
    takes a current model as soon as one reaches it. ``None`` is the control."""
    n, first, then = 4, 100, 60
    stopped = threading.Barrier(n - 1)
    resume = threading.Event()
    done = threading.Barrier(n)

    def fn(rank: int, node: GossipNode) -> dict[str, Any]:
        x = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
        sgp = SGP([x], torch.optim.SGD([x], lr=1.0), node, staleness=None, lag_limit=lag_limit)

        def step() -> float:
            x.grad = torch.full_like(x, -1.0)
            sgp.step()
            time.sleep(0.01)  # a step's time: shares and acknowledgements flow
            return float(x.detach()[0])

        reached = 0.0
        if rank == n - 1:
            while sgp.round < sgp._start_rounds:
                step()
            resume.wait(60)
        else:
            for _ in range(first):
                reached = step()
            stopped.wait(60)  # every model of ranks 0-2 is in `reached` before rank 3 goes on
            resume.set()
        lowest = min(step() for _ in range(then))
        result = {"reached": reached, "lowest": lowest, "lagged": dict(node_lagged(sgp))}
        done.wait(60)
        return result

    results = run_workers(n, fn)
    others = results[: n - 1]
    floor = min(r["reached"] for r in others)
    lowest = min(r["lowest"] for r in others)
    if lag_limit is None:  # the control: the stale model set somebody back
        assert lowest < floor - 12, results
        return
    assert lowest > floor - 8, results  # no model of rank 3's 100 steps behind got in
    assert sum(r["lagged"].get("behind", 0) for r in others) >= 1, results
    assert results[n - 1]["lagged"].get("ahead", 0) >= 1, results


def node_lagged(sgp: SGP) -> dict[str, int]:
    return dict(sgp.snapshot().lagged)
