"""End-to-end training runs: real worker processes, real ZeroMQ sockets, real gloo.

Each test starts ``gossip-sgp launch`` (or ``demo``) as a subprocess in its own session with a
hard timeout; the ``jobs`` fixture kills the whole process tree if a test fails or hangs. The
runs train the example CNN on scikit-learn's bundled digits (gossip_sgp/digits.py).
"""

from __future__ import annotations

import json
import signal
import statistics
import time

import pytest

from tests.procs import (
    DigitsRuns,
    Jobs,
    Record,
    alive,
    brief,
    check_trained,
    children,
    drain,
    read_until,
    record,
    synchronous,
)

pytestmark = pytest.mark.slow


SEEDS = (1, 2, 3)
"""Seeds of the statistical comparison: one test set of 359 digits moves by 0.28 points per
image, so a mean over seeds is compared."""


def accuracy(result: dict[str, object]) -> float:
    return float(result["accuracy"])  # type: ignore[arg-type]


@pytest.mark.measured
@pytest.mark.timeout(300)
def test_synchronous_sgp_over_zeromq_trains_and_agrees(
    digits_runs: DigitsRuns, record_property: Record
) -> None:
    result = digits_runs.deterministic(4, *synchronous(4, 1))
    assert result["algorithm"] == "sgp"
    check_trained(result, workers=4, prop=record_property)


@pytest.mark.measured
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("nproc", [4, 8])
def test_sgp_modes_are_within_a_point_of_allreduce(
    digits_runs: DigitsRuns, record_property: Record, nproc: int
) -> None:
    """SGP ends within a point of AllReduce: same script, seeds and epochs.

    The same number of steps per worker at both sizes (40 epochs of a quarter of the data,
    80 of an eighth: 480 steps). At 8 workers and 40 epochs (240 steps) on 2 cores,
    asynchronous SGP had not caught up: 0.966-0.982 over six seeds against AllReduce's 0.9856
    (docs/training.md).

    AllReduce, synchronous SGP and overlap SGP are deterministic for a seed (bit-identical
    parameters run after run), so those are trained once per seed per session, and the two
    SGP modes are compared with AllReduce on the same seed, at 4 workers (at 8 they are
    measured by ``benchmarks/accuracy.py``, docs/training.md). Asynchronous SGP is not
    deterministic (what arrives before each fold depends on timing): at both sizes the mean
    of its three seeds is compared with AllReduce's mean.
    """
    epochs = ("--epochs", str(10 * nproc))
    allreduce = {
        seed: accuracy(
            digits_runs.deterministic(
                nproc, "--algorithm", "allreduce", *epochs, "--seed", str(seed)
            )
        )
        for seed in SEEDS
    }
    deterministic = {}
    if nproc == 4:
        deterministic = {
            "synchronous": accuracy(digits_runs.deterministic(nproc, *synchronous(nproc, 1))),
            "overlap": accuracy(
                digits_runs.deterministic(nproc, "--staleness", "1", *epochs, "--seed", "1")
            ),
        }
    async_runs = [
        digits_runs.fresh(nproc, "--staleness", "none", *epochs, "--seed", str(seed))
        for seed in SEEDS
    ]
    asynchronous = [accuracy(r) for r in async_runs]
    expected = statistics.mean(allreduce.values())
    record(
        record_property,
        "sync, overlap >= allreduce(seed 1) - 0.01; mean(async) >= mean(allreduce) - 0.01",
        allreduce_seed1=allreduce[1],
        allreduce_mean=expected,
        asynchronous_mean=statistics.mean(asynchronous),
        asynchronous_min=min(asynchronous),
        **deterministic,
    )
    for mode, acc in deterministic.items():
        assert acc >= allreduce[1] - 0.01, (
            f"{mode} SGP {acc:.4f} vs AllReduce {allreduce[1]:.4f} (seed 1)"
        )
    mean = statistics.mean(asynchronous)
    low = [brief(r) for r in async_runs if accuracy(r) < expected - 0.01]  # say why
    assert mean >= expected - 0.01, (
        f"asynchronous SGP {mean:.4f} {asynchronous} vs AllReduce {expected:.4f} {allreduce}; "
        f"the low runs: {low}"
    )


@pytest.mark.measured
@pytest.mark.timeout(300)
def test_local_steps_average_every_8_steps_and_send_a_quarter_of_the_bytes(
    digits_runs: DigitsRuns, record_property: Record
) -> None:
    """``--local-steps 8 --outer slowmo``: 4 workers, an outer step (2 push-sum rounds, an
    exact average on 4 workers) every 8 steps; synchronous, so the run is deterministic."""
    args = ("--local-steps", "8", "--outer", "slowmo", "--epochs", "40", "--seed", "1")
    result = digits_runs.deterministic(4, *args)
    check_trained(result, workers=4, prop=record_property)
    workers = result["per_worker"]
    assert isinstance(workers, list)
    steps = workers[0]["steps"]
    assert [w["outer_steps"] for w in workers] == [steps // 8] * 4
    every_step = digits_runs.deterministic(4, *synchronous(4, 1))  # the same epochs
    assert every_step["per_worker"][0]["steps"] == steps  # type: ignore[index]
    sent = sum(w["payload_bytes_sent"] for w in workers)
    sent_every_step = sum(w["payload_bytes_sent"] for w in every_step["per_worker"])  # type: ignore[attr-defined]
    # 2 messages per 8 steps instead of 8, plus the 4 rounds of the start
    assert 3.5 <= sent_every_step / sent <= 4.0, (sent_every_step, sent)


@pytest.mark.timeout(300)
def test_demo_json(jobs: Jobs) -> None:
    out = jobs.run("demo", "--epochs", "5", "--json", timeout=240)
    last = json.loads(out.strip().splitlines()[-1])
    assert set(last) == {"accuracy", "accuracies", "consensus_error", "steps_per_second"}
    assert len(last["accuracies"]) == 4
    assert 0.5 < last["accuracy"] <= 1.0
    assert last["steps_per_second"] > 0
    assert "test accuracy per worker" in out


@pytest.mark.measured
@pytest.mark.timeout(120)
def test_sigint_to_launch_ends_every_training_worker(jobs: Jobs, record_property: Record) -> None:
    proc = jobs.start("launch", "--nproc", "4", "-m", "gossip_sgp.digits", "--epochs", "1000")
    read_until(proc, "[rank 0] epoch", within=90, what="training did not start")
    workers = children(proc.pid)
    assert len(workers) == 4
    jobs.workers.update(workers)
    output = drain(proc)  # so the launcher never blocks on a full pipe
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    while any(alive(pid) for pid in workers) and time.monotonic() < started + 15:
        time.sleep(0.02)
    ended = time.monotonic() - started
    code = proc.wait(15)
    log = output(15)[-4000:]
    assert not [pid for pid in workers if alive(pid)], f"workers outlived the launcher:\n{log}"
    record(record_property, "exit_seconds < 10", exit_seconds=ended)
    assert ended < 10, f"the workers took {ended:.1f} s to stop:\n{log}"
    assert code == 130, log
