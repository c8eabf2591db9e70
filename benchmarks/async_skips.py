"""How often asynchronous SGP sends nothing, against workers per core and step length.

An asynchronous worker sends a round's share only when it holds a send credit, and a credit
comes back when a peer folds one of its shares in (docs/design.md, "Send credit"). The
fraction of rounds without a send (``SGP.skipped_rounds`` over steps, the Prometheus
``gossip_sgp_skipped_rounds`` against ``gossip_sgp_rounds``) thus tells how long a share
takes, in the sender's rounds, from its send to the receiver's next fold. This script runs the
digits trainer asynchronously for every (workers, batch size, seed), side by side in one run,
and prints that fraction with the median step time and the accuracy:

    python -m benchmarks.async_skips --workers 2 4 --batch-sizes 32 256 --seeds 1 2 3

A larger batch makes each step longer at the same model; more workers than cores make each
worker wait for its turn on a core (a time slice of several milliseconds), during which its
peers' shares wait unfolded. ``--min-step-ms MS`` pads every step's compute to at least MS
milliseconds with a sleep (the digits trainer's option of that name): the CPU stays free
meanwhile, as when an accelerator computes, so more workers than cores behave as if each had
a core of its own when MS is large enough (8 workers on 2 cores: 20 ms):

    python -m benchmarks.async_skips --workers 4 8 --batch-sizes 32 --min-step-ms 0 20
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
from typing import Any

from benchmarks.accuracy import run


def skipped_fraction(result: dict[str, Any]) -> float:
    """Rounds without a send over steps, summed over the job's workers."""
    workers = result["per_worker"]
    return float(sum(w["skipped_rounds"] for w in workers) / sum(w["steps"] for w in workers))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[2, 4], help="world sizes")
    p.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[32, 256], help="per-worker batch sizes"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds")
    p.add_argument(
        "--steps",
        type=int,
        default=480,
        help="optimizer steps per worker, whatever the size and batch (default 480)",
    )
    p.add_argument(
        "--min-step-ms",
        type=float,
        nargs="+",
        default=[0.0],
        metavar="MS",
        help="pad each step's compute to at least MS milliseconds with a sleep, one run per "
        "value (default 0: no padding)",
    )
    args = p.parse_args(argv)
    if any(not 0 <= ms <= 60_000 for ms in args.min_step_ms):
        p.error("--min-step-ms must be in 0..60000")
    if any(n < 2 for n in args.workers):
        p.error("--workers must be at least 2 (one worker never gossips)")
    if any(b < 1 for b in args.batch_sizes) or args.steps < 1:
        p.error("--batch-sizes and --steps must be at least 1")
    train = 1437  # the digits training set (80% of 1,797), as gossip_sgp.digits sizes an epoch
    print(
        f"{'workers':>7} {'batch':>5} {'pad ms':>6} {'seed':>4} {'skipped':>8} {'step ms':>8} "
        f"{'accuracy':>9}"
    )
    for n, batch, pad in itertools.product(args.workers, args.batch_sizes, args.min_step_ms):
        # epochs such that each worker takes about --steps steps on its 1/n of the data
        steps_per_epoch = math.ceil((train // n) / batch)
        epochs = max(1, round(args.steps / steps_per_epoch))
        extra = ["--staleness", "none", "--batch-size", str(batch)]
        extra += ["--min-step-ms", str(pad)]
        fractions = []
        for seed in args.seeds:
            r = run(n, extra, seed, epochs)
            fractions.append(skipped_fraction(r))
            print(
                f"{n:>7} {batch:>5} {pad:>6g} {seed:>4} {fractions[-1]:>8.3f} "
                f"{1000 * r['iteration_seconds']['median']:>8.1f} {r['accuracy']:>9.4f}",
                flush=True,
            )
        print(
            f"{n:>7} {batch:>5} {pad:>6g} mean {statistics.mean(fractions):.3f} skipped",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
