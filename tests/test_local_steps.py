"""Local steps with an outer optimizer: ``SGP(..., local_steps=H, outer=...)``.

Worker ``i`` minimises ``0.5 * ||x - c_i||^2`` with plain SGD, so ``H`` inner steps from
``x0`` end at ``c_i + (x0 - c_i) * (1 - lr)**H`` and the outer step can be computed by hand:
the pseudo-gradient is ``delta = x0 - mean_i(x_i) = (x0 - mean(c)) * (1 - (1 - lr)**H)``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

import topologies
from gossip_sgp import SGP, GossipError, GossipNode
from gossip_sgp.sgp import Lockstep, _averaging_rounds
from tests.threads import run_workers

LR = 0.1


def targets(rank: int) -> torch.Tensor:
    return torch.tensor([float(rank), -2.0 * rank, 0.5], dtype=torch.float64)


def hand(outer: str, n: int, h: int, outer_steps: int) -> torch.Tensor:
    """The reference point after ``outer_steps`` outer steps, as the papers write them."""
    c = sum(targets(r) for r in range(n)) / n
    x0 = torch.zeros(3, dtype=torch.float64)
    u = torch.zeros(3, dtype=torch.float64)
    for _ in range(outer_steps):
        delta = (x0 - c) * (1 - (1 - LR) ** h)
        if outer == "average":
            x0 = x0 - delta
        elif outer == "slowmo":  # u <- beta u + delta / gamma; x0 <- x0 - alpha gamma u
            alpha, beta = 1.0, 0.5
            u = beta * u + delta / LR
            x0 = x0 - alpha * LR * u
        else:  # diloco: Nesterov, outer lr 0.7, momentum 0.9
            eta, mu = 0.7, 0.9
            u = mu * u + delta
            x0 = x0 - eta * (delta + mu * u)
    return x0


def train(steps: int, **kw: Any) -> Any:
    def fn(rank: int, node: GossipNode) -> dict[str, Any]:
        x = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        opt = torch.optim.SGD([x], lr=LR)
        sgp = SGP([x], opt, node, **kw)
        for _ in range(steps):
            opt.zero_grad()
            (0.5 * (x - targets(rank)).pow(2).sum()).backward()
            sgp.step()
        return {
            "x": x.detach().clone(),
            "weight": sgp.weight,
            "outer_steps": sgp.outer_steps,
            "snapshot": sgp.snapshot(),
            "round": sgp.round,
        }

    return fn


@pytest.mark.timeout(60)
@pytest.mark.parametrize("outer", ["average", "slowmo", "diloco"])
def test_outer_steps_match_the_papers_updates(outer: str) -> None:
    n, h = 4, 3
    results = run_workers(n, train(2 * h, local_steps=h, outer=outer))
    want = hand(outer, n, h, 2)
    for r in results:
        torch.testing.assert_close(r["x"], want, rtol=0, atol=1e-12)
        assert r["outer_steps"] == 2
        assert r["snapshot"].outer_steps == 2
        assert r["snapshot"].outer_gradient_norm > 0
    assert math.fsum(r["weight"] for r in results) == pytest.approx(n, abs=1e-12)
    # rounds: the start (4 on 4 workers) and 2 per outer step (log2(4), exact), none between
    assert [r["round"] for r in results] == [4 + 2 * 2] * n


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n", [4, 8])
def test_an_outer_step_averages_distinct_models_exactly_on_a_power_of_two(n: int) -> None:
    """Models that drift apart (each worker pulled to its own target) are averaged exactly
    at each outer step; the first step averages the workers' distinct starting models."""

    def start(rank: int) -> torch.Tensor:
        return torch.randn(50, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)

    def fn(rank: int, node: GossipNode) -> list[torch.Tensor]:
        x = torch.nn.Parameter(start(rank))
        opt = torch.optim.SGD([x], lr=LR)
        sgp = SGP([x], opt, node, local_steps=2)
        seen = []
        for _ in range(4):
            opt.zero_grad()
            (0.5 * (x - float(rank)).pow(2).sum()).backward()
            sgp.step()
            seen.append(x.detach().clone())
        return seen

    results = run_workers(n, fn)
    for step in (1, 3):  # after each outer step every worker holds the same model
        for r in results[1:]:
            torch.testing.assert_close(r[step], results[0][step], rtol=0, atol=1e-12)
    assert not torch.allclose(results[0][0], results[1][0])  # inner steps drift apart
    # By hand: the first step averages the starts (its gradient was taken at each worker's
    # own start), two inner steps pull each towards its rank, the outer step averages.
    mean = sum(start(r) for r in range(n)) / n
    ends = []
    for r in range(n):
        x = mean - LR * (start(r) - r)
        ends.append(x - LR * (x - r))
    torch.testing.assert_close(results[0][1], sum(ends) / n, rtol=0, atol=1e-12)


def test_the_default_rounds_are_exact_where_they_can_be() -> None:
    assert _averaging_rounds(topologies.get("exponential", 4)) == 2
    assert _averaging_rounds(topologies.get("exponential", 8)) == 3
    assert _averaging_rounds(topologies.get("exponential", 1)) == 0
    # not a power of two: a block, every worker hears from every other
    assert _averaging_rounds(topologies.get("exponential", 6)) == 4


@pytest.mark.timeout(60)
def test_an_approximate_average_on_six_workers_loses_no_mass() -> None:
    n, h = 6, 3
    results = run_workers(n, train(2 * h, local_steps=h))
    assert math.fsum(r["weight"] for r in results) == pytest.approx(n, abs=1e-12)
    want = hand("average", n, h, 2)  # the targets span 0 to -10: close, not exact
    for r in results:  # (synchronous: the same numbers every run)
        torch.testing.assert_close(r["x"], want, rtol=0, atol=0.25)
        assert not torch.allclose(r["x"], want, rtol=0, atol=1e-9)


@pytest.mark.timeout(60)
def test_a_checkpoint_holds_the_outer_state_and_resumes_bit_identically() -> None:
    n, h = 2, 3
    saved: dict[int, dict[str, Any]] = {}

    def first(rank: int, node: GossipNode) -> torch.Tensor:
        x = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        opt = torch.optim.SGD([x], lr=LR, momentum=0.5)
        sgp = SGP([x], opt, node, local_steps=h, outer="diloco")
        for step in range(9):
            if step == 4:  # one outer step and one inner step in
                # a copy, as torch.save makes: state dicts hold the optimizers' buffers
                saved[rank] = copy.deepcopy(sgp.state_dict())
                assert saved[rank]["local"]["inner"] == 1
                assert saved[rank]["local"]["outer_steps"] == 1
            opt.zero_grad()
            (0.5 * (x - targets(rank)).pow(2).sum()).backward()
            sgp.step()
        return x.detach().clone()

    def resumed(rank: int, node: GossipNode) -> torch.Tensor:
        x = torch.nn.Parameter(torch.full((3,), 7.0, dtype=torch.float64))
        opt = torch.optim.SGD([x], lr=LR, momentum=0.5)
        sgp = SGP([x], opt, node, local_steps=h, outer="diloco")
        sgp.load_state_dict(saved[rank])
        for _ in range(5):
            opt.zero_grad()
            (0.5 * (x - targets(rank)).pow(2).sum()).backward()
            sgp.step()
        return x.detach().clone()

    want = run_workers(n, first)
    got = run_workers(n, resumed)
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)


@pytest.mark.timeout(30)
def test_a_checkpoint_of_another_mode_or_outer_optimizer_is_refused_and_changes_nothing() -> None:
    def fn(rank: int, node: GossipNode) -> None:
        x = torch.nn.Parameter(torch.zeros(3))
        sgp = SGP([x], torch.optim.SGD([x], lr=0.1), node, local_steps=2, outer="average")
        for _ in range(3):
            sgp.step()
        local = sgp.state_dict()
        plain = {k: v for k, v in local.items() if k != "local"}
        with pytest.raises(GossipError, match="local-steps"):
            sgp.load_state_dict(plain)
        diloco = copy.deepcopy(local)
        diloco["local"]["outer"]["param_groups"][0].update(lr=0.7, momentum=0.9, nesterov=True)
        diloco["round"] = 99
        with pytest.raises(GossipError, match="other settings"):
            sgp.load_state_dict(diloco)
        assert sgp.round == local["round"]  # checked before anything changed
        sgp.load_state_dict(local)  # the same settings: fine

    def other(rank: int, node: GossipNode) -> None:
        x = torch.nn.Parameter(torch.zeros(3))
        sgp = SGP([x], torch.optim.SGD([x], lr=0.1), node)
        with pytest.raises(GossipError, match="local-steps"):
            sgp.load_state_dict({**sgp.state_dict(), "local": {}})

    run_workers(1, fn)
    run_workers(1, other)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"local_steps": 0}, "local_steps must be an integer >= 1"),
        ({"local_steps": 2, "staleness": None}, "staleness=0"),
        ({"local_steps": 2, "staleness": 1}, "staleness=0"),
        ({"outer": "diloco"}, "go with local_steps"),
        ({"local_steps": 2, "outer": "adam"}, "unknown outer optimizer 'adam'"),
        ({"local_steps": 2, "outer_rounds": 0}, "outer_rounds must be"),
        ({"local_steps": 2, "policy": Lockstep(0)}, "no policy="),
    ],
)
def test_bad_local_step_arguments_are_refused(kw: dict[str, Any], match: str) -> None:
    def fn(rank: int, node: GossipNode) -> None:
        x = torch.nn.Parameter(torch.zeros(3))
        with pytest.raises(ValueError, match=match):
            SGP([x], torch.optim.SGD([x], lr=0.1), node, **kw)

    run_workers(1, fn)
