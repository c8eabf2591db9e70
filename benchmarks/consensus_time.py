"""``SGP.consensus()`` against the synchronous steps it is made of, side by side in one run.

    gossip-sgp launch --nproc 4 -m benchmarks.consensus_time --floats 10000000

Every worker holds one flat parameter of ``--floats`` float32 values (its rank everywhere),
takes ``--steps`` synchronous SGP steps with learning rate 0 (each one gossip round: the same
message and wait as a consensus round), then calls ``consensus()``. Rank 0 prints the median
step time, the time and rounds of ``consensus()``, and their ratio to the same number of
steps; with ``--json``, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from gossip_sgp import SGP, GossipConfig, GossipNode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--floats", type=int, default=10_000_000, help="parameters per worker")
    p.add_argument("--steps", type=int, default=8, help="synchronous steps timed")
    p.add_argument("--tol", type=float, default=1e-6, help="consensus() tolerance")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.floats < 1 or args.steps < 1:
        p.error("--floats and --steps must be at least 1")
    config = GossipConfig.from_env()
    with GossipNode(config) as node:
        x = torch.nn.Parameter(torch.full((args.floats,), float(config.rank)))
        sgp = SGP([x], torch.optim.SGD([x], lr=0.0), node, staleness=0)
        for _ in range(sgp.start_up_rounds):  # the start-up barrier: not timed
            sgp.step()
        times = []
        for _ in range(args.steps):
            started = time.perf_counter()
            sgp.step()
            times.append(time.perf_counter() - started)
        with torch.no_grad():  # the workers' models apart again, as after training
            x.fill_(float(config.rank))
            sgp.state.numerator[0].copy_(x * sgp.weight)
        first = sgp.round
        started = time.perf_counter()
        disagreement = sgp.consensus(tol=args.tol)
        seconds = time.perf_counter() - started
        rounds = sgp.round - first
    step = statistics.median(times)
    result = {
        "workers": config.world_size,
        "floats": args.floats,
        "step_seconds": step,
        "consensus_seconds": seconds,
        "consensus_rounds": rounds,
        "ratio": seconds / (rounds * step),
        "disagreement": disagreement,
    }
    if config.rank == 0:
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(
                f"{config.world_size} workers, {args.floats} floats: one synchronous step "
                f"{step:.3f} s; consensus() {seconds:.3f} s in {rounds} rounds "
                f"= {result['ratio']:.2f}x its rounds' steps (disagreement {disagreement:.1e})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
