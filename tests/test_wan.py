"""The WAN emulator (gossip_sgp.wan): link parsing, and real namespaces, relay and shaping.

The emulator tests need root, ``ip``, ``tc`` and ``nft`` (``scripts/ensure-test-tools``
installs nftables where it can); without them they skip and say what is missing. They check
function, not speed: a ping-pong pays at least twice the one-way delay, a rate limit makes a
transfer take at least most of its theoretical time, gloo works across the emulated links,
and nothing the emulator made outlives it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, cast

import pytest

from gossip_sgp.wan import (
    LinkSpec,
    WanEmulator,
    WanError,
    job_environment,
    list_namespaces,
    missing_requirements,
    parse_link,
)
from gossip_sgp.wan import relay as wan_relay
from gossip_sgp.wan.probe import run_client, start_server

MISSING = missing_requirements()
needs_root = pytest.mark.skipif(
    bool(MISSING), reason="WAN emulator unavailable: " + "; ".join(MISSING)
)
PREFIX = "gsgpwantest"
"""Namespace prefix of the emulators these tests start (the CLI's use the default)."""


# ---------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1gbit,50ms", LinkSpec(delay_ms=50, rate_mbit=1000)),
        ("100mbit,100ms,jitter=5ms", LinkSpec(delay_ms=100, jitter_ms=5, rate_mbit=100)),
        ("50ms", LinkSpec(delay_ms=50)),
        ("10mbit", LinkSpec(rate_mbit=10)),
        (" 0.5s , 1.5Mbit ", LinkSpec(delay_ms=500, rate_mbit=1.5)),
        ("delay=250us,rate=64kbit", LinkSpec(delay_ms=0.25, rate_mbit=0.064)),
    ],
)
def test_parse_link(text: str, expected: LinkSpec) -> None:
    assert parse_link(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("fast", "bad part 'fast'"),
        ("50", "bad part '50'"),
        ("10mbps", "bad part '10mbps'"),
        ("50ms,20ms", "delay given twice"),
        ("1gbit,2gbit", "rate given twice"),
        ("loss=1%", "unknown link field"),
        ("10ms,jitter=20ms", "must not exceed"),
        ("-5ms", "bad part '-5ms'"),
        ("jitter=5", "bad jitter '5'"),
        ("0bit", "rate_mbit must be between"),
    ],
)
def test_parse_link_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_link(text)


def test_link_spec_validates_and_prints() -> None:
    with pytest.raises(ValueError, match="finite"):
        LinkSpec(delay_ms=float("nan"))
    with pytest.raises(ValueError, match="number"):
        LinkSpec(rate_mbit=True)
    spec = LinkSpec(delay_ms=100, jitter_ms=5, rate_mbit=100)
    assert parse_link(str(spec)) == spec


def test_emulator_arguments() -> None:
    with pytest.raises(ValueError, match="hosts"):
        WanEmulator(0)
    with pytest.raises(ValueError, match=r"not in 0\.\.1"):
        WanEmulator(2, links={2: LinkSpec()})
    with pytest.raises(ValueError, match="cannot delay"):
        WanEmulator(2, "10ms", relay=False)
    wan = WanEmulator(3, "1gbit,50ms", {2: "10mbit,10ms"})
    assert wan.delay_ms(0, 1) == 50
    assert wan.delay_ms(2, 0) == wan.delay_ms(0, 2) == 30
    assert wan.delay_ms(1, 1) == 0
    assert wan.link(2) == LinkSpec(delay_ms=10, rate_mbit=10)
    assert wan.address(1) == "10.1.1.2"
    assert wan.command(1, ["true"])[1:] == ["netns", "exec", wan.namespace(1), "true"]
    with pytest.raises(ValueError, match="host must be"):
        wan.address(3)


def test_missing_requirements_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == "nft" else "/bin/" + tool)
    assert missing_requirements() == [
        "needs root (network namespaces, tc, nftables)",
        "nft not found (Debian/Ubuntu: apt-get install nftables)",
    ]
    with pytest.raises(WanError, match="cannot emulate: needs root"):
        WanEmulator(2).start()


# ---------------------------------------------------------------------------- relay pipes


class _Recorder:
    """Stands in for an asyncio transport: records what the relay does with it."""

    def __init__(self) -> None:
        self.written: list[tuple[float, bytes]] = []
        self.eof = False
        self.paused = False

    def writelines(self, chunks: list[bytes]) -> None:
        self.written += [(time.monotonic(), c) for c in chunks]

    def write_eof(self) -> None:
        self.eof = True

    def can_write_eof(self) -> bool:
        return True

    def is_closing(self) -> bool:
        return False

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


@pytest.mark.timeout(30)
def test_pipe_keeps_order_under_jitter_and_delays_every_chunk() -> None:
    async def main() -> tuple[_Recorder, list[float]]:
        done = asyncio.Event()
        link = wan_relay.Link(0.02, 0.019, None, random.Random(0))
        pipe = wan_relay.Pipe(asyncio.get_running_loop(), link, done.set)
        target = _Recorder()
        pipe.attach(cast(asyncio.Transport, target))
        sent = []
        for i in range(100):
            sent.append(time.monotonic())
            pipe.push(b"%d," % i)
            await asyncio.sleep(0.001)
        pipe.push(wan_relay.EOF)
        await asyncio.wait_for(done.wait(), 10)
        return target, sent

    target, sent = asyncio.run(main())
    assert b"".join(c for _, c in target.written) == b"".join(b"%d," % i for i in range(100))
    assert target.eof
    # every chunk waited at least the smallest draw (1 ms), and they did vary
    waits = [t - s for (t, _), s in zip(target.written, sent, strict=True)]
    assert min(waits) >= 0.001
    assert max(waits) - min(waits) > 0.005


@pytest.mark.timeout(30)
def test_pipe_stops_reading_beyond_its_limit() -> None:
    async def main() -> None:
        link = wan_relay.Link(0.0, 0.0, None, random.Random(0))
        pipe = wan_relay.Pipe(asyncio.get_running_loop(), link, lambda: None)
        source, target = _Recorder(), _Recorder()
        pipe.source = cast(asyncio.Transport, source)
        chunk = bytes(256 << 10)
        for _ in range(link.limit // len(chunk) + 1):  # no target yet: all of it queues
            pipe.push(chunk)
        assert source.paused
        pipe.attach(cast(asyncio.Transport, target))  # hands it all on at once
        assert not source.paused
        assert sum(len(c) for _, c in target.written) == (link.limit // len(chunk) + 1) * len(chunk)
        pipe.set_target_paused(True)  # the receiving socket is full
        assert source.paused

    asyncio.run(main())


# ---------------------------------------------------------------------------- emulator


def _relay_errors(wan: WanEmulator) -> str:
    """The relay's log without the one expected note (no real-time priority in a container)."""
    return "".join(
        line for line in wan.relay_log().splitlines(True) if "no real-time priority" not in line
    )


def _leftovers(name: str) -> list[str]:
    return [n for n in list_namespaces(PREFIX) if n.startswith(name)]


REFUSED = textwrap.dedent(
    """
    import socket, sys, time
    start = time.perf_counter()
    try:
        with socket.create_connection((sys.argv[1], 9), timeout=10) as conn:
            conn.recv(1)
    except OSError as exc:
        print(type(exc).__name__, time.perf_counter() - start)
    """
)


@needs_root
@pytest.mark.timeout(60)
def test_delay_and_overrides() -> None:
    with WanEmulator(3, "50ms", {2: "10ms"}, prefix=PREFIX) as wan:
        start_server(wan, 1)
        start_server(wan, 2)
        far = run_client(wan, 0, "pingpong", 1, "--count", "5")
        near = run_client(wan, 0, "pingpong", 2, "--count", "5")
        # The loopback of each host is up, and its own address is not delayed.
        local = run_client(wan, 2, "pingpong", 2, "--count", "5")
        refused = subprocess.run(
            wan.command(0, [sys.executable, "-c", REFUSED, wan.address(1)]),
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
        assert _relay_errors(wan) == ""
    assert min(far["rtts"]) >= 0.1, far
    assert max(far["rtts"]) < 1.0, far
    # handshake (2 x 50 ms) before the first request (50 ms) and its answer (50 ms)
    assert far["first"] >= 0.2, far
    # a port nobody listens on: reset after the SYN's and the SYN-ACK's delay
    assert refused[0] == "ConnectionResetError", refused
    assert 0.1 <= float(refused[1]) < 1.0, refused
    assert min(near["rtts"]) >= 0.06, near
    assert max(near["rtts"]) < 0.6, near
    assert max(local["rtts"]) < 0.05, local


@needs_root
@pytest.mark.timeout(60)
def test_rate_limit() -> None:
    nbytes = 3_000_000
    with WanEmulator(2, "20mbit", prefix=PREFIX) as wan:
        start_server(wan, 1)
        result = run_client(wan, 0, "send", 1, "--bytes", str(nbytes))
        assert _relay_errors(wan) == ""
    theoretical = nbytes * 8 / 20e6  # 1.2 s
    assert result["seconds"] >= 0.8 * theoretical, result


@needs_root
@pytest.mark.timeout(60)
def test_jitter_keeps_byte_order() -> None:
    with WanEmulator(2, "20ms,jitter=15ms", prefix=PREFIX, seed=1) as wan:
        start_server(wan, 1)
        # many chunks, each with its own delay draw: any overtaking changes the hash
        run_client(wan, 0, "send", 1, "--bytes", "4000000", "--verify")
        pings = run_client(wan, 0, "pingpong", 1, "--count", "10")
        assert _relay_errors(wan) == ""
    assert min(pings["rtts"]) >= 0.01, pings  # two draws of at least 5 ms
    assert len(set(pings["rtts"])) > 1, pings


WORKER = textwrap.dedent(
    """
    import asyncio, json, os, time
    from datetime import timedelta
    import torch, torch.distributed as dist
    from gossip_sgp.message import Message
    from transports.zmq import ZmqTransport

    # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, GLOO_SOCKET_IFNAME, GOSSIP_SGP_PEERS:
    # job_environment's
    dist.init_process_group("gloo", timeout=timedelta(seconds=40))
    rank = dist.get_rank()
    times = []
    for _ in range(3):
        t = torch.full((1000,), float(rank + 1))
        start = time.perf_counter()
        dist.all_reduce(t)
        times.append(time.perf_counter() - start)

    async def gossip():  # rank 0 sends, rank 1 answers: one round trip per message
        peers = ["tcp://" + a for a in os.environ["GOSSIP_SGP_PEERS"].split(",")]
        transport = ZmqTransport(rank, peers, fingerprint=7)
        await transport.start()
        rtts = []
        try:
            for seq in range(3):
                start = time.perf_counter()
                message = Message(sender=rank, receiver=1 - rank, round=seq, seq=seq,
                                  weight=1.0, tensors=(t,), fingerprint=7)
                if rank == 0:
                    await transport.send(1, message)
                    await asyncio.wait_for(transport.recv(), 30)
                else:
                    await asyncio.wait_for(transport.recv(), 30)
                    await transport.send(0, message)
                rtts.append(time.perf_counter() - start)
            await asyncio.sleep(0.5)  # let the last answer leave before closing
        finally:
            await transport.close()
        return rtts

    zmq_rtts = asyncio.run(gossip())
    print(json.dumps({"sum": t.tolist()[:3], "times": times, "zmq": zmq_rtts}), flush=True)
    dist.destroy_process_group()
    """
)


@needs_root
@pytest.mark.timeout(90)
def test_gloo_and_zeromq_cross_the_links() -> None:
    with WanEmulator(2, "25ms", prefix=PREFIX) as wan:
        procs = [
            wan.popen(
                rank,
                [sys.executable, "-c", WORKER],
                env={**os.environ, **job_environment(wan, rank, port=29500)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=Path(__file__).parent.parent,
            )
            for rank in range(2)
        ]
        outputs = [proc.communicate(timeout=80) for proc in procs]
        assert _relay_errors(wan) == ""
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert result["sum"] == [3.0, 3.0, 3.0]
        # each all_reduce waits for the other rank's data: at least one one-way delay
        assert min(result["times"]) >= 0.02, result
    # rank 0 timed a message to rank 1 and its answer: a round trip, 2 x 25 ms
    assert min(json.loads(outputs[0][0].strip().splitlines()[-1])["zmq"]) >= 0.045, outputs[0]


def _namespace_pids(names: list[str]) -> list[int]:
    return [
        int(pid)
        for name in names
        for pid in subprocess.run(
            ["ip", "netns", "pids", name], capture_output=True, text=True, check=True
        ).stdout.split()
    ]


def _gone(pids: list[int], timeout: float = 5.0) -> bool:
    """Whether all ``pids`` have exited (and been reaped) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{p}").exists() for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@needs_root
@pytest.mark.timeout(60)
def test_sigterm_raises_while_any_emulator_runs() -> None:
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    first = WanEmulator(1, prefix=PREFIX).start()
    try:
        with WanEmulator(1, prefix=PREFIX):
            first.close()  # the other one still runs: SIGTERM must still clean up
            with pytest.raises(SystemExit) as exited:
                signal.raise_signal(signal.SIGTERM)
            assert exited.value.code == 128 + signal.SIGTERM
    finally:
        first.close()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def _fail_inside(wan: WanEmulator, seen: dict[str, Any]) -> None:
    with wan:
        seen["started"] = [wan.popen(0, ["sleep", "600"]).pid]
        # started without popen and left running: the namespace's own cleanup kills it
        seen["untracked"] = subprocess.Popen(wan.command(1, ["sleep", "600"]))
        seen["names"] = _leftovers(wan.router_namespace[:-2])
        seen["relay"] = _namespace_pids([wan.router_namespace])
        raise RuntimeError("body failed")


@needs_root
@pytest.mark.timeout(60)
def test_everything_removed_when_the_body_raises() -> None:
    wan = WanEmulator(2, "10mbit,5ms", prefix=PREFIX)
    seen: dict[str, Any] = {}
    try:
        with pytest.raises(RuntimeError, match="body failed"):
            _fail_inside(wan, seen)
        assert len(seen["names"]) == 3
        assert len(seen["relay"]) == 1
        assert _leftovers(wan.router_namespace[:-2]) == []
        assert _gone(seen["started"] + seen["relay"])
        assert seen["untracked"].wait(5) == -signal.SIGTERM  # killed by the emulator
    finally:
        if "untracked" in seen:
            seen["untracked"].kill()
            seen["untracked"].wait()


@needs_root
@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_removes_everything_on_signal(sig: signal.Signals) -> None:
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gossip_sgp.wan",
            "run",
            "--hosts",
            "2",
            "--link",
            "10ms",
            "--",
            "sh",
            "-c",
            "echo {rank} ready $MASTER_ADDR $GOSSIP_SGP_PEERS; exec sleep 600",
        ],
        cwd=Path(__file__).parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # Ctrl-C would reach the whole group; here only the CLI
    )
    try:
        assert cli.stdout is not None
        ready = {cli.stdout.readline().strip() for _ in range(2)}
        peers = "10.1.0.2:29501,10.1.1.2:29501"
        assert ready == {f"0 ready 10.1.0.2 {peers}", f"1 ready 10.1.0.2 {peers}"}, ready
        names = [n for n in list_namespaces() if n.startswith(f"gsgpwan-{cli.pid}-")]
        assert len(names) == 3
        sleepers = _namespace_pids(names)
        assert len(sleepers) == 3  # two sleeps and the relay
        cli.send_signal(sig)
        code = cli.wait(30)
    finally:
        if cli.poll() is None:
            cli.kill()
        cli.communicate()  # reaps it and closes the pipes
    assert code == 128 + sig
    assert [n for n in list_namespaces() if n.startswith(f"gsgpwan-{cli.pid}-")] == []
    assert _gone(sleepers)
