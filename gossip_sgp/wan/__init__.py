"""WAN emulator: N hosts in their own network namespaces, joined by links with delay, jitter
and bandwidth limits that every TCP connection between them crosses (ZeroMQ and
torch.distributed gloo alike). Linux only, needs root, ``ip``/``tc`` (iproute2) and ``nft``.

    python -m gossip_sgp.wan check
    python -m gossip_sgp.wan run --hosts 4 --link 100mbit,50ms -- \\
        python my_worker.py --rank {rank} --peers {addresses}
    python -m gossip_sgp.wan cleanup

In Python::

    from gossip_sgp.wan import WanEmulator, parse_link

    with WanEmulator(hosts=2, link=parse_link("1gbit,50ms")) as wan:
        server = wan.popen(1, ["python", "server.py", "--bind", wan.address(1)])
        client = wan.popen(0, ["python", "client.py", "--connect", wan.address(1)])

How: host i is the network namespace ``<prefix>-h<i>`` with one veth link to a router
namespace ``<prefix>-r`` (address ``10.X.Y.2``, its router ``10.X.Y.1``). The router
forwards IPv4 between the links. HTB qdiscs shape each host's uplink (its end of the veth)
and downlink (the router's end). This kernel family has no ``netem``, so the delay comes from
user space: an nftables ``redirect`` rule in the router sends every TCP connection from one
host to another (of which one has a delay) to a relay process (``gossip_sgp/wan/relay.py``)
in the router, which opens the connection to the real destination after one one-way delay
and hands on the bytes of each direction one one-way delay (plus jitter) after they
arrived. See ``docs/wan-emulator.md`` for the semantics, accuracy and limits.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, ClassVar

__all__ = ["LinkSpec", "WanEmulator", "WanError", "job_environment", "parse_link"]

PREFIX = "gsgpwan"
"""Start of every namespace name the emulator creates (then ``-<pid>-<random>``)."""
MAX_HOSTS = 1000
RELAY_MODULE = "gossip_sgp.wan.relay"
INSTALL_HINT = "Debian/Ubuntu: apt-get install nftables iproute2"


class WanError(RuntimeError):
    """The emulator could not be set up (missing tool, no root, a command failed)."""


# ---------------------------------------------------------------------------- links


@dataclass(frozen=True)
class LinkSpec:
    """The link between a host and the router; see ``WanEmulator`` for how two combine."""

    delay_ms: float = 0.0
    """One-way delay in milliseconds (a TCP ping-pong's round trip takes twice this)."""
    jitter_ms: float = 0.0
    """Each chunk's delay is drawn uniformly from [delay - jitter, delay + jitter]."""
    rate_mbit: float | None = None
    """Bandwidth of the host's uplink and of its downlink, in Mbit/s; None: unlimited."""

    def __post_init__(self) -> None:
        for name in ("delay_ms", "jitter_ms", "rate_mbit"):
            value = getattr(self, name)
            if value is None and name == "rate_mbit":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"LinkSpec.{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"LinkSpec.{name} must be finite and >= 0, got {value!r}")
        if self.delay_ms > 60_000:
            raise ValueError(f"LinkSpec.delay_ms must be at most 60000, got {self.delay_ms}")
        if self.jitter_ms > self.delay_ms:
            raise ValueError(
                f"LinkSpec.jitter_ms ({self.jitter_ms}) must not exceed delay_ms "
                f"({self.delay_ms}): the delay is drawn from [delay - jitter, delay + jitter]"
            )
        if self.rate_mbit is not None and not 0.01 <= self.rate_mbit <= 100_000:
            raise ValueError(
                f"LinkSpec.rate_mbit must be between 0.01 and 100000 (Mbit/s), got {self.rate_mbit}"
            )

    def __str__(self) -> str:
        parts = []
        if self.rate_mbit is not None:
            parts.append(f"{self.rate_mbit:g}mbit")
        parts.append(f"{self.delay_ms:g}ms")
        if self.jitter_ms:
            parts.append(f"jitter={self.jitter_ms:g}ms")
        return ",".join(parts)


_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}
_RATE_UNITS = {"bit": 1e-6, "kbit": 1e-3, "mbit": 1.0, "gbit": 1e3}
_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)\s*$", re.IGNORECASE)


def _quantity(text: str, units: Mapping[str, float], what: str) -> float:
    match = _QUANTITY.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in units:
        raise ValueError(
            f"bad {what} {text!r}: expected a number with a unit, one of {list(units)}"
        )
    return float(match.group(1)) * units[unit]


def parse_link(text: str) -> LinkSpec:
    """A ``LinkSpec`` from text such as ``"1gbit,50ms"`` or ``"100mbit,100ms,jitter=5ms"``.

    Comma-separated parts, in any order: a rate (``bit``, ``kbit``, ``mbit``, ``gbit``: bits
    per second, as in ``tc``), a delay (``us``, ``ms``, ``s``: one way), or ``rate=``,
    ``delay=``, ``jitter=`` followed by such a value. Raises ``ValueError`` on anything else.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty link description {text!r}; example: '1gbit,50ms'")
    fields: dict[str, float] = {}
    for raw in text.split(","):
        part = raw.strip()
        key, eq, value = part.partition("=")
        if eq:
            key = key.strip().lower()
            if key not in ("rate", "delay", "jitter"):
                raise ValueError(f"unknown link field {key!r} in {text!r}: rate, delay or jitter")
        else:
            match = _QUANTITY.match(part)
            unit = match.group(2).lower() if match else ""
            if unit not in _RATE_UNITS and unit not in _TIME_UNITS:
                raise ValueError(
                    f"bad part {part!r} of link description {text!r}: expected a rate "
                    f"({', '.join(_RATE_UNITS)}), a one-way delay ({', '.join(_TIME_UNITS)}) "
                    "or jitter=DELAY, e.g. '100mbit,50ms,jitter=5ms'"
                )
            key, value = ("rate" if unit in _RATE_UNITS else "delay"), part
        if key in fields:
            raise ValueError(f"{key} given twice in link description {text!r}")
        if key == "rate":
            fields[key] = _quantity(value, _RATE_UNITS, "rate")
        else:
            fields[key] = _quantity(value, _TIME_UNITS, key)
    return LinkSpec(
        delay_ms=fields.get("delay", 0.0),
        jitter_ms=fields.get("jitter", 0.0),
        rate_mbit=fields.get("rate"),
    )


def _as_link(link: LinkSpec | str) -> LinkSpec:
    if isinstance(link, str):
        return parse_link(link)
    if not isinstance(link, LinkSpec):
        raise TypeError(f"expected a LinkSpec or a link description, got {link!r}")
    return link


# ---------------------------------------------------------------------------- commands


def _run(argv: Sequence[str], stdin: str | None = None, timeout: float = 30) -> str:
    """Run a set-up command; its stdout, or ``WanError`` with its stderr."""
    try:
        done = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise WanError(f"{argv[0]} not found ({INSTALL_HINT})") from exc
    except subprocess.TimeoutExpired as exc:
        raise WanError(f"{' '.join(argv)} took over {timeout} s") from exc
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()
        raise WanError(f"{' '.join(argv)} failed (exit {done.returncode}): {detail}")
    return done.stdout


def _batch(tool: str, namespace: str | None, lines: Sequence[str]) -> None:
    """Several ``ip``/``tc`` commands in one process (``-batch``)."""
    if lines:
        ns = ["-n", namespace] if namespace else []
        _run([tool, *ns, "-batch", "-"], stdin="\n".join(lines) + "\n")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _namespace_pids(namespace: str) -> list[int]:
    try:
        out = _run(["ip", "netns", "pids", namespace], timeout=10)
    except WanError:
        return []
    return [int(p) for p in out.split() if p.isdigit()]


def _kill_namespace_processes(namespaces: Sequence[str], grace: float = 2.0) -> None:
    """SIGTERM, then SIGKILL, every process still inside ``namespaces``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [pid for ns in namespaces for pid in _namespace_pids(ns) if pid != os.getpid()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if _alive(pid)]
            if pids:
                time.sleep(0.02)
        if not pids:
            return


def _delete_namespaces(namespaces: Sequence[str]) -> None:
    if namespaces:
        with contextlib.suppress(WanError):
            _run(
                ["ip", "-force", "-batch", "-"], "".join(f"netns delete {n}\n" for n in namespaces)
            )


def list_namespaces(prefix: str = PREFIX) -> list[str]:
    """Names of the network namespaces whose name starts with ``prefix-`` (all for "")."""
    out = _run(["ip", "netns", "list"])
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if not prefix or n.startswith(prefix + "-")]


# ---------------------------------------------------------------------------- emulator


class WanEmulator:
    """N emulated hosts joined through a router; a context manager that removes it all.

    ``link`` applies to every host, ``links`` overrides it for some (``{host: LinkSpec}``).
    Between host i and host j (i != j): one-way delay ``(d_i + d_j) / 2`` and jitter
    ``(j_i + j_j) / 2`` in each direction; host i's ``rate_mbit`` limits all it sends
    (uplink) and all it receives (downlink), so a single flow from i to j gets at most
    ``min(r_i, r_j)``. Only TCP is delayed; UDP and ICMP are routed (and rate limited)
    without delay.

    TCP between two hosts with no delay and no jitter is routed directly, without the relay
    (which costs CPU). ``relay=True`` sends every TCP connection through the relay, delayed
    or not, and ``relay=False`` none (then the delay must be 0): for measuring the relay's
    overhead. ``seed`` fixes the jitter's random draws. ``realtime`` runs the relay with
    real-time priority (``SCHED_FIFO`` 1), so that it hands chunks on in time also while
    the emulated workers keep every core busy; it takes no more CPU, only sooner.
    ``prefix`` starts every namespace name (then ``-<pid>-<random>``).

    Leaving the ``with`` block, also by an exception, or ``close()`` kills every process
    still running in the hosts' namespaces (those ``popen`` started first, gently), stops
    the relay, and deletes the namespaces (and with them their links and nftables rules).
    While it runs in the main thread, SIGTERM and SIGHUP raise ``SystemExit`` (where no
    handler was installed) so that cleanup runs then too.
    """

    def __init__(
        self,
        hosts: int,
        link: LinkSpec | str = LinkSpec(),
        links: Mapping[int, LinkSpec | str] | None = None,
        *,
        relay: bool | None = None,
        seed: int | None = None,
        realtime: bool = True,
        prefix: str = PREFIX,
    ) -> None:
        if isinstance(hosts, bool) or not isinstance(hosts, int) or not 1 <= hosts <= MAX_HOSTS:
            raise ValueError(f"hosts must be an integer from 1 to {MAX_HOSTS}, got {hosts!r}")
        if not re.fullmatch(r"[a-z][a-z0-9]{0,15}", prefix):
            raise ValueError(f"prefix must be 1-16 lowercase letters/digits, got {prefix!r}")
        self._hosts = hosts
        self._default = _as_link(link)
        self._links = [self._default] * hosts
        for host, spec in (links or {}).items():
            if isinstance(host, bool) or not isinstance(host, int) or not 0 <= host < hosts:
                raise ValueError(f"links: host {host!r} is not in 0..{hosts - 1}")
            self._links[host] = _as_link(spec)
        if relay is False and any(s.delay_ms or s.jitter_ms for s in self._links):
            raise ValueError("relay=False cannot delay: the delay comes from the relay")
        if relay not in (None, True, False):
            raise ValueError(f"relay must be None, True or False, got {relay!r}")
        self._relay_mode = relay
        self._seed = seed
        self._realtime = bool(realtime)
        self._name = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._relay: subprocess.Popen[str] | None = None
        self._relay_log: IO[str] | None = None
        self._holds_signals = False
        self._started = False
        self._closed = False
        self._lock = threading.Lock()

    # -- description

    @property
    def hosts(self) -> int:
        return self._hosts

    @property
    def router_namespace(self) -> str:
        return f"{self._name}-r"

    def link(self, i: int) -> LinkSpec:
        """The link of host i (the default or its override)."""
        return self._links[self._check_host(i)]

    def delay_ms(self, i: int, j: int) -> float:
        """Configured one-way delay from host i to host j (0 for i == j)."""
        if self._check_host(i) == self._check_host(j):
            return 0.0
        return (self._links[i].delay_ms + self._links[j].delay_ms) / 2

    def address(self, i: int) -> str:
        """IPv4 address of host i."""
        self._check_host(i)
        return f"10.{1 + i // 256}.{i % 256}.2"

    def _gateway(self, i: int) -> str:
        return f"10.{1 + i // 256}.{i % 256}.1"

    def namespace(self, i: int) -> str:
        """Network namespace name of host i."""
        self._check_host(i)
        return f"{self._name}-h{i}"

    def command(self, i: int, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside host i's namespace."""
        if isinstance(argv, str) or not argv:
            raise ValueError(f"argv must be a non-empty list of strings, got {argv!r}")
        return self._in(self.namespace(i)) + [str(arg) for arg in argv]

    def popen(self, i: int, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` of ``argv`` in host i's namespace; stopped on close."""
        if not self._started or self._closed:
            raise WanError("the emulator is not running (use it in a with block)")
        proc: subprocess.Popen[Any] = subprocess.Popen(self.command(i, argv), **kwargs)
        self._procs.append(proc)
        return proc

    def _check_host(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self._hosts:
            raise ValueError(f"host must be in 0..{self._hosts - 1}, got {i!r}")
        return i

    def __repr__(self) -> str:
        return f"WanEmulator(hosts={self._hosts}, link={str(self._default)!r}, name={self._name})"

    # -- life cycle

    def __enter__(self) -> WanEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> WanEmulator:
        """Create the namespaces, links, shaping, relay and redirect rule."""
        if self._started:
            raise WanError("an emulator starts once")
        self._started = True
        missing = missing_requirements()
        if missing:
            raise WanError("cannot emulate: " + "; ".join(missing))
        atexit.register(self.close)
        self._catch_signals()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        router = self.router_namespace
        names = [router, *(self.namespace(i) for i in range(self._hosts))]
        for name in names:
            # one by one, so that a failure leaves an exact list of what to delete
            _run(["ip", "netns", "add", name])
            self._created.append(name)
        lines = ["link set lo up"]
        for i in range(self._hosts):
            lines += [
                f"link add h{i} type veth peer name eth0 netns {self.namespace(i)}",
                f"addr add {self._gateway(i)}/24 dev h{i}",
                f"link set h{i} up",
            ]
        _batch("ip", router, lines)
        _run([*self._in(router), "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
        router_tc = []
        for i in range(self._hosts):
            _batch(
                "ip",
                self.namespace(i),
                [
                    "link set lo up",
                    f"addr add {self.address(i)}/24 dev eth0",
                    "link set eth0 up",
                    f"route add default via {self._gateway(i)}",
                ],
            )
            rate = self._links[i].rate_mbit
            if rate is not None:
                _batch("tc", self.namespace(i), _shaping("eth0", rate))
                router_tc += _shaping(f"h{i}", rate)
        _batch("tc", router, router_tc)
        delayed = [i for i, s in enumerate(self._links) if s.delay_ms or s.jitter_ms]
        if self._relay_mode is True:
            delayed = list(range(self._hosts))
        if delayed:
            port = self._start_relay()
            hosts = ", ".join(self.address(i) for i in range(self._hosts))
            slow = ", ".join(self.address(i) for i in delayed)
            # Every TCP connection between two hosts of which one (at least) has a delay.
            rules = (
                "table ip gossip_sgp_wan {\n"
                "  chain prerouting {\n"
                "    type nat hook prerouting priority dstnat; policy accept;\n"
                f"    ip saddr {{ {hosts} }} ip daddr {{ {slow} }} ip protocol tcp"
                f" redirect to :{port}\n"
                f"    ip saddr {{ {slow} }} ip daddr {{ {hosts} }} ip protocol tcp"
                f" redirect to :{port}\n"
                "  }\n"
                "}\n"
            )
            _run([*self._in(router), "nft", "-f", "-"], stdin=rules)

    @staticmethod
    def _in(namespace: str) -> list[str]:
        # ip's full path: a caller's env= without /usr/sbin in PATH must not lose it
        return [shutil.which("ip") or "ip", "netns", "exec", namespace]

    def _start_relay(self) -> int:
        config = {
            "hosts": {
                self.address(i): [
                    s.delay_ms / 1000,
                    s.jitter_ms / 1000,
                    None if s.rate_mbit is None else s.rate_mbit * 1e6 / 8,
                ]
                for i, s in enumerate(self._links)
            },
            "seed": self._seed,
            "realtime": self._realtime,
        }
        self._relay_log = tempfile.TemporaryFile("w+", prefix="wan-relay-")  # noqa: SIM115
        self._relay = subprocess.Popen(
            [
                *self._in(self.router_namespace),
                sys.executable,
                "-m",
                RELAY_MODULE,
                json.dumps(config),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._relay_log,
            text=True,
        )
        assert self._relay.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._relay.stdout, selectors.EVENT_READ)
            line = self._relay.stdout.readline() if sel.select(30) else ""
        if not line.startswith("ready "):
            raise WanError(f"the relay did not start: {self.relay_log() or line!r}")
        return int(line.split()[1])

    def relay_log(self) -> str:
        """What the relay wrote to its standard error (tracebacks, if any)."""
        if self._relay_log is None or self._relay_log.closed:
            return ""
        self._relay_log.seek(0)
        return self._relay_log.read()[-4000:]

    def close(self) -> None:
        """Stop every process in the namespaces and the relay; delete the namespaces."""
        with self._lock:
            if self._closed or not self._started:
                self._closed = True
                return
            self._closed = True
        try:
            with _signals_deferred():
                self._stop()
        finally:
            self._restore_signals()
            atexit.unregister(self.close)

    def _stop(self) -> None:
        try:
            for proc in self._procs:
                if proc.poll() is None:
                    proc.terminate()
            deadline = time.monotonic() + 3
            for proc in self._procs:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if self._relay is not None:
                if self._relay.stdin is not None:
                    with contextlib.suppress(OSError):
                        self._relay.stdin.close()
                try:
                    self._relay.wait(3)
                except subprocess.TimeoutExpired:
                    self._relay.kill()
                    self._relay.wait()
                if self._relay.stdout is not None:
                    self._relay.stdout.close()
            _kill_namespace_processes(self._created)
            _delete_namespaces(self._created)
        finally:
            if self._relay_log is not None:
                self._relay_log.close()

    def _catch_signals(self) -> None:
        if threading.current_thread() is threading.main_thread():
            _SignalExit.acquire()
            self._holds_signals = True

    def _restore_signals(self) -> None:
        if self._holds_signals:
            self._holds_signals = False
            _SignalExit.release()


class _SignalExit:
    """SIGTERM and SIGHUP raise ``SystemExit`` while any emulator runs (main thread only).

    Counted, so that of two emulators open at once the first to close does not take the
    handler away from the other; only signals without a handler of their own are taken.
    """

    users = 0
    saved: ClassVar[dict[int, Any]] = {}

    @classmethod
    def acquire(cls) -> None:
        if cls.users == 0:
            for sig in (signal.SIGTERM, signal.SIGHUP):
                if signal.getsignal(sig) in (signal.SIG_DFL, None):
                    cls.saved[sig] = signal.signal(sig, _exit_on_signal)
        cls.users += 1

    @classmethod
    def release(cls) -> None:
        cls.users -= 1
        if cls.users == 0 and threading.current_thread() is threading.main_thread():
            for sig, handler in cls.saved.items():
                if signal.getsignal(sig) is _exit_on_signal:
                    signal.signal(sig, handler)
            cls.saved.clear()


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back (in the main thread), deliver them after.

    A second Ctrl-C must not cut the clean-up short and leave namespaces behind.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    saved = {
        sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)


def _shaping(device: str, rate_mbit: float) -> list[str]:
    """``tc`` lines limiting ``device``'s egress to ``rate_mbit`` with an HTB class."""
    rate = f"{round(rate_mbit * 1e6)}bit"
    return [
        f"qdisc add dev {device} root handle 1: htb default 1 r2q 1000",
        f"class add dev {device} parent 1: classid 1:1 htb rate {rate} ceil {rate}",
    ]


# ---------------------------------------------------------------------------- checks


def missing_requirements() -> list[str]:
    """What stops the emulator here (empty when nothing): root and the tools."""
    missing = []
    if os.geteuid() != 0:
        missing.append("needs root (network namespaces, tc, nftables)")
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            missing.append(f"{tool} not found (Debian/Ubuntu: apt-get install {package})")
    return missing


def job_environment(wan: WanEmulator, rank: int, port: int) -> dict[str, str]:
    """What ``run`` adds to host ``rank``'s environment (see its ``--help``).

    ``GLOO_SOCKET_IFNAME=eth0`` matters to any gloo job in the emulator: without it gloo
    advertises the address the host name resolves to, which is loopback.
    """
    n = wan.hosts
    return {
        "WAN_RANK": str(rank),
        "WAN_HOSTS": str(n),
        "WAN_ADDRESS": wan.address(rank),
        "WAN_ADDRESSES": ",".join(wan.address(i) for i in range(n)),
        # torch.distributed / torchrun conventions
        "RANK": str(rank),
        "WORLD_SIZE": str(n),
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": wan.address(0),
        "MASTER_PORT": str(port),
        # gloo would pick the address the host name resolves to (loopback, here)
        "GLOO_SOCKET_IFNAME": "eth0",
        # gossip-sgp's peer list, one port above MASTER_PORT on every host
        "GOSSIP_SGP_RANK": str(rank),
        "GOSSIP_SGP_PEERS": ",".join(f"{wan.address(i)}:{port + 1}" for i in range(n)),
    }
