"""``gossip-sgp bench``: argument checks, result files, Ctrl-C, and an emulated-network run."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from gossip_sgp import cli
from gossip_sgp.bench import Network, emulator_problem, parse_network
from tests.procs import Jobs, alive, descendants, drain, read_until


def test_parse_network() -> None:
    assert parse_network("loopback") == Network("loopback")
    assert parse_network("1gbit-50ms") == Network("1gbit-50ms", rate_mbit=1000.0, delay_ms=50.0)
    assert parse_network("100mbit-100ms").link_text() == "100mbit,100ms"
    assert parse_network("500kbit-0.5ms") == Network("500kbit-0.5ms", 0.5, 0.5)


@pytest.mark.parametrize("text", ["1gbit", "50ms", "1gbit,50ms", "fast", "0mbit-5ms", "1tbit-5ms"])
def test_parse_network_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="bad network"):
        parse_network(text)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--networks", "1gbit"], "bad network '1gbit'"),
        (["--algorithms", "allreduce,sgd"], "unknown algorithm(s) sgd"),
        (["--workers", "1"], "worker counts must be in 2..64"),
        (["--workers", "four"], "worker counts must be integers"),
        (["--stragglers", "0.5"], "straggler factors must be in 1..100"),
    ],
)
def test_bench_rejects_bad_arguments(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--out", str(tmp_path), *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_rejects_bad_numbers(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--repeats must be >= 1"):
        cli.main(["bench", "--out", str(tmp_path), "--repeats", "0"])
    with pytest.raises(SystemExit, match="--run-timeout must be > 0"):
        cli.main(["bench", "--out", str(tmp_path), "--run-timeout", "0"])
    with pytest.raises(SystemExit, match="--compression: unknown codec 'zip'"):
        cli.main(["bench", "--out", str(tmp_path), "--compression", "zip"])


def _read(out: Path) -> tuple[list[dict[str, str]], dict[str, object]]:
    with open(out / "bench.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((out / "bench.json").read_text(encoding="utf-8"))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_quick_bench_on_loopback_writes_csv_and_json(jobs: Jobs, tmp_path: Path) -> None:
    algorithms = ["allreduce", "dpsgd", "adpsgd", "sgp-async", "local"]
    out = jobs.run(
        "bench",
        "--quick",
        "--workers",
        "2",
        "--algorithms",
        ",".join(algorithms),
        "--compression",
        "int8",
        "--out",
        str(tmp_path),
        timeout=360,
    )
    rows, document = _read(tmp_path)
    assert [r["algorithm"] for r in rows] == algorithms
    for r in rows:
        assert r["status"] == "ok", r
        assert (r["network"], r["workers"], r["straggler"]) == ("loopback", "2", "1.0")
        assert 0 < float(r["iteration_s_min"]) <= float(r["iteration_s_median"])
        assert float(r["iteration_s_median"]) <= float(r["iteration_s_max"])
        assert float(r["samples_per_s"]) > 0
        assert 0.0 <= float(r["accuracy"]) <= 1.0
        assert r["model"] == "mlp"
        assert r["compression"] == ("int8" if r["algorithm"] == "sgp-async" else "none")
    sent = {r["algorithm"]: float(r["bytes_sent_per_worker"]) for r in rows}
    assert sent["local"] == 0
    assert all(v > 0 for a, v in sent.items() if a != "local")
    runs = document["runs"]
    assert isinstance(runs, list)
    assert len(runs) == len(algorithms)
    assert all(r["evaluations"] for r in runs)  # --eval-every 1: one point per epoch
    summary = {e["algorithm"]: e for e in document["summary"]}  # type: ignore[attr-defined]
    assert summary["allreduce"]["speedup_vs_allreduce"]["median"] == 1.0
    assert summary["local"]["time_vs_local"]["median"] == 1.0
    assert "| loopback | 2 | x1 | adpsgd |" in out  # the table at the end


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_stops_the_workers(jobs: Jobs, tmp_path: Path, signum: int) -> None:
    proc = jobs.start(
        "bench",
        "--quick",
        "--workers",
        "2",
        "--algorithms",
        "local",
        "--epochs",
        "10000",
        "--out",
        str(tmp_path),
    )
    read_until(proc, "[1/1] local", within=60, what="the bench did not start")
    deadline = time.monotonic() + 60
    workers: list[int] = []
    while len(workers) < 2 and time.monotonic() < deadline:
        workers = descendants(proc.pid)
        time.sleep(0.1)
    assert len(workers) >= 2, "the workers did not start"
    jobs.workers.update(workers)
    output = drain(proc)
    time.sleep(3)  # into training
    proc.send_signal(signum)
    code = proc.wait(30)
    log = output(10)[-3000:]
    assert code == 130, log
    assert not [pid for pid in workers if alive(pid)], log
    rows, _ = _read(tmp_path)
    assert rows == []  # the interrupted run is not recorded as a result


def _namespaces() -> set[str]:
    text = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in text.splitlines() if line.strip()}


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_quick_bench_over_the_wan_emulator(jobs: Jobs, tmp_path: Path) -> None:
    problem = emulator_problem()
    if problem is not None:
        pytest.skip(problem)
    proc = jobs.start(
        "bench",
        "--quick",
        "--workers",
        "2",
        "--networks",
        "100mbit-20ms",
        "--algorithms",
        "allreduce,sgp-overlap,local",
        "--out",
        str(tmp_path),
    )
    out, _ = proc.communicate(timeout=360)
    assert proc.returncode == 0, out[-4000:]
    rows, _ = _read(tmp_path)
    by = {r["algorithm"]: r for r in rows}
    assert all(r["status"] == "ok" for r in rows), out[-4000:]
    assert {r["network"] for r in rows} == {"100mbit-20ms"}
    # Each all-reduce crosses the link at least once: 20 ms one way. Loopback takes < 1 ms.
    assert float(by["allreduce"]["iteration_s_median"]) >= 0.02
    assert float(by["local"]["iteration_s_median"]) < 0.02
    left = {n for n in _namespaces() if n.startswith(f"gsgpwan-{proc.pid}-")}
    assert not left, f"namespaces left behind: {left}"
    assert os.geteuid() == 0
