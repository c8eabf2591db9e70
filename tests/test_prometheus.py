"""A real Prometheus server scrapes a real 4-worker training job.

``gossip-sgp launch --nproc 4 --metrics-port BASE`` runs the digits example over ZeroMQ; a
Prometheus server (the binary on PATH, e.g. Debian's ``prometheus`` package, which
``scripts/ensure-test-tools`` installs before ``make test``) runs on a free loopback port
with the configuration ``gossip-sgp prometheus-config`` prints and a temporary data
directory. Its HTTP API must report all four workers up and a consensus distance series.
Both are stopped at the end, also on failure. Skips only where the binary is missing.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gossip_sgp.cli import main
from gossip_sgp.launch import find_free_ports

pytestmark = pytest.mark.slow

_DEADLINE = 45.0
"""Seconds the job and Prometheus get to show every worker up with a distance series."""


def _free_run(count: int) -> int:
    """A port p such that p .. p+count-1 are free on loopback now."""
    for _ in range(50):
        (base,) = find_free_ports("127.0.0.1", 1)
        if base + count > 65536:
            continue
        ok = True
        for port in range(base, base + count):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise AssertionError("no run of free ports found")


def _stop(process: subprocess.Popen[bytes], sig: int, grace: float) -> None:
    """Signal ``process``'s group, wait ``grace`` s, then kill the group."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


@contextlib.contextmanager
def _started(command: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield process
    finally:
        # SIGINT: the launcher forwards it and its workers unwind; Prometheus takes SIGTERM.
        _stop(process, signal.SIGINT if command[0] == sys.executable else signal.SIGTERM, 15)


def _query(port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            answer = json.load(response)
    except (OSError, ValueError):
        return []  # not up yet
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


@pytest.mark.timeout(120)
def test_prometheus_scrapes_four_workers(tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(
            "the prometheus binary is not on PATH (Debian: apt-get install prometheus; "
            "`make test` runs scripts/ensure-test-tools to install it)"
        )
    base = _free_run(4)
    (prom_port,) = find_free_ports("127.0.0.1", 1, exclude=range(base, base + 4))
    targets = ",".join(f"127.0.0.1:{base + rank}" for rank in range(4))
    config = io.StringIO()
    with contextlib.redirect_stdout(config):
        code = main(["prometheus-config", "--targets", targets, "--scrape-interval", "1s"])
    assert code == 0
    (tmp_path / "prometheus.yml").write_text(config.getvalue())

    job = [sys.executable, "-m", "gossip_sgp.cli", "launch", "--nproc", "4"]
    job += ["--metrics-port", str(base), "--timeout", "60", "--grace", "5"]
    job += ["-m", "gossip_sgp.digits", "--epochs", "100000", "--quiet"]
    prometheus = [binary, f"--config.file={tmp_path / 'prometheus.yml'}"]
    prometheus += [f"--storage.tsdb.path={tmp_path / 'data'}"]
    prometheus += [f"--web.listen-address=127.0.0.1:{prom_port}"]
    up: list[dict[str, Any]] = []
    distance: list[dict[str, Any]] = []
    with (
        _started(job, tmp_path / "job.log") as workers,
        _started(prometheus, tmp_path / "prometheus.log") as server,
    ):
        deadline = time.monotonic() + _DEADLINE
        while time.monotonic() < deadline:
            assert workers.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
            assert server.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            up = _query(prom_port, 'up{job="gossip-sgp"}')
            distance = _query(prom_port, "gossip_sgp_consensus_distance")
            if (
                len(up) == 4
                and all(r["value"][1] == "1" for r in up)
                and len({r["metric"]["rank"] for r in distance}) == 4
            ):
                break
            time.sleep(0.5)
    log = (tmp_path / "job.log").read_text()[-3000:]
    assert sorted(r["metric"]["instance"] for r in up) == targets.split(","), (up, log)
    assert all(r["value"][1] == "1" for r in up), (up, log)
    ranks = sorted(r["metric"]["rank"] for r in distance)
    assert ranks == ["0", "1", "2", "3"], (distance, log)
    for r in distance:
        assert 0.0 <= float(r["value"][1]) < 10.0
