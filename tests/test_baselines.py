"""D-PSGD and AD-PSGD (gossip_sgp.baselines): mass, weights, consensus, and training.

The in-process tests run real GossipNodes over the in-process transport (tests/threads.py);
the slow ones train the digits example with real worker processes over ZeroMQ.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from gossip_sgp import GossipNode
from gossip_sgp.baselines import PairwiseExchange, adpsgd, dpsgd
from tests.procs import TRAIN, Jobs, Record, check_trained, summary
from tests.threads import run_workers

DIM = 64


def _start(rank: int) -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
    """A parameter that differs by rank, and a plain SGD optimizer over it."""
    gen = torch.Generator().manual_seed(100 + rank)
    param = torch.nn.Parameter(torch.randn(DIM, generator=gen, dtype=torch.float64))
    return param, torch.optim.SGD([param], lr=0.1)


def _initial_sum(n: int) -> torch.Tensor:
    return torch.stack([_start(r)[0].detach() for r in range(n)]).sum(0)


def _gossip_only(sgp: object, param: torch.nn.Parameter, steps: int, pause: float) -> None:
    """Steps with zero gradients: only gossip moves the parameters (and the mass)."""
    for _ in range(steps):
        param.grad = torch.zeros_like(param)
        sgp.step()  # type: ignore[attr-defined]
        if pause:
            time.sleep(pause)


@pytest.mark.timeout(60)
def test_dpsgd_is_pairwise_averaging_with_weights_one() -> None:
    n = 4

    def worker(rank: int, node: GossipNode) -> tuple[list[float], torch.Tensor, int]:
        param, opt = _start(rank)
        sgp = dpsgd([param], opt, node)
        weights = []
        for _ in range(6):
            param.grad = torch.zeros_like(param)
            sgp.step()
            weights.append(sgp.weight)
        return weights, sgp.state.numerator[0].clone(), len(sgp.protocol.mailbox.pending())

    results = run_workers(n, worker)
    for weights, _, pending in results:
        assert weights == [1.0] * 6  # 0.5 kept + 0.5 received, exactly, every round
        assert pending == 0
    numerators = torch.stack([x for _, x, _ in results])
    mean = _initial_sum(n) / n
    torch.testing.assert_close(numerators.sum(0), _initial_sum(n), rtol=1e-12, atol=1e-12)
    # n = 4 is a power of two: log2(n) rounds of the bipartite graph give the exact average
    for x in numerators:
        torch.testing.assert_close(x, mean, rtol=1e-12, atol=1e-12)


@pytest.mark.timeout(90)
def test_adpsgd_conserves_mass_and_reaches_consensus_with_uneven_speeds() -> None:
    n = 4

    def worker(rank: int, node: GossipNode) -> dict[str, object]:
        param, opt = _start(rank)
        sgp = adpsgd([param], opt, node)
        policy = sgp.policy
        assert isinstance(policy, PairwiseExchange)
        _gossip_only(sgp, param, 40, pause=0.008 if rank == 1 else 0.002)  # rank 1 is slower
        exchanges = policy.exchanges
        sgp.consensus(max_rounds=64, tol=1e-9)
        pending = sgp.protocol.mailbox.pending()
        return {
            "active": policy.active,
            "exchanges": exchanges,
            "weight": sgp.weight,
            "x": sgp.state.numerator[0].clone(),
            "z": param.detach().clone(),
            "pending": pending,
        }

    results = run_workers(n, worker)
    assert [r["active"] for r in results] == [True, False, True, False]
    for r in results:
        assert r["exchanges"] > 0  # every rank took part in asynchronous exchanges
    held_w = [float(r["weight"]) for r in results]  # type: ignore[arg-type]
    held_x = [r["x"] for r in results]
    for r in results:
        for tensors, w in r["pending"]:  # type: ignore[attr-defined]
            held_w.append(w)
            held_x.append(tensors[0])
    assert math.fsum(held_w) == pytest.approx(n, rel=1e-12)
    total = torch.stack(held_x).sum(0)  # type: ignore[arg-type]
    torch.testing.assert_close(total, _initial_sum(n), rtol=1e-10, atol=1e-10)
    mean = _initial_sum(n) / n
    for r in results:
        torch.testing.assert_close(r["z"], mean, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.measured
@pytest.mark.timeout(600)
@pytest.mark.parametrize("algorithm", ["dpsgd", "adpsgd"])
def test_baseline_trains_digits(jobs: Jobs, record_property: Record, algorithm: str) -> None:
    out = jobs.run(
        "launch", "--nproc", "4", *TRAIN, "--algorithm", algorithm, "--epochs", "20", timeout=500
    )
    result = summary(out)
    assert result["algorithm"] == algorithm
    if algorithm == "adpsgd":  # pairwise averagings completed, per worker
        workers = result["per_worker"]
        assert isinstance(workers, list)
        record_property("min_exchanges", min(w["exchanges"] for w in workers))
    check_trained(result, workers=4, prop=record_property)
