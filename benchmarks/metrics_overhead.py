"""What Prometheus metrics cost per training step: the same loop with metrics off and on.

1. The metrics code alone, in one process with the digits model: the receive and fold-in
   hooks per message and one scrape of a worker's registry.
2. The training loop of gossip_sgp/digits.py (SmallCNN on digits, batch 32, SGP) in two
   jobs of ``--workers`` threads over the in-process transport, one with metrics off and one
   serving them on loopback while a scraper fetches every worker's ``/metrics`` every
   ``--scrape-interval`` seconds. The jobs run alternating blocks of ``--steps`` steps, so
   load changes on the machine hit both alike; it prints the median step time of each and
   their ratio.
3. With ``--launch-pairs N``, also whole ``gossip-sgp launch`` jobs (one process per worker,
   ZeroMQ), off and on alternately: the real setting, but far noisier on a shared machine.

    python benchmarks/metrics_overhead.py
    python benchmarks/metrics_overhead.py --blocks 40 --launch-pairs 5
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import torch
from prometheus_client import CollectorRegistry, generate_latest

from gossip_sgp import SGP, GossipConfig, GossipNode, Message
from gossip_sgp.digits import SmallCNN
from gossip_sgp.launch import find_free_ports
from transports import InProcNetwork


def _free_run(count: int) -> int:
    """A port p such that p .. p+count-1 are free on loopback now."""
    for _ in range(50):
        (base,) = find_free_ports("127.0.0.1", 1)
        if base + count <= 65536 and all(_bindable(base + i) for i in range(count)):
            return base
    raise RuntimeError("no run of free ports")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _scrape_loop(
    urls: list[str],
    interval: float,
    stop: threading.Event,
    count: list[int],
    active: threading.Event | None = None,
) -> None:
    while not stop.wait(interval):
        if active is not None and not active.is_set():
            continue  # the other job's block is running: its CPU time must not include ours
        for url in urls:
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    response.read()
                count[0] += 1
            except OSError:
                pass  # not up yet, or already gone


def run_job(workers: int, epochs: int, metrics: bool, interval: float) -> tuple[float, int]:
    """One launch; returns (mean per-worker seconds per step, scrapes answered)."""
    cmd = [sys.executable, "-m", "gossip_sgp.cli", "launch", "--nproc", str(workers)]
    base = 0
    if metrics:
        base = _free_run(workers)
        cmd += ["--metrics-port", str(base)]
    cmd += ["-m", "gossip_sgp.digits", "--quiet", "--json"]
    cmd += ["--epochs", str(epochs)]
    stop, count = threading.Event(), [0]
    scraper = None
    if metrics:
        urls = [f"http://127.0.0.1:{base + r}/metrics" for r in range(workers)]
        scraper = threading.Thread(target=_scrape_loop, args=(urls, interval, stop, count))
        scraper.start()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True).stdout
    finally:
        stop.set()
        if scraper is not None:
            scraper.join()
    line = next(x for x in reversed(out.splitlines()) if x.startswith("[rank 0] {"))
    summary = json.loads(line.removeprefix("[rank 0] "))
    per_worker = [r["train_seconds"] / r["steps"] for r in summary["per_worker"]]
    return statistics.mean(per_worker), count[0]


class _Job:
    """``workers`` threads training the digits model with SGP over the in-process transport,
    stepping in blocks on request: two jobs (metrics off, on) can alternate block by block."""

    def __init__(self, workers: int, metrics: bool, interval: float) -> None:
        from gossip_sgp.digits import load_digits_split

        self.x, self.y, _, _ = load_digits_split()
        self.workers = workers
        self.metrics = metrics
        self.net = InProcNetwork(workers)
        self.ports = find_free_ports("127.0.0.1", workers) if metrics else [0] * workers
        self.go = [threading.Semaphore(0) for _ in range(workers)]
        self.done = threading.Semaphore(0)
        self.steps = 0
        self.seconds: list[float] = [0.0] * workers
        self.failed: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._worker, args=(r,), daemon=True) for r in range(workers)
        ]
        self.stop = threading.Event()
        self.active = threading.Event()
        self.scraper: threading.Thread | None = None
        self.scrapes = [0]
        for t in self.threads:
            t.start()
        if metrics:
            urls = [f"http://127.0.0.1:{p}/metrics" for p in self.ports]
            self.scraper = threading.Thread(
                target=_scrape_loop,
                args=(urls, interval, self.stop, self.scrapes, self.active),
                daemon=True,
            )
            self.scraper.start()

    def _worker(self, rank: int) -> None:
        config = GossipConfig.local(
            self.workers,
            rank,
            ports=range(40000, 40000 + self.workers),
            transport="inproc",
            metrics_ports=self.ports,
        )
        try:
            with GossipNode(config, transport=self.net.transport(rank)) as node:
                torch.manual_seed(0)
                model = SmallCNN()
                opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
                sgp = SGP(model.parameters(), opt, node)
                x, y = self.x[rank :: self.workers], self.y[rank :: self.workers]
                gen = torch.Generator().manual_seed(rank)
                while True:
                    self.go[rank].acquire()
                    if self.steps == 0:
                        return
                    started = time.perf_counter()
                    for _ in range(self.steps):
                        idx = torch.randint(len(y), (32,), generator=gen)
                        opt.zero_grad()
                        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                        loss.backward()  # type: ignore[no-untyped-call]
                        sgp.step()
                        sgp.report(loss=loss.item())
                    self.seconds[rank] = time.perf_counter() - started
                    self.done.release()
        except BaseException as exc:
            self.failed.append(exc)
            self.done.release()

    def block(self, steps: int) -> tuple[float, float]:
        """Run ``steps`` steps on every worker: (wall, CPU) seconds per step.

        Wall: the workers' mean. CPU: the whole process's CPU time during the block (training,
        gossip, metrics server and scraper threads; the other job is idle meanwhile) / steps.
        """
        self.steps = steps
        cpu = time.process_time()
        self.active.set()
        for go in self.go:
            go.release()
        for _ in range(self.workers):
            self.done.acquire()
        self.active.clear()
        cpu = time.process_time() - cpu
        if self.failed:
            raise self.failed[0]
        return statistics.mean(self.seconds) / steps, cpu / steps

    def close(self) -> None:
        self.steps = 0
        for go in self.go:
            go.release()
        for t in self.threads:
            t.join(30)
        self.stop.set()
        if self.scraper is not None:
            self.scraper.join(10)


def interleaved(
    workers: int, blocks: int, steps: int, interval: float
) -> tuple[list[tuple[float, float]], list[tuple[float, float]], int]:
    """(wall, CPU) per-step times of alternating blocks with metrics off and on (scraped)."""
    torch.set_num_threads(1)
    off_job = _Job(workers, False, interval)
    on_job = _Job(workers, True, interval)
    off: list[tuple[float, float]] = []
    on: list[tuple[float, float]] = []
    try:
        off_job.block(steps)  # warm-up: start-up rounds, allocator, first scrapes
        on_job.block(steps)
        for i in range(blocks):
            order = [(off_job, off), (on_job, on)]
            for job, times in order if i % 2 == 0 else reversed(order):
                times.append(job.block(steps))
    finally:
        off_job.close()
        on_job.close()
    return off, on, on_job.scrapes[0]


def micro(repeats: int = 2000) -> dict[str, float]:
    """CPU seconds per call of the metrics hooks and of one scrape, for the digits model.

    CPU time of this thread, not wall time: other programs on the machine do not inflate it.
    """
    torch.manual_seed(0)
    model = SmallCNN()
    net = InProcNetwork(2)
    config = GossipConfig.local(2, 0, ports=[1, 2], transport="inproc")
    node = GossipNode(config, transport=net.transport(0), registry=CollectorRegistry())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sgp = SGP(model.parameters(), optimizer, node)
    metrics = node.metrics
    assert metrics is not None
    share = tuple(x * 0.5 for x in sgp.state.numerator)
    messages = [
        Message(
            sender=1, receiver=0, round=i, seq=i, weight=0.5, tensors=share, sent_at=time.time()
        )
        for i in range(repeats)
    ]
    flats = sgp._flats
    costs: dict[str, float] = {}
    for sampled in (True, False):
        # A sampled message also keeps a strided sample of the sender's model (one message
        # per metrics._SAMPLE_INTERVAL seconds); the others only their send time.
        received = folded = 0.0
        for i, m in enumerate(messages):
            if sampled:
                metrics._next_sample = 0.0
            started = time.thread_time()
            metrics.received(m)
            received += time.thread_time() - started
            receipt = (m.sender, m.seq, m.round)
            started = time.thread_time()
            metrics.folded_in([receipt], i, flats, coalesced=False)
            folded += time.thread_time() - started
        key = "sampled" if sampled else "plain"
        costs[f"received_{key}"] = received / repeats
        costs[f"folded_{key}"] = folded / repeats
    scrapes = 200
    started = time.thread_time()
    for _ in range(scrapes):
        generate_latest(metrics.registry)
    scrape = (time.thread_time() - started) / scrapes
    costs["scrape"] = scrape
    return costs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2, help="workers per job (default 2)")
    p.add_argument("--blocks", type=int, default=20, help="off/on block pairs (default 20)")
    p.add_argument("--steps", type=int, default=50, help="steps per block (default 50)")
    p.add_argument(
        "--scrape-interval", type=float, default=1.0, help="seconds between scrapes (default 1)"
    )
    p.add_argument(
        "--launch-pairs",
        type=int,
        default=0,
        help="also run this many off/on pairs of whole `gossip-sgp launch` jobs (default 0)",
    )
    p.add_argument("--epochs", type=int, default=30, help="epochs per launched job (default 30)")
    args = p.parse_args(argv)
    costs = micro()
    print(
        "metrics code, digits model (43k parameters), CPU time per message, receive + fold-in "
        f"hooks: sampled {1e6 * costs['received_sampled']:.1f} + "
        f"{1e6 * costs['folded_sampled']:.1f} us, others {1e6 * costs['received_plain']:.1f} + "
        f"{1e6 * costs['folded_plain']:.1f} us; one scrape {1e3 * costs['scrape']:.2f} ms"
    )
    off, on, scrapes = interleaved(args.workers, args.blocks, args.steps, args.scrape_interval)
    print(
        f"\n{args.workers} workers as threads (in-process transport), {args.blocks} alternating "
        f"blocks of {args.steps} steps each, metrics on = served and scraped every "
        f"{args.scrape_interval:g} s ({scrapes} scrapes)"
    )
    m_off = 0.0
    for kind, index in (("wall", 0), ("CPU", 1)):
        a = statistics.median(t[index] for t in off)
        b = statistics.median(t[index] for t in on)
        ratios = sorted(y[index] / x[index] for x, y in zip(off, on, strict=True))
        q = len(ratios) // 4
        print(
            f"median {kind} time per step: off {1e3 * a:.2f} ms, on {1e3 * b:.2f} ms, "
            f"ratio on/off {b / a:.4f}; block ratios: median {statistics.median(ratios):.4f}, "
            f"quartiles {ratios[q]:.4f} .. {ratios[-q - 1]:.4f}"
        )
        m_off = a if index == 0 else m_off
    per_step = costs["received_plain"] + costs["folded_plain"]
    print(
        f"hook cost of a step with one unsampled message {1e6 * per_step:.1f} us = "
        f"{100 * per_step / m_off:.2f}% of the median wall time per step"
    )
    if args.launch_pairs:
        print(
            f"\n`gossip-sgp launch` jobs, {args.workers} workers, {args.epochs} epochs, "
            f"per-worker step time (ms):"
        )
        print(f"{'pair':>4} {'off':>8} {'on':>8} {'scrapes':>8}")
        l_off: list[float] = []
        l_on: list[float] = []
        for pair in range(args.launch_pairs):
            t_off, _ = run_job(args.workers, args.epochs, False, args.scrape_interval)
            t_on, n = run_job(args.workers, args.epochs, True, args.scrape_interval)
            l_off.append(t_off)
            l_on.append(t_on)
            print(f"{pair:>4} {1e3 * t_off:>8.2f} {1e3 * t_on:>8.2f} {n:>8}", flush=True)
        a, b = statistics.median(l_off), statistics.median(l_on)
        print(f"median: off {1e3 * a:.2f} ms, on {1e3 * b:.2f} ms, ratio on/off {b / a:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
