"""End-to-end training runs: real worker processes, real ZeroMQ sockets, real gloo.

Each test starts ``gossip-sgp launch`` (or ``demo``) as a subprocess in its own session with a
hard timeout; the ``jobs`` fixture kills the whole process tree if a test fails or hangs. The
runs train the example CNN on scikit-learn's bundled digits (examples/train_digits.py).
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.procs import TRAIN, Jobs, alive, check_trained, children, drain, read_until, summary

pytestmark = pytest.mark.slow


def accuracy(jobs: Jobs, nproc: int, *args: str, seeds: tuple[int, ...]) -> float:
    accs = []
    for seed in seeds:
        out = jobs.run(
            "launch", "--nproc", str(nproc), *TRAIN, "--seed", str(seed), *args, timeout=240
        )
        accs.append(float(summary(out)["accuracy"]))  # type: ignore[arg-type]
    return sum(accs) / len(accs)


@pytest.mark.timeout(300)
def test_synchronous_sgp_over_zeromq_trains_and_agrees(jobs: Jobs) -> None:
    out = jobs.run("launch", "--nproc", "4", *TRAIN, timeout=240)
    result = summary(out)
    assert result["algorithm"] == "sgp"
    check_trained(result, workers=4)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("nproc", [4, 8])
def test_sgp_modes_are_within_a_point_of_allreduce(jobs: Jobs, nproc: int) -> None:
    # Same script, seeds and epochs; the mean over three seeds, since one test set of 359
    # digits moves by 0.28 points per image (with two, asynchronous SGP at 8 workers on 2
    # cores measured 0.9749 against AllReduce's 0.9861 in one run and passed in others).
    seeds = (1, 2, 3)
    baseline = accuracy(jobs, nproc, "--algorithm", "allreduce", seeds=seeds)
    modes = {
        "synchronous": accuracy(jobs, nproc, "--staleness", "0", seeds=seeds),
        "overlap": accuracy(jobs, nproc, "--staleness", "1", seeds=seeds),
        "asynchronous": accuracy(jobs, nproc, "--staleness", "none", seeds=seeds),
    }
    for mode, acc in modes.items():
        assert acc >= baseline - 0.01, f"{mode} SGP {acc:.4f} vs AllReduce {baseline:.4f}"


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
