"""Stragglers: in the asynchronous mode nobody waits for a slow worker.

Real worker processes over ZeroMQ (``gossip-sgp launch``), with rank 3 slowed down by
``gossip_sgp/digits.py --straggler 3:6``: after each step's compute it sleeps five times
that long, as a worker with a slower accelerator would wait for it. Runs with and without the
straggler alternate, so both see the same load on the machine.

A sleeping straggler also frees its share of the CPU, and on this 2-core machine the other
workers speed up from that alone. So the asynchronous test is read against a control, the
synchronous mode, where every worker waits for its in-peer's message each round: beside the
same straggler and the same freed CPU, the others there must slow down, far below the
asynchronous test's gate. Measured (scripts/flake_check.py, docs/testing.md): asynchronous,
the others at 1.17-1.28x their pace without the straggler and the straggler at 0.28-0.33x
theirs (3 runs); synchronous, the others at 0.41-0.52x (5 runs).

Both use a 6x straggler. A 3x straggler ran at 0.41-0.66x the others' pace (7 runs), too
close to the 0.75 gate that shows it did straggle, and in the synchronous control the others
kept 0.58-0.82x of their pace, too close to the asynchronous gate to tell the modes apart.
"""

from __future__ import annotations

import statistics

import pytest

from tests.procs import TRAIN, Jobs, Record, record, summary

pytestmark = [pytest.mark.slow, pytest.mark.measured]

STRAGGLER = ("--straggler", "3:6")
CONTROL_STRAGGLER = ("--straggler", "3:12")


def run(jobs: Jobs, *args: str) -> dict[str, object]:
    out = jobs.run("launch", "--nproc", "4", *TRAIN, *args, timeout=240)
    return summary(out)


def rates(result: dict[str, object]) -> list[float]:
    """Steps per second of each worker, by rank."""
    workers = result["per_worker"]
    assert isinstance(workers, list)
    return [w["steps"] / w["train_seconds"] for w in workers]


def slowdown(
    jobs: Jobs, *args: str, straggler: tuple[str, str] = STRAGGLER
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
def test_asynchronous_workers_keep_their_pace_beside_a_straggler(
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

    With a 12x straggler: a synchronous step is the straggler's compute plus a gossip round,
    and the gossip part grows with the machine's load, so beside a 6x straggler the others
    kept 0.32-0.75x of their pace (10 runs, one at 0.747 against the 0.75 gate); beside a 12x
    one 0.20-0.31x (5 runs, 10 epochs) and 0.20-0.50x (10 runs, the 5 epochs used here). A
    stronger straggler also frees more CPU for the others, which only makes this control
    harder to pass."""
    ratio, straggler, _ = slowdown(
        jobs, "--staleness", "0", "--epochs", "5", straggler=CONTROL_STRAGGLER
    )
    record(record_property, "others_ratio <= 0.75", others_ratio=ratio, straggler_ratio=straggler)
    assert ratio <= 0.75, f"synchronous workers kept {ratio:.2f}x their pace beside a straggler"
