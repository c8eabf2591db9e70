"""The launchers: ``gossip-sgp launch`` (N local workers) and ``gossip-sgp run`` (one worker).

Workers here are tiny scripts written to tmp_path, not training runs. Every test that starts
processes has a hard timeout; launchers run in-process reap their workers themselves (also when
a test fails or times out), and launchers run as subprocesses are killed by the ``launchers``
fixture, which also kills any worker pid they reported.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gossip_sgp.cli import main
from gossip_sgp.config import GossipConfig
from gossip_sgp.errors import ConfigError
from gossip_sgp.launch import find_free_ports, launch

REPO = Path(__file__).resolve().parent.parent

ENV_WORKER = """
import json, os, sys
keys = [k for k in os.environ if k.startswith("GOSSIP_SGP_")] + [
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
    "PYTHONUNBUFFERED",
]
env = {k: os.environ.get(k) for k in keys}
print(json.dumps({"argv": sys.argv[1:], "env": env, "pid": os.getpid()}))
for i in range(20):
    print(f"line {i}")
print("to stderr", file=sys.stderr)
sys.stdout.flush()
sys.stdout.buffer.write(b"bytes \\xff\\xfe not utf-8\\r\\npartial last line")
"""

# Rank 0 writes its pid and sleeps; rank 1 waits until rank 0 is up, writes the time it
# fails at (CLOCK_MONOTONIC: one clock for every process on Linux), then fails.
FAILING_WORKER = """
import os, signal, sys, time
from pathlib import Path
ready = Path(sys.argv[1])
if os.environ["RANK"] == "0":
    ready.with_suffix(".tmp").write_text(str(os.getpid()))
    ready.with_suffix(".tmp").rename(ready)
    time.sleep(60)
    sys.exit(0)
deadline = time.monotonic() + 20
while not ready.exists() and time.monotonic() < deadline:
    time.sleep(0.01)
ready.with_suffix(".failed").write_text(repr(time.monotonic()))
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(int(sys.argv[2]))
"""

# Prints "ready <pid>" and waits; with "stubborn" it ignores SIGINT and SIGTERM.
SLEEPING_WORKER = """
import os, signal, sys, time
if sys.argv[1:] == ["stubborn"]:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", os.getpid(), flush=True)
try:
    time.sleep(60)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(1)
"""


def script(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def free_metrics_base(count: int) -> int:
    """A port p such that p .. p+count-1 are free on loopback right now."""
    for _ in range(50):
        (base,) = find_free_ports("127.0.0.1", 1)
        if base + count <= 65536 and all(_bindable(base + i) for i in range(count)):
            return base
    raise AssertionError("no run of free ports found")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Launchers:
    """Launcher subprocesses of one test, and the worker pids they printed."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[str]] = []
        self.worker_pids: list[int] = []

    def start(self, *args: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "gossip_sgp.cli", "launch", *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.processes.append(process)
        return process

    def wait_ready(self, process: subprocess.Popen[str], count: int) -> list[int]:
        """Read the launcher's stdout until ``count`` workers printed ``ready <pid>``."""
        assert process.stdout is not None
        pids: list[int] = []
        while len(pids) < count:
            line = process.stdout.readline()
            assert line, "launcher ended before its workers were ready"
            if "] ready " in line:
                pids.append(int(line.split()[-1]))
                self.worker_pids.append(pids[-1])
        return pids

    def cleanup(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.communicate()
        for pid in self.worker_pids:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def launchers() -> Iterator[Launchers]:
    tracker = Launchers()
    try:
        yield tracker
    finally:
        tracker.cleanup()


@pytest.mark.timeout(60)
def test_launch_prefixes_output_and_sets_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOSSIP_SGP_CONFIG", "/stale/peers.toml")  # must not leak into workers
    worker = script(tmp_path, "env_worker.py", ENV_WORKER)
    base = free_metrics_base(3)
    out, err = io.StringIO(), io.StringIO()
    code = launch([worker, "--lr", "0.1"], 3, metrics_port=base, stdout=out, stderr=err)
    assert code == 0, err.getvalue()

    lines: dict[int, list[str]] = {0: [], 1: [], 2: []}
    for line in out.getvalue().splitlines():
        assert line.startswith("[rank "), line
        label, _, text = line[len("[rank ") :].partition("] ")
        lines[int(label)].append(text)
    reports = {rank: json.loads(texts[0]) for rank, texts in lines.items()}
    peers = {report["env"]["GOSSIP_SGP_PEERS"] for report in reports.values()}
    assert len(peers) == 1
    ports = [int(entry.rsplit(":", 1)[1]) for entry in peers.pop().split(",")]
    assert len(set(ports)) == 3
    for rank, texts in lines.items():
        env = reports[rank]["env"]
        assert reports[rank]["argv"] == ["--lr", "0.1"]
        assert env["GOSSIP_SGP_RANK"] == env["RANK"] == env["LOCAL_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "3"
        assert env["MASTER_ADDR"] == "127.0.0.1"
        assert int(env["MASTER_PORT"]) not in ports
        assert env["GOSSIP_SGP_TRANSPORT"] == "zmq"
        assert env["GOSSIP_SGP_METRICS_PORT"] == str(base + rank)
        assert env["PYTHONUNBUFFERED"] == "1"
        assert "GOSSIP_SGP_CONFIG" not in env
        config = GossipConfig.from_env({k: v for k, v in env.items() if v is not None})
        assert config.rank == rank
        assert config.metrics_port == base + rank
        # Order kept per stream; the undecodable bytes and the unterminated line survive.
        assert texts[1:] == [
            *(f"line {i}" for i in range(20)),
            "bytes \\xff\\xfe not utf-8",
            "partial last line",
        ]
    errors = err.getvalue().splitlines()
    pids = ", ".join(str(reports[rank]["pid"]) for rank in range(3))
    assert f"gossip-sgp launch: 3 worker(s), pids {pids} (each a new python)" in errors
    for rank in range(3):
        assert f"[rank {rank}] to stderr" in errors
        metrics = f"gossip-sgp launch: rank {rank} metrics http://127.0.0.1:{base + rank}/metrics"
        assert metrics in errors


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("how", "expected", "message"),
    [("3", 3, "rank 1 exited with code 3"), ("kill", 137, "rank 1 was killed by SIGKILL")],
)
def test_failing_worker_stops_the_others(
    tmp_path: Path, how: str, expected: int, message: str
) -> None:
    """When rank 1 fails, the launcher sends the sleeping rank 0 SIGTERM at once, not after
    the grace period: timed from the moment rank 1 fails (the time it wrote), so the
    workers' interpreter start-up is not in it. The limit is the grace period itself, the
    behaviour: a launcher that waited it out would take at least that long.

    Measured on the 2-core machine loaded by other test runs (load average 11), 5 runs of
    each case: launch() returned 0.46-0.59 s after its call (the limit used to be 4 s from
    there, with the workers' interpreter start-ups, 0.36-0.43 s of it, included) and
    0.06-0.17 s after rank 1's failure, against this 5 s limit. Fails if the launcher waits
    a grace period before its first signal to the others (``_Supervisor.wait`` in
    gossip_sgp/launch.py with ``next_step = 0.0`` on a failure made
    ``time.monotonic() + self.grace``): 5.11 and 5.14 s.
    """
    worker = script(tmp_path, "failing_worker.py", FAILING_WORKER)
    ready = tmp_path / "rank0.ready"
    out, err = io.StringIO(), io.StringIO()
    grace = 5.0
    code = launch([worker, str(ready), how], 2, grace=grace, stdout=out, stderr=err)
    ended = time.monotonic()
    assert code == expected, err.getvalue()
    assert f"{message}; stopping the other 1 worker(s)" in err.getvalue()
    since_failure = ended - float(ready.with_suffix(".failed").read_text())
    assert since_failure < grace  # rank 0 went down on SIGTERM, not after the grace period
    assert gone(int(ready.read_text()))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("preload", ["", "colorsys"], ids=["exec", "fork"])
def test_sigint_stops_every_worker(tmp_path: Path, launchers: Launchers, preload: str) -> None:
    worker = script(tmp_path, "sleeping_worker.py", SLEEPING_WORKER)
    launcher = launchers.start("--preload", preload, "--nproc", "3", worker)
    pids = launchers.wait_ready(launcher, 3)
    started = time.monotonic()
    launcher.send_signal(signal.SIGINT)
    out, err = launcher.communicate(timeout=15)
    assert time.monotonic() - started < 10
    assert launcher.returncode == 130, err
    assert all(gone(pid) for pid in pids)
    for rank in range(3):
        assert f"[rank {rank}] interrupted" in out  # one KeyboardInterrupt each, handled
    assert "got SIGINT" in err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("preload", ["", "colorsys"], ids=["exec", "fork"])
def test_workers_ignoring_sigint_get_sigterm_then_sigkill(
    tmp_path: Path, launchers: Launchers, preload: str
) -> None:
    worker = script(tmp_path, "sleeping_worker.py", SLEEPING_WORKER)
    launcher = launchers.start(
        "--preload", preload, "--nproc", "2", "--grace", "0.5", worker, "stubborn"
    )
    pids = launchers.wait_ready(launcher, 2)
    started = time.monotonic()
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=15)
    assert 1.0 <= time.monotonic() - started < 10  # two grace periods: SIGINT, SIGTERM, SIGKILL
    assert launcher.returncode == 128 + signal.SIGTERM, err
    assert "sending SIGTERM to rank(s) 0, 1" in err
    assert "sending SIGKILL to rank(s) 0, 1" in err
    assert all(gone(pid) for pid in pids)


@pytest.mark.timeout(60)
def test_module_form(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script(
        tmp_path, "hello_module.py", 'import os, sys\nprint("hi", os.environ["RANK"], sys.argv[1:])'
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert main(["launch", "--nproc", "2", "-m", "hello_module", "--epochs", "5", "-m"]) == 0
    lines = sorted(capsys.readouterr().out.splitlines())
    assert lines == [f"[rank {r}] hi {r} ['--epochs', '5', '-m']" for r in range(2)]
    out = io.StringIO()
    assert launch(["-m", "hello_module"], 1, stdout=out) == 0
    assert launch(["hello_module", "x"], 1, module=True, stdout=out) == 0
    assert out.getvalue().splitlines() == ["[rank 0] hi 0 []", "[rank 0] hi 0 ['x']"]


@pytest.mark.timeout(60)
def test_run_starts_one_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    port0, port1 = find_free_ports("127.0.0.1", 2)
    (tmp_path / "peers.toml").write_text(
        f'[[peers]]\nrank = 0\nhost = "127.0.0.1"\nport = {port0}\n'
        f'[[peers]]\nrank = 1\nhost = "127.0.0.1"\nport = {port1}\n'
    )
    worker = script(tmp_path, "env_worker.py", ENV_WORKER)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    args = ["run", "--config", "peers.toml", "--rank", "1", "--metrics-port", "0", worker, "x"]
    assert main(args) == 0
    report = json.loads(capfd.readouterr().out.splitlines()[0])
    env = report["env"]
    assert report["argv"] == ["x"]
    assert env["GOSSIP_SGP_CONFIG"] == str(tmp_path / "peers.toml")
    assert env["GOSSIP_SGP_RANK"] == env["RANK"] == "1"
    assert env["WORLD_SIZE"] == "2"
    assert env["LOCAL_RANK"] == "0"
    assert env["MASTER_ADDR"] == "127.0.0.1"
    assert env["MASTER_PORT"] == str(port0 + 1000 if port0 <= 64535 else port0 - 1000)
    assert env["GOSSIP_SGP_METRICS_PORT"] == "0"
    exit_worker = script(tmp_path, "exit_worker.py", "import sys\nsys.exit(5)\n")
    assert main(["run", "--config", "peers.toml", "--rank", "0", exit_worker]) == 5


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("peers", "rank", "message"),
    [
        (None, "0", "cannot read peer list"),
        ('[[peers]]\nrank = 0\nhost = "127.0.0.1"\nprot = 1\n', "0", "did you mean 'port'"),
        ('[[peers]]\nrank = 0\nhost = "127.0.0.1"\nport = 1\n', "1", "rank 1 is out of range"),
    ],
)
def test_run_rejects_bad_config_before_starting(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    peers: str | None,
    rank: str,
    message: str,
) -> None:
    config = tmp_path / "peers.toml"
    if peers is not None:
        config.write_text(peers)
    marker = tmp_path / "started"
    worker = script(tmp_path, "marker.py", f"open({str(marker)!r}, 'w').close()\n")
    assert main(["run", "--config", str(config), "--rank", rank, worker]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gossip-sgp run: error: {config}: ")
    assert message in err
    assert not marker.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["launch", "--nproc", "0", "x.py"], "--nproc: must be >= 1"),
        (["launch", "--nproc", "2"], "the following arguments are required: SCRIPT"),
        (["launch", "--nproc", "2", "--metrics-port", "70000", "x.py"], "--metrics-port: must be"),
        (["launch", "--nproc", "2", "--timeout", "0", "x.py"], "--timeout: must be"),
        (["launch", "--nproc", "2", "--transport", "tcp", "x.py"], "invalid choice: 'tcp'"),
        (["run", "--rank", "0", "x.py"], "the following arguments are required: --config"),
        (["run", "--config", "p.toml", "--rank", "-1", "x.py"], "--rank: must be >= 0"),
    ],
)
def test_cli_argument_errors(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["launch", "--nproc", "2", "missing.py"], "script not found: missing.py"),
        (["launch", "--nproc", "2", "--metrics-port", "65535", "x.py"], "exceed 65535"),
        (["launch", "--nproc", "2", "--host", "192.0.2.1", "x.py"], "cannot bind a port"),
    ],
)
def test_launch_errors_before_starting(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.py").write_text("raise SystemExit(9)\n")
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_launch_library_argument_errors(tmp_path: Path) -> None:
    worker = script(tmp_path, "w.py", "")
    with pytest.raises(ConfigError, match="nproc must be"):
        launch([worker], 0)
    with pytest.raises(ConfigError, match="no script to run"):
        launch([], 1)
    with pytest.raises(ConfigError, match="no script to run"):
        launch(["-m"], 1)
    with pytest.raises(ConfigError, match="grace must be"):
        launch([worker], 1, grace=-1)
    with pytest.raises(ConfigError, match="transport must be"):
        launch([worker], 1, transport="carrier-pigeon")


def test_find_free_ports() -> None:
    ports = find_free_ports("127.0.0.1", 5, exclude=[])
    assert len(set(ports)) == 5
    assert not set(find_free_ports("127.0.0.1", 20, exclude=ports)) & set(ports)
