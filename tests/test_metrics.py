"""Prometheus metrics, the metrics server, ``gossip-sgp top`` and ``prometheus-config``.

Workers run as threads over the in-process transport, each node with a fresh
``CollectorRegistry``; the HTTP tests use real loopback sockets.
"""

from __future__ import annotations

import http.server
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gossip_sgp import SGP, GossipConfig, GossipError, GossipNode, Message, TransportError
from gossip_sgp.cli import main
from gossip_sgp.config import ConfigError
from gossip_sgp.launch import find_free_ports
from gossip_sgp.metrics import MetricsServer, relative_distance, scrape_config
from gossip_sgp.settings import LinkSettings
from gossip_sgp.top import Snapshot, render, scrape, summarize
from tests import threads
from transports import FaultSpec, InProcNetwork
from transports.base import TransportStats

ROOT = Path(__file__).resolve().parent.parent


def run_workers(
    n: int,
    fn: Callable[[int, GossipNode], Any],
    *,
    faults: FaultSpec | None = None,
    metrics_ports: list[int] | None = None,
    settings: LinkSettings | None = None,
) -> tuple[list[Any], list[CollectorRegistry]]:
    """Run ``fn(rank, node)`` on n threads, each node with a fresh registry."""
    registries = [CollectorRegistry() for _ in range(n)]
    results = threads.run_workers(
        n, fn, faults=faults, metrics_ports=metrics_ports, registries=registries, settings=settings
    )
    return results, registries


def train(
    steps: int, *, staleness: int | None = 0, compression: str = "none", size: int = 5
) -> Callable[[int, GossipNode], Any]:
    """Worker i pulls x (``size`` float64) towards i; reports loss; returns metrics state."""

    def fn(rank: int, node: GossipNode) -> dict[str, Any]:
        x = torch.nn.Parameter(torch.zeros(size, dtype=torch.float64))
        opt = torch.optim.SGD([x], lr=0.1)
        sgp = SGP([x], opt, node, staleness=staleness, compression=compression)
        loss = math.nan
        for _ in range(steps):
            opt.zero_grad()
            value = 0.5 * (x - float(rank)).pow(2).sum()
            value.backward()
            sgp.step()
            loss = value.item()
            sgp.report(loss=loss)
        assert node.metrics is not None
        pending = len(node.metrics._pending)
        return {"loss": loss, "weight": sgp.weight, "pending": pending}

    return fn


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


# ------------------------------------------------------------------ the collector
class _StubTransport:
    """Just the counters of a transport: the collector reads nothing else."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.stats = TransportStats()


def test_collector_reads_live_node_counters() -> None:
    registry = CollectorRegistry()
    config = GossipConfig.local(3, 0, ports=[1, 2, 3], transport="inproc")
    transport = _StubTransport(0)
    node = GossipNode(config, transport=transport, registry=registry)  # type: ignore[arg-type]
    assert value(registry, "gossip_sgp_messages_sent_total", rank="0", peer="1") is None
    assert value(registry, "gossip_sgp_lost_weight", rank="0") == 0.0
    assert value(registry, "gossip_sgp_peers_down", rank="0") == 2.0  # nobody heard yet

    transport.stats.messages_sent[1] += 3
    transport.stats.bytes_sent[1] += 300
    transport.stats.messages_received[2] += 2
    transport.stats.bytes_received[2] += 128
    transport.stats.rejected["bad_header"] += 2
    node.rejected["wrong_model"] += 1
    node.dropped["closed"] += 4
    node.lost_weight += 0.25
    node.send_errors[2] += 1
    node.last_heard[2] = time.monotonic()
    node._link(1).rtts.extend([0.010, 0.030, 0.020])

    assert value(registry, "gossip_sgp_messages_sent_total", rank="0", peer="1") == 3
    assert value(registry, "gossip_sgp_sent_bytes_total", rank="0", peer="1") == 300
    assert value(registry, "gossip_sgp_messages_received_total", rank="0", peer="2") == 2
    assert value(registry, "gossip_sgp_received_bytes_total", rank="0", peer="2") == 128
    rejected = "gossip_sgp_rejected_messages_total"
    assert value(registry, rejected, rank="0", reason="bad_header") == 2
    assert value(registry, rejected, rank="0", reason="wrong_model") == 1
    assert value(registry, "gossip_sgp_dropped_messages_total", rank="0", reason="closed") == 4
    assert value(registry, "gossip_sgp_lost_weight", rank="0") == 0.25
    assert value(registry, "gossip_sgp_send_errors_total", rank="0", peer="2") == 1
    assert value(registry, "gossip_sgp_peer_rtt_seconds", rank="0", peer="1") == 0.020
    assert value(registry, "gossip_sgp_peer_up", rank="0", peer="2") == 1.0
    assert value(registry, "gossip_sgp_peer_up", rank="0", peer="1") == 0.0
    assert value(registry, "gossip_sgp_peers_up", rank="0") == 1.0
    assert value(registry, "gossip_sgp_peers_down", rank="0") == 1.0
    assert value(registry, "gossip_sgp_steps_total", rank="0") is None  # no SGP yet


def test_metrics_are_off_without_port_or_registry() -> None:
    config = GossipConfig.local(2, 0, ports=[1, 2], transport="inproc")
    node = GossipNode(config, transport=InProcNetwork(2).transport(0))
    assert node.metrics is None


def test_one_registry_per_node() -> None:
    registry = CollectorRegistry()
    net = InProcNetwork(2)
    configs = [GossipConfig.local(2, r, ports=[1, 2], transport="inproc") for r in range(2)]
    GossipNode(configs[0], transport=net.transport(0), registry=registry)
    with pytest.raises(GossipError, match="registry of its own"):
        GossipNode(configs[1], transport=net.transport(1), registry=registry)


@pytest.mark.timeout(60)
def test_training_moves_the_metrics() -> None:
    steps = 6
    # No heartbeats during this short run, so the message counts below are exact.
    quiet = LinkSettings(heartbeat_s=3600.0, suspect_floor_s=3600.0, suspect_initial_s=3600.0)
    results, registries = run_workers(2, train(steps), settings=quiet)
    for rank, (result, registry) in enumerate(zip(results, registries, strict=True)):
        r, peer = str(rank), str(1 - rank)
        assert value(registry, "gossip_sgp_steps_total", rank=r) == steps
        assert value(registry, "gossip_sgp_step_seconds_count", rank=r) == steps
        step_seconds = value(registry, "gossip_sgp_step_seconds_sum", rank=r)
        assert step_seconds is not None
        assert step_seconds > 0
        assert value(registry, "gossip_sgp_rounds_total", rank=r) == steps
        assert value(registry, "gossip_sgp_weight", rank=r) == result["weight"] == 1.0
        assert value(registry, "gossip_sgp_loss", rank=r) == result["loss"]
        # Synchronous: every round's message from the one peer is folded in that round.
        assert value(registry, "gossip_sgp_folded_messages_total", rank=r) == steps
        assert value(registry, "gossip_sgp_staleness_rounds_count", rank=r) == steps
        assert value(registry, "gossip_sgp_staleness_rounds_sum", rank=r) == 0.0
        assert value(registry, "gossip_sgp_message_age_seconds_count", rank=r) == steps
        age = value(registry, "gossip_sgp_message_age_seconds_sum", rank=r)
        assert age is not None
        assert 0 <= age < 10 * steps
        assert result["pending"] == 0  # nothing remembered beyond fold-in
        # Workers pull towards 0 and 1: their models differ.
        distance = value(registry, "gossip_sgp_consensus_distance", rank=r)
        assert distance is not None
        assert 0 < distance < 2
        # 6 MASS messages of 5 float64 each, plus acknowledgements (no payload).
        assert value(registry, "gossip_sgp_sent_payload_bytes_total", rank=r) == steps * 40
        assert value(registry, "gossip_sgp_sent_payload_raw_bytes_total", rank=r) == steps * 40
        assert value(registry, "gossip_sgp_compression_ratio", rank=r) == 1.0
        assert value(registry, "gossip_sgp_sent_bytes_total", rank=r, peer=peer) == steps * 40
        assert value(registry, "gossip_sgp_received_bytes_total", rank=r, peer=peer) == steps * 40
        sent = value(registry, "gossip_sgp_messages_sent_total", rank=r, peer=peer)
        assert sent is not None
        assert steps <= sent <= 2 * steps
        assert value(registry, "gossip_sgp_peer_up", rank=r, peer=peer) == 1.0
        rtt = value(registry, "gossip_sgp_peer_rtt_seconds", rank=r, peer=peer)
        assert rtt is not None
        assert rtt > 0
        assert value(registry, "gossip_sgp_lost_weight", rank=r) == 0.0


@pytest.mark.timeout(60)
def test_duplicates_are_counted_as_rejected() -> None:
    steps = 8
    results, registries = run_workers(2, train(steps), faults=FaultSpec(duplicate=1.0))
    for rank, registry in enumerate(registries):
        r = str(rank)
        duplicates = value(
            registry, "gossip_sgp_rejected_messages_total", rank=r, reason="duplicate"
        )
        assert duplicates is not None
        assert duplicates >= steps - 1
        # A duplicate is neither folded nor timed twice, nor remembered.
        assert value(registry, "gossip_sgp_folded_messages_total", rank=r) == steps
        assert value(registry, "gossip_sgp_message_age_seconds_count", rank=r) == steps
        assert results[rank]["pending"] == 0


@pytest.mark.timeout(60)
def test_asynchronous_mode_counts_coalesced_messages() -> None:
    steps = 30
    _, registries = run_workers(4, train(steps, staleness=None))
    for rank, registry in enumerate(registries):
        r = str(rank)
        folded = value(registry, "gossip_sgp_folded_messages_total", rank=r)
        coalesced = value(registry, "gossip_sgp_coalesced_messages_total", rank=r)
        assert folded is not None
        assert coalesced is not None
        assert 0 < folded <= steps + 8
        assert 0 <= coalesced < folded
        stale = value(registry, "gossip_sgp_staleness_rounds_count", rank=r)
        assert stale == folded
        for side in ("ahead", "behind"):  # 30 steps: no model 50 steps from another
            assert value(registry, "gossip_sgp_lagged_shares_total", rank=r, side=side) == 0


@pytest.mark.timeout(60)
def test_compression_ratio_from_the_codec() -> None:
    steps = 4
    _, registries = run_workers(2, train(steps, compression="fp16", size=4096))
    for rank, registry in enumerate(registries):
        r = str(rank)
        # 4096 float64 sent as float16: 32768 raw bytes, 8192 on the wire per message.
        raw = value(registry, "gossip_sgp_sent_payload_raw_bytes_total", rank=r)
        assert raw == steps * 4096 * 8
        assert value(registry, "gossip_sgp_sent_payload_bytes_total", rank=r) == steps * 4096 * 2
        assert value(registry, "gossip_sgp_compression_ratio", rank=r) == 4.0
        assert value(registry, "gossip_sgp_folded_messages_total", rank=r) == steps


def test_relative_distance() -> None:
    own = (torch.tensor([3.0, 0.0]), torch.tensor([4.0]))
    assert relative_distance(own, own) == 0.0
    # theirs / weight = (0, 0, 0): distance = ||own|| / ||own|| = 1
    assert relative_distance(own, (torch.zeros(2), torch.zeros(1)), 0.5) == 1.0
    theirs = (torch.tensor([1.5, 0.0]), torch.tensor([2.0]))  # x = z / 2 with w = 0.5
    assert relative_distance(own, theirs, 0.5) == pytest.approx(0.0)
    assert relative_distance((torch.zeros(2),), (torch.ones(2),)) == pytest.approx(math.sqrt(2))


# ------------------------------------------------------------------ serving
def _metrics_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("gossip-sgp-metrics")]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        text: str = response.read().decode()
        return text


def _refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.timeout(60)
def test_node_serves_metrics_until_closed() -> None:
    (port,) = find_free_ports("127.0.0.1", 1)
    config = GossipConfig.local(1, 0, ports=[40000], transport="inproc", metrics_ports=[port])
    node = GossipNode(config, transport=InProcNetwork(1).transport(0))
    try:
        node.start()
        x = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.SGD([x], lr=0.1)
        sgp = SGP([x], opt, node)
        sgp.step()
        sgp.report(loss=0.5)
        text = _get(f"http://127.0.0.1:{port}/metrics")
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert families["gossip_sgp_steps"].samples[0].value == 1.0
        assert families["gossip_sgp_loss"].samples[0].value == 0.5
        assert len(_metrics_threads()) == 1
    finally:
        node.close()
    assert _metrics_threads() == []
    assert _refused(port)


@pytest.mark.timeout(30)
def test_metrics_port_in_use_fails_start_cleanly() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = GossipConfig.local(1, 0, ports=[40000], transport="inproc", metrics_ports=[port])
        node = GossipNode(config, transport=InProcNetwork(1).transport(0))
        before = threading.active_count()
        with pytest.raises(TransportError, match=f"cannot serve metrics on 127.0.0.1 port {port}"):
            node.start()
        assert node.closed
        assert not node.running
        assert threading.active_count() <= before
        assert _metrics_threads() == []


def _ipv6_loopback_problem() -> str | None:
    """Why this machine cannot serve on ``::1`` (None: it can), found with a plain socket."""
    if not socket.has_ipv6:
        return "Python was built without IPv6"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
            probe.listen()
    except OSError as exc:
        return f"no IPv6 loopback on this machine: {exc}"
    return None


@pytest.mark.timeout(30)
def test_metrics_server_on_ipv6_loopback_and_port_zero() -> None:
    """Fails if ``MetricsServer`` cannot serve on ``::1`` where the machine can: e.g. the
    mutation that always picks ``_IPv4Server`` in ``MetricsServer.start`` makes it fail
    (``socket.gaierror``, an ``OSError``). The old version skipped on any ``OSError``
    from the code under test, and so skipped under that mutation; now only a machine
    without IPv6 loopback, found with a plain socket first, skips."""
    problem = _ipv6_loopback_problem()
    if problem is not None:
        pytest.skip(problem)
    registry = CollectorRegistry()
    server = MetricsServer(registry, "::1", 0).start()
    try:
        assert server.port > 0
        assert server.url == f"http://[::1]:{server.port}/metrics"
        _get(server.url)
    finally:
        server.stop()
    server.stop()  # idempotent
    assert _metrics_threads() == []


def test_metrics_host_from_environment() -> None:
    env = {"GOSSIP_SGP_PEERS": "127.0.0.1:1,127.0.0.1:2", "GOSSIP_SGP_RANK": "0"}
    assert GossipConfig.from_env(env).metrics_host == "127.0.0.1"
    config = GossipConfig.from_env({**env, "GOSSIP_SGP_METRICS_HOST": "0.0.0.0"})
    assert config.metrics_host == "0.0.0.0"
    with pytest.raises(ConfigError, match="GOSSIP_SGP_METRICS_HOST"):
        GossipConfig.from_env({**env, "GOSSIP_SGP_METRICS_HOST": "tcp://x"})


# ------------------------------------------------------------------ top
@pytest.fixture
def garbage_server() -> Iterator[int]:
    """A loopback HTTP server answering every request with bytes that are not metrics."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'<html>\xff\xfe not metrics {{{ \n# TYPE x counter\nx{a="} 1\n'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.timeout(30)
def test_scrape_never_crashes_on_garbage_or_silence(garbage_server: int) -> None:
    bad = scrape(f"127.0.0.1:{garbage_server}", timeout=2)
    assert bad.error is not None
    assert bad.error.startswith("bad response")
    (free,) = find_free_ports("127.0.0.1", 1)
    down = scrape(f"127.0.0.1:{free}", timeout=2)
    assert down.error is not None
    assert down.error.startswith("unreachable")
    text = render([summarize(bad), summarize(down)])
    assert "0/2 workers up" in text
    assert f"127.0.0.1:{free}" in text
    assert "DOWN: unreachable" in text


def test_summarize_rates_between_scrapes() -> None:
    def snap(t: float, steps: float, sent: float) -> Snapshot:
        labels = {"rank": "3"}
        return Snapshot(
            "h:1",
            t,
            {
                "gossip_sgp_steps_total": [(labels, steps)],
                "gossip_sgp_step_seconds_count": [(labels, steps)],
                "gossip_sgp_step_seconds_sum": [(labels, steps * 0.02)],
                "gossip_sgp_start_time_seconds": [(labels, 100.0)],
                "gossip_sgp_sent_bytes_total": [
                    ({"rank": "3", "peer": "0"}, sent),
                    ({"rank": "3", "peer": "1"}, sent),
                ],
                "gossip_sgp_peer_rtt_seconds": [
                    ({"rank": "3", "peer": "0"}, 0.004),
                    ({"rank": "3", "peer": "1"}, 0.006),
                ],
                "gossip_sgp_weight": [(labels, 0.75)],
            },
        )

    first = summarize(snap(110.0, 50, 1000))  # averages since the start (t = 100)
    assert first.rank == "3"
    assert first.step_rate == pytest.approx(5.0)
    assert first.sent_rate == pytest.approx(200.0)
    assert first.step_ms == pytest.approx(20.0)
    assert first.rtt_ms == pytest.approx(5.0)
    later = summarize(snap(112.0, 90, 3000), snap(110.0, 50, 1000))
    assert later.step_rate == pytest.approx(20.0)
    assert later.sent_rate == pytest.approx(2000.0)
    assert later.distance is None
    assert later.loss is None
    line = render([later]).splitlines()[2]
    assert line.split()[:4] == ["h:1", "3", "90", "20.0"]
    assert "2.0 kB/s" in line
    assert "0.750" in line


@pytest.mark.timeout(60)
def test_top_once_shows_live_workers_and_down_ones(capsys: pytest.CaptureFixture[str]) -> None:
    ports = find_free_ports("127.0.0.1", 3)
    outputs: list[str] = []
    barrier = threading.Barrier(2)

    def fn(rank: int, node: GossipNode) -> None:
        train(4)(rank, node)
        barrier.wait(20)  # both trained, both still serving
        if rank == 0:
            targets = f"127.0.0.1:{ports[0]},127.0.0.1:{ports[1]},127.0.0.1:{ports[2]}"
            outputs.append(str(main(["top", "--targets", targets, "--once", "--timeout", "2"])))
        barrier.wait(20)

    run_workers(2, fn, metrics_ports=ports[:2])
    out = capsys.readouterr().out
    assert outputs == ["1"]  # one target is down
    assert "2/3 workers up" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    for rank in range(2):
        row = lines[f"127.0.0.1:{ports[rank]}"]
        assert row[1] == str(rank)
        assert row[2] == "4"
    assert lines[f"127.0.0.1:{ports[2]}"][1] == "DOWN:"


@pytest.mark.timeout(60)
def test_top_exits_cleanly_on_ctrl_c() -> None:
    (port,) = find_free_ports("127.0.0.1", 1)
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "gossip_sgp.cli", "top"),
            *("--targets", f"127.0.0.1:{port}", "--interval", "0.2", "--timeout", "0.5"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline().decode()
        assert "0/1 workers up" in first
        process.send_signal(signal.SIGINT)
        _out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err.decode()
    assert b"Traceback" not in err


# ------------------------------------------------------------------ prometheus-config
def test_scrape_config_lists_every_target() -> None:
    text = scrape_config(["10.0.0.1:9100", "[::1]:9101"], job="my job", interval="2s")
    assert '  - job_name: "my job"' in text
    assert "  scrape_interval: 2s" in text
    assert '          - "10.0.0.1:9100"' in text
    assert '          - "[::1]:9101"' in text


def test_prometheus_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    peers = tmp_path / "peers.toml"
    peers.write_text(
        "[[peers]]\nrank = 0\nhost = '10.0.0.1'\nport = 29500\nmetrics_port = 9100\n"
        "[[peers]]\nrank = 1\nhost = '10.0.0.2'\nport = 29500\nmetrics_port = 9100\n"
        "[[peers]]\nrank = 2\nhost = '10.0.0.3'\nport = 29500\n"
    )
    assert main(["prometheus-config", "--config", str(peers)]) == 0
    captured = capsys.readouterr()
    assert '"10.0.0.1:9100"' in captured.out
    assert '"10.0.0.2:9100"' in captured.out
    assert "10.0.0.3" not in captured.out
    assert "1 peer(s) without metrics_port" in captured.err
    assert 'metrics_host = "0.0.0.0"' in captured.err  # loopback endpoints, remote peers
    peers.write_text("[[peers]]\nrank = 0\nhost = '10.0.0.1'\nport = 29500\n")
    assert main(["prometheus-config", "--config", str(peers)]) == 2
    assert "no peer has a metrics_port" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prometheus-config", "--targets", "a:1", "--scrape-interval", "soon"])


# ------------------------------------------------------------------ dashboard
@pytest.mark.timeout(60)
def test_dashboard_queries_use_exported_metric_names() -> None:
    _, registries = run_workers(2, train(3))
    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count"),
    }
    exported = {
        family.name + suffix
        for family in registries[0].collect()
        for suffix in suffixes[family.type]
    }
    assert "gossip_sgp_rejected_messages_total" in exported  # listed even with no samples
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    expressions = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    assert len(expressions) >= 4
    used = set()
    for expr in expressions:
        names = re.findall(r"\bgossip_sgp_[a-z_]+\b", expr)
        assert names, f"no gossip-sgp metric in {expr!r}"
        used.update(names)
    assert used <= exported, f"unknown metric names: {sorted(used - exported)}"
    for needed in ("steps_total", "consensus_distance", "peer_rtt_seconds", "sent_bytes_total"):
        assert f"gossip_sgp_{needed}" in used


def test_receive_hook_keeps_a_small_copy() -> None:
    """The receive hook keeps a sample, never the message's tensors (bounded memory)."""
    registry = CollectorRegistry()
    config = GossipConfig.local(2, 0, ports=[1, 2], transport="inproc")
    node = GossipNode(config, transport=InProcNetwork(2).transport(0), registry=registry)
    assert node.metrics is not None
    big = torch.arange(100_000, dtype=torch.float32)
    message = Message(sender=1, receiver=0, round=0, seq=0, weight=0.5, tensors=(big,))
    node.metrics.received(message)
    _, sample = node.metrics._pending[(1, 0)]
    assert sample is not None
    assert sum(t.numel() for t in sample) <= 4096
    assert sample[0].untyped_storage().data_ptr() != big.untyped_storage().data_ptr()
    # Every 25th element (100000 / 4096 rounded up), de-biased by the weight 0.5.
    assert sample[0][:3].tolist() == [0.0, 50.0, 100.0]
