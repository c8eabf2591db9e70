"""``gossip-sgp top`` and ``gossip-sgp prometheus-config``: watch a job's workers.

    gossip-sgp top --targets 127.0.0.1:9100,127.0.0.1:9101
    gossip-sgp top --config peers.toml --interval 5
    gossip-sgp top --config peers.toml --once
    gossip-sgp prometheus-config --config peers.toml > prometheus.yml

``top`` scrapes every worker's ``/metrics`` endpoint (see ``docs/metrics.md``) and prints one
line per worker: step rate, mean step time, push-sum weight, consensus distance, median
round-trip latency, bytes per second each way, peers up and the last reported loss. Rates
are taken between two refreshes; the first frame (and ``--once``) shows averages since the
worker started. A target that does not answer, or answers with something that is not
Prometheus text, is shown as down with the reason; nothing a target sends can crash the view.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import statistics
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

from prometheus_client.parser import text_string_to_metric_families

from gossip_sgp.config import GossipConfig, parse_peer_list
from gossip_sgp.errors import ConfigError

__all__ = ["Row", "Snapshot", "add_parsers", "scrape", "summarize", "top"]

_MAX_RESPONSE_BYTES = 16 << 20
"""A metrics page larger than this is not a gossip-sgp worker's."""

_CLEAR = "\x1b[H\x1b[2J"

Samples = dict[str, list[tuple[dict[str, str], float]]]
"""Sample name -> (labels, value) of one scrape."""


@dataclass
class Snapshot:
    """One scrape of one target."""

    target: str
    time: float
    """Wall-clock time of the scrape (``time.time()``)."""
    samples: Samples = field(default_factory=dict)
    error: str | None = None
    """Why the target counts as down, or None."""

    def value(self, name: str) -> float | None:
        """The first sample called ``name``, or None."""
        found = self.samples.get(name)
        return found[0][1] if found else None

    def values(self, name: str) -> list[float]:
        return [value for _, value in self.samples.get(name, [])]


@dataclass
class Row:
    """What ``top`` shows for one worker (None: not known)."""

    target: str
    error: str | None = None
    rank: str | None = None
    steps: float | None = None
    step_rate: float | None = None
    step_ms: float | None = None
    weight: float | None = None
    distance: float | None = None
    rtt_ms: float | None = None
    sent_rate: float | None = None
    received_rate: float | None = None
    peers_up: float | None = None
    peers: float | None = None
    loss: float | None = None


def scrape(target: str, timeout: float = 2.0) -> Snapshot:
    """Fetch and parse ``http://target/metrics``; never raises for what the target does."""
    now = time.time()
    try:
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=timeout) as response:
            body = response.read(_MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        return Snapshot(target, now, error=f"HTTP {exc.code}")
    except (OSError, ValueError) as exc:  # refused, timed out, reset, bad URL
        reason = getattr(exc, "reason", None) or exc
        return Snapshot(target, now, error=f"unreachable: {reason}")
    if len(body) > _MAX_RESPONSE_BYTES:
        return Snapshot(target, now, error="bad response: too large")
    samples: Samples = {}
    try:
        for family in text_string_to_metric_families(body.decode("utf-8")):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    except Exception as exc:  # the parser raises several types for garbage
        return Snapshot(target, now, error=f"bad response: {type(exc).__name__}")
    if not any(name.startswith("gossip_sgp_") for name in samples):
        return Snapshot(target, now, error="no gossip-sgp metrics")
    return Snapshot(target, now, samples)


def _rate(now: Snapshot, before: Snapshot | None, name: str) -> float | None:
    """Per-second increase of the sum of ``name`` since ``before`` (or since the start)."""
    total = sum(now.values(name)) if name in now.samples else None
    if total is None:
        return None
    if before is not None and before.error is None and name in before.samples:
        seconds = now.time - before.time
        if seconds > 0:
            return max(0.0, total - sum(before.values(name))) / seconds
    start = now.value("gossip_sgp_start_time_seconds")
    if start is None or now.time <= start:
        return None
    return total / (now.time - start)


def summarize(now: Snapshot, before: Snapshot | None = None) -> Row:
    """The row of one worker from its latest scrape and, for rates, the one before."""
    row = Row(now.target, now.error)
    if now.error is not None:
        return row
    for samples in now.samples.values():
        if samples and "rank" in samples[0][0]:
            row.rank = samples[0][0]["rank"]
            break
    row.steps = now.value("gossip_sgp_steps_total")
    row.step_rate = _rate(now, before, "gossip_sgp_steps_total")
    count = _rate(now, before, "gossip_sgp_step_seconds_count")
    seconds = _rate(now, before, "gossip_sgp_step_seconds_sum")
    if count and seconds is not None:
        row.step_ms = 1000.0 * seconds / count
    row.weight = now.value("gossip_sgp_weight")
    row.distance = now.value("gossip_sgp_consensus_distance")
    rtts = now.values("gossip_sgp_peer_rtt_seconds")
    row.rtt_ms = 1000.0 * statistics.median(rtts) if rtts else None
    row.sent_rate = _rate(now, before, "gossip_sgp_sent_bytes_total")
    row.received_rate = _rate(now, before, "gossip_sgp_received_bytes_total")
    row.peers_up = now.value("gossip_sgp_peers_up")
    down = now.value("gossip_sgp_peers_down")
    if row.peers_up is not None and down is not None:
        row.peers = row.peers_up + down
    row.loss = now.value("gossip_sgp_loss")
    return row


def _number(value: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    return format(value, fmt)


def _bytes_rate(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B/s", "kB/s", "MB/s", "GB/s"):
        if abs(value) < 1000 or unit == "GB/s":
            return f"{value:.0f} {unit}" if unit == "B/s" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


_COLUMNS = (
    ("TARGET", 21),
    ("RANK", 4),
    ("STEPS", 7),
    ("STEP/S", 7),
    ("STEP ms", 8),
    ("WEIGHT", 7),
    ("DISTANCE", 9),
    ("RTT ms", 7),
    ("SENT", 10),
    ("RECEIVED", 10),
    ("PEERS", 5),
    ("LOSS", 7),
)


def render(rows: Sequence[Row], *, now: float | None = None) -> str:
    """The table ``top`` prints: a header and one line per worker."""
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    up = sum(1 for row in rows if row.error is None)
    lines = [f"gossip-sgp top  {stamp}  {up}/{len(rows)} workers up"]
    lines.append(
        "  ".join(
            f"{name:>{width}}" if i else f"{name:<{width}}"
            for i, (name, width) in enumerate(_COLUMNS)
        )
    )
    for row in rows:
        if row.error is not None:
            lines.append(f"{row.target:<21}  DOWN: {row.error}")
            continue
        peers = (
            "-"
            if row.peers is None or row.peers_up is None
            else f"{row.peers_up:.0f}/{row.peers:.0f}"
        )
        cells = (
            row.rank or "-",
            _number(row.steps, ".0f"),
            _number(row.step_rate, ".1f"),
            _number(row.step_ms, ".1f"),
            _number(row.weight, ".3f"),
            _number(row.distance, ".2e"),
            _number(row.rtt_ms, ".1f"),
            _bytes_rate(row.sent_rate),
            _bytes_rate(row.received_rate),
            peers,
            _number(row.loss, ".4f"),
        )
        text = [f"{row.target:<21}"]
        text += [f"{cell:>{width}}" for cell, (_, width) in zip(cells, _COLUMNS[1:], strict=True)]
        lines.append("  ".join(text))
    return "\n".join(lines) + "\n"


def top(
    targets: Sequence[str],
    *,
    interval: float = 2.0,
    once: bool = False,
    timeout: float = 2.0,
    out: TextIO | None = None,
) -> int:
    """Show the live view until Ctrl-C (0) or, with ``once``, one frame.

    With ``once`` it returns 0 when every target is up and 1 otherwise.
    """
    stream = sys.stdout if out is None else out
    clear = not once and stream.isatty()
    before: dict[str, Snapshot] = {}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(targets)))
    try:
        while True:
            snapshots = list(pool.map(lambda t: scrape(t, timeout), targets))
            rows = [summarize(s, before.get(s.target)) for s in snapshots]
            frame = render(rows)
            stream.write(_CLEAR + frame if clear else frame)
            stream.flush()
            if once:
                return 0 if all(row.error is None for row in rows) else 1
            before = {s.target: s for s in snapshots}
            time.sleep(interval)
            if not clear:
                stream.write("\n")
    except KeyboardInterrupt:
        return 0
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _targets(args: argparse.Namespace, command: str) -> list[str]:
    """``host:port`` of every worker's metrics endpoint, from ``--targets`` or ``--config``."""
    if args.targets is not None:
        pairs = parse_peer_list(args.targets)
        return [f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in pairs]
    config = GossipConfig.from_toml(args.config, rank=0)
    targets = [
        f"[{p.host}]:{p.metrics_port}" if ":" in p.host else f"{p.host}:{p.metrics_port}"
        for p in config.peers
        if p.metrics_port is not None
    ]
    if not targets:
        raise ConfigError(f"{args.config}: no peer has a metrics_port; add one per [[peers]] entry")
    if len(targets) < len(config.peers):
        print(
            f"gossip-sgp {command}: {len(config.peers) - len(targets)} peer(s) without "
            "metrics_port left out",
            file=sys.stderr,
        )
    return targets


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 86400.0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def _duration(text: str) -> str:
    """A Prometheus duration such as 5s, 500ms or 1m."""
    number = text.rstrip("smhd")
    unit = text[len(number) :]
    if not number.isdigit() or int(number) < 1 or unit not in ("ms", "s", "m", "h", "d"):
        raise argparse.ArgumentTypeError(f"must be a duration like 5s, 500ms or 1m; got {text!r}")
    return text


def _add_target_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--config",
        metavar="PEERS_TOML",
        help="the job's TOML peer list: every peer with a metrics_port is a target",
    )
    group.add_argument(
        "--targets",
        metavar="HOST:PORT,...",
        help="metrics endpoints, comma-separated (IPv6 as [addr]:port)",
    )


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``top`` and ``prometheus-config`` subcommands."""
    p = sub.add_parser(
        "top",
        help="live view of the workers' metrics: step rate, weight, consensus, latency",
        description="Scrape every worker's Prometheus endpoint and show one line per worker: "
        "steps, step rate, mean step time, push-sum weight, consensus distance, median "
        "round-trip latency, bytes per second sent and received, peers up, loss. "
        "Unreachable workers are shown as down. Ctrl-C quits.",
    )
    _add_target_arguments(p)
    p.add_argument(
        "--interval",
        type=_positive_seconds,
        default=2.0,
        metavar="S",
        help="seconds between refreshes (default: 2)",
    )
    p.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=2.0,
        metavar="S",
        help="seconds to wait for each worker's answer (default: 2)",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="print one frame and exit (code 1 when a worker is down)",
    )
    p.set_defaults(func=_run_top)

    p = sub.add_parser(
        "prometheus-config",
        help="print a Prometheus configuration that scrapes every worker",
        description="Print a Prometheus configuration file (YAML) with one scrape job for "
        "the workers' metrics endpoints; run it with `prometheus --config.file=FILE`. "
        "Workers on other machines must listen beyond loopback: set metrics_host in [job].",
    )
    _add_target_arguments(p)
    p.add_argument("--job", default="gossip-sgp", help="the job name (default: gossip-sgp)")
    p.add_argument(
        "--scrape-interval",
        type=_duration,
        default="5s",
        metavar="DURATION",
        help="how often Prometheus scrapes each worker (default: 5s)",
    )
    p.set_defaults(func=_run_prometheus_config)


def _run_top(args: argparse.Namespace) -> int:
    try:
        targets = _targets(args, "top")
    except ConfigError as exc:
        print(f"gossip-sgp top: error: {exc}", file=sys.stderr)
        return 2
    return top(targets, interval=args.interval, once=args.once, timeout=args.timeout)


def _run_prometheus_config(args: argparse.Namespace) -> int:
    from gossip_sgp.metrics import scrape_config

    try:
        targets = _targets(args, "prometheus-config")
    except ConfigError as exc:
        print(f"gossip-sgp prometheus-config: error: {exc}", file=sys.stderr)
        return 2
    if args.config is not None:
        config = GossipConfig.from_toml(args.config, rank=0)
        local = {"127.0.0.1", "::1", "localhost"}
        if config.metrics_host in local and any(p.host not in local for p in config.peers):
            print(
                "gossip-sgp prometheus-config: note: metrics_host is "
                f"{config.metrics_host}, so workers answer only on their own machine; set "
                'metrics_host = "0.0.0.0" in [job] to scrape them from elsewhere',
                file=sys.stderr,
            )
    sys.stdout.write(scrape_config(targets, job=args.job, interval=args.scrape_interval))
    return 0
