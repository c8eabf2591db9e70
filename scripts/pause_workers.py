"""Stop random asynchronous workers at random times and print the accuracy they end at.

Each run is the digits job as the suite runs it (``gossip-sgp launch --nproc 4 -m
gossip_sgp.digits --quiet --json --staleness none --seed S``); while it trains, one random
worker at a time is stopped with SIGSTOP for ``0.05..--max-pause`` seconds, every
0.1-1 s, as a machine that swaps it out or starves it of CPU would. Runs with each
``--lag-limit`` value alternate seed by seed, so they see the same load. Prints one line per
run, then per lag limit the mean and lowest accuracy and the runs below ``--gate``.

    .venv/bin/python scripts/pause_workers.py --seeds 60-75
    .venv/bin/python scripts/pause_workers.py --seeds 1-5 --lag-limits 50 --max-pause 1

Only loopback sockets; every worker is continued and the job waited for, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="1-10", help="seed range A-B (default 1-10)")
    p.add_argument(
        "--lag-limits",
        default="none,50",
        help="comma-separated --lag-limit values to compare (default none,50)",
    )
    p.add_argument("--max-pause", type=float, default=3.0, help="longest stop, seconds (default 3)")
    p.add_argument("--gate", type=float, default=0.95, help="accuracy to count runs below")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per run (default 300)")
    args = p.parse_args(argv)
    first, _, last = args.seeds.partition("-")
    try:
        args.seeds = list(range(int(first), int(last or first) + 1))
    except ValueError:
        p.error(f"--seeds must be A-B, got {args.seeds!r}")
    if not args.seeds:
        p.error("--seeds is empty")
    args.lag_limits = [v.strip() for v in args.lag_limits.split(",") if v.strip()]
    if not args.lag_limits:
        p.error("--lag-limits is empty")
    if not 0.05 < args.max_pause <= 60:
        p.error("--max-pause must be in (0.05, 60]")
    return args


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def run(seed: int, lag_limit: str, max_pause: float, timeout: float) -> dict[str, object]:
    """One job, paused at random; its summary plus the pauses ``(second, rank, length)``."""
    launcher = Path(sys.executable).with_name("gossip-sgp")
    command = [str(launcher), "launch", "--nproc", "4", "-m", "gossip_sgp.digits"]
    command += ["--quiet", "--json", "--staleness", "none", "--seed", str(seed)]
    command += ["--lag-limit", lag_limit]
    job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    rng = random.Random(seed)
    pauses: list[tuple[float, int, float]] = []
    start = time.monotonic()

    def pause() -> None:
        while job.poll() is None:
            time.sleep(rng.uniform(0.1, 1.0))
            workers = children(job.pid)
            if not workers:
                continue
            rank, length = rng.randrange(len(workers)), rng.uniform(0.05, max_pause)
            try:
                os.kill(workers[rank], signal.SIGSTOP)
            except ProcessLookupError:
                continue
            try:
                time.sleep(length)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(workers[rank], signal.SIGCONT)
            pauses.append((round(time.monotonic() - start, 1), rank, round(length, 2)))

    pauser = threading.Thread(target=pause, daemon=True)
    pauser.start()
    try:
        out, _ = job.communicate(timeout=timeout)
    finally:
        if job.poll() is None:
            job.send_signal(signal.SIGINT)
            job.wait(30)
        pauser.join(65)
    lines = [line.split("] ", 1)[1] for line in out.splitlines() if line.startswith("[rank 0] {")]
    if job.returncode != 0 or not lines:
        raise SystemExit(f"seed {seed}, lag limit {lag_limit}: the job failed ({job.returncode})")
    summary: dict[str, object] = json.loads(lines[-1])
    summary["pauses"] = pauses
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    accuracies: dict[str, list[float]] = {limit: [] for limit in args.lag_limits}
    for seed in args.seeds:
        for limit in args.lag_limits:
            summary = run(seed, limit, args.max_pause, args.timeout)
            accuracy = float(summary["accuracy"])  # type: ignore[arg-type]
            accuracies[limit].append(accuracy)
            workers = summary["per_worker"]
            assert isinstance(workers, list)
            lagged = [w.get("lagged", {}) for w in workers]
            print(
                f"seed {seed:3d}  lag limit {limit:>4}  accuracy {accuracy:.4f}  "
                f"lagged {lagged}  pauses {len(summary['pauses'])}",  # type: ignore[arg-type]
                flush=True,
            )
    print()
    for limit, values in accuracies.items():
        below = sum(v < args.gate for v in values)
        print(
            f"lag limit {limit:>4}: {len(values)} runs, accuracy mean {statistics.mean(values):.4f}"
            f", lowest {min(values):.4f}, {below} below {args.gate}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
