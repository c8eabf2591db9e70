"""Push-sum state math: split, fold, de-bias, on every supported dtype; shares off the
schedule."""

from __future__ import annotations

import pytest
import torch

import topologies
from gossip_sgp.protocol import PushSumProtocol
from gossip_sgp.pushsum import PushSumState


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_split_keeps_mass(dtype: torch.dtype) -> None:
    x = torch.arange(8, dtype=dtype)
    state = PushSumState([x.clone()], weight=1.0)
    shares = state.split(0.5, {3: 0.25, 5: 0.25})
    assert set(shares) == {3, 5}
    total = state.numerator[0].double() + sum(t[0].double() for t, _ in shares.values())
    assert torch.allclose(total, x.double(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-12)
    assert state.weight + sum(w for _, w in shares.values()) == 1.0
    for tensors, w in shares.values():
        assert w == 0.25
        assert tensors[0].dtype == dtype


def test_split_returns_fresh_tensors() -> None:
    state = PushSumState([torch.ones(4)])
    shares = state.split(0.5, {1: 0.5})
    shares[1][0][0].fill_(99.0)  # the receiver owns its share
    assert torch.equal(state.numerator[0], torch.full((4,), 0.5))


def test_fold_and_debias() -> None:
    state = PushSumState([torch.tensor([2.0, 4.0], dtype=torch.float64)], weight=0.5)
    state.fold([torch.tensor([1.0, 1.0], dtype=torch.float64)], 0.5)
    assert state.weight == 1.0
    (z,) = state.debias()
    assert z.tolist() == [3.0, 5.0]
    out = [torch.empty(2, dtype=torch.float64)]
    state.debias(out=out)
    assert out[0].tolist() == [3.0, 5.0]


def test_fold_casts_received_dtype() -> None:
    state = PushSumState([torch.zeros(3, dtype=torch.bfloat16)])
    state.fold([torch.ones(3, dtype=torch.float32)], 1.0)
    assert state.numerator[0].dtype == torch.bfloat16
    assert state.weight == 2.0


def test_pairwise_average_is_exact() -> None:
    a = PushSumState([torch.tensor([1.0, 3.0], dtype=torch.float64)])
    b = PushSumState([torch.tensor([5.0, 7.0], dtype=torch.float64)])
    to_b = a.split(0.5, {1: 0.5})[1]
    to_a = b.split(0.5, {0: 0.5})[0]
    a.fold(*to_a)
    b.fold(*to_b)
    assert a.debias()[0].tolist() == b.debias()[0].tolist() == [3.0, 5.0]


@pytest.mark.parametrize(
    ("tensors", "weight"),
    [
        ([torch.zeros(2, 2)], 1.0),
        ([torch.zeros(3, dtype=torch.int64)], 1.0),
        ([torch.zeros(3)], 0.0),
        ([torch.zeros(3)], float("nan")),
    ],
)
def test_rejects_bad_state(tensors: list[torch.Tensor], weight: float) -> None:
    with pytest.raises(ValueError, match="push-sum"):
        PushSumState(tensors, weight=weight)


def test_fold_rejects_wrong_group_count() -> None:
    state = PushSumState([torch.zeros(2), torch.zeros(3)])
    with pytest.raises(ValueError, match="expected 2 tensors"):
        state.fold([torch.zeros(2)], 1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16, torch.float64])
def test_a_fold_that_would_overflow_is_taken_out_again(dtype: torch.dtype) -> None:
    """Finite plus finite can be infinite: ``fold_finite`` leaves ``x`` finite and ``w`` as
    it was. Where the sum did not overflow ``x`` comes back up to rounding (exactly here),
    where it did it is 0. Fails with ``fold`` in its place (x holds inf)."""
    top = torch.finfo(dtype).max
    x = torch.tensor([top / 2, 1.0, -top / 2, 2.0], dtype=dtype)
    state = PushSumState([x.clone()], weight=1.0)
    assert state.fold_finite([torch.full((4,), top / 4, dtype=dtype)], 0.5)
    assert state.weight == 1.5
    state = PushSumState([x.clone()], weight=1.0)
    share = torch.tensor([top * 0.75, 0.0, -top * 0.75, 0.0], dtype=dtype)
    assert not state.fold_finite([share], 0.5)
    assert state.weight == 1.0
    assert torch.equal(state.numerator[0], torch.tensor([0.0, 1.0, 0.0, 2.0], dtype=dtype))


@pytest.mark.parametrize("codec", ["none", "int8,ref"])
def test_shares_given_off_the_schedule_are_numbered_and_coded_like_the_links_others(
    codec: str,
) -> None:
    """``PushSumProtocol.give`` (answers to stragglers, AD-PSGD answers) splits the mass as
    asked, continues each link's sequence and codes the share with the link's codec: a
    share built by hand would reuse a sequence number (a duplicate to the receiver) or
    break a ``,ref`` link's reference."""
    topo = topologies.get("exponential", 4)
    start = torch.randn(300, dtype=torch.float64)
    state = PushSumState([start.clone()])
    protocol = PushSumProtocol(0, topo, state, compression=codec)
    (first,) = protocol.emit(0)  # to rank 1
    given = protocol.give({1: 0.25, 2: 0.125}, 0, adpsgd=2)
    assert [(m.receiver, m.seq, m.adpsgd) for m in given] == [(1, 1, 2), (2, 0, 2)]
    assert all(m.codec == protocol.codec.spec for m in given)
    assert sum(m.weight for m in [first, *given]) + state.weight == pytest.approx(1.0, abs=0)
    receivers = {
        r: PushSumProtocol(r, topo, PushSumState([torch.zeros(300, dtype=torch.float64)]))
        for r in (1, 2)
    }
    total = state.numerator[0].clone()
    for m in [first, *given]:
        total += receivers[m.receiver].decode(m).tensors[0]
    torch.testing.assert_close(total, start, rtol=0, atol=1e-12)  # no mass made or lost
    (answer,) = protocol.give({3: 1 / 1024}, 5, answer=True)
    assert (answer.receiver, answer.round, answer.answer) == (3, 5, True)
    for bad in ({}, {1: 0.0}, {1: 1.0}, {1: 0.5, 2: 0.5}):
        with pytest.raises(ValueError, match="fractions"):
            protocol.give(bad, 0)
