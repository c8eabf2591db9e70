"""A worker killed with SIGKILL mid-training: real worker processes, real ZeroMQ sockets.

``gossip-sgp launch --keep-going`` runs four digits workers; the test kills rank 3 (no
goodbye, its sockets vanish) once training is under way. The others must detect it, train
on, agree, and account for the push-sum weight it took with it: the survivors' weights add
up to at most 4, and to exactly 4 minus the weight the summary reports as lost.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.procs import Jobs, children, drain, read_until

pytestmark = pytest.mark.slow

TRAIN_VERBOSE = ["-m", "gossip_sgp.examples.train_digits", "--json"]
"""The digits example with its per-epoch lines (rank 0), to know when training is going."""


def worker_of_rank(launcher: int, rank: int) -> int:
    """The process id of the launcher's worker with ``rank``."""
    for pid in children(launcher):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"GOSSIP_SGP_RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker of rank {rank} under process {launcher}")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("staleness", ["0"])
def test_survivors_of_a_kill_9_finish_and_account_for_its_mass(
    jobs: Jobs, tmp_path: Path, staleness: str
) -> None:
    summary_file = tmp_path / "summary.json"
    proc = jobs.start(
        "launch",
        "--nproc",
        "4",
        "--keep-going",
        *TRAIN_VERBOSE,
        "--staleness",
        staleness,
        "--epochs",
        "40",
        "--summary-file",
        str(summary_file),
    )
    read_until(proc, "[rank 0] epoch   8/", within=120, what="training did not start")
    victim = worker_of_rank(proc.pid, 3)
    jobs.workers.add(victim)
    output = drain(proc)
    os.kill(victim, signal.SIGKILL)
    code = proc.wait(180)
    everything = output(10)
    log = everything[-6000:]
    assert code == 128 + signal.SIGKILL, log  # --keep-going: the job reports the dead worker
    assert "rank 3 was killed by SIGKILL; the other 3 worker(s) go on" in everything, log
    summary = json.loads(summary_file.read_text())
    assert summary["dead_ranks"] == [3], log
    assert min(summary["accuracies"]) >= 0.95, summary["accuracies"]
    assert summary["consensus_error"] <= 1e-3
    for worker in summary["per_worker"]:
        assert 3 in worker["mass"]["suspected"], worker  # every survivor is a neighbour of 3
    # No mass created: the survivors hold at most the 4 units the job started with, and
    # exactly what the ledgers say rank 3 did not take with it.
    weight, lost = summary["weight_sum"], summary["lost_weight"]
    assert 0 < lost < 4
    assert weight <= 4 + 1e-9
    assert weight == pytest.approx(4 - lost, abs=1e-6), (weight, lost)


@pytest.mark.timeout(300)
def test_a_killed_worker_restarted_with_rejoin_catches_up_and_finishes(
    jobs: Jobs, tmp_path: Path
) -> None:
    summary_file = tmp_path / "summary.json"
    args = [*TRAIN_VERBOSE, "--staleness", "none", "--epochs", "160"]  # long enough to join
    proc = jobs.start(
        "launch", "--nproc", "4", "--keep-going", *args, "--summary-file", str(summary_file)
    )
    read_until(proc, "[rank 0] epoch   8/", within=120, what="training did not start")
    victim = worker_of_rank(proc.pid, 3)
    environ = dict(
        item.split("=", 1)
        for item in Path(f"/proc/{victim}/environ").read_text().split("\0")
        if "=" in item
    )
    jobs.workers.add(victim)
    output = drain(proc)
    os.kill(victim, signal.SIGKILL)
    # The same rank again, with the same peer list and store, in a process of its own.
    again = jobs.start(*args, "--rejoin", prefix=(sys.executable,), env=environ)
    rejoined = drain(again)
    code = proc.wait(240)
    log = output(10)
    assert again.wait(60) == 0, rejoined(10)[-4000:]
    assert code == 128 + signal.SIGKILL, log[-4000:]
    summary = json.loads(summary_file.read_text())
    assert summary["dead_ranks"] == [], log[-4000:]
    assert len(summary["accuracies"]) == 4
    assert min(summary["accuracies"]) >= 0.95, summary["accuracies"]
    assert summary["consensus_error"] <= 1e-3
    assert summary["per_worker"][3]["mass"]["rejoined"]
    assert "gives half of its mass to rank 3" in log
    # The earlier life of rank 3 took some weight with it; nothing was created.
    weight, lost = summary["weight_sum"], summary["lost_weight"]
    assert 0 < lost < 4
    assert weight <= 4 + 1e-9
    assert weight == pytest.approx(4 - lost, abs=1e-6), (weight, lost)
