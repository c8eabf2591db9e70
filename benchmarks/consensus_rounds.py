"""Rounds of push-sum gossip to reach a consensus error, per topology and world size.

Runs the simulator (the same push-sum code as the workers, over the in-process transport) and
prints, for each world size and topology, the first round whose max relative consensus error
``max_i ||z_i - mean|| / ||mean||`` is at most ``--tol``, the error after the last round, and
the wall time.

    python benchmarks/consensus_rounds.py --sizes 16 64 256 1024 --rounds 60 --dim 10000
"""

from __future__ import annotations

import argparse
import json
import sys

from gossip_sgp.simulate import SimulationConfig, simulate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256, 1024], help="nodes")
    p.add_argument(
        "--topologies", nargs="+", default=["exponential", "base-k", "ring"], help="schedules"
    )
    p.add_argument("--rounds", type=int, default=60, help="rounds to simulate")
    p.add_argument("--dim", type=int, default=10_000, help="vector length per node")
    p.add_argument("--tol", type=float, default=1e-6, help="consensus error to reach")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    args = p.parse_args(argv)
    if not args.json:
        print(
            f"{'nodes':>6} {'topology':<12} {'rounds to ' + format(args.tol, 'g'):>16} "
            f"{'error after ' + str(args.rounds):>18} {'seconds':>8}"
        )
    for n in args.sizes:
        for topology in args.topologies:
            result = simulate(
                SimulationConfig(nodes=n, rounds=args.rounds, topology=topology, dim=args.dim)
            )
            reached = next((t + 1 for t, e in enumerate(result.errors) if e <= args.tol), None)
            row = {
                "nodes": n,
                "topology": topology,
                "rounds_to_tol": reached,
                "final_error": result.errors[-1],
                "seconds": result.seconds,
            }
            if args.json:
                print(json.dumps(row))
            else:
                shown = str(reached) if reached is not None else f"> {args.rounds}"
                print(
                    f"{n:>6} {topology:<12} {shown:>16} {result.errors[-1]:>18.3e} "
                    f"{result.seconds:>8.2f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
