"""End-to-end training runs: real worker processes, real ZeroMQ sockets, real gloo.

Each test starts ``gossip-sgp launch`` (or ``demo``) as a subprocess in its own session with a
hard timeout; the ``jobs`` fixture kills the whole process tree if a test fails or hangs. The
runs train the example CNN on scikit-learn's bundled digits (examples/train_digits.py).
"""

from __future__ import annotations

import json
import signal
import statistics
import time

import pytest

from tests.procs import TRAIN, Jobs, alive, check_trained, children, drain, read_until, summary

pytestmark = pytest.mark.slow


def accuracies(jobs: Jobs, nproc: int, *args: str, seeds: tuple[int, ...]) -> list[float]:
    """Test accuracy (mean over the workers) of one ``launch`` per seed."""
    accs = []
    for seed in seeds:
        out = jobs.run(
            "launch", "--nproc", str(nproc), *TRAIN, "--seed", str(seed), *args, timeout=240
        )
        accs.append(float(summary(out)["accuracy"]))  # type: ignore[arg-type]
    return accs


@pytest.mark.timeout(300)
def test_synchronous_sgp_over_zeromq_trains_and_agrees(jobs: Jobs) -> None:
    out = jobs.run("launch", "--nproc", "4", *TRAIN, timeout=240)
    result = summary(out)
    assert result["algorithm"] == "sgp"
    check_trained(result, workers=4)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("nproc", [4, 8])
def test_sgp_modes_are_within_a_point_of_allreduce(jobs: Jobs, nproc: int) -> None:
    # Same script, seeds and epochs for every algorithm, and the same number of steps per
    # worker at both sizes (40 epochs of a quarter of the data, 80 of an eighth: 480 steps).
    # At 8 workers and 40 epochs (240 steps) on 2 cores, asynchronous SGP gossips in only
    # ~30% of its rounds (messages take several steps to arrive) and had not caught up:
    # 0.966-0.982 over six seeds against AllReduce's 0.9856 (docs/training.md).
    # The mean over three seeds, since one test set of 359 digits moves by 0.28 points per
    # image.
    seeds = (1, 2, 3)
    epochs = ("--epochs", str(10 * nproc))
    baseline = accuracies(jobs, nproc, "--algorithm", "allreduce", *epochs, seeds=seeds)
    modes = {
        "synchronous": accuracies(jobs, nproc, "--staleness", "0", *epochs, seeds=seeds),
        "overlap": accuracies(jobs, nproc, "--staleness", "1", *epochs, seeds=seeds),
        "asynchronous": accuracies(jobs, nproc, "--staleness", "none", *epochs, seeds=seeds),
    }
    expected = statistics.mean(baseline)
    for mode, accs in modes.items():
        acc = statistics.mean(accs)
        assert acc >= expected - 0.01, (
            f"{mode} SGP {acc:.4f} {accs} vs AllReduce {expected:.4f} {baseline}"
        )


@pytest.mark.timeout(300)
def test_demo_json(jobs: Jobs) -> None:
    out = jobs.run("demo", "--epochs", "5", "--json", timeout=240)
    last = json.loads(out.strip().splitlines()[-1])
    assert set(last) == {"accuracy", "accuracies", "consensus_error", "steps_per_second"}
    assert len(last["accuracies"]) == 4
    assert 0.5 < last["accuracy"] <= 1.0
    assert last["steps_per_second"] > 0
    assert "test accuracy per worker" in out


@pytest.mark.timeout(120)
def test_sigint_to_launch_ends_every_training_worker(jobs: Jobs) -> None:
    proc = jobs.start(
        "launch", "--nproc", "4", "-m", "gossip_sgp.examples.train_digits", "--epochs", "1000"
    )
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
    assert ended < 10, f"the workers took {ended:.1f} s to stop:\n{log}"
    assert code == 130, log
