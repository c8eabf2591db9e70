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
