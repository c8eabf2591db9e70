"""Subprocesses for the multi-process tests: start them, and make sure they are gone after.

Every command runs in a session of its own. ``Jobs.cleanup`` (the ``jobs`` fixture in
conftest.py calls it whatever the test's outcome) kills the process group of every
descendant it can find, then the command's own group: the launchers start each worker in a
session of its own, and so does torchrun.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

CLI = (sys.executable, "-m", "gossip_sgp.cli")
"""The default command prefix: ``gossip-sgp`` from the interpreter running the tests."""

TRAIN = ["-m", "gossip_sgp.digits", "--quiet", "--json"]
"""``gossip-sgp launch`` arguments that train the digits example and print a JSON summary."""


def children(pid: int) -> list[int]:
    """The direct children of the main thread of process ``pid`` (none if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, started by any of its threads."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            kids = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in kids:
            found += [child, *descendants(child)]
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def summary(out: str) -> dict[str, object]:
    """The JSON object rank 0 prints last (behind the launcher's ``[rank 0]`` prefix)."""
    for line in reversed(out.splitlines()):
        if line.startswith("[rank 0] {"):
            result: dict[str, object] = json.loads(line.removeprefix("[rank 0] "))
            return result
    raise AssertionError(f"no JSON summary in the output:\n{out[-4000:]}")


def read_until(proc: subprocess.Popen[str], prefix: str, *, within: float, what: str) -> list[str]:
    """Read ``proc``'s output up to a line that starts with ``prefix``; the lines read.

    Fails with ``what`` if a line comes later than ``within`` seconds; returns at the end of
    the output too (then the caller's checks on the workers fail).
    """
    assert proc.stdout is not None
    deadline = time.monotonic() + within
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            break
        assert time.monotonic() < deadline, what
    return lines


def worker_pids(lines: Sequence[str]) -> list[int]:
    """The workers' process ids, by rank, from the line ``gossip-sgp launch`` prints."""
    for line in lines:
        if line.startswith("gossip-sgp launch: ") and ", pids " in line:
            listed = line.split(", pids ", 1)[1].split(" (", 1)[0]
            return [int(pid) for pid in listed.split(", ")]
    raise AssertionError("the launcher printed no pids:\n" + "".join(lines[-20:]))


def drain(proc: subprocess.Popen[str]) -> Callable[[float], str]:
    """Read the rest of ``proc``'s output on a thread, so it never blocks on a full pipe.

    The returned function waits up to the seconds given for the output to end, then gives
    what was read (nothing if it had not ended).
    """
    stdout = proc.stdout
    assert stdout is not None
    rest: list[str] = []
    thread = threading.Thread(target=lambda: rest.append(stdout.read()), daemon=True)
    thread.start()

    def collect(timeout: float) -> str:
        thread.join(timeout)
        return "".join(rest)

    return collect


Record = Callable[[str, object], None]
"""pytest's ``record_property``: what a statistical or timing-sensitive test measured goes
into the JUnit report, where ``scripts/flake_check.py`` reads it."""


def record(prop: Record, gate: str, **measured: float) -> None:
    """Record ``measured`` values and the ``gate`` they are checked against."""
    for name, value in measured.items():
        prop(name, value)
    prop("gate", gate)


def brief(result: dict[str, object]) -> str:
    """The parts of a digits summary that say why a run failed its gate."""
    keys = (
        "algorithm",
        "staleness",
        "accuracies",
        "consensus_error",
        "dead_ranks",
        "weight_sum",
        "lost_weight",
        "seconds",
    )
    shown = {k: result.get(k) for k in keys if k in result}
    workers = result.get("per_worker")
    if isinstance(workers, list):
        shown["per_worker"] = [
            {
                k: w.get(k)
                for k in (
                    "steps",
                    "train_seconds",
                    "suspicions",
                    "skipped_rounds",
                    "kept_rounds",
                    "exchanges",
                    "weight",
                    "lagged",
                    "answered",
                    "accuracy_before_consensus",
                )
            }
            for w in workers
        ]
    return json.dumps(shown)


def check_trained(result: dict[str, object], workers: int = 4, prop: Record | None = None) -> None:
    """A digits run's summary: every worker at 95% or better, and the workers agree.

    After ``consensus()`` the workers hold the same parameters to 1e-3 relative. With
    ``prop`` (pytest's ``record_property``) the lowest accuracy and the disagreement are
    recorded for ``scripts/flake_check.py``.
    """
    accuracies = result["accuracies"]
    assert isinstance(accuracies, list)
    error = float(result["consensus_error"])  # type: ignore[arg-type]
    if prop is not None and accuracies:
        record(
            prop,
            "min_accuracy >= 0.95; consensus_error <= 1e-3",
            min_accuracy=min(accuracies),
            consensus_error=error,
        )
    assert result["workers"] == workers, brief(result)
    assert len(accuracies) == workers, f"results of {len(accuracies)} workers: {brief(result)}"
    assert min(accuracies) >= 0.95, brief(result)
    assert error <= 1e-3, brief(result)


class Jobs:
    """Starts commands in their own sessions; kills them and all their descendants after.

    ``workers`` holds extra process ids to kill at the end (a test that looks up a
    launcher's workers adds them, since an ended launcher no longer lists them).
    """

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.workers: set[int] = set()

    def start(
        self,
        *args: str,
        prefix: Sequence[str] = CLI,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[str]:
        """``prefix + args`` (``gossip-sgp ARGS`` by default), unbuffered, output piped."""
        proc = subprocess.Popen(
            [*prefix, *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.procs.append(proc)
        return proc

    def run(
        self, *args: str, timeout: float, prefix: Sequence[str] = CLI, cwd: Path | None = None
    ) -> str:
        """Run a command to its end; its output, or a test failure if it fails or runs over."""
        proc = self.start(*args, prefix=prefix, cwd=cwd)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(proc)
            out, _ = proc.communicate()
            name = "gossip-sgp" if tuple(prefix) == CLI else " ".join(prefix)
            pytest.fail(f"{name} {' '.join(args)} ran over {timeout} s:\n{out[-4000:]}")
        assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-4000:]}"
        return out

    def kill(self, proc: subprocess.Popen[str]) -> None:
        """SIGKILL the process group of ``proc`` and of each of its descendants."""
        below = descendants(proc.pid)
        self.workers.update(below)
        for pid in [*below, proc.pid]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        proc.wait(10)

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.kill(proc)
            if proc.stdout is not None:
                proc.stdout.close()
        for pid in self.workers:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)


def synchronous(nproc: int, seed: int) -> tuple[str, ...]:
    """``launch`` arguments of a synchronous SGP run with the training tests' epochs: 10 per
    worker in the job, so every world size takes the same steps per worker. Tests that share
    a run through :class:`DigitsRuns` build its arguments here, so that they match."""
    return ("--staleness", "0", "--epochs", str(10 * nproc), "--seed", str(seed))


class DigitsRuns:
    """Summaries of ``gossip-sgp launch`` runs of the digits example, each run once per session.

    Synchronous SGP, overlap SGP and AllReduce are deterministic for a seed (the same
    parameters, bit for bit, run after run), so tests that need the same run share it instead
    of training it again. Asynchronous runs are not: call :meth:`fresh` for those.
    """

    def __init__(self) -> None:
        self.jobs = Jobs()
        self._done: dict[tuple[str, ...], dict[str, object]] = {}

    def fresh(self, nproc: int, *args: str) -> dict[str, object]:
        """A new run of ``launch --nproc NPROC`` with ``args``; its summary."""
        out = self.jobs.run("launch", "--nproc", str(nproc), *TRAIN, *args, timeout=240)
        return summary(out)

    def deterministic(self, nproc: int, *args: str) -> dict[str, object]:
        """The summary of a deterministic run (trained once per session)."""
        key = (str(nproc), *args)
        if key not in self._done:
            self._done[key] = self.fresh(nproc, *args)
        return self._done[key]
