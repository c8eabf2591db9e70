"""SGP against AllReduce on the digits example: accuracy and speed, side by side in one run.

Runs gossip_sgp/digits.py through ``gossip-sgp launch`` for every (workers, algorithm,
seed) and prints test accuracy (mean over workers), per-worker steps per second and wall
time, then per algorithm the mean over seeds and its difference to AllReduce.

    python benchmarks/accuracy.py --workers 4 8 --seeds 0 1 2 3

By default every world size trains for the same number of steps per worker: 40 epochs at 4
workers, 80 at 8 (each worker's shard is half as large), as in tests/test_training.py.
``--epochs E`` runs E epochs at every size instead. ``--min-step-ms MS`` pads every step's
compute to MS milliseconds with a sleep (the CPU stays free, as if each worker had a core or
an accelerator of its own; see benchmarks/async_skips.py), ``--algorithms`` picks a subset.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Any

from benchmarks import add_names_option

ALGORITHMS = {
    "allreduce": ["--algorithm", "allreduce"],
    "sgp sync": ["--staleness", "0"],
    "sgp overlap": ["--staleness", "1"],
    "sgp async": ["--staleness", "none"],
    "local 8": ["--local-steps", "8"],
    "slowmo 8": ["--local-steps", "8", "--outer", "slowmo"],
    "diloco 8": ["--local-steps", "8", "--outer", "diloco"],
}
DEFAULT = ["allreduce", "sgp sync", "sgp overlap", "sgp async"]
"""What runs without ``--algorithms``; the local-steps variants (gossip every 8 steps,
``SGP(local_steps=8, outer=...)``) run when named."""


def run(workers: int, extra: list[str], seed: int, epochs: int) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "gossip_sgp.cli", "launch", "--nproc", str(workers),
        "-m", "gossip_sgp.digits", "--quiet", "--json",
        "--seed", str(seed), "--epochs", str(epochs), *extra,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True).stdout
    line = next(x for x in reversed(out.splitlines()) if x.startswith("[rank 0] {"))
    result: dict[str, Any] = json.loads(line.removeprefix("[rank 0] "))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[4, 8], help="world sizes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="seeds")
    p.add_argument(
        "--epochs",
        type=int,
        help="epochs per run at every size (default: 10 x workers, the same steps per worker)",
    )
    add_names_option(p, "--algorithms", ALGORITHMS, DEFAULT)
    p.add_argument(
        "--min-step-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="pad each step's compute to at least MS milliseconds with a sleep (default 0)",
    )
    args = p.parse_args(argv)
    if not 0 <= args.min_step_ms <= 60_000:
        p.error("--min-step-ms must be in 0..60000")
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be at least 1")
    if any(n < 1 for n in args.workers):
        p.error("--workers must be at least 1")
    print(
        f"{'workers':>7} {'epochs':>6} {'algorithm':<12} {'seed':>4} {'accuracy':>9} "
        f"{'steps/s':>8} {'s':>6}"
    )
    for n in args.workers:
        epochs = args.epochs if args.epochs is not None else 10 * n
        means: dict[str, float] = {}
        for name in args.algorithms:
            extra = [*ALGORITHMS[name], "--min-step-ms", str(args.min_step_ms)]
            accs = []
            for seed in args.seeds:
                r = run(n, extra, seed, epochs)
                accs.append(r["accuracy"])
                print(
                    f"{n:>7} {epochs:>6} {name:<12} {seed:>4} {r['accuracy']:>9.4f} "
                    f"{r['steps_per_second']:>8.1f} {r['seconds']:>6.1f}",
                    flush=True,
                )
            means[name] = statistics.mean(accs)
        for name, mean in means.items():
            vs = ""
            if "allreduce" in means:
                vs = f"  ({100 * (mean - means['allreduce']):+.2f} points vs allreduce)"
            print(f"{n:>7} {name:<12} mean {mean:.4f}{vs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
