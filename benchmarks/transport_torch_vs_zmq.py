"""Per-round gossip time: the torch.distributed (gloo) transport against ZeroMQ, in one run.

    python benchmarks/transport_torch_vs_zmq.py --params 10000000 --repeats 20
    python benchmarks/transport_torch_vs_zmq.py --json > transports.json

Four CPU worker processes each hold two copies of a model with ``--params`` float32
parameters (one flat tensor: 10M parameters is a 40 MB message) and two gossip nodes, one
over each transport, with synchronous SGP on the exponential graph (one out-peer and one
in-peer per round). A round is one ``SGP.step()`` with a plain SGD optimizer and no gradient:
split the numerator, send half to the round's peer, wait for the in-peer's message, fold it
in, de-bias. The two transports take turns round by round (the first transport alternates
between repeats), so background load on a shared machine hits them alike. A round counts
as long as its slowest worker took; the first ``--warmup`` rounds of each transport are not
reported (connections, first allocations). Prints min / median / max per transport and the
ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from typing import Any

import torch

from gossip_sgp import SGP, GossipConfig, GossipNode
from gossip_sgp.launch import find_free_ports

TRANSPORTS = ("torch", "zmq")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=int, default=10_000_000, help="float32 parameters per model")
    p.add_argument("--repeats", type=int, default=20, help="measured rounds per transport")
    p.add_argument("--warmup", type=int, default=3, help="unreported rounds per transport")
    p.add_argument("--workers", type=int, default=4, help="worker processes")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    for name in ("params", "repeats", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.workers < 2:
        p.error("--workers must be >= 2 (gossip needs a peer)")
    return args


def worker(
    rank: int, args: argparse.Namespace, ports: dict[str, list[int]], master: int, out: Any
) -> None:
    torch.set_num_threads(1)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master), "RANK": str(rank)})
    n = args.workers
    nodes = {
        t: GossipNode(GossipConfig.local(n, rank, ports=ports[t], transport=t, timeout=60.0))
        for t in TRANSPORTS
    }
    times: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
    try:
        sgps = {}
        for t, node in nodes.items():
            node.start()
            gen = torch.Generator().manual_seed(rank)
            param = torch.nn.Parameter(torch.randn(args.params, generator=gen))
            sgps[t] = SGP([param], torch.optim.SGD([param], lr=0.1), node, staleness=0)
        for k in range(args.warmup + args.repeats):
            order = TRANSPORTS if k % 2 == 0 else TRANSPORTS[::-1]
            for t in order:
                started = time.perf_counter()
                sgps[t].step()
                times[t].append(time.perf_counter() - started)
    finally:
        for node in nodes.values():
            node.close()
    out.put((rank, {t: v[args.warmup :] for t, v in times.items()}))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    n = args.workers
    free = find_free_ports("127.0.0.1", 2 * n + 1)
    ports = {"torch": free[:n], "zmq": free[n : 2 * n]}  # the torch transport binds none
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, args, ports, free[-1], out)) for r in range(n)]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=600) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    codes = [p.exitcode for p in procs]
    if any(codes):
        print(f"worker exit codes {codes}", file=sys.stderr)
        return 1
    summary: dict[str, Any] = {
        "workers": n,
        "params": args.params,
        "message_mib": args.params * 4 / 2**20,
        "repeats": args.repeats,
    }
    for t in TRANSPORTS:
        rounds = [max(results[r][t][i] for r in range(n)) * 1e3 for i in range(args.repeats)]
        summary[t] = {
            "min_ms": min(rounds),
            "median_ms": statistics.median(rounds),
            "max_ms": max(rounds),
        }
    summary["ratio_torch_over_zmq"] = summary["torch"]["median_ms"] / summary["zmq"]["median_ms"]
    if args.json:
        print(json.dumps(summary))
        return 0
    print(
        f"{n} CPU workers, {args.params:,} float32 parameters ({summary['message_mib']:.1f} MiB "
        f"per message), synchronous SGP, {args.repeats} rounds per transport"
    )
    print(f"{'transport':<16}{'min ms':>10}{'median ms':>12}{'max ms':>10}")
    for t, label in (("torch", "torch (gloo)"), ("zmq", "zmq")):
        s = summary[t]
        print(f"{label:<16}{s['min_ms']:>10.1f}{s['median_ms']:>12.1f}{s['max_ms']:>10.1f}")
    print(f"median round time, torch / zmq: {summary['ratio_torch_over_zmq']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
