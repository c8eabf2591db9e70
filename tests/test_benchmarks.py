"""Benchmark scripts that have no test of their own run end to end on a tiny input."""

from __future__ import annotations

import json
import sys

import pytest

from tests.procs import Jobs

pytestmark = pytest.mark.slow


@pytest.mark.timeout(120)
def test_consensus_time_prints_consensus_beside_its_steps(jobs: Jobs) -> None:
    out = jobs.run(
        "launch",
        "--nproc",
        "2",
        "-m",
        "benchmarks.consensus_time",
        "--floats",
        "1000",
        "--steps",
        "3",
        "--json",
        timeout=100,
    )
    line = next(x for x in out.splitlines() if x.startswith("[rank 0] {"))
    result = json.loads(line.removeprefix("[rank 0] "))
    assert result["workers"] == 2
    assert result["floats"] == 1000
    assert result["disagreement"] <= 1e-6
    assert result["consensus_rounds"] >= 2  # two blocks at least: the first has no estimate
    assert result["ratio"] == pytest.approx(
        result["consensus_seconds"] / (result["consensus_rounds"] * result["step_seconds"])
    )


@pytest.mark.timeout(120)
def test_async_skips_prints_the_fraction_of_rounds_without_a_send(jobs: Jobs) -> None:
    out = jobs.run(
        "-m",
        "benchmarks.async_skips",
        "--workers",
        "2",
        "--batch-sizes",
        "32",
        "--seeds",
        "1",
        "--steps",
        "100",
        "--min-step-ms",
        "3",
        timeout=100,
        prefix=(sys.executable,),
    )
    row = out.splitlines()[1].split()
    assert row[:4] == ["2", "32", "3", "1"]  # workers, batch, padding, seed
    assert 0.0 <= float(row[4]) <= 1.0  # skipped fraction
    assert float(row[5]) >= 3.0  # median step in ms: the padding took effect
    assert float(row[6]) > 0.5  # accuracy: it trained
    assert out.splitlines()[2].split()[:4] == ["2", "32", "3", "mean"]


@pytest.mark.timeout(200)
def test_charlm_prints_loss_and_bytes_per_variant(jobs: Jobs) -> None:
    """The language-model comparison, 40 steps: a row per run, a mean per variant against
    AllReduce's, and the local-steps variant sending a fraction of AllReduce's bytes."""
    out = jobs.run(
        "-m", "benchmarks.charlm", "--workers", "2", "--seeds", "0", "--steps", "40",
        "--variants", "allreduce", "slowmo H=16 int8", "--eval-every", "20",
        timeout=180,
        prefix=(sys.executable,),
    )  # fmt: skip
    means = {
        line.split(" mean ")[0].split(None, 1)[1].strip(): line
        for line in out.splitlines()
        if " mean " in line
    }
    assert set(means) == {"allreduce", "slowmo H=16 int8"}, out
    local = means["slowmo H=16 int8"]
    assert "vs allreduce)" in local, out
    sent = {name: float(line.split("nats/byte, ")[1].split()[0]) for name, line in means.items()}
    assert 0 < sent["slowmo H=16 int8"] < sent["allreduce"] / 4, out
