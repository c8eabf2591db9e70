"""The language-model example under AllReduce, per-step SGP and local steps, side by side.

Runs examples/train_charlm.py through ``gossip-sgp launch`` for every (workers, variant,
seed), all at the same steps and batch per worker (equal samples), and prints the final
validation loss (nats per byte, the workers agree on one model), the megabytes each worker
sent, and per variant the mean over seeds against AllReduce's:

    python -m benchmarks.charlm --workers 4 --seeds 0 1 2

AllReduce's bytes are a ring all-reduce's, 2 (n - 1) / n of the model per step; the gossip
variants' are what their nodes handed to the wire (headers and acknowledgements included).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_charlm.py"

VARIANTS = {
    "allreduce": ["--algorithm", "allreduce"],
    "sgp every step": ["--local-steps", "1"],
    "average H=50": ["--local-steps", "50", "--outer", "average"],
    "slowmo H=50": ["--local-steps", "50", "--outer", "slowmo"],
    "diloco H=50": ["--local-steps", "50", "--outer", "diloco"],
}


def run(workers: int, extra: list[str], seed: int, steps: int) -> tuple[float, float]:
    """(validation loss, MB sent per worker) of one run."""
    cmd = [
        sys.executable, "-m", "gossip_sgp.cli", "launch", "--nproc", str(workers),
        str(EXAMPLE), "--seed", str(seed), "--steps", str(steps), *extra,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=True).stdout
    finals = [line for line in out.splitlines() if "validation loss" in line]
    if len(finals) != workers:
        raise RuntimeError(f"{len(finals)} of {workers} workers reported:\n{out[-2000:]}")
    losses = {float(line.split("validation loss ")[1].split()[0]) for line in finals}
    sent = [float(line.split("sent ")[1].split()[0]) for line in finals]
    return max(losses), statistics.mean(sent)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[4], help="world sizes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds")
    p.add_argument("--steps", type=int, default=1000, help="steps per worker (default 1000)")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        metavar="NAME",
        help=f"which to run (default all: {', '.join(repr(v) for v in VARIANTS)})",
    )
    args = p.parse_args(argv)
    if any(n < 2 for n in args.workers) or args.steps < 1:
        p.error("--workers must be at least 2 and --steps at least 1")
    print(f"{'workers':>7} {'variant':<15} {'seed':>4} {'val loss':>9} {'MB sent':>8}")
    for n in args.workers:
        means: dict[str, tuple[float, float]] = {}
        for name in args.variants:
            results = [run(n, VARIANTS[name], seed, args.steps) for seed in args.seeds]
            for seed, (loss, sent) in zip(args.seeds, results, strict=True):
                print(f"{n:>7} {name:<15} {seed:>4} {loss:>9.4f} {sent:>8.1f}", flush=True)
            means[name] = (
                statistics.mean(r[0] for r in results),
                statistics.mean(r[1] for r in results),
            )
        base = means.get("allreduce")
        for name, (loss, sent) in means.items():
            vs = "" if base is None else f"  ({100 * (loss / base[0] - 1):+.1f}% vs allreduce)"
            print(f"{n:>7} {name:<15} mean {loss:.4f} nats/byte, {sent:.1f} MB sent{vs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
