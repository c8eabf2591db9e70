"""The ``gossip-sgp`` command: one entry point, one subcommand per job.

gossip-sgp simulate --nodes 1024 --rounds 12 --dim 10000
gossip-sgp demo
gossip-sgp launch --nproc 4 -m gossip_sgp.digits --epochs 5
gossip-sgp run --config peers.toml --rank 0 -m gossip_sgp.digits
gossip-sgp top --targets 127.0.0.1:9100,127.0.0.1:9101
gossip-sgp prometheus-config --config peers.toml
gossip-sgp bench --quick --out /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1], got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _module_list(text: str) -> tuple[str, ...]:
    from gossip_sgp.prefork import parse_preload

    try:
        return parse_preload(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _port_or_zero(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(
            f"must be a TCP port in 1..65535, or 0 for off; got {text}"
        )
    return value


def _add_simulate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    import topologies

    p = sub.add_parser(
        "simulate",
        help="run N push-sum nodes in one process and print the consensus error per round",
        description="Run N push-sum nodes in one process (the same code as the training "
        "workers, over the in-process transport) from random vectors, and print the max "
        "relative consensus error max_i ||z_i - mean|| / ||mean|| after each round.",
    )
    p.add_argument("--nodes", type=_positive_int, required=True, help="number of nodes")
    p.add_argument("--rounds", type=_non_negative_int, required=True, help="gossip rounds")
    p.add_argument(
        "--topology", choices=topologies.NAMES, default="exponential", help="peer schedule"
    )
    p.add_argument(
        "--peers-per-round",
        type=_positive_int,
        default=1,
        help="out-peers per round (exponential, base-k)",
    )
    p.add_argument("--dim", type=_positive_int, default=1000, help="vector length per node")
    p.add_argument(
        "--dtype",
        choices=("float64", "float32", "bfloat16"),
        default="float64",
        help="numerator dtype",
    )
    p.add_argument(
        "--mode",
        choices=("sync", "async"),
        default="sync",
        help="sync: each round waits for its messages; async: fold whatever has arrived",
    )
    p.add_argument("--drop", type=_probability, default=0.0, help="message loss probability")
    p.add_argument("--duplicate", type=_probability, default=0.0, help="duplication probability")
    p.add_argument("--reorder", type=_probability, default=0.0, help="reordering probability")
    p.add_argument("--delay-ms", type=_non_negative_float, default=0.0, help="one-way delay (ms)")
    p.add_argument("--jitter-ms", type=_non_negative_float, default=0.0, help="delay jitter (ms)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--compression",
        default="none",
        metavar="CODEC",
        help="message codec: none, fp16, bf16, int8[:BLOCK], topk:FRACTION (docs/compression.md)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=_run_simulate)


def _run_simulate(args: argparse.Namespace) -> int:
    from gossip_sgp.simulate import SimulationConfig, simulate

    try:
        config = SimulationConfig(
            nodes=args.nodes,
            rounds=args.rounds,
            topology=args.topology,
            peers_per_round=args.peers_per_round,
            dim=args.dim,
            dtype=args.dtype,
            mode=args.mode,
            drop=args.drop,
            duplicate=args.duplicate,
            reorder=args.reorder,
            delay_ms=args.delay_ms,
            jitter_ms=args.jitter_ms,
            seed=args.seed,
            compression=args.compression,
        )
        result = simulate(config)
    except ValueError as exc:
        print(f"gossip-sgp simulate: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    print(f"{config.nodes} nodes, topology {config.topology}, dim {config.dim}, mode {config.mode}")
    print(f"{'round':>5}  {'max_rel_error':>13}")
    for t, err in enumerate(result.errors, start=1):
        print(f"{t:>5}  {err:13.3e}")
    print(
        f"{result.messages} messages in {result.seconds:.2f} s; dropped {result.dropped}, "
        f"duplicates rejected {result.duplicates_rejected}; weight held {result.weight_total:.6f}"
    )
    if config.compression != "none":
        ratio = result.raw_bytes_sent / max(result.bytes_sent, 1)
        print(
            f"compression {config.compression}: {result.bytes_sent} payload bytes sent, "
            f"{result.raw_bytes_sent} uncompressed ({ratio:.2f}x smaller)"
        )
    if result.rejected:
        print(f"rejected (did not decode): {dict(result.rejected)}")
    return 0


def _add_worker_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments ``launch`` and ``run`` share: the grace period and what to run."""
    p.add_argument(
        "--grace",
        type=_non_negative_float,
        default=10.0,
        metavar="S",
        help="seconds workers get to exit after SIGINT before SIGTERM, and after SIGTERM "
        "before SIGKILL (default: 10)",
    )
    p.add_argument(
        "-m",
        "--module",
        action="store_true",
        help="SCRIPT is a module name, run like `python -m MODULE`",
    )
    p.add_argument("script", metavar="SCRIPT", help="the training script (or module with -m)")
    p.add_argument(
        "args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments passed to the script"
    )


def _add_launch(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:

    p = sub.add_parser(
        "launch",
        help="start N workers of one job on this machine",
        description="Start N workers `python SCRIPT ARGS` (or `python -m MODULE ARGS`) on free "
        "ports of one host, with each worker's rank and the peer list in its environment. "
        "Output lines are prefixed with [rank R]. Ctrl-C stops every worker; if one worker "
        "fails, the others are stopped and its exit code is returned.",
        epilog="Launcher options go before SCRIPT; everything after SCRIPT goes to the script.",
    )
    p.add_argument(
        "--nproc", type=_positive_int, required=True, metavar="N", help="number of workers"
    )
    p.add_argument(
        "--transport",
        choices=("zmq", "torch"),
        default="zmq",
        help="gossip transport between the worker processes: zmq (ZeroMQ, default) or torch "
        "(torch.distributed point-to-point on gloo/NCCL; synchronous and overlap modes only)",
    )
    p.add_argument(
        "--metrics-port",
        type=_port_or_zero,
        default=0,
        metavar="BASE",
        help="rank R serves Prometheus metrics on port BASE + R (default: 0, off)",
    )
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="ADDR",
        help="address the metrics endpoints listen on (default: 127.0.0.1)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address the workers bind and gossip on")
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="when a worker fails, let the others train on without it (SGP detects the dead "
        "peer); exit with its code once all have ended",
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=None,
        metavar="S",
        help="seconds a synchronous step waits for a round's messages (default: 120)",
    )
    p.add_argument(
        "--preload",
        type=_module_list,
        default=None,
        metavar="MODULES",
        help="comma-separated modules the launcher imports once and then forks the workers "
        "from, so that each need not import them again (default: torch,torch._dynamo; an empty "
        "string starts every worker as a new interpreter). Forking is skipped where unsafe",
    )
    _add_worker_arguments(p)
    p.set_defaults(func=_run_launch)


def _run_launch(args: argparse.Namespace) -> int:
    from gossip_sgp.errors import ConfigError
    from gossip_sgp.launch import launch
    from gossip_sgp.prefork import DEFAULT_PRELOAD

    try:
        return launch(
            [args.script, *args.args],
            args.nproc,
            module=args.module,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            host=args.host,
            transport=args.transport,
            timeout=args.timeout,
            grace=args.grace,
            keep_going=args.keep_going,
            preload=DEFAULT_PRELOAD if args.preload is None else args.preload,
        )
    except ConfigError as exc:
        print(f"gossip-sgp launch: error: {exc}", file=sys.stderr)
        return 2


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="start this machine's worker of a job across machines",
        description="Start one worker of a multi-machine job described by a TOML peer list "
        "(run the same command with each rank on its machine). The peer list is checked "
        "before the script starts; signals are forwarded and the script's exit code returned.",
        epilog="Options go before SCRIPT; everything after SCRIPT goes to the script.",
    )
    p.add_argument("--config", required=True, metavar="PEERS_TOML", help="the job's TOML peer list")
    p.add_argument(
        "--rank", type=_non_negative_int, required=True, help="this worker's rank in the list"
    )
    p.add_argument(
        "--metrics-port",
        type=_port_or_zero,
        default=None,
        metavar="PORT",
        help="serve this worker's Prometheus metrics on PORT (0: off; default: the peer "
        "list's metrics_port)",
    )
    p.add_argument(
        "--metrics-host",
        default=None,
        metavar="ADDR",
        help="address the metrics endpoint listens on (default: the peer list's "
        "metrics_host, else 127.0.0.1)",
    )
    _add_worker_arguments(p)
    p.set_defaults(func=_run_run)


def _run_run(args: argparse.Namespace) -> int:
    from gossip_sgp.errors import ConfigError
    from gossip_sgp.launch import run

    try:
        return run(
            args.config,
            args.rank,
            [args.script, *args.args],
            module=args.module,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            grace=args.grace,
        )
    except ConfigError as exc:
        print(f"gossip-sgp run: error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used to render the CLI docs)."""
    from gossip_sgp import __version__, bench, demo, keys, top

    parser = argparse.ArgumentParser(
        prog="gossip-sgp",
        description="Decentralized PyTorch training with Stochastic Gradient Push.",
    )
    parser.add_argument("--version", action="version", version=f"gossip-sgp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_simulate(sub)
    demo.add_parser(sub)
    _add_launch(sub)
    _add_run(sub)
    top.add_parsers(sub)
    keys.add_parser(sub)
    bench.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gossip-sgp`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
