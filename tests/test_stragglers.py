"""Stragglers: in the asynchronous mode nobody waits for a slow worker.

Real worker processes over ZeroMQ (``gossip-sgp launch``), with one rank slowed down by
``examples/train_digits.py --straggler RANK:FACTOR``. Runs with and without the straggler
alternate, so both see the same load on the machine.
"""

from __future__ import annotations

import statistics

import pytest

from tests.procs import TRAIN, Jobs, summary

pytestmark = pytest.mark.slow


def run(jobs: Jobs, *args: str) -> dict[str, object]:
    out = jobs.run("launch", "--nproc", "4", *TRAIN, "--staleness", "none", *args, timeout=240)
    return summary(out)


def rates(result: dict[str, object]) -> list[float]:
    workers = result["per_worker"]
    assert isinstance(workers, list)
    return [w["steps"] / w["train_seconds"] for w in workers]


@pytest.mark.timeout(600)
def test_asynchronous_workers_keep_their_pace_beside_a_3x_straggler(jobs: Jobs) -> None:
    plain, slowed = [], []
    for seed in (1, 2):
        baseline = run(jobs, "--seed", str(seed))
        straggling = run(jobs, "--seed", str(seed), "--straggler", "3:3")
        plain += rates(baseline)[:3]
        slowed += rates(straggling)[:3]
        for result in (baseline, straggling):
            accuracies = result["accuracies"]
            assert isinstance(accuracies, list)
            assert min(accuracies) >= 0.95, result
        straggler_rate = rates(straggling)[3]
        assert straggler_rate < statistics.median(rates(straggling)[:3])  # it did straggle
    ratio = statistics.median(slowed) / statistics.median(plain)
    assert ratio >= 0.85, f"the other workers ran at {ratio:.2f}x their pace without straggler"
