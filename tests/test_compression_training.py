"""Compressed SGP end to end: 8 worker processes over real ZeroMQ sockets, digits CNN.

One seed per codec, same script, epochs and seed as the uncompressed run: int8 and top-k 1%
(with difference coding and a damped step) must stay within a point of it; the bytes each
worker handed to the wire (headers, payloads and acknowledgements, from the transport's
counters) must shrink at least 3.8x with int8 and 20x with top-k 1%. docs/compression.md has
the figures over three seeds (there top-k is within a point on the mean, and 1.08 points
below on its worst seed).
"""

from __future__ import annotations

import pytest

from tests.procs import TRAIN, Jobs, summary

pytestmark = pytest.mark.slow

TOPK = "topk:0.01,ref,step=0.2"
"""Top-k 1%; plain error feedback (``topk:0.01``) ends 4 points below, see the docs."""


def _run(jobs: Jobs, compression: str) -> dict[str, object]:
    out = jobs.run(
        "launch", "--nproc", "8", *TRAIN, "--seed", "1", "--compression", compression, timeout=240
    )
    result = summary(out)
    assert result["compression"] == compression
    return result


@pytest.mark.timeout(780)
def test_compressed_sgp_accuracy_and_bytes(jobs: Jobs) -> None:
    runs = {codec: _run(jobs, codec) for codec in ("none", "int8", TOPK)}
    accuracy = {codec: float(r["accuracy"]) for codec, r in runs.items()}  # type: ignore[arg-type]
    sent = {codec: float(r["bytes_sent_per_worker"]) for codec, r in runs.items()}  # type: ignore[arg-type]
    assert accuracy["int8"] >= accuracy["none"] - 0.01, accuracy
    # 3.94x on the payload; acknowledgements, heartbeats and retransmitted copies are not
    # compressed and their share depends on the run's length (measured 3.90-3.91x in all)
    assert sent["none"] / sent["int8"] >= 3.8, sent
    assert accuracy[TOPK] >= accuracy["none"] - 0.01, accuracy
    assert sent["none"] / sent[TOPK] >= 20, sent
