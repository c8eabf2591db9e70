"""A worker killed with SIGKILL mid-training: real worker processes, real ZeroMQ sockets.

``gossip-sgp launch --keep-going`` runs four digits workers; the test kills rank 3 (no
goodbye, its sockets vanish) once training is under way. The others must detect it, train
on, agree, and account for the push-sum weight it took with it: the survivors' weights add
up to at most 4, and to exactly 4 minus the weight the summary reports as lost. In the
second test rank 3 is started again at once with ``--rejoin`` (asynchronous mode) and
finishes with the others.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from subprocess import Popen

import pytest

from tests.procs import Jobs, Record, alive, drain, read_until, record, worker_pids

pytestmark = pytest.mark.slow

TRAIN_VERBOSE = ["-m", "gossip_sgp.digits", "--json"]
"""The digits example with its per-epoch lines (rank 0), to know when training is going."""


def start_job(
    jobs: Jobs, summary_file: Path, *args: str, preload: str | None = None
) -> tuple[Popen[str], list[int]]:
    """``launch --keep-going`` of four digits workers with ``args``; returns once rank 0 is
    at epoch 8 (training well under way), with the workers' pids by rank."""
    proc = jobs.start(
        "launch",
        "--nproc",
        "4",
        "--keep-going",
        *(() if preload is None else ("--preload", preload)),
        *TRAIN_VERBOSE,
        *args,
        "--summary-file",
        str(summary_file),
    )
    lines = read_until(proc, "[rank 0] epoch   8/", within=120, what="training did not start")
    return proc, worker_pids(lines)


@pytest.mark.measured
@pytest.mark.timeout(240)
@pytest.mark.parametrize("staleness", ["0", "none", "local", "streamed"])
def test_survivors_of_a_kill_9_finish_and_account_for_its_mass(
    jobs: Jobs, tmp_path: Path, record_property: Record, staleness: str
) -> None:
    """``local``: local steps (H=4, SlowMo, outer steps overlapped), whose outer steps are
    synchronous rounds: without rank 3 they average approximately, losing no mass.
    ``streamed``: the same in 2 fragments on alternate outer steps (``StreamingSGP``): each
    fragment's mass is accounted for (the summary's weights are means over fragments)."""
    summary_file = tmp_path / "summary.json"
    local = ["--local-steps", "4", "--outer", "slowmo", "--outer-overlap"]
    mode = {"local": local, "streamed": [*local, "--fragments", "2"]}.get(
        staleness, ["--staleness", staleness]
    )
    proc, pids = start_job(jobs, summary_file, *mode, "--epochs", "40")
    victim = pids[3]
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
    record(
        record_property,
        "min_accuracy >= 0.95",
        min_accuracy=min(summary["accuracies"]),
        lost_weight=summary["lost_weight"],
    )
    assert min(summary["accuracies"]) >= 0.95, summary["accuracies"]
    assert summary["consensus_error"] <= 1e-3
    for worker in summary["per_worker"]:
        assert 3 in worker["mass"]["suspected"], worker  # every survivor is a neighbour of 3
        if staleness == "none":
            # The link window: rank 3 took at most one share per link into it (rank 2's
            # and rank 1's), besides its own weight; before, each share sent to it took a
            # send credit along, and the survivors wrote off 2.6-3.2 of the 4 units.
            assert worker["mass"]["written_off_to"].get("3", 0) <= 1, worker
    # No mass created: the survivors hold at most the 4 units the job started with, and
    # exactly what the ledgers say rank 3 did not take with it.
    weight, lost = summary["weight_sum"], summary["lost_weight"]
    assert 0 < lost < 4
    assert weight <= 4 + 1e-9
    assert weight == pytest.approx(4 - lost, abs=1e-6), (weight, lost)


WARM_START = """
import json, os, pathlib, sys, time
import torch
import gossip_sgp.digits as digits  # torch, scikit-learn, gossip_sgp
torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)  # imports torch._dynamo
print("warm", flush=True)
go = pathlib.Path(sys.argv[1])
while not go.exists():
    time.sleep(0.01)
os.environ.update(json.loads(go.read_text()))
sys.exit(digits.main(sys.argv[2:]))
"""
"""A worker process that has done the slow part of starting (imports, including the ones
torch makes when the first optimizer is created) and then waits for
``go``, a file with the environment of the worker it replaces: so the restart takes well
under a second whatever the machine's load, and the others are still training when it
asks to rejoin (a cold start under load took longer than their whole run)."""


@pytest.mark.measured
@pytest.mark.timeout(300)
def test_a_killed_worker_restarted_with_rejoin_catches_up_and_finishes(
    jobs: Jobs, tmp_path: Path, record_property: Record
) -> None:
    summary_file, go = tmp_path / "summary.json", tmp_path / "go.json"
    args = ["--staleness", "none", "--epochs", "100"]
    spare = jobs.start("-c", WARM_START, str(go), *args, "--rejoin", prefix=(sys.executable,))
    read_until(spare, "warm", within=120, what="the spare worker did not start")
    spare_output = drain(spare)
    # Started as new interpreters: the restart needs rank 3's environment, which
    # /proc/PID/environ shows only for a worker that was exec'd (a forked one shows the
    # launcher's).
    proc, pids = start_job(jobs, summary_file, *args, preload="")
    victim = pids[3]
    environ = dict(
        item.split("=", 1)
        for item in Path(f"/proc/{victim}/environ").read_text().split("\0")
        if "=" in item
    )
    jobs.workers.add(victim)
    output = drain(proc)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(victim):  # gone, its port free again
        assert time.monotonic() < deadline, "rank 3 outlived SIGKILL"
        time.sleep(0.01)
    # The same rank again, with the same peer list and store, in a process of its own.
    partial = go.with_suffix(".part")
    partial.write_text(json.dumps(environ))
    partial.rename(go)
    code = proc.wait(240)
    log = output(10)
    assert spare.wait(60) == 0, f"{spare_output(10)[-4000:]}\n--- launch ---\n{log[-6000:]}"
    assert code == 128 + signal.SIGKILL, log[-4000:]
    summary = json.loads(summary_file.read_text())
    assert summary["dead_ranks"] == [], log[-4000:]
    assert len(summary["accuracies"]) == 4
    record(
        record_property,
        "min_accuracy >= 0.95",
        min_accuracy=min(summary["accuracies"]),
        lost_weight=summary["lost_weight"],
    )
    assert min(summary["accuracies"]) >= 0.95, summary["accuracies"]
    assert summary["consensus_error"] <= 1e-3
    rejoined = summary["per_worker"][3]
    assert rejoined["mass"]["rejoined"]
    assert 0 < rejoined["steps"] < summary["per_worker"][0]["steps"]  # it caught up
    assert "gives half of its mass to rank 3" in log
    # The earlier life of rank 3 took some weight with it; nothing was created.
    weight, lost = summary["weight_sum"], summary["lost_weight"]
    assert 0 < lost < 4
    assert weight <= 4 + 1e-9
    assert weight == pytest.approx(4 - lost, abs=1e-6), (weight, lost)
