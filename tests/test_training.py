"""End-to-end training runs: real worker processes, real ZeroMQ sockets, real gloo.

Each test starts ``gossip-sgp launch`` (or ``demo``) as a subprocess in its own session with a
hard timeout; the ``jobs`` fixture kills the whole process tree if a test fails or hangs. The
runs train the example CNN on scikit-learn's bundled digits (examples/train_digits.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TRAIN = ["-m", "gossip_sgp.examples.train_digits", "--quiet", "--json"]


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Jobs:
    """Starts CLI subprocesses and guarantees that they and their workers are gone after."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.workers: set[int] = set()

    def start(self, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gossip_sgp.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.procs.append(proc)
        return proc

    def run(self, *args: str, timeout: float) -> str:
        proc = self.start(*args)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.workers.update(_children(proc.pid))
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            pytest.fail(f"gossip-sgp {' '.join(args)} ran over {timeout} s:\n{out[-4000:]}")
        assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-4000:]}"
        return out

    def cleanup(self) -> None:
        for proc in self.procs:
            self.workers.update(_children(proc.pid))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
        for pid in self.workers:
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def jobs() -> Iterator[Jobs]:
    j = Jobs()
    try:
        yield j
    finally:
        j.cleanup()


def summary(out: str) -> dict[str, object]:
    """The JSON object rank 0 prints last (behind the launcher's ``[rank 0]`` prefix)."""
    for line in reversed(out.splitlines()):
        if line.startswith("[rank 0] {"):
            result: dict[str, object] = json.loads(line.removeprefix("[rank 0] "))
            return result
    raise AssertionError(f"no JSON summary in the output:\n{out[-4000:]}")


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
    assert result["workers"] == 4
    accuracies = result["accuracies"]
    assert isinstance(accuracies, list)
    assert len(accuracies) == 4
    assert min(accuracies) >= 0.95
    # after consensus() the four workers hold the same parameters to 1e-3 relative
    assert float(result["consensus_error"]) <= 1e-3  # type: ignore[arg-type]


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("nproc", [4, 8])
def test_sgp_modes_are_within_a_point_of_allreduce(jobs: Jobs, nproc: int) -> None:
    # Same script, seeds and epochs; the mean over two seeds, since one test set of 359
    # digits moves by 0.28 points per image.
    seeds = (1, 2)
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
    assert proc.stdout is not None
    deadline = time.monotonic() + 90
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("[rank 0] epoch"):
            break
        assert time.monotonic() < deadline, "training did not start"
    workers = _children(proc.pid)
    assert len(workers) == 4
    jobs.workers.update(workers)
    output: list[str] = []
    drain = threading.Thread(target=lambda: output.append(proc.stdout.read()), daemon=True)
    drain.start()  # so the launcher never blocks on a full pipe
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    while any(_alive(pid) for pid in workers) and time.monotonic() < started + 15:
        time.sleep(0.02)
    ended = time.monotonic() - started
    code = proc.wait(15)
    drain.join(15)
    log = "".join(output)[-4000:]
    assert not [pid for pid in workers if _alive(pid)], f"workers outlived the launcher:\n{log}"
    assert ended < 10, f"the workers took {ended:.1f} s to stop:\n{log}"
    assert code == 130, log
