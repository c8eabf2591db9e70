"""A peer flooding garbage cannot stop training, exhaust memory or sneak mass in.

Four workers train (threads of this process, each with its own GossipNode over real ZeroMQ
sockets on loopback); once rank 0 has taken its first steps, a separate process pushes
random multipart frames at rank 0's gossip port as fast as it can for 10 seconds.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from gossip_sgp import SGP, GossipConfig, GossipNode
from gossip_sgp.launch import find_free_ports
from tests.procs import Record, record

pytestmark = pytest.mark.slow

FLOOD_SECONDS = 10.0
STEPS = 600
STEP_SECONDS = 0.025  # at least 15 s of training: the flood falls in the middle
BEFORE_STEPS = 100  # rank 0's steps before the flood: its step rate on this machine now
FLOOD_RATE_FRACTION = 0.25
"""Rank 0's step rate during the flood, at least this part of its rate just before it.

Relative, so that it does not depend on the machine's speed (it used to be 100 steps in the
10 s: about 140-180 were measured at load average 12-15 on the 2-core machine, a margin of
1.4-1.8). Measured, 7 runs on the 2-core machine loaded by other test runs: 0.48, 0.63
and 0.66 at load average 12-15 (14-18 steps/s during the flood against 21-30 before),
0.75-0.84 at load average 6-7 (24-28 against 31-33); so 0.25 leaves about half the
lowest. A receiver that backs off after each rejected message (``await
asyncio.sleep(0.1)`` in place of ``sleep(0)`` in ``ZmqTransport.recv``,
transports/zmq.py) fails the test: rank 0 then ran at 0.15 of its rate before the flood
(4.5 against 31 steps/s; the flooder also got at most 1000 messages out, which the test
checks first)."""

FLOODER = r"""
import os, random, sys, time
import zmq
address, seconds = sys.argv[1], float(sys.argv[2])
ctx = zmq.Context()
sock = ctx.socket(zmq.PUSH)
sock.setsockopt(zmq.LINGER, 0)
sock.setsockopt(zmq.SNDHWM, 1000)
sock.connect(address)
rng = random.Random(0)
blobs = [os.urandom(rng.choice([1, 16, 300, 4096, 65536, 1 << 20])) for _ in range(64)]
end, sent = time.monotonic() + seconds, 0
while time.monotonic() < end:
    frames = [rng.choice(blobs) for _ in range(rng.randint(1, 6))]
    try:
        sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        sent += 1
    except zmq.Again:
        time.sleep(0.0005)
print(sent, flush=True)
sock.close(linger=0)
ctx.term()
"""


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.measured
@pytest.mark.timeout(120)
def test_training_goes_on_under_a_garbage_flood(record_property: Record) -> None:
    n = 4
    ports = find_free_ports("127.0.0.1", n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []
    flood_window: list[float] = []
    started = threading.Barrier(n + 1)
    stamps0: list[float] = []  # when rank 0 finished each step, as it goes
    warmed_up = threading.Event()  # rank 0 has taken BEFORE_STEPS steps

    def worker(rank: int) -> None:
        try:
            config = GossipConfig.local(n, rank, ports=ports, timeout=30.0)
            with GossipNode(config) as node:
                x = torch.nn.Parameter(torch.full((1000,), float(rank), dtype=torch.float64))
                opt = torch.optim.SGD([x], lr=0.01)
                sgp = SGP([x], opt, node)
                started.wait(30)
                stamps = stamps0 if rank == 0 else []
                for _ in range(STEPS):
                    time.sleep(STEP_SECONDS)  # the "compute"
                    opt.zero_grad()
                    (0.5 * (x - float(rank)).pow(2).sum()).backward()
                    sgp.step()
                    stamps.append(time.monotonic())
                    if len(stamps) == BEFORE_STEPS and rank == 0:
                        warmed_up.set()
                sgp.consensus(tol=1e-12)
                results[rank] = {
                    "x": x.detach().clone(),
                    "stamps": stamps,
                    "rejected": sum(node.stats.rejected.values()) + sum(node.rejected.values()),
                    "weight": sgp.weight,
                }
        except BaseException as exc:
            errors.append(exc)
            started.abort()

    threads = [threading.Thread(target=worker, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    started.wait(30)
    assert warmed_up.wait(60) or errors, f"rank 0 did not get to step {BEFORE_STEPS}"
    assert not errors, errors
    baseline = rss_bytes()
    peak = baseline
    flood_window.append(time.monotonic())
    flooder = subprocess.Popen(
        [sys.executable, "-c", FLOODER, f"tcp://127.0.0.1:{ports[0]}", str(FLOOD_SECONDS)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        while flooder.poll() is None:
            peak = max(peak, rss_bytes())
            time.sleep(0.05)
        flood_window.append(time.monotonic())
        sent = int(flooder.communicate(timeout=10)[0])
    finally:
        if flooder.poll() is None:
            flooder.kill()
            flooder.wait(10)
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert not errors, errors

    assert sent > 1000, f"the flooder only got {sent} messages out"
    rank0 = results[0]
    # every garbage message was rejected and counted ...
    assert rank0["rejected"] >= sent * 0.9, (rank0["rejected"], sent)
    # ... while rank 0 kept training through the flood, at a good part of the rate it
    # trained at just before (on the same machine, under the same load) ...
    stamps = rank0["stamps"]
    before = (BEFORE_STEPS - 1) / (stamps[BEFORE_STEPS - 1] - stamps[0])
    start, end = flood_window
    during = sum(start < s < end for s in stamps) / (end - start)
    after = [s for s in stamps if s > end]
    rates = f"steps/s: {before:.1f} before, {during:.1f} during the flood"
    if len(after) > 1:
        rates += f", {(len(after) - 1) / (after[-1] - after[0]):.1f} after"
    record(
        record_property,
        f"rate_ratio >= {FLOOD_RATE_FRACTION}",
        rate_ratio=during / before,
        rss_growth_mib=(peak - baseline) / 2**20,
    )
    assert during >= FLOOD_RATE_FRACTION * before, rates
    # ... with bounded memory (the flood pushed far more than this through) ...
    assert peak - baseline < 256 << 20, f"RSS grew by {(peak - baseline) >> 20} MiB"
    # ... and no garbage got into the model: the workers agree on the joint optimum.
    target = torch.full((1000,), (n - 1) / 2, dtype=torch.float64)
    for r in results:
        torch.testing.assert_close(r["x"], target, atol=2e-2, rtol=0)
    assert sum(r["weight"] for r in results) == pytest.approx(n, abs=1e-9)
