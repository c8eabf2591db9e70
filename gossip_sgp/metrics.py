"""Prometheus metrics of one gossip worker, read from the live state at scrape time.

A :class:`~gossip_sgp.GossipNode` whose config has a ``metrics_port`` (or that is given a
``registry=``) owns a :class:`GossipMetrics`: one ``prometheus_client.CollectorRegistry``
holding a collector that reads snapshots (:mod:`gossip_sgp.stats`) of the node's counters
(transport bytes and messages per peer, rejections, drops, round trips) and of the
:class:`~gossip_sgp.SGP` wrapper's state (steps, rounds, weight, loss) when Prometheus asks,
so nothing is kept in sync on the hot path, and this module knows neither class.
Two histograms (message age, staleness) are observed when the training thread folds
messages in, and a small strided sample of each received model feeds the consensus
distance, which is computed at scrape time. With metrics off none of this runs.

:class:`MetricsServer` serves a registry on ``http://HOST:PORT/metrics`` from one thread
that stops with the node. Every metric name starts with ``gossip_sgp_`` and carries the
label ``rank`` (and ``peer`` where per peer); see ``docs/metrics.md`` for the list.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import torch
from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from gossip_sgp.errors import GossipError
from gossip_sgp.mailbox import Receipt
from gossip_sgp.message import Message
from gossip_sgp.stats import NodeStats, TrainingStats

__all__ = [
    "AGE_BUCKETS",
    "PEER_UP_WINDOW",
    "STALENESS_BUCKETS",
    "GossipMetrics",
    "MetricsServer",
    "relative_distance",
    "scrape_config",
]

PEER_UP_WINDOW = 30.0
"""A peer counts as up when this worker heard from it (any message, acknowledgements
included) within this many seconds. A stand-in until a failure detector decides it."""

AGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Histogram buckets of the message age, in seconds."""

STALENESS_BUCKETS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
"""Histogram buckets of the staleness of folded messages, in rounds."""

_SAMPLE_ELEMENTS = 4096
"""Elements of a model sampled (strided) for the consensus distance: cheap at any size."""

_SAMPLE_INTERVAL = 0.25
"""Seconds between two messages sampled for the consensus distance: the gauge needs only the
latest sample, and sampling every message cost about 2% of a digits step."""

_MAX_PENDING = 8192
"""Received messages remembered until fold-in; beyond that the oldest are forgotten."""

_SERVER_POLL = 0.1
"""Seconds between the metrics server's checks for a stop request."""

_REQUEST_TIMEOUT = 5.0
"""Seconds a scrape connection may stay idle before the server drops it."""


def _sample(
    tensors: Sequence[torch.Tensor], elements: int, scale: float = 1.0
) -> tuple[torch.Tensor, ...]:
    """Every s-th element of each flat tensor times ``scale``, copied; about ``elements``."""
    total = sum(t.numel() for t in tensors)
    stride = max(1, math.ceil(total / elements))
    return tuple(t.detach()[::stride] * scale for t in tensors)


def relative_distance(
    own: Sequence[torch.Tensor], other: Sequence[torch.Tensor], other_weight: float = 1.0
) -> float:
    """``||own - other / other_weight|| / ||own||`` over all tensors (absolute if own is 0)."""
    num = den = 0.0
    for a, b in zip(own, other, strict=True):
        a64 = a.double()
        num += float((a64 - b.double() / other_weight).pow(2).sum())
        den += float(a64.pow(2).sum())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


class GossipMetrics:
    """The metrics of one worker (its node and, once created, its SGP wrapper).

    Built by :class:`~gossip_sgp.GossipNode`; use ``node.metrics.registry`` to read or serve
    them. One registry per node: two nodes on one registry would expose clashing series.
    """

    def __init__(
        self,
        rank: int,
        node_stats: Callable[[], NodeStats],
        registry: CollectorRegistry | None = None,
        *,
        peer_up_window: float = PEER_UP_WINDOW,
    ) -> None:
        if not peer_up_window > 0:
            raise ValueError(f"peer_up_window must be > 0 seconds, got {peer_up_window}")
        self.registry = CollectorRegistry() if registry is None else registry
        self.rank = rank
        self.node_stats = node_stats
        """Called at every scrape: the node's counters (``GossipNode.snapshot``)."""
        self.training_stats: Callable[[], TrainingStats] | None = None
        """Called at every scrape once an SGP wrapper is attached (``SGP.snapshot``)."""
        self.peer_up_window = float(peer_up_window)
        self.started = time.time()
        self._lock = threading.Lock()
        # (sender, seq) -> (sent_at, sample of the sender's de-biased model or None)
        self._pending: dict[tuple[int, int], tuple[float, tuple[torch.Tensor, ...] | None]] = {}
        self._pair: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None = None
        self._next_sample = 0.0  # monotonic time from which the next message is sampled
        self.folded = 0
        """Received messages whose mass has been folded in."""
        self.coalesced = 0
        """Received messages whose mass was summed with others' before fold-in (async mode)."""
        try:
            age = Histogram(
                "gossip_sgp_message_age_seconds",
                "Time from a message's send (sender's clock) to its fold-in, in seconds; "
                "clock skew between machines adds to it (negative values count as 0)",
                ["rank"],
                registry=self.registry,
                buckets=AGE_BUCKETS,
            )
            staleness = Histogram(
                "gossip_sgp_staleness_rounds",
                "Own round minus the round of a message when it is folded in",
                ["rank"],
                registry=self.registry,
                buckets=STALENESS_BUCKETS,
            )
            self.registry.register(_Collector(self))
        except ValueError as exc:  # names taken: a registry shared by two nodes
            raise GossipError(
                f"rank {rank}: the metrics registry already holds gossip-sgp metrics; "
                f"give each GossipNode a registry of its own ({exc})"
            ) from None
        self._age = age.labels(rank=str(rank))
        self._staleness = staleness.labels(rank=str(rank))

    def watch(self, training_stats: Callable[[], TrainingStats]) -> None:
        """Read the training state from ``training_stats()`` at scrape time (called by
        ``SGP.__init__`` with its ``snapshot``)."""
        self.training_stats = training_stats

    # ----------------------------------------------------------- hooks (hot path)
    def received(self, message: Message) -> object:
        """A message is about to enter the mailbox (gossip thread); returns a token.

        Remembers its send time until :meth:`folded_in`, and a strided sample of the sender's
        ``x / w`` for one message every ``_SAMPLE_INTERVAL`` s. Pass the token to
        :meth:`rejected` if the mailbox refuses the message.
        """
        sample = None
        now = time.monotonic()
        if now >= self._next_sample and message.weight > 0 and message.tensors:
            self._next_sample = now + _SAMPLE_INTERVAL
            sample = _sample(message.tensors, _SAMPLE_ELEMENTS, 1.0 / message.weight)
        entry = (message.sent_at, sample)
        key = (message.sender, message.seq)
        with self._lock:
            if key in self._pending:
                return None  # a duplicate of a message still waiting: keep the original
            self._pending[key] = entry
            if len(self._pending) > _MAX_PENDING:
                del self._pending[next(iter(self._pending))]
        return entry

    def rejected(self, message: Message, token: object) -> None:
        """The mailbox refused ``message`` (a duplicate): forget what :meth:`received` kept."""
        key = (message.sender, message.seq)
        with self._lock:
            if token is not None and self._pending.get(key) is token:
                del self._pending[key]

    @staticmethod
    def sample_own(numerator: Sequence[torch.Tensor], weight: float) -> tuple[torch.Tensor, ...]:
        """The elements of ``numerator / weight`` that :meth:`folded_in` compares, copied:
        an ``own`` for it where the model is not the state being averaged."""
        return _sample(numerator, _SAMPLE_ELEMENTS, 1.0 / weight)

    def folded_in(
        self,
        receipts: Sequence[Receipt],
        own_round: int,
        own: Sequence[torch.Tensor],
        *,
        coalesced: bool,
    ) -> None:
        """The training thread folded these messages into its state (before de-biasing).

        ``own`` is this worker's de-biased model before the fold (or :meth:`sample_own`
        of it); with the last sampled message it forms the pair the consensus distance is
        computed from at scrape time.
        """
        now = time.time()
        with self._lock:
            entries = [self._pending.pop((sender, seq), None) for sender, seq, _ in receipts]
        sample = None
        for entry, (_, _, round) in zip(entries, receipts, strict=True):
            self._staleness.observe(max(0, own_round - round))
            if entry is not None:
                self._age.observe(max(0.0, now - entry[0]))
                sample = entry[1] if entry[1] is not None else sample
        if sample is not None:
            self._pair = (_sample(own, _SAMPLE_ELEMENTS), sample)
        self.folded += len(receipts)
        if coalesced and len(receipts) > 1:
            self.coalesced += len(receipts) - 1

    def consensus_distance(self) -> float | None:
        """Relative distance between this worker's model and the last one folded in."""
        pair = self._pair
        if pair is None:
            return None
        return relative_distance(*pair)


def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=["rank", *labels])


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=["rank", *labels])


class _Collector(Collector):
    """Reads a worker's node and SGP state when the registry is scraped."""

    def __init__(self, metrics: GossipMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        node = m.node_stats()
        training = m.training_stats() if m.training_stats is not None else None
        rank = str(m.rank)
        yield from self._training(rank, training)
        yield from self._traffic(rank, node)
        yield from self._peers(rank, node)
        yield from self._losses(rank, node, training)
        folded = _counter(
            "gossip_sgp_folded_messages", "Received messages whose mass was folded in"
        )
        folded.add_metric([rank], m.folded)
        coalesced = _counter(
            "gossip_sgp_coalesced_messages",
            "Received messages summed with others before fold-in (asynchronous mode)",
        )
        coalesced.add_metric([rank], m.coalesced)
        start = _gauge("gossip_sgp_start_time_seconds", "Unix time the worker's metrics began")
        start.add_metric([rank], m.started)
        yield from (folded, coalesced, start)
        distance = m.consensus_distance()
        if distance is not None:
            g = _gauge(
                "gossip_sgp_consensus_distance",
                "Estimated relative distance ||z_i - z_j|| / ||z_i|| between this worker's "
                "model and the last model folded in (strided sample of the parameters)",
            )
            g.add_metric([rank], distance)
            yield g

    def _training(self, rank: str, sgp: TrainingStats | None) -> Iterator[Metric]:
        if sgp is None:
            return
        steps = _counter("gossip_sgp_steps", "SGP.step() calls")
        steps.add_metric([rank], sgp.steps)
        step_time = SummaryMetricFamily(
            "gossip_sgp_step_seconds",
            "Time spent in SGP.step() (optimizer step, gossip, waiting), in seconds",
            labels=["rank"],
        )
        step_time.add_metric([rank], count_value=sgp.steps, sum_value=sgp.step_seconds)
        rounds = _counter("gossip_sgp_rounds", "Gossip rounds run (training and consensus)")
        rounds.add_metric([rank], sgp.round)
        skipped = _counter(
            "gossip_sgp_skipped_rounds",
            "Asynchronous rounds in which this worker kept its mass (no send credit, or its "
            "out-peer's link still held a share not folded)",
        )
        skipped.add_metric([rank], sgp.skipped_rounds)
        answered = _counter(
            "gossip_sgp_answered_shares",
            "Shares of peers still training answered with a little of this worker's mass "
            "while it waited in consensus() (asynchronous mode)",
        )
        answered.add_metric([rank], sgp.answered)
        weight = _gauge(
            "gossip_sgp_weight", "Push-sum weight w of this worker at the end of its last round"
        )
        weight.add_metric([rank], sgp.weight)
        outer = _counter(
            "gossip_sgp_outer_steps",
            "Outer steps taken: models averaged and the outer optimizer applied (local-steps "
            "mode, SGP(local_steps=H))",
        )
        outer.add_metric([rank], sgp.outer_steps)
        yield from (steps, step_time, rounds, skipped, answered, weight, outer)
        if sgp.outer_gradient_norm is not None:
            norm = _gauge(
                "gossip_sgp_outer_gradient_norm",
                "The last outer step's pseudo-gradient norm ||x0 - mean(x_i)|| relative to "
                "the reference point's ||x0|| (local-steps mode)",
            )
            norm.add_metric([rank], sgp.outer_gradient_norm)
            yield norm
        if sgp.loss is not None:
            loss = _gauge("gossip_sgp_loss", "Training loss last reported with SGP.report()")
            loss.add_metric([rank], sgp.loss)
            yield loss

    def _traffic(self, rank: str, node: NodeStats) -> Iterator[Metric]:
        stats = node.traffic
        if stats is None:  # not started yet: no transport
            return
        families = (
            ("gossip_sgp_messages_sent", "Messages handed to the wire", stats.messages_sent),
            ("gossip_sgp_sent_bytes", "Bytes handed to the wire", stats.bytes_sent),
            ("gossip_sgp_messages_received", "Valid messages received", stats.messages_received),
            ("gossip_sgp_received_bytes", "Bytes of valid messages received", stats.bytes_received),
        )
        for name, doc, counts in families:
            family = _counter(name, doc + ", per peer", ["peer"])
            for peer, value in sorted(counts.items()):
                family.add_metric([rank, str(peer)], value)
            yield family
        errors = _counter(
            "gossip_sgp_send_errors",
            "Failed sends, per peer (a full queue: sent again; else lost)",
            ["peer"],
        )
        for peer, value in sorted(node.send_errors.items()):
            errors.add_metric([rank, str(peer)], value)
        yield errors
        raw, wire = node.payload_raw_bytes_sent, node.payload_bytes_sent
        raw_total = _counter(
            "gossip_sgp_sent_payload_raw_bytes", "Numerator bytes sent, before compression"
        )
        raw_total.add_metric([rank], raw)
        wire_total = _counter(
            "gossip_sgp_sent_payload_bytes", "Numerator bytes sent, as encoded by the codec"
        )
        wire_total.add_metric([rank], wire)
        yield from (raw_total, wire_total)
        if wire > 0:
            ratio = _gauge(
                "gossip_sgp_compression_ratio",
                "Raw numerator bytes / encoded numerator bytes of the messages sent (1: none)",
            )
            ratio.add_metric([rank], raw / wire)
            yield ratio

    def _peers(self, rank: str, node: NodeStats) -> Iterator[Metric]:
        rtt = _gauge(
            "gossip_sgp_peer_rtt_seconds",
            "Median time from sending a message to its acknowledgement (fold-in), per peer",
            ["peer"],
        )
        for peer, seconds in sorted(node.rtt_medians.items()):
            rtt.add_metric([rank, str(peer)], seconds)
        outstanding = _gauge(
            "gossip_sgp_outstanding_messages",
            "Messages sent whose mass the peer has not acknowledged yet",
            ["peer"],
        )
        up = _gauge(
            "gossip_sgp_peer_up",
            f"1 if this worker heard from the peer in the last {self.metrics.peer_up_window:g} s "
            "and does not suspect it down (failure detector)",
            ["peer"],
        )
        now = time.monotonic()
        count = 0
        peers = sorted(node.neighbours)  # every other rank until an SGP wrapper picks them
        for peer in peers:
            outstanding.add_metric([rank, str(peer)], node.outstanding.get(peer, 0))
            alive = (
                peer not in node.down
                and now - node.last_heard.get(peer, -math.inf) <= self.metrics.peer_up_window
            )
            count += alive
            up.add_metric([rank, str(peer)], float(alive))
        ups = _gauge("gossip_sgp_peers_up", "Peers heard from recently (see gossip_sgp_peer_up)")
        ups.add_metric([rank], count)
        downs = _gauge("gossip_sgp_peers_down", "Peers not heard from recently")
        downs.add_metric([rank], len(peers) - count)
        yield from (rtt, outstanding, up, ups, downs)

    def _losses(self, rank: str, node: NodeStats, sgp: TrainingStats | None) -> Iterator[Metric]:
        reasons: dict[str, int] = dict(node.rejected)
        for more in (
            node.traffic.rejected if node.traffic is not None else {},
            sgp.rejected if sgp is not None else {},
        ):
            for reason, value in more.items():
                reasons[reason] = reasons.get(reason, 0) + value
        rejected = _counter(
            "gossip_sgp_rejected_messages", "Received messages refused, per reason", ["reason"]
        )
        for reason, value in sorted(reasons.items()):
            rejected.add_metric([rank, reason], value)
        dropped = _counter(
            "gossip_sgp_dropped_messages",
            "Push-sum messages whose mass this worker lost, per reason",
            ["reason"],
        )
        for reason, value in sorted(node.dropped.items()):
            dropped.add_metric([rank, reason], value)
        # A gauge: a write-off taken back (a peer suspected by mistake acknowledges after
        # all) lowers it, which a counter must never do (Prometheus would see a reset).
        lost = _gauge(
            "gossip_sgp_lost_weight",
            "Push-sum weight of the messages this worker dropped, failed to send, or sent to a "
            "peer suspected down that has not acknowledged them",
        )
        lost.add_metric([rank], node.lost_weight)
        yield from (rejected, dropped, lost)
        if sgp is not None:
            lagged = _counter(
                "gossip_sgp_lagged_shares",
                "Asynchronous mode: shares received whose model was more than lag_limit steps "
                "behind this worker's (weight kept, model dropped) or ahead (model taken)",
                ["side"],
            )
            for side in ("ahead", "behind"):
                lagged.add_metric([rank, side], sgp.lagged.get(side, 0))
            yield lagged


class _QuietHandler(WSGIRequestHandler):
    timeout = _REQUEST_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are routine: no access log on stderr."""


class MetricsServer:
    """Serves ``registry`` on ``http://host:port/metrics`` from one thread.

    Requests are answered one at a time (a scrape takes about a millisecond), so there is a
    single thread to stop: :meth:`stop` returns within ``_SERVER_POLL`` s plus at most one
    request, and leaves no socket open. Port 0 picks a free port (see :attr:`port`).
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> MetricsServer:
        """Bind and start serving; raises ``OSError`` when the address cannot be bound."""
        if self._server is not None:
            raise GossipError("a MetricsServer starts only once")
        infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        family = infos[0][0]
        server_class = _IPv6Server if family == socket.AF_INET6 else _IPv4Server
        server = server_class((self.host, self.port), _QuietHandler)
        server.set_app(make_wsgi_app(self.registry))
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": _SERVER_POLL},
            name=f"gossip-sgp-metrics:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving, close the socket, join the thread (idempotent)."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._thread = None
        if thread.is_alive():
            server.shutdown()
            thread.join(_REQUEST_TIMEOUT + 1.0)
        server.server_close()


class _IPv4Server(WSGIServer):
    address_family = socket.AF_INET

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can stall on DNS; the
        # exposition never needs it.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]
        self.setup_environ()


class _IPv6Server(_IPv4Server):
    address_family = socket.AF_INET6


def scrape_config(targets: Sequence[str], *, job: str = "gossip-sgp", interval: str = "5s") -> str:
    """A Prometheus configuration file (YAML) that scrapes ``targets`` (``host:port``)."""
    lines = [
        "# Prometheus configuration for the gossip-sgp workers; run it with",
        "#   prometheus --config.file=THIS_FILE",
        "global:",
        f"  scrape_interval: {interval}",
        "scrape_configs:",
        f"  - job_name: {_yaml_string(job)}",
        f"    scrape_interval: {interval}",
        "    metrics_path: /metrics",
        "    static_configs:",
        "      - targets:",
    ]
    lines += [f"          - {_yaml_string(target)}" for target in targets]
    return "\n".join(lines) + "\n"


def _yaml_string(text: str) -> str:
    """``text`` as a double-quoted YAML scalar (JSON string syntax is valid YAML)."""
    import json

    return json.dumps(text)
