"""Checkpoint and resume with real worker processes over ZeroMQ (gossip_sgp/digits.py).

SIGTERM stops a synchronous run mid-training; the workers must be gone within 5 seconds
and leave checkpoints that load; resuming from them finishes with the very same parameters,
bit for bit, as a run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.procs import TRAIN, Jobs, Record, alive, children, drain, read_until, record, summary

pytestmark = pytest.mark.slow

ARGS = ["--epochs", "30", "--seed", "5"]


def cpu_seconds(pid: int) -> float | None:
    """User and system CPU seconds process ``pid`` has used (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hashes(out: str) -> list[str]:
    workers = summary(out)["per_worker"]
    assert isinstance(workers, list)
    return [w["params_sha256"] for w in workers]


@pytest.mark.measured
@pytest.mark.timeout(300)
def test_sigterm_leaves_checkpoints_and_resume_is_bit_identical(
    jobs: Jobs, tmp_path: Path, record_property: Record
) -> None:
    uninterrupted = hashes(jobs.run("launch", "--nproc", "4", *TRAIN, *ARGS, timeout=120))
    assert len(set(uninterrupted)) == 1  # consensus() made the workers agree exactly

    ckpt = str(tmp_path / "ckpt")
    module = [a for a in TRAIN if a != "--quiet"]  # progress lines tell where training is
    proc = jobs.start("launch", "--nproc", "4", *module, *ARGS, "--checkpoint", ckpt)
    read_until(proc, "[rank 0] epoch   5/30", within=90, what="training did not get to epoch 5")
    workers = children(proc.pid)
    assert len(workers) == 4
    jobs.workers.update(workers)
    rest = drain(proc)
    cpu_at_signal = {pid: cpu_seconds(pid) or 0.0 for pid in workers}
    cpu_at_exit = dict(cpu_at_signal)
    exits: dict[int, float] = {}
    signalled = time.monotonic()
    for pid in workers:  # as a cluster manager would: SIGTERM to every worker
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    while len(exits) < len(workers) and time.monotonic() < signalled + 20:
        for pid in set(workers) - set(exits):
            used = cpu_seconds(pid)  # a zombie's too: the last figure before it is reaped
            cpu_at_exit[pid] = cpu_at_exit[pid] if used is None else used
            if not alive(pid):
                exits[pid] = time.monotonic() - signalled
        time.sleep(0.02)
    stopped = time.monotonic() - signalled
    proc.wait(20)
    log = rest(20)[-3000:]
    # The 5 s is the documented promise (docs/reliability.md, "Checkpoints and resume"), so
    # it stays a wall-clock limit. The failure message gives each worker's exit time and
    # the CPU seconds it used after the signal: they tell a worker that waited for something
    # from one that had no CPU to run on.
    # Measured: these steps 12 times on the 2-core machine while other test runs loaded it
    # (load average 8.5-14): all four workers were gone 2.8 and 3.6 s after the signal in 2
    # runs, and 5.1, 5.5, 6.6, 7.2, 7.4, 7.4, 7.9, 8.6, 8.9 and 9.6 s in the other 10
    # (failing here). Every worker used 0.75-1.45 CPU-s after the signal, most of it
    # Python's own exit (an interpreter that imported torch, scikit-learn and gossip_sgp
    # took 0.84-1.01 CPU-s to exit, 3 runs); the exits were 4-8 times their CPU time. So
    # the promise holds while each worker gets about a quarter of a core, and there is no
    # margin under that load: this limit is not a test problem to tune away.
    # Fails too if SIGTERM does not stop a worker (``_exit_on_sigterm`` in
    # gossip_sgp/node.py returning instead of raising SystemExit(143)).
    per_worker = ", ".join(
        f"{exits.get(pid, math.inf):.1f} s using {cpu_at_exit[pid] - cpu_at_signal[pid]:.2f} CPU-s"
        for pid in workers
    )
    record(record_property, "exit_seconds < 5", exit_seconds=stopped)
    assert stopped < 5, f"workers took {stopped:.1f} s to exit after SIGTERM ({per_worker}):\n{log}"
    assert "test accuracy" not in log, "training finished before the SIGTERM"

    epochs = set()
    for rank in range(4):
        state = torch.load(Path(ckpt) / f"rank{rank}.pt", weights_only=True)
        epochs.add(state["epoch"])
        assert set(state["sgp"]) >= {"round", "weight", "numerator", "next_seq", "optimizer"}
    # rank 0 had printed epoch 5; a worker stopped while saving may be one epoch behind
    assert min(epochs) >= 4
    assert max(epochs) < 30

    out = jobs.run(
        "launch", "--nproc", "4", *module, *ARGS, "--checkpoint", ckpt, "--resume", timeout=120
    )
    assert "resumed from the checkpoints of epoch" in out
    assert hashes(out) == uninterrupted
