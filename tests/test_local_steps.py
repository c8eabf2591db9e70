"""Local steps with an outer optimizer: ``SGP(..., local_steps=H, outer=...)``.

Worker ``i`` minimises ``0.5 * ||x - c_i||^2`` with plain SGD, so ``H`` inner steps from
``x0`` end at ``c_i + (x0 - c_i) * (1 - lr)**H`` and the outer step can be computed by hand:
the pseudo-gradient is ``delta = x0 - mean_i(x_i) = (x0 - mean(c)) * (1 - (1 - lr)**H)``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

import topologies
from gossip_sgp import SGP, GossipError, GossipNode
from gossip_sgp.outer import OuterFactory, diloco, slowmo
from gossip_sgp.sgp import Lockstep, _averaging_rounds
from tests.threads import run_workers

LR = 0.1


def targets(rank: int) -> torch.Tensor:
    return torch.tensor([float(rank), -2.0 * rank, 0.5], dtype=torch.float64)


def outer_update(
    outer: str, x0: torch.Tensor, delta: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One outer step as the papers write it: the new reference point and momentum."""
    if outer == "average":
        return x0 - delta, u
    if outer == "slowmo":  # u <- beta u + delta / gamma; x0 <- x0 - alpha gamma u
        alpha, beta = 1.0, 0.5
        u = beta * u + delta / LR
        return x0 - alpha * LR * u, u
    eta, mu = 0.7, 0.9  # diloco: Nesterov, outer lr 0.7, momentum 0.9
    u = mu * u + delta
    return x0 - eta * (delta + mu * u), u


def hand(outer: str, n: int, h: int, outer_steps: int) -> torch.Tensor:
    """The reference point after ``outer_steps`` outer steps, as the papers write them."""
    c = sum(targets(r) for r in range(n)) / n
    x0 = torch.zeros(3, dtype=torch.float64)
    u = torch.zeros(3, dtype=torch.float64)
    for _ in range(outer_steps):
        x0, u = outer_update(outer, x0, (x0 - c) * (1 - (1 - LR) ** h), u)
    return x0


def hand_overlapped(outer: str, h: int, landed: list[list[int]]) -> list[torch.Tensor]:
    """Every worker's model at the end of an ``outer_overlap`` run, computed by hand from
    when each worker's outer steps landed: ``landed[i][s]`` is worker i's ``outer_steps``
    after step s (the last entry: after ``state_dict()``, which lands the one in flight).

    At the end of every H steps each worker lands the averaging still in flight, then
    launches one of its model ``x_end``; the outer step is computed from the mean of those
    models, and where it lands the model moves by ``x0_new - x_end``."""
    n, steps = len(landed), len(landed[0]) - 1
    x = [torch.zeros(3, dtype=torch.float64) for _ in range(n)]
    x0, u = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    queue: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(n)]

    def land(i: int) -> None:
        x_end, new = queue[i].pop(0)
        x[i] = x[i] - x_end + new

    for s in range(steps + 1):
        end = s < steps and (s + 1) % h == 0
        counts = [landed[i][s] - (landed[i][s - 1] if s else 0) for i in range(n)]
        for i in range(n):
            if s < steps:
                x[i] = x[i] - LR * (x[i] - targets(i))
            if end and queue[i]:  # the next launch waits for the one in flight
                assert counts[i] >= 1, f"worker {i} launched at step {s} with one in flight"
                land(i)
                counts[i] -= 1
            if not end:
                for _ in range(counts[i]):
                    land(i)
                counts[i] = 0
        if end:
            x0, u = outer_update(outer, x0, x0 - sum(x) / n, u)
            for i in range(n):
                queue[i].append((x[i].clone(), x0))
                for _ in range(counts[i]):  # landed within its own launch step
                    land(i)
    assert not any(queue), "an outer step never landed"
    return x


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


@pytest.mark.timeout(60)
@pytest.mark.parametrize("outer", ["average", "slowmo", "diloco"])
def test_overlapped_outer_steps_match_a_hand_computation(outer: str) -> None:
    """``outer_overlap``: whenever each worker's averaging landed (it depends on timing,
    so it is recorded), the models are exactly what the update rule gives."""
    n, h, steps = 4, 3, 11

    def fn(rank: int, node: GossipNode) -> dict[str, Any]:
        x = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        opt = torch.optim.SGD([x], lr=LR)
        sgp = SGP([x], opt, node, local_steps=h, outer=outer, outer_overlap=True)
        landed = []
        for _ in range(steps):
            opt.zero_grad()
            (0.5 * (x - targets(rank)).pow(2).sum()).backward()
            sgp.step()
            landed.append(sgp.outer_steps)
        state = sgp.state_dict()  # lands the averaging in flight
        landed.append(sgp.outer_steps)
        assert state["local"]["outer_steps"] == sgp.outer_steps == steps // h
        return {"x": x.detach().clone(), "landed": landed, "weight": sgp.weight}

    results = run_workers(n, fn)
    want = hand_overlapped(outer, h, [r["landed"] for r in results])
    for r, w in zip(results, want, strict=True):
        torch.testing.assert_close(r["x"], w, rtol=0, atol=1e-12)
    assert math.fsum(r["weight"] for r in results) == pytest.approx(n, abs=1e-12)


@pytest.mark.timeout(60)
def test_overlapped_outer_steps_land_while_the_next_inner_steps_run() -> None:
    """With inner steps of 30 ms and two rounds over an in-process link, an averaging lands
    before the next outer step needs it (not at the end of the H steps, waiting)."""
    n, h, cycles = 4, 6, 3

    def fn(rank: int, node: GossipNode) -> list[tuple[int, int]]:
        x = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        opt = torch.optim.SGD([x], lr=LR)
        sgp = SGP([x], opt, node, local_steps=h, outer_overlap=True)
        landed = []  # (step within its cycle, outer steps landed in that step)
        for step in range(h * cycles):
            opt.zero_grad()
            (0.5 * (x - targets(rank)).pow(2).sum()).backward()
            time.sleep(0.03)  # the inner step's compute
            before = sgp.outer_steps
            sgp.step()
            if sgp.outer_steps > before:
                landed.append((step % h, sgp.outer_steps - before))
        sgp.outer_wait()
        assert sgp.outer_steps == cycles
        return landed

    results = run_workers(n, fn)
    # The first two launches landed while training (the last may have, in its own step).
    assert all(sum(c for _, c in r) in (cycles - 1, cycles) for r in results), results
    mid_cycle = sum(c for r in results for step, c in r if step != h - 1)
    assert mid_cycle >= 1, results  # 8 landings; each had 5 steps (150 ms) to come in


@pytest.mark.timeout(60)
def test_overlapped_outer_steps_on_six_workers_lose_no_mass() -> None:
    n, h = 6, 3

    def fn(rank: int, node: GossipNode) -> dict[str, Any]:
        x = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        opt = torch.optim.SGD([x], lr=LR, momentum=0.5)
        sgp = SGP([x], opt, node, local_steps=h, outer="slowmo", outer_overlap=True)
        for _ in range(3 * h + 1):
            opt.zero_grad()
            (0.5 * (x - targets(rank)).pow(2).sum()).backward()
            sgp.step()
        disagreement = sgp.consensus(tol=1e-9)  # lands the averaging in flight first
        return {"x": x.detach().clone(), "weight": sgp.weight, "d": disagreement}

    results = run_workers(n, fn)
    assert math.fsum(r["weight"] for r in results) == pytest.approx(n, abs=1e-12)
    for r in results:
        assert r["d"] <= 1e-9
        torch.testing.assert_close(r["x"], results[0]["x"], rtol=0, atol=1e-6)


@pytest.mark.timeout(60)
def test_an_overlapped_checkpoint_lands_the_averaging_in_flight_and_resumes() -> None:
    n, h = 2, 3
    saved: dict[int, dict[str, Any]] = {}

    def first(rank: int, node: GossipNode) -> list[int]:
        x = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        opt = torch.optim.SGD([x], lr=LR)
        sgp = SGP([x], opt, node, local_steps=h, outer="diloco", outer_overlap=True)
        landed = []
        for _ in range(h + 1):  # one averaging launched, maybe landed
            opt.zero_grad()
            (0.5 * (x - targets(rank)).pow(2).sum()).backward()
            sgp.step()
            landed.append(sgp.outer_steps)
        saved[rank] = copy.deepcopy(sgp.state_dict())
        landed.append(sgp.outer_steps)
        assert saved[rank]["local"]["outer_steps"] == 1  # landed
        return landed

    def resumed(rank: int, node: GossipNode) -> dict[str, Any]:
        x = torch.nn.Parameter(torch.full((3,), 7.0, dtype=torch.float64))
        opt = torch.optim.SGD([x], lr=LR)
        sgp = SGP([x], opt, node, local_steps=h, outer="diloco", outer_overlap=True)
        sgp.load_state_dict(saved[rank])
        for _ in range(2 * h):
            opt.zero_grad()
            (0.5 * (x - targets(rank)).pow(2).sum()).backward()
            sgp.step()
        sgp.consensus()
        return {"outer_steps": sgp.outer_steps, "weight": sgp.weight}

    landed = run_workers(n, first)
    # What was saved is the landed state, as the update rule gives it: the model (the
    # numerator over the weight) and the reference point, the same on both workers.
    want = hand_overlapped("diloco", h, landed)
    for rank in range(n):
        model = saved[rank]["numerator"][0] / saved[rank]["weight"]
        torch.testing.assert_close(model, want[rank], rtol=0, atol=1e-12)
        torch.testing.assert_close(
            saved[rank]["local"]["reference"][0], saved[0]["local"]["reference"][0]
        )
    results = run_workers(n, resumed)
    for r in results:
        assert r["outer_steps"] == 3  # 1 saved, 2 after the resume (landed by consensus)
    assert math.fsum(r["weight"] for r in results) == pytest.approx(n, abs=1e-12)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"outer_overlap": True}, "go with local_steps"),
        ({"local_steps": 2, "outer_overlap": 1}, "outer_overlap must be True or False"),
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


@pytest.mark.parametrize(
    ("factory", "kw", "match"),
    [
        (slowmo, {"lr": 0.0}, "outer learning rate must be > 0"),
        (slowmo, {"momentum": 1.0}, r"outer momentum must be in \[0, 1\)"),
        (diloco, {"momentum": -0.1}, r"outer momentum must be in \[0, 1\)"),
        (diloco, {"momentum": 0.0}, r"Nesterov's: it must be in \(0, 1\)"),
    ],
)
def test_bad_outer_hyper_parameters_are_refused_when_named(
    factory: Callable[..., OuterFactory], kw: dict[str, float], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        factory(**kw)
