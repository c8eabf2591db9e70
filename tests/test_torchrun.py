"""Digits training started by torchrun, and by ``gossip-sgp launch --transport torch``.

Each test runs the launcher as a subprocess in its own session with a hard timeout. torchrun
starts every worker in a session of its own, so on failure the ``jobs`` fixture kills the
process group of every descendant it finds, then the launcher's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.procs import Jobs, check_trained

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ["-m", "gossip_sgp.digits", "--quiet", "--json"]


def _summary(out: str) -> dict[str, object]:
    """Rank 0's closing JSON line (with or without the launcher's ``[rank 0]`` prefix)."""
    for line in reversed(out.splitlines()):
        line = line.removeprefix("[rank 0] ")
        if line.startswith('{"algorithm"'):
            result: dict[str, object] = json.loads(line)
            return result
    raise AssertionError(f"no JSON summary in the output:\n{out[-4000:]}")


def _check(result: dict[str, object], staleness: int) -> None:
    assert result["staleness"] == staleness
    check_trained(result, workers=4)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("transport", ["torch", "zmq"])
def test_torchrun_trains_digits(jobs: Jobs, transport: str) -> None:
    # No peer list: the zmq workers exchange their addresses through torchrun's TCPStore,
    # the torch workers gossip over a gloo group built on the same store.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    args = ["--nproc-per-node", "4", *DIGITS, "--transport", transport, "--epochs", "20"]
    out = jobs.run(*args, prefix=torchrun, cwd=ROOT, timeout=200)
    _check(_summary(out), staleness=0)


@pytest.mark.timeout(240)
def test_launch_overlap_sgp_over_gloo_trains_digits(jobs: Jobs) -> None:
    args = ["--transport", "torch", *DIGITS, "--staleness", "1", "--epochs", "20"]
    out = jobs.run("launch", "--nproc", "4", *args, cwd=ROOT, timeout=200)
    _check(_summary(out), staleness=1)
