"""Stragglers: in the asynchronous mode nobody waits for a slow worker.

Real worker processes over ZeroMQ (``gossip-sgp launch``), with rank 3 slowed down by
``examples/train_digits.py --straggler 3:3``: after each step's compute it sleeps twice that
long, as a worker with a slower accelerator would wait for it. Runs with and without the
straggler alternate, so both see the same load on the machine.

A sleeping straggler also frees its share of the CPU, and on this 2-core machine the other
workers speed up from that alone. So the asynchronous test is read against a control, the
synchronous mode, where every worker waits for its in-peer's message each round: under the
a straggler of the same kind and the same freed CPU, the others there must slow down, far below the
asynchronous test's gate (the control's straggler is 6x slow, see its docstring).
Measured (scripts/flake_check.py, docs/testing.md): asynchronous, the others at 1.10-1.15x
their pace without the straggler and the straggler at 0.41-0.58x theirs; synchronous with
the 6x straggler, the others at 0.41-0.52x (5 runs).
"""

from __future__ import annotations

import statistics

import pytest

from tests.procs import TRAIN, Jobs, Record, record, summary

pytestmark = [pytest.mark.slow, pytest.mark.measured]

STRAGGLER = ("--straggler", "3:3")


def run(jobs: Jobs, *args: str) -> dict[str, object]:
    out = jobs.run("launch", "--nproc", "4", *TRAIN, *args, timeout=240)
    return summary(out)


def rates(result: dict[str, object]) -> list[float]:
    """Steps per second of each worker, by rank."""
    workers = result["per_worker"]
    assert isinstance(workers, list)
    return [w["steps"] / w["train_seconds"] for w in workers]


def slowdown(
    jobs: Jobs, *args: str, straggler: tuple[str, ...] = STRAGGLER
) -> tuple[float, float, list[dict[str, object]]]:
    """(others' median rate with the straggler / without, the straggler's rate / the others'
    median, both runs' summaries) for two seeds, runs alternating."""
    plain, slowed, own = [], [], []
    results = []
    for seed in ("1", "2"):
        baseline = run(jobs, *args, "--seed", seed)
        straggling = run(jobs, *args, "--seed", seed, *straggler)
        plain += rates(baseline)[:3]
        slowed += rates(straggling)[:3]
        own.append(rates(straggling)[3] / statistics.median(rates(straggling)[:3]))
        results += [baseline, straggling]
    return statistics.median(slowed) / statistics.median(plain), max(own), results


@pytest.mark.timeout(600)
def test_asynchronous_workers_keep_their_pace_beside_a_3x_straggler(
    jobs: Jobs, record_property: Record
) -> None:
    """Fails if asynchronous workers wait for the straggler: e.g. with ``staleness=None``
    treated as synchronous (the control below shows what waiting looks like)."""
    ratio, straggler, results = slowdown(jobs, "--staleness", "none")
    record(
        record_property,
        "others_ratio >= 0.85; straggler_ratio <= 0.75; min_accuracy >= 0.95",
        others_ratio=ratio,
        straggler_ratio=straggler,
        min_accuracy=min(min(r["accuracies"]) for r in results),  # type: ignore[type-var]
    )
    assert straggler <= 0.75, f"rank 3 ran at {straggler:.2f}x the others' pace: no straggler"
    for result in results:
        accuracies = result["accuracies"]
        assert isinstance(accuracies, list)
        assert min(accuracies) >= 0.95, result
    assert ratio >= 0.85, f"the other workers ran at {ratio:.2f}x their pace without straggler"


@pytest.mark.timeout(600)
def test_synchronous_workers_wait_for_the_straggler(jobs: Jobs, record_property: Record) -> None:
    """The control: synchronous SGP waits for the straggler's messages, so the measurement
    that the asynchronous test gates at >= 0.85 drops well below it here.

    The straggler is 6x slow here: at 3x the others kept 0.58 to 0.82 of their pace (3 runs),
    too close to the asynchronous gate to tell the two apart every time, since a straggler
    that sleeps hands its CPU to the others while they wait for it."""
    ratio, straggler, _ = slowdown(
        jobs, "--staleness", "0", "--epochs", "10", straggler=("--straggler", "3:6")
    )
    record(record_property, "others_ratio <= 0.75", others_ratio=ratio, straggler_ratio=straggler)
    assert ratio <= 0.75, f"synchronous workers kept {ratio:.2f}x their pace beside a straggler"
