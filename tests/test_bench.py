"""``gossip-sgp bench``: argument checks, result files, Ctrl-C, and an emulated-network run."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from gossip_sgp import cli
from gossip_sgp.bench import Network, emulator_problem, parse_network, plan_from_args, summarize
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
    with pytest.raises(SystemExit, match="--local-steps must be >= 1"):
        cli.main(["bench", "--out", str(tmp_path), "--local-steps", "0"])
    with pytest.raises(SystemExit, match="--outer must be one of average, diloco, slowmo"):
        cli.main(["bench", "--out", str(tmp_path), "--outer", "adam"])
    with pytest.raises(SystemExit, match=r"--fragments must be in 1\.\.8 \(--local-steps\)"):
        cli.main(["bench", "--out", str(tmp_path), "--fragments", "9"])
    with pytest.raises(SystemExit, match=r"--fragments must be in 1\.\.2"):
        cli.main(
            ["bench", "--out", str(tmp_path), "--local-steps", "2", "--algorithms", "sgp-stream"]
        )
    with pytest.raises(SystemExit, match=r"--emulate-compute must be in 0\.\.60000"):
        cli.main(["bench", "--out", str(tmp_path), "--emulate-compute", "-1"])


def test_the_plan_carries_local_steps_and_emulated_compute(tmp_path: Path) -> None:
    argv = ["--local-steps", "32", "--outer", "diloco", "--emulate-compute", "25"]
    args = cli.build_parser().parse_args(
        ["bench", "--out", str(tmp_path), *argv, "--fragments", "8"]
    )
    plan = plan_from_args(args)
    assert (plan.local_steps, plan.outer, plan.emulate_compute_ms) == (32, "diloco", 25.0)
    assert plan.fragments == 8
    assert plan.train_args[-2:] == ("--emulate-compute", "25")
    default = plan_from_args(cli.build_parser().parse_args(["bench", "--out", str(tmp_path)]))
    assert "--emulate-compute" not in default.train_args
    # --fragments (default 4) is checked against H only where a streamed run is planned
    short = ["bench", "--out", str(tmp_path), "--local-steps", "2", "--algorithms", "sgp-local"]
    assert plan_from_args(cli.build_parser().parse_args(short)).local_steps == 2


def _row(
    algorithm: str, repeat: int, it: float, sps: float, status: str = "ok", mean: float = math.nan
) -> dict[str, Any]:
    return {
        "iteration_s_mean": mean,
        "network": "loopback",
        "workers": 2,
        "straggler": 1.0,
        "algorithm": algorithm,
        "repeat": repeat,
        "status": status,
        "iteration_s_median": it,
        "samples_per_s": sps,
        "accuracy": 0.9,
    }


@pytest.mark.timeout(30)
def test_summary_ratios_are_taken_within_each_repeat() -> None:
    """Fails if ``bench.summarize`` gets a ratio wrong: e.g. the mutation that inverts the
    speed-up (``_paired(mine, allreduce, ...)`` instead of ``_paired(allreduce, mine, ...)``)
    makes it fail (dpsgd's speed-up 0.25..0.5 instead of 2..4); a ratio of the medians
    instead of a median of per-repeat ratios would too (min 3.0, not 2.0). Expected values
    are worked out by hand from the rows below."""
    rows = [
        _row("allreduce", 0, 0.4, 100.0),
        _row("dpsgd", 0, 0.2, 200.0),
        _row("local", 0, 0.1, 400.0, mean=0.1),
        _row("allreduce", 1, 0.8, 50.0),
        _row("dpsgd", 1, 0.2, 200.0),
        _row("local", 1, 0.05, 800.0, mean=0.05),
        _row("allreduce", 2, math.nan, math.nan, status="timeout"),  # repeat 2: no pair
        _row("dpsgd", 2, 0.3, 150.0),
        _row("sgp-local", 0, 0.1, 300.0, mean=0.15),
        _row("sgp-local", 1, 0.05, 600.0, mean=0.1),
    ]
    summary = {e["algorithm"]: e for e in summarize(rows)}
    dpsgd = summary["dpsgd"]
    assert (dpsgd["runs"], dpsgd["ok"]) == (3, 3)
    assert dpsgd["iteration_s"] == {"median": 0.2, "min": 0.2, "max": 0.3}
    # allreduce/dpsgd per repeat: 0.4/0.2 = 2 and 0.8/0.2 = 4 (repeat 2 has no allreduce)
    assert dpsgd["speedup_vs_allreduce"] == {"median": 3.0, "min": 2.0, "max": 4.0}
    assert dpsgd["throughput_vs_allreduce"] == {"median": 3.0, "min": 2.0, "max": 4.0}
    # dpsgd/local per repeat: 0.2/0.1 = 2 and 0.2/0.05 = 4
    assert dpsgd["time_vs_local"] == {"median": 3.0, "min": 2.0, "max": 4.0}
    assert dpsgd["accuracy_minus_allreduce"] == {"median": 0.0, "min": 0.0, "max": 0.0}
    # the mean step time, which counts the outer steps: 0.15/0.1 = 1.5 and 0.1/0.05 = 2
    local_steps = summary["sgp-local"]
    assert local_steps["time_vs_local"] == {"median": 1.0, "min": 1.0, "max": 1.0}
    assert local_steps["iteration_s_mean"] == {"median": 0.125, "min": 0.1, "max": 0.15}
    assert local_steps["mean_time_vs_local"]["median"] == pytest.approx(1.75, rel=1e-12)
    assert local_steps["mean_time_vs_local"]["max"] == pytest.approx(2.0, rel=1e-12)
    # local/allreduce: 0.4/0.1 = 4 and 0.8/0.05 = 16
    assert summary["local"]["speedup_vs_allreduce"] == {"median": 10.0, "min": 4.0, "max": 16.0}


def _read(out: Path) -> tuple[list[dict[str, str]], dict[str, object]]:
    with open(out / "bench.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((out / "bench.json").read_text(encoding="utf-8"))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_quick_bench_on_loopback_writes_csv_and_json(jobs: Jobs, tmp_path: Path) -> None:
    """Fails if a column of the summary is computed wrongly: e.g. the mutation that inverts
    the speed-up in ``bench.summarize`` (``_paired(mine, allreduce, ...)`` instead of
    ``_paired(allreduce, mine, ...)``) makes it fail at ``('dpsgd', 'speedup_vs_allreduce')``.
    The old version compared allreduce with itself and local with itself (1.0 whatever the
    formula) and passed under that mutation."""
    algorithms = [
        "allreduce", "dpsgd", "adpsgd", "sgp-async", "sgp-local-overlap", "sgp-stream", "local"
    ]  # fmt: skip
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
        assert float(r["iteration_s_min"]) <= float(r["iteration_s_mean"])
        assert float(r["iteration_s_mean"]) <= float(r["iteration_s_max"])
        assert float(r["samples_per_s"]) > 0
        assert 0.0 <= float(r["accuracy"]) <= 1.0
        assert r["model"] == "mlp"
        sgp = r["algorithm"].startswith("sgp-")
        assert r["compression"] == ("int8" if sgp else "none")
    sent = {r["algorithm"]: float(r["bytes_sent_per_worker"]) for r in rows}
    assert sent["local"] == 0
    assert all(v > 0 for a, v in sent.items() if a != "local")
    runs = document["runs"]
    assert isinstance(runs, list)
    assert len(runs) == len(algorithms)
    assert all(r["evaluations"] for r in runs)  # --eval-every 1: one point per epoch
    summary = {e["algorithm"]: e for e in document["summary"]}  # type: ignore[attr-defined]
    # The summary's columns, recomputed from the CSV rows (one repeat: median, min and max
    # of each ratio are the ratio of the two runs). allreduce against itself, or local
    # against itself, would be 1.0 by construction; the other algorithms' ratios are not.
    it = {r["algorithm"]: float(r["iteration_s_median"]) for r in rows}
    mean = {r["algorithm"]: float(r["iteration_s_mean"]) for r in rows}
    sps = {r["algorithm"]: float(r["samples_per_s"]) for r in rows}
    acc = {r["algorithm"]: float(r["accuracy"]) for r in rows}
    assert it["local"] != it["allreduce"]  # else an inverted ratio would go unnoticed
    for a in algorithms:
        expected = {
            "iteration_s": it[a],
            "speedup_vs_allreduce": it["allreduce"] / it[a],
            "throughput_vs_allreduce": sps[a] / sps["allreduce"],
            "time_vs_local": it[a] / it["local"],
            "mean_time_vs_local": mean[a] / mean["local"],
            "accuracy_minus_allreduce": acc[a] - acc["allreduce"],
        }
        for column, value in expected.items():
            near = pytest.approx(value, rel=1e-12, abs=1e-15)
            assert summary[a][column] == {"median": near, "min": near, "max": near}, (a, column)
    assert "| loopback | 2 | x1 | adpsgd |" in out  # the table at the end


@pytest.mark.slow  # a bench run: training worker processes (5 s each)
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
