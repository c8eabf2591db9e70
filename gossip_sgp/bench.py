"""``gossip-sgp bench``: SGP against its baselines, side by side, on emulated networks.

Runs ``gossip_sgp/digits.py`` for every combination of algorithm x network x workers x
straggler (x repeats), each run a fresh set of worker processes with a hard timeout, and
writes one row per run to ``DIR/bench.csv`` and ``DIR/bench.json``, PNG plots (with
matplotlib: ``pip install 'gossip-sgp[bench]'``) and a table of ratios against AllReduce and
against the compute-only time (``local``: no communication at all).

    gossip-sgp bench --quick --out /tmp/bench               # smoke test, loopback, ~1 min
    sudo gossip-sgp bench --networks 1gbit-50ms --workers 8 --algorithms \\
        allreduce,sgp-overlap,local --repeats 3 --out results/

Networks other than ``loopback`` run each worker in its own network namespace behind the
WAN emulator of ``gossip_sgp.wan`` (root needed): ``RATE-DELAY`` such as ``1gbit-50ms`` is
a link of that rate and that one-way delay to every worker.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["ALGORITHMS", "Network", "add_parser", "parse_network", "run_bench"]

ALGORITHMS: dict[str, list[str]] = {
    "allreduce": ["--algorithm", "allreduce"],
    "dpsgd": ["--algorithm", "dpsgd"],
    "adpsgd": ["--algorithm", "adpsgd"],
    "sgp-sync": ["--algorithm", "sgp", "--staleness", "0"],
    "sgp-overlap": ["--algorithm", "sgp", "--staleness", "1"],
    "sgp-async": ["--algorithm", "sgp", "--staleness", "none"],
    "sgp-local": ["--algorithm", "sgp"],
    "sgp-local-overlap": ["--algorithm", "sgp", "--outer-overlap"],
    "sgp-stream": ["--algorithm", "sgp"],
    "sgp-stream-overlap": ["--algorithm", "sgp", "--outer-overlap"],
    "local": ["--algorithm", "local"],
}
"""Benchmark algorithm name -> the training script's options (the ``sgp-local*`` and
``sgp-stream*`` runs also get ``--local-steps H --outer NAME`` from the plan, the
``sgp-stream*`` runs ``--fragments F``: ``StreamingSGP``)."""

STREAMING_ALGORITHMS = ("sgp-stream", "sgp-stream-overlap")
LOCAL_STEPS_ALGORITHMS = ("sgp-local", "sgp-local-overlap", *STREAMING_ALGORITHMS)

NETWORKS = ("loopback", "1gbit-10ms", "1gbit-50ms", "100mbit-100ms")
"""The default network matrix."""

_RATE_UNITS = {"kbit": 1e-3, "mbit": 1.0, "gbit": 1e3}
_NETWORK_RE = re.compile(r"^(\d+(?:\.\d+)?)(kbit|mbit|gbit)-(\d+(?:\.\d+)?)ms$")
_CSV_FIELDS = (
    "run",
    "repeat",
    "algorithm",
    "network",
    "rate_mbit",
    "delay_ms",
    "workers",
    "straggler",
    "model",
    "compression",
    "emulated_compute_ms",
    "parameters",
    "epochs",
    "status",
    "iteration_s_median",
    "iteration_s_mean",
    "iteration_s_min",
    "iteration_s_max",
    "samples_per_s",
    "accuracy",
    "bytes_sent_per_worker",
    "train_s",
    "wall_s",
)


@dataclasses.dataclass(frozen=True)
class Network:
    """A network of the matrix: ``loopback``, or a link of ``rate_mbit`` and ``delay_ms``."""

    name: str
    rate_mbit: float | None = None
    """Link rate in Mbit/s (None: loopback, unshaped)."""
    delay_ms: float = 0.0
    """One-way delay of every worker's link, in milliseconds."""

    @property
    def emulated(self) -> bool:
        return self.rate_mbit is not None

    def link_text(self) -> str:
        """The link as ``gossip_sgp.wan.parse_link`` reads it, e.g. ``1000mbit,50ms``."""
        return f"{self.rate_mbit:g}mbit,{self.delay_ms:g}ms"


def parse_network(text: str) -> Network:
    """``loopback`` or ``RATE-DELAY`` (``1gbit-50ms``, ``100mbit-100ms``, ``500kbit-20ms``)."""
    name = text.strip().lower()
    if name == "loopback":
        return Network("loopback")
    m = _NETWORK_RE.match(name)
    if m is None:
        raise ValueError(
            f"bad network {text!r}: use 'loopback' or RATE-DELAY such as 1gbit-50ms "
            "(rate in kbit, mbit or gbit; one-way delay in ms)"
        )
    rate = float(m.group(1)) * _RATE_UNITS[m.group(2)]
    if not rate > 0:
        raise ValueError(f"bad network {text!r}: the rate must be > 0")
    return Network(name, rate_mbit=rate, delay_ms=float(m.group(3)))


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to run: the matrix and the per-run training options."""

    algorithms: tuple[str, ...]
    networks: tuple[Network, ...]
    workers: tuple[int, ...]
    stragglers: tuple[float, ...]
    """Slow-down factor of rank 1 (1: no straggler)."""
    repeats: int
    train_args: tuple[str, ...]
    """Options for the training script shared by every run (model, epochs, ...)."""
    run_timeout: float
    out: Path
    compression: str = "none"
    """Message codec of the SGP runs (``sgp-*``); the other algorithms send uncompressed."""
    local_steps: int = 8
    """``H`` of the ``sgp-local*`` runs."""
    outer: str = "slowmo"
    """The outer optimizer of the ``sgp-local*`` runs."""
    fragments: int = 4
    """``F`` of the ``sgp-stream*`` runs."""
    emulate_compute_ms: float | None = None
    """Emulated accelerator: every step's forward and backward pass is a sleep this long."""


def _comma_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("must be a comma-separated list, got nothing")
    return items


def _algorithms(text: str) -> tuple[str, ...]:
    names = _comma_list(text)
    bad = [n for n in names if n not in ALGORITHMS]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown algorithm(s) {', '.join(bad)}; choose from {', '.join(ALGORITHMS)}"
        )
    return tuple(dict.fromkeys(names))


def _networks(text: str) -> tuple[Network, ...]:
    try:
        return tuple(dict.fromkeys(parse_network(t) for t in _comma_list(text)))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _workers(text: str) -> tuple[int, ...]:
    try:
        values = [int(t) for t in _comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"worker counts must be integers, got {text!r}") from None
    if any(not 2 <= v <= 64 for v in values):
        raise argparse.ArgumentTypeError(f"worker counts must be in 2..64, got {text!r}")
    return tuple(dict.fromkeys(values))


def _stragglers(text: str) -> tuple[float, ...]:
    values = []
    for t in _comma_list(text):
        if t.lower() == "none":
            values.append(1.0)
            continue
        try:
            values.append(float(t))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"straggler factors must be numbers or 'none', got {t!r}"
            ) from None
        if not 1.0 <= values[-1] <= 100.0:
            raise argparse.ArgumentTypeError(f"straggler factors must be in 1..100, got {t!r}")
    return tuple(dict.fromkeys(values))


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``bench`` subcommand."""
    p = sub.add_parser(
        "bench",
        help="time SGP against AllReduce, D-PSGD, AD-PSGD on emulated networks",
        description="Run the digits example for every algorithm x network x workers x "
        "straggler combination, write DIR/bench.csv, DIR/bench.json and PNG plots, and print "
        "time per iteration with ratios against AllReduce and against compute-only ('local'). "
        "Networks other than loopback need root and the WAN emulator (gossip_sgp.wan).",
    )
    p.add_argument(
        "--algorithms",
        type=_algorithms,
        help=f"comma list from {', '.join(ALGORITHMS)} (default: all)",
    )
    p.add_argument(
        "--networks",
        type=_networks,
        help="comma list of 'loopback' and RATE-DELAY links such as 1gbit-50ms "
        f"(one-way delay; default: {','.join(NETWORKS)}; --quick: loopback)",
    )
    p.add_argument("--workers", type=_workers, help="comma list of worker counts (default 4,8)")
    p.add_argument(
        "--stragglers",
        type=_stragglers,
        help="comma list of slow-down factors of rank 1, 'none' for no straggler (default none,3)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of each combination (default 1); repeat r trains with seed r",
    )
    p.add_argument("--epochs", type=int, help="epochs per run (default 20; --quick 1)")
    p.add_argument(
        "--width",
        type=int,
        help="hidden units of the MLP (default 2304: 5.5M parameters; --quick 64)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="per-worker batch size (32)")
    p.add_argument("--eval-every", type=int, default=1, help="epochs between accuracy points (1)")
    p.add_argument(
        "--run-timeout",
        type=float,
        help="seconds before a run is stopped and recorded as timed out (default 1200; "
        "--quick 180)",
    )
    p.add_argument(
        "--compression",
        default="none",
        help="message codec of the SGP runs (sgp-sync, sgp-overlap, sgp-async, sgp-local, "
        "sgp-local-overlap, sgp-stream, sgp-stream-overlap): "
        "none, fp16, bf16, int8[:BLOCK], topk:FRACTION (default none)",
    )
    p.add_argument(
        "--local-steps",
        type=int,
        default=8,
        metavar="H",
        help="inner steps between outer steps of sgp-local* and sgp-stream* (default 8)",
    )
    p.add_argument(
        "--outer",
        default="slowmo",
        help="outer optimizer of sgp-local* and sgp-stream*: average, slowmo or diloco "
        "(default slowmo)",
    )
    p.add_argument(
        "--fragments",
        type=int,
        default=4,
        metavar="F",
        help="fragments of sgp-stream and sgp-stream-overlap, which are sgp-local and "
        "sgp-local-overlap with the model averaged 1/F at a time every H/F steps (default 4)",
    )
    p.add_argument(
        "--emulate-compute",
        type=float,
        metavar="MS",
        help="emulated accelerator: each step's forward and backward pass is replaced by a "
        "sleep of MS ms (the CPU stays free, as while a GPU computes) and a fixed gradient, "
        "so communication hiding can be measured with more workers than cores; the "
        "optimizer step and all communication stay real, accuracy means nothing. Size the "
        "parameter vector with --width (parameters = width^2 + 76 width + 10)",
    )
    p.add_argument("--out", type=Path, required=True, help="directory for CSV, JSON and plots")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: tiny MLP, 1 epoch, loopback, 4 workers, no straggler (unless asked)",
    )
    p.set_defaults(func=_cmd_bench)


def plan_from_args(args: argparse.Namespace) -> Plan:
    """The run plan of parsed ``bench`` arguments (defaults depend on ``--quick``)."""
    quick = bool(args.quick)
    epochs = args.epochs if args.epochs is not None else (1 if quick else 20)
    width = args.width if args.width is not None else (64 if quick else 2304)
    timeout = args.run_timeout if args.run_timeout is not None else (180.0 if quick else 1200.0)
    for name, value in (
        ("--repeats", args.repeats),
        ("--epochs", epochs),
        ("--width", width),
        ("--batch-size", args.batch_size),
    ):
        if value < 1:
            raise SystemExit(f"gossip-sgp bench: {name} must be >= 1, got {value}")
    if args.eval_every < 0:
        raise SystemExit(f"gossip-sgp bench: --eval-every must be >= 0, got {args.eval_every}")
    if not timeout > 0:
        raise SystemExit(f"gossip-sgp bench: --run-timeout must be > 0, got {timeout}")
    if args.local_steps < 1:
        raise SystemExit(f"gossip-sgp bench: --local-steps must be >= 1, got {args.local_steps}")
    streamed = any(a in STREAMING_ALGORITHMS for a in args.algorithms or ALGORITHMS)
    if streamed and not 1 <= args.fragments <= args.local_steps:
        raise SystemExit(
            f"gossip-sgp bench: --fragments must be in 1..{args.local_steps} (--local-steps), "
            f"got {args.fragments}"
        )
    from gossip_sgp.outer import OUTER

    if args.outer not in OUTER:
        raise SystemExit(
            f"gossip-sgp bench: --outer must be one of {', '.join(sorted(OUTER))}, "
            f"got {args.outer!r}"
        )
    emulate = args.emulate_compute
    if emulate is not None and not 0 <= emulate <= 60_000:
        raise SystemExit(f"gossip-sgp bench: --emulate-compute must be in 0..60000, got {emulate}")
    from gossip_sgp.compression import parse_codec  # torch: only where a bench runs

    try:
        parse_codec(args.compression)
    except ValueError as exc:
        raise SystemExit(f"gossip-sgp bench: --compression: {exc}") from None
    networks = args.networks or (
        (Network("loopback"),) if quick else tuple(parse_network(n) for n in NETWORKS)
    )
    return Plan(
        algorithms=args.algorithms or tuple(ALGORITHMS),
        networks=networks,
        workers=args.workers or ((4,) if quick else (4, 8)),
        stragglers=args.stragglers or ((1.0,) if quick else (1.0, 3.0)),
        repeats=args.repeats,
        train_args=(
            "--model",
            "mlp",
            "--width",
            str(width),
            "--epochs",
            str(epochs),
            "--batch-size",
            str(args.batch_size),
            "--eval-every",
            str(args.eval_every),
            *(() if emulate is None else ("--emulate-compute", f"{emulate:g}")),
        ),
        run_timeout=timeout,
        out=args.out,
        compression=args.compression,
        local_steps=args.local_steps,
        outer=args.outer,
        fragments=args.fragments,
        emulate_compute_ms=emulate,
    )


def _cmd_bench(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    wan_needed = any(n.emulated for n in plan.networks)
    if wan_needed:
        problem = emulator_problem()
        if problem is not None:
            raise SystemExit(f"gossip-sgp bench: {problem}")
    # Ctrl-C, SIGTERM and SIGHUP all unwind through the clean-up (workers stopped, emulated
    # network removed), also where the shell started us with SIGINT ignored (``cmd &``).
    previous = {sig: signal.signal(sig, _interrupt) for sig in _STOP_SIGNALS}
    try:
        rows = run_bench(plan, log=print)
    except KeyboardInterrupt:  # the workers and the emulator are already cleaned up
        print(f"gossip-sgp bench: interrupted; the runs so far are in {plan.out}", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failed = [r for r in rows if r["status"] != "ok"]
    return 1 if failed else 0


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def emulator_problem() -> str | None:
    """Why emulated networks cannot run here (None: they can)."""
    if os.geteuid() != 0:
        return "emulated networks need root (network namespaces); or use --networks loopback"
    return None


# --------------------------------------------------------------------------- running
def run_bench(plan: Plan, *, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run the whole plan; write CSV, JSON and plots to ``plan.out``; return the rows."""
    plan.out.mkdir(parents=True, exist_ok=True)
    logs = plan.out / "logs"
    logs.mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []
    total = (
        len(plan.networks)
        * len(plan.workers)
        * plan.repeats
        * len(plan.stragglers)
        * len(plan.algorithms)
    )
    started = time.monotonic()
    write_results(plan, rows)  # the files always hold the runs so far
    for network in plan.networks:
        for workers in plan.workers:
            algorithms = [
                a for a in plan.algorithms if workers % 2 == 0 or a not in ("dpsgd", "adpsgd")
            ]
            with _hosts(network, workers) as hosts:
                for repeat in range(plan.repeats):  # repeats outermost: drifts hit all alike
                    for straggler in plan.stragglers:
                        for algorithm in algorithms:
                            run = len(rows)
                            log(
                                f"[{run + 1}/{total}] {algorithm} {network.name} "
                                f"{workers} workers straggler x{straggler:g} repeat {repeat} "
                                f"({time.monotonic() - started:.0f} s so far)"
                            )
                            row = _run_one(
                                plan, hosts, algorithm, network, workers, straggler, repeat, run
                            )
                            rows.append(row)
                            log(
                                f"    {row['status']}: {row['iteration_s_median']:.4f} s/iter, "
                                f"accuracy {row['accuracy']:.4f}, {row['wall_s']:.1f} s"
                            )
                            write_results(plan, rows)
    write_results(plan, rows)
    if plan.emulate_compute_ms is not None:
        log(
            f"emulated compute: every step's forward and backward pass was a sleep of "
            f"{plan.emulate_compute_ms:g} ms (accuracy means nothing; time per iteration does)"
        )
    log(format_table(rows))
    try:
        paths = plot(rows, plan.out)
        log("plots: " + ", ".join(str(p) for p in paths))
    except ImportError:
        log(
            "matplotlib is not installed: no plots (CSV and JSON are written); "
            "pip install 'gossip-sgp[bench]' for them"
        )
    return rows


class _Hosts:
    """Where the workers of one network run: loopback processes, or emulated hosts."""

    def __init__(self, workers: int, wan: Any = None) -> None:
        self.workers = workers
        self.wan = wan

    def address(self, rank: int) -> str:
        return "127.0.0.1" if self.wan is None else str(self.wan.address(rank))

    def ports(self, run: int) -> list[int]:
        """Gossip ports per rank, then the store's port: fresh for every run."""
        if self.wan is None:
            from gossip_sgp.launch import find_free_ports

            return find_free_ports("127.0.0.1", self.workers + 1)
        base = 20000 + (run % 400) * 100  # own addresses per host: no clash with anything
        return [base + r for r in range(self.workers)] + [base + 99]

    def env(self, rank: int) -> dict[str, str]:
        """Extra environment of a worker on this host."""
        if self.wan is None:
            return {}
        # gloo must use the emulated interface, not loopback or another namespace's name
        return {"GLOO_SOCKET_IFNAME": _interface_of(self.wan, rank)}

    def popen(self, rank: int, argv: list[str], env: dict[str, str], out: IO[bytes]) -> Any:
        if self.wan is None:
            return subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self.wan.popen(
            rank, argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _interface_of(wan: Any, rank: int) -> str:
    """The name of the interface that holds host ``rank``'s address, in its namespace."""
    address = str(wan.address(rank))
    argv = wan.command(rank, ["ip", "-o", "-4", "addr", "show"])
    text = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[3].split("/")[0] == address:
            return fields[1]
    raise RuntimeError(f"no interface holds {address} in host {rank}'s namespace:\n{text}")


@contextlib.contextmanager
def _hosts(network: Network, workers: int) -> Iterator[_Hosts]:
    if not network.emulated:
        yield _Hosts(workers)
        return
    from gossip_sgp.wan import (  # type: ignore[import-not-found,unused-ignore]
        WanEmulator,
        parse_link,
    )

    with WanEmulator(hosts=workers, link=parse_link(network.link_text())) as wan:
        yield _Hosts(workers, wan)


def _run_one(
    plan: Plan,
    hosts: _Hosts,
    algorithm: str,
    network: Network,
    workers: int,
    straggler: float,
    repeat: int,
    run: int,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "run": run,
        "repeat": repeat,
        "algorithm": algorithm,
        "network": network.name,
        "rate_mbit": network.rate_mbit,
        "delay_ms": network.delay_ms,
        "workers": workers,
        "straggler": straggler,
    }
    ports = hosts.ports(run)
    peers = ",".join(f"{hosts.address(r)}:{ports[r]}" for r in range(workers))
    argv = [
        sys.executable,
        "-m",
        "gossip_sgp.digits",
        *ALGORITHMS[algorithm],
        *plan.train_args,
        "--quiet",
        "--threads",
        "1",
    ]
    argv += ["--seed", str(repeat)]  # repeat r: seed r, the same for every algorithm
    if algorithm in LOCAL_STEPS_ALGORITHMS:
        argv += ["--local-steps", str(plan.local_steps), "--outer", plan.outer]
    if algorithm in STREAMING_ALGORITHMS:
        argv += ["--fragments", str(plan.fragments)]
    if straggler > 1.0:
        argv += ["--straggler", f"1:{straggler:g}"]
    if algorithm.startswith("sgp-") and plan.compression != "none":
        argv += ["--compression", plan.compression]
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("GOSSIP_SGP_")}
    base_env.update(
        {
            "WORLD_SIZE": str(workers),
            "MASTER_ADDR": hosts.address(0),
            "MASTER_PORT": str(ports[-1]),
            "GOSSIP_SGP_PEERS": peers,
            "GOSSIP_SGP_TRANSPORT": "zmq",
            "GOSSIP_SGP_TIMEOUT": str(plan.run_timeout),
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gossip-sgp-bench-") as tmp:
        summary_file = Path(tmp) / "summary.json"
        status = _start_and_wait(
            hosts,
            [
                (argv + (["--summary-file", str(summary_file)] if r == 0 else []), r)
                for r in range(workers)
            ],
            base_env,
            plan.out / "logs" / f"run{run:04d}-{algorithm}-{network.name}-w{workers}",
            plan.run_timeout,
        )
        summary: dict[str, Any] = {}
        if status == "ok":
            try:
                summary = json.loads(summary_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                status = "no summary"
    row["wall_s"] = time.monotonic() - started
    row["status"] = status
    return _fill_row(row, summary)


def _start_and_wait(
    hosts: _Hosts,
    commands: list[tuple[list[str], int]],
    base_env: dict[str, str],
    log_prefix: Path,
    timeout: float,
) -> str:
    """Start one worker per command; wait for all; 'ok', 'failed (rc ...)' or 'timed out'."""
    procs: list[Any] = []
    files: list[IO[bytes]] = []
    try:
        for argv, rank in commands:
            env = {**base_env, "RANK": str(rank), **hosts.env(rank)}
            out = open(f"{log_prefix}-rank{rank}.log", "wb")  # noqa: SIM115  # closed below
            files.append(out)
            procs.append(hosts.popen(rank, argv, env, out))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes):
                return f"failed (rc {', '.join(str(c) for c in codes if c not in (None, 0))})"
            if all(c == 0 for c in codes):
                return "ok"
            time.sleep(0.2)
        return "timed out"
    finally:
        _stop(procs)
        for f in files:
            f.close()


def _stop(procs: list[Any]) -> None:
    """Terminate the workers still running (SIGTERM, then SIGKILL after 10 s)."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10.0
    for p in alive:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait(10)


def _fill_row(row: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    it = summary.get("iteration_seconds", {})
    per_worker = summary.get("per_worker", [])
    row.update(
        {
            "model": summary.get("model"),
            "compression": summary.get("compression") or "none",
            "emulated_compute_ms": summary.get("emulate_compute_ms"),
            "parameters": summary.get("parameters"),
            "epochs": summary.get("epochs"),
            "iteration_s_median": it.get("median", math.nan),
            "iteration_s_mean": it.get("mean", math.nan),
            "iteration_s_min": it.get("min", math.nan),
            "iteration_s_max": it.get("max", math.nan),
            "samples_per_s": summary.get("samples_per_second", math.nan),
            "accuracy": summary.get("accuracy", math.nan),
            "bytes_sent_per_worker": summary.get("bytes_sent_per_worker", math.nan),
            "train_s": max((w["train_seconds"] for w in per_worker), default=math.nan),
            "evaluations": summary.get("evaluations", []),
        }
    )
    return row


# --------------------------------------------------------------------------- results
def write_results(plan: Plan, rows: list[dict[str, Any]]) -> None:
    """``bench.csv`` (one row per run) and ``bench.json`` (rows, summary and the plan)."""
    with open(plan.out / "bench.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    document = {
        "plan": {
            "algorithms": list(plan.algorithms),
            "networks": [n.name for n in plan.networks],
            "workers": list(plan.workers),
            "stragglers": list(plan.stragglers),
            "repeats": plan.repeats,
            "train_args": list(plan.train_args),
            "compression": plan.compression,
            "local_steps": plan.local_steps,
            "outer": plan.outer,
            "fragments": plan.fragments,
            "emulate_compute_ms": plan.emulate_compute_ms,
            "run_timeout": plan.run_timeout,
        },
        "runs": rows,
        "summary": summarize(rows),
    }
    text = json.dumps(_finite(document), indent=1, allow_nan=False)
    (plan.out / "bench.json").write_text(text, encoding="utf-8")


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _stats(values: Sequence[float]) -> dict[str, float]:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return {"median": math.nan, "min": math.nan, "max": math.nan}
    return {"median": statistics.median(finite), "min": min(finite), "max": max(finite)}


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (network, workers, straggler, algorithm): statistics over repeats and
    ratios against AllReduce and against ``local`` (compute only) of the same group."""
    groups: dict[tuple[str, int, float, str], list[dict[str, Any]]] = {}
    for r in rows:
        key = (r["network"], r["workers"], r["straggler"], r["algorithm"])
        groups.setdefault(key, []).append(r)
    out = []
    for (network, workers, straggler, algorithm), runs in groups.items():
        ok = [r for r in runs if r["status"] == "ok"]
        entry: dict[str, Any] = {
            "network": network,
            "workers": workers,
            "straggler": straggler,
            "algorithm": algorithm,
            "runs": len(runs),
            "ok": len(ok),
            "iteration_s": _stats([r["iteration_s_median"] for r in ok]),
            "iteration_s_mean": _stats([r.get("iteration_s_mean", math.nan) for r in ok]),
            "samples_per_s": _stats([r["samples_per_s"] for r in ok]),
            "accuracy": _stats([r["accuracy"] for r in ok]),
        }
        out.append(entry)
    for e in out:
        net, n, slow = e["network"], e["workers"], e["straggler"]
        mine = groups[(net, n, slow, e["algorithm"])]
        allreduce = groups.get((net, n, slow, "allreduce"), [])
        local = groups.get((net, n, slow, "local"), [])
        # Ratios within each repeat (runs of one repeat ran back to back), then statistics.
        e["speedup_vs_allreduce"] = _paired(allreduce, mine, "iteration_s_median", _ratio)
        e["throughput_vs_allreduce"] = _paired(mine, allreduce, "samples_per_s", _ratio)
        e["time_vs_local"] = _paired(mine, local, "iteration_s_median", _ratio)
        # the mean counts the outer steps of local-steps runs, which the median hides
        e["mean_time_vs_local"] = _paired(mine, local, "iteration_s_mean", _ratio)
        e["accuracy_minus_allreduce"] = _paired(mine, allreduce, "accuracy", _difference)
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def _difference(a: float, b: float) -> float:
    return a - b


def _paired(
    a_runs: list[dict[str, Any]],
    b_runs: list[dict[str, Any]],
    field: str,
    combine: Callable[[float, float], float],
) -> dict[str, float]:
    """Statistics of ``combine(a, b)`` of ``field`` over the repeats both completed."""
    b_by_repeat = {r["repeat"]: r for r in b_runs if r["status"] == "ok"}
    values = [
        combine(r[field], b_by_repeat[r["repeat"]][field])
        for r in a_runs
        if r["status"] == "ok" and r["repeat"] in b_by_repeat
    ]
    return _stats(values)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table (also what ``bench`` prints at the end).

    Each cell is the median over repeats and [min, max]; ratios are taken within a repeat.
    "s/iteration" is the median step time of a run, "mean s/iteration" its mean (which
    counts the few long steps of local-steps runs, their outer steps)."""
    lines = [
        "| network | workers | straggler | algorithm | s/iteration | x faster than AllReduce "
        "| x compute-only time | mean s/iteration | x compute-only mean | samples/s "
        "| x AllReduce samples/s | accuracy | points vs AllReduce |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in summarize(rows):
        points = {k: 100 * v for k, v in e["accuracy_minus_allreduce"].items()}
        cells = [
            _cell(e["iteration_s"], ".3f"),
            _cell(e["speedup_vs_allreduce"], ".2f"),
            _cell(e["time_vs_local"], ".2f"),
            _cell(e["iteration_s_mean"], ".3f"),
            _cell(e["mean_time_vs_local"], ".2f"),
            _cell(e["samples_per_s"], ".0f"),
            _cell(e["throughput_vs_allreduce"], ".2f"),
            _cell(e["accuracy"], ".4f"),
            _cell(points, "+.1f"),
        ]
        failed = "" if e["ok"] == e["runs"] else f" ({e['runs'] - e['ok']} failed)"
        lines.append(
            f"| {e['network']} | {e['workers']} | x{e['straggler']:g} | {e['algorithm']}"
            f"{failed} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def _cell(stats: dict[str, float], fmt: str) -> str:
    if not math.isfinite(stats["median"]):
        return "-"
    if stats["min"] == stats["max"]:
        return format(stats["median"], fmt)
    return (
        f"{format(stats['median'], fmt)} [{format(stats['min'], fmt)}, {format(stats['max'], fmt)}]"
    )


def plot(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Time per iteration by algorithm and network, and accuracy against wall time.

    Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    summary = summarize(rows)
    for workers, straggler in sorted({(e["workers"], e["straggler"]) for e in summary}):
        entries = [e for e in summary if (e["workers"], e["straggler"]) == (workers, straggler)]
        networks = list(dict.fromkeys(e["network"] for e in entries))
        algorithms = list(dict.fromkeys(e["algorithm"] for e in entries))
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(algorithms)
        for i, algorithm in enumerate(algorithms):
            xs, ys, lo, hi = [], [], [], []
            for j, network in enumerate(networks):
                e = next(
                    (e for e in entries if e["network"] == network and e["algorithm"] == algorithm),
                    None,
                )
                if e is None or not math.isfinite(e["iteration_s"]["median"]):
                    continue
                xs.append(j + (i - (len(algorithms) - 1) / 2) * width)
                ys.append(e["iteration_s"]["median"])
                lo.append(e["iteration_s"]["median"] - e["iteration_s"]["min"])
                hi.append(e["iteration_s"]["max"] - e["iteration_s"]["median"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=algorithm)
        ax.set_xticks(range(len(networks)), networks)
        ax.set_ylabel("s / iteration (median, min-max)")
        title = f"{workers} workers" + (f", one x{straggler:g} straggler" if straggler > 1 else "")
        ax.set_title(title)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out / f"iteration-time-w{workers}-x{straggler:g}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    for network, workers, straggler in sorted(
        {(r["network"], r["workers"], r["straggler"]) for r in rows}
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        colors = {a: f"C{i}" for i, a in enumerate(dict.fromkeys(r["algorithm"] for r in rows))}
        labelled: set[str] = set()
        for r in rows:
            if (r["network"], r["workers"], r["straggler"]) != (network, workers, straggler):
                continue
            points = r.get("evaluations") or []
            if r["status"] != "ok" or not points:
                continue
            algorithm = r["algorithm"]
            ax.plot(
                [p[0] for p in points],
                [p[2] for p in points],
                marker=".",
                color=colors[algorithm],
                label=None if algorithm in labelled else algorithm,
            )
            labelled.add(algorithm)
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("test accuracy (rank 0's model; one line per run)")
        title = f"{network}, {workers} workers"
        ax.set_title(title + (f", one x{straggler:g} straggler" if straggler > 1 else ""))
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out / f"accuracy-{network}-w{workers}-x{straggler:g}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
