"""``gossip-sgp demo``: the main job on an embedded default.

Four local workers train a small CNN on scikit-learn's bundled digits over ZeroMQ with
synchronous SGP, then print test accuracy per worker, the consensus error and throughput.
The training script is :mod:`gossip_sgp.digits`, started through the same launcher as
``gossip-sgp launch``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``demo`` subcommand."""
    p = sub.add_parser(
        "demo",
        help="train a small CNN on the bundled digits data with 4 local SGP workers",
        description="Start N local workers that train a small CNN on scikit-learn's bundled "
        "digits data with SGP over ZeroMQ (about a minute on 2 CPU cores), then print test "
        "accuracy per worker, the consensus error and throughput.",
    )
    p.add_argument("--nproc", type=int, default=4, help="number of local workers (default 4)")
    p.add_argument("--epochs", type=int, default=40, help="epochs per worker (default 40)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--staleness",
        default="0",
        help="0 synchronous (default), N overlap by N rounds, 'none' asynchronous",
    )
    p.add_argument(
        "--compression",
        default="none",
        metavar="CODEC",
        help="message codec: none (default), fp16, bf16, int8[:BLOCK], topk:FRACTION",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        metavar="BASE",
        help="rank r serves Prometheus metrics on port BASE + r (default: 0, off)",
    )
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="ADDR",
        help="address the metrics endpoints listen on (default: 127.0.0.1)",
    )
    p.add_argument(
        "--json", action="store_true", help="end with one JSON line: accuracy, consensus, speed"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit code."""
    from gossip_sgp.errors import ConfigError
    from gossip_sgp.launch import launch
    from gossip_sgp.prefork import DEFAULT_PRELOAD

    problem = None
    if args.nproc < 1:
        problem = "--nproc must be >= 1"
    elif args.epochs < 1:
        problem = "--epochs must be >= 1"
    elif not (args.staleness.lower() == "none" or args.staleness.isdigit()):
        problem = f"--staleness must be an integer >= 0 or 'none', got {args.staleness!r}"
    elif (codec_problem := _codec_problem(args.compression)) is not None:
        problem = f"--compression: {codec_problem}"
    elif importlib.util.find_spec("sklearn") is None:
        problem = "the demo needs scikit-learn for its data: pip install 'gossip-sgp[demo]'"
    if problem is not None:
        print(f"gossip-sgp demo: error: {problem}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gossip-sgp-demo-") as tmp:
        summary_file = Path(tmp) / "summary.json"
        print(
            f"gossip-sgp demo: {args.nproc} workers, small CNN on digits, SGP over ZeroMQ, "
            f"{args.epochs} epochs",
            flush=True,
        )
        try:
            code = launch(
                [
                    "gossip_sgp.digits",
                    "--epochs",
                    str(args.epochs),
                    "--seed",
                    str(args.seed),
                    "--staleness",
                    str(args.staleness),
                    "--compression",
                    args.compression,
                    "--summary-file",
                    str(summary_file),
                ],
                args.nproc,
                module=True,
                metrics_port=args.metrics_port,
                metrics_host=args.metrics_host,
                preload=DEFAULT_PRELOAD,
            )
        except ConfigError as exc:
            print(f"gossip-sgp demo: error: {exc}", file=sys.stderr)
            return 2
        if code != 0:
            return code
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
    if args.json:
        keys = ("accuracy", "accuracies", "consensus_error", "steps_per_second")
        print(json.dumps({k: summary[k] for k in keys}))
    return 0


def _codec_problem(spec: str) -> str | None:
    from gossip_sgp.compression import parse_codec

    try:
        parse_codec(spec)
    except ValueError as exc:
        return str(exc)
    return None
