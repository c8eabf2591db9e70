"""Benchmark scripts that have no test of their own run end to end on a tiny input."""

from __future__ import annotations

import json

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
