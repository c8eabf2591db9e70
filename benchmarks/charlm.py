"""The language-model example under AllReduce, per-step SGP and local steps, side by side.

Runs examples/train_charlm.py through ``gossip-sgp launch`` for every (workers, variant,
seed), all at the same steps and batch per worker (equal samples), and prints the final
validation loss (nats per byte, the workers agree on one model), the megabytes each worker
sent, and per variant the mean over seeds against AllReduce's:

    python -m benchmarks.charlm --workers 4 --seeds 0 1 2
    python -m benchmarks.charlm --workers 8 --seeds 0 --eval-every 100 --plot loss-bytes.png

``--shards`` picks the example's data split: ``interleaved`` (the default, IID) or
``contiguous`` (each worker its own n-th of the text; docs/training.md's earlier tables).
AllReduce's bytes are a ring all-reduce's, 2 (n - 1) / n of the model per step; the gossip
variants' are what their nodes handed to the wire (headers and acknowledgements included).
With ``--eval-every N`` rank 0 also tests its own model every N steps, and ``--plot FILE``
draws those points, validation loss against megabytes sent (mean over seeds; needs
matplotlib).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks import add_names_option

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_charlm.py"


def _int8(outer: str, local_steps: int) -> list[str]:
    """An outer step every ``local_steps`` steps, 8-bit messages coded against the last."""
    return ["--local-steps", str(local_steps), "--outer", outer, "--compression", "int8,ref"]


_SLOWMO_16_INT8 = _int8("slowmo", 16)

VARIANTS = {
    "allreduce": ["--algorithm", "allreduce"],
    "sgp every step": ["--local-steps", "1"],
    "average H=50": ["--local-steps", "50", "--outer", "average"],
    "slowmo H=50": ["--local-steps", "50", "--outer", "slowmo"],
    "diloco H=50": ["--local-steps", "50", "--outer", "diloco"],
    "slowmo H=16 int8": _SLOWMO_16_INT8,
    "slowmo H=12 int8": _int8("slowmo", 12),
    "slowmo H=20 int8": _int8("slowmo", 20),
    "slowmo H=24 int8": _int8("slowmo", 24),
    "diloco H=16 int8": _int8("diloco", 16),
    "slowmo H=50 overlap": ["--local-steps", "50", "--outer", "slowmo", "--outer-overlap"],
    "slowmo H=50 F=5": ["--local-steps", "50", "--outer", "slowmo", "--fragments", "5"],
    "slowmo H=16 int8 F=4": [*_SLOWMO_16_INT8, "--fragments", "4"],
}
DEFAULT = ["allreduce", "sgp every step", "average H=50", "slowmo H=50", "diloco H=50"]

Curve = list[tuple[int, float, float]]
"""(step, MB sent so far, validation loss) of rank 0."""


def run(
    workers: int,
    extra: list[str],
    seed: int,
    steps: int,
    eval_every: int = 0,
    shards: str = "interleaved",
) -> tuple[float, float, Curve]:
    """(validation loss, MB sent per worker, rank 0's curve) of one run."""
    cmd = [
        sys.executable, "-m", "gossip_sgp.cli", "launch", "--nproc", str(workers),
        str(EXAMPLE), "--seed", str(seed), "--steps", str(steps),
        "--eval-every", str(eval_every), "--shards", shards, *extra,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=True).stdout
    finals = [line for line in out.splitlines() if "validation loss" in line]
    if len(finals) != workers:
        raise RuntimeError(f"{len(finals)} of {workers} workers reported:\n{out[-2000:]}")
    losses = {float(line.split("validation loss ")[1].split()[0]) for line in finals}
    sent = [float(line.split("sent ")[1].split()[0]) for line in finals]
    curve = []
    for line in out.splitlines():  # "[rank 0] at step S: MB MB sent, held-out loss L"
        if "held-out loss" in line:
            head, tail = line.split(": ", 1)
            mb = float(tail.split()[0])
            curve.append((int(head.split()[-1]), mb, float(tail.split()[-1])))
    return max(losses), statistics.mean(sent), curve


def plot(curves: dict[str, list[Curve]], workers: int, path: Path) -> None:
    """Validation loss against MB sent, one line per variant (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in curves.items():
        points = list(zip(*runs, strict=True))  # per eval step, one point per seed
        if not points:
            continue
        mb = [statistics.mean(p[1] for p in step) for step in points]
        loss = [statistics.mean(p[2] for p in step) for step in points]
        ax.plot(mb, loss, marker=".", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("MB sent per worker (log scale)")
    ax.set_ylabel("validation loss, nats/byte (rank 0)")
    ax.set_title(f"character-level LM, {workers} workers, equal samples")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[4], help="world sizes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds")
    p.add_argument("--steps", type=int, default=1000, help="steps per worker (default 1000)")
    add_names_option(p, "--variants", VARIANTS, DEFAULT)
    p.add_argument("--eval-every", type=int, default=0, help="rank 0 tests every N steps")
    p.add_argument(
        "--shards",
        choices=("interleaved", "contiguous"),
        default="interleaved",
        help="the example's data split: windows at rank + k n (IID, the default) or each "
        "worker its own n-th of the text (other files)",
    )
    p.add_argument("--plot", type=Path, help="PNG of loss against MB sent (per world size)")
    args = p.parse_args(argv)
    if any(n < 2 for n in args.workers) or args.steps < 1 or args.eval_every < 0:
        p.error("--workers must be at least 2, --steps at least 1, --eval-every >= 0")
    if args.plot is not None and not args.eval_every:
        p.error("--plot needs --eval-every N")
    print(f"{'workers':>7} {'variant':<20} {'seed':>4} {'val loss':>9} {'MB sent':>8}")
    for n in args.workers:
        means: dict[str, tuple[float, float]] = {}
        curves: dict[str, list[Curve]] = {}
        for name in args.variants:
            results = [
                run(n, VARIANTS[name], seed, args.steps, args.eval_every, args.shards)
                for seed in args.seeds
            ]
            curves[name] = [r[2] for r in results]
            for seed, (loss, sent, _) in zip(args.seeds, results, strict=True):
                print(f"{n:>7} {name:<20} {seed:>4} {loss:>9.4f} {sent:>8.1f}", flush=True)
            means[name] = (
                statistics.mean(r[0] for r in results),
                statistics.mean(r[1] for r in results),
            )
        base = means.get("allreduce")
        for name, (loss, sent) in means.items():
            vs = "" if base is None else f"  ({100 * (loss / base[0] - 1):+.1f}% vs allreduce)"
            print(f"{n:>7} {name:<20} mean {loss:.4f} nats/byte, {sent:.1f} MB sent{vs}")
        if args.plot is not None:
            path = args.plot.with_name(f"{args.plot.stem}-w{n}{args.plot.suffix}")
            plot(curves, n, path)
            print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
