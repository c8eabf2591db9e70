"""Who the peers are and how to reach them: the peer list of one gossip job.

A job is described by a :class:`GossipConfig`: this worker's rank, the list of all peers
(rank -> host, port, optional metrics port and CurveZMQ public key) and a few job-wide
settings. It comes from one of three places:

* a TOML peer list that names each machine by hand (:meth:`GossipConfig.from_toml`), for jobs
  across machines started with ``gossip-sgp run --config peers.toml --rank R script.py``;
* environment variables (:meth:`GossipConfig.from_env`), set by ``gossip-sgp launch`` and
  ``gossip-sgp run`` for the workers they start;
* code (:meth:`GossipConfig.local`), for tests and single-machine experiments.

The TOML format, with every key optional except ``rank``, ``host`` and ``port``::

    [job]
    transport = "zmq"
    timeout = 120.0

    [link]                 # optional: gossip_sgp.LinkSettings, e.g. for stalls over 5 s
    suspect_floor_s = 20.0

    [[peers]]
    rank = 0
    host = "192.168.1.10"
    port = 29500
    metrics_port = 9100

Every value is validated when the config is built, so a typo in a peer list fails on every
machine before any training starts. See ``docs/configuration.md``.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import socket
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gossip_sgp.errors import ConfigError
from gossip_sgp.settings import LinkSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "ENV_BIND_HOST",
    "ENV_CONFIG",
    "ENV_METRICS_HOST",
    "ENV_METRICS_PORT",
    "ENV_PEERS",
    "ENV_RANK",
    "ENV_TIMEOUT",
    "ENV_TRANSPORT",
    "SECURITY",
    "TRANSPORTS",
    "GossipConfig",
    "PeerSpec",
    "format_peer_list",
    "parse_peer_list",
]

TRANSPORTS = ("zmq", "torch", "inproc")
"""Transport names a config may select: ZeroMQ, torch.distributed (gloo/NCCL), in-process."""
SECURITY = ("none", "curve")
"""Security modes: ``none``, or CurveZMQ authentication and encryption."""

ENV_CONFIG = "GOSSIP_SGP_CONFIG"
"""Path to a TOML peer list (takes precedence over ``GOSSIP_SGP_PEERS``)."""
ENV_PEERS = "GOSSIP_SGP_PEERS"
"""Comma-separated ``host:port`` list, one entry per rank (IPv6 as ``[addr]:port``)."""
ENV_RANK = "GOSSIP_SGP_RANK"
"""This worker's rank (falls back to torchrun's ``RANK``)."""
ENV_METRICS_PORT = "GOSSIP_SGP_METRICS_PORT"
"""This worker's Prometheus port; 0 turns metrics off."""
ENV_METRICS_HOST = "GOSSIP_SGP_METRICS_HOST"
"""Address the Prometheus endpoint binds on (default 127.0.0.1; 0.0.0.0 for all)."""
ENV_TRANSPORT = "GOSSIP_SGP_TRANSPORT"
"""Transport name, overrides the peer list's ``[job] transport``."""
ENV_TIMEOUT = "GOSSIP_SGP_TIMEOUT"
"""Seconds a synchronous step waits for a round's messages."""
ENV_BIND_HOST = "GOSSIP_SGP_BIND_HOST"
"""Host this worker binds its gossip socket on."""

_HOW_TO_START = (
    "start workers with `gossip-sgp launch --nproc N script.py` (one machine) or "
    "`gossip-sgp run --config peers.toml --rank R script.py` (one worker per machine), "
    "or with torchrun"
)
_Z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
_Z85_VALUE = {c: i for i, c in enumerate(_Z85)}
_JOB_KEYS = {
    "transport": str,
    "timeout": float,
    "security": str,
    "metrics_host": str,
    "bind_host": str,
    "max_message_bytes": int,
    "secret_key_file": str,
}
_PEER_KEYS = {"rank": int, "host": str, "port": int, "metrics_port": int, "public_key": str}
_REQUIRED_PEER_KEYS = ("rank", "host", "port")
_LINK_KEYS: dict[str, type] = LinkSettings.field_types()
_KIND = {str: "a string", int: "an integer", float: "a number"}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_name(value: object) -> str:
    return type(value).__name__


def _check_port(what: str, value: object) -> None:
    if not _is_int(value):
        raise ConfigError(f"{what} must be an integer, got {value!r} ({_type_name(value)})")
    assert isinstance(value, int)
    if not 1 <= value <= 65535:
        raise ConfigError(f"{what} must be in 1..65535, got {value}")


def _check_host(what: str, value: object, *, bind: bool = False) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a string, got {value!r} ({_type_name(value)})")
    if not value or value != value.strip() or any(c.isspace() for c in value):
        raise ConfigError(f"{what} must be a host name or address without spaces, got {value!r}")
    if "://" in value:
        raise ConfigError(f"{what} must be a bare host such as '192.168.1.10', got {value!r}")
    if bind and value == "*":
        return
    if ":" in value:
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            raise ConfigError(
                f"{what} {value!r} is neither a host name nor an IPv6 address "
                "(give the port separately; write IPv6 addresses without brackets)"
            ) from None


def _canonical_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower()


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _check_z85_key(what: str, value: object) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a string, got {value!r} ({_type_name(value)})")
    if len(value) != 40:
        raise ConfigError(
            f"{what} must be a 40-character Z85 CurveZMQ public key, got {len(value)} characters"
        )
    bad = sorted({c for c in value if c not in _Z85_VALUE})
    if bad:
        raise ConfigError(f"{what} is not Z85-encoded: invalid characters {''.join(bad)!r}")
    for start in range(0, 40, 5):
        number = 0
        for c in value[start : start + 5]:
            number = number * 85 + _Z85_VALUE[c]
        if number >= 1 << 32:
            raise ConfigError(f"{what} is not a valid Z85 key (group {start // 5 + 1} overflows)")


@dataclass(frozen=True, kw_only=True)
class PeerSpec:
    """One worker of the job, as every other worker sees it."""

    rank: int
    """Position of this peer in the job, 0..world_size-1."""
    host: str
    """Host name or IP address other peers connect to (IPv6 without brackets)."""
    port: int
    """TCP port of the peer's gossip socket."""
    metrics_port: int | None = None
    """Port of the peer's Prometheus endpoint, or None when its metrics are off."""
    public_key: str | None = None
    """The peer's CurveZMQ public key, Z85-encoded (40 characters); needed for ``curve``."""

    def __post_init__(self) -> None:
        if not _is_int(self.rank) or self.rank < 0:
            raise ConfigError(f"peer rank must be an integer >= 0, got {self.rank!r}")
        what = f"rank {self.rank}"
        if isinstance(self.host, str) and self.host.startswith("[") and self.host.endswith("]"):
            object.__setattr__(self, "host", self.host[1:-1])
        _check_host(f"{what}: host", self.host)
        if _is_wildcard(self.host):
            raise ConfigError(
                f"{what}: host {self.host!r} is a wildcard address other peers cannot connect "
                "to; give this machine's address and set bind_host to listen on all interfaces"
            )
        _check_port(f"{what}: port", self.port)
        if self.metrics_port is not None:
            _check_port(f"{what}: metrics_port", self.metrics_port)
        if self.public_key is not None:
            _check_z85_key(f"{what}: public_key", self.public_key)

    @property
    def address(self) -> str:
        """The ZeroMQ endpoint of this peer, ``tcp://host:port`` (IPv6 hosts bracketed)."""
        return f"tcp://{_bracket(self.host)}:{self.port}"


def _is_wildcard(host: str) -> bool:
    """Whether ``host`` is a wildcard address such as ``0.0.0.0`` or ``::``."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


@dataclass(frozen=True, kw_only=True)
class GossipConfig:
    """Everything one worker needs to know about its gossip job."""

    rank: int
    """This worker's rank, 0..world_size-1."""
    peers: tuple[PeerSpec, ...]
    """All workers of the job, ordered by rank (``peers[r].rank == r``)."""
    transport: str = "zmq"
    """Transport name, one of ``TRANSPORTS``: ``zmq``, ``torch`` (torch.distributed), or
    ``inproc`` for tests."""
    bind_host: str | None = None
    """Host to bind this worker's gossip socket on (e.g. ``0.0.0.0``); default: its peer host."""
    metrics_host: str = "127.0.0.1"
    """Address the Prometheus endpoint binds on: loopback unless you open it (``0.0.0.0``)."""
    timeout: float = 120.0
    """Seconds a synchronous step waits for a round's messages before ``GossipTimeout``."""
    max_message_bytes: int = 1 << 30
    """Largest message accepted from the network, in bytes; bigger ones are rejected."""
    security: str = "none"
    """``none``, or ``curve`` for CurveZMQ (every peer then needs a ``public_key``)."""
    secret_key_file: str | None = None
    """File holding this worker's CurveZMQ secret key (``curve`` only)."""
    link: LinkSettings = dataclasses.field(default_factory=LinkSettings)
    """The links' liveness, retransmission and memory bounds (the peer list's ``[link]``
    table); a ``GossipNode`` made from this config uses them unless given its own."""

    def __post_init__(self) -> None:
        if not isinstance(self.peers, tuple):
            object.__setattr__(self, "peers", tuple(self.peers))
        if not self.peers:
            raise ConfigError("the peer list is empty: a job needs at least one peer")
        for position, peer in enumerate(self.peers):
            if not isinstance(peer, PeerSpec):
                raise ConfigError(f"peers[{position}] must be a PeerSpec, got {_type_name(peer)}")
            if peer.rank != position:
                raise ConfigError(
                    f"peers must be ordered by rank 0..{len(self.peers) - 1}: "
                    f"position {position} holds rank {peer.rank}"
                )
        if not _is_int(self.rank) or not 0 <= self.rank < len(self.peers):
            raise ConfigError(
                f"rank {self.rank!r} is out of range for {len(self.peers)} peers "
                f"(valid ranks: 0..{len(self.peers) - 1})"
            )
        self._check_endpoints()
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.bind_host is not None:
            _check_host("bind_host", self.bind_host, bind=True)
        _check_host("metrics_host", self.metrics_host, bind=True)
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)):
            raise ConfigError(f"timeout must be a number of seconds, got {self.timeout!r}")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ConfigError(f"timeout must be a finite number of seconds > 0, got {self.timeout}")
        if not _is_int(self.max_message_bytes) or self.max_message_bytes < 1:
            raise ConfigError(
                f"max_message_bytes must be an integer >= 1, got {self.max_message_bytes!r}"
            )
        if not isinstance(self.link, LinkSettings):
            raise ConfigError(f"link must be a LinkSettings, got {_type_name(self.link)}")
        self._check_security()

    def _check_endpoints(self) -> None:
        owners: dict[tuple[str, int], str] = {}
        for peer in self.peers:
            host = _canonical_host(peer.host)
            ports = [(peer.port, f"rank {peer.rank}'s gossip port")]
            if peer.metrics_port is not None:
                ports.append((peer.metrics_port, f"rank {peer.rank}'s metrics port"))
            for port, role in ports:
                other = owners.setdefault((host, port), role)
                if other != role:
                    raise ConfigError(
                        f"{_bracket(peer.host)}:{port} is used twice: as {other} and as {role}"
                    )

    def _check_security(self) -> None:
        if self.security not in SECURITY:
            raise ConfigError(f"security must be one of {SECURITY}, got {self.security!r}")
        if self.secret_key_file is not None and not (
            isinstance(self.secret_key_file, str) and self.secret_key_file
        ):
            raise ConfigError(f"secret_key_file must be a path, got {self.secret_key_file!r}")
        if self.security == "none":
            if self.secret_key_file is not None:
                raise ConfigError(
                    "secret_key_file is set but security is 'none': set security = 'curve' "
                    "to encrypt, or remove secret_key_file"
                )
            return
        missing = [peer.rank for peer in self.peers if peer.public_key is None]
        if missing:
            raise ConfigError(
                f"security 'curve' needs a public_key for every peer; missing for ranks {missing}"
            )
        if self.secret_key_file is None:
            raise ConfigError("security 'curve' needs secret_key_file (this worker's secret key)")

    @property
    def world_size(self) -> int:
        """Number of workers in the job."""
        return len(self.peers)

    @property
    def me(self) -> PeerSpec:
        """This worker's own entry of the peer list."""
        return self.peers[self.rank]

    @property
    def addresses(self) -> list[str]:
        """The ``tcp://host:port`` endpoint of every rank, indexed by rank."""
        return [peer.address for peer in self.peers]

    @property
    def bind_address(self) -> str:
        """The endpoint this worker binds its gossip socket on."""
        host = self.bind_host if self.bind_host is not None else self.me.host
        return f"tcp://{_bracket(host)}:{self.me.port}"

    @property
    def metrics_port(self) -> int | None:
        """This worker's Prometheus port, or None when its metrics are off."""
        return self.me.metrics_port

    def with_metrics_port(self, port: int | None) -> GossipConfig:
        """A copy in which this worker's metrics port is ``port`` (None or 0: metrics off)."""
        me = dataclasses.replace(self.me, metrics_port=port or None)
        peers = (*self.peers[: self.rank], me, *self.peers[self.rank + 1 :])
        return dataclasses.replace(self, peers=peers)

    @classmethod
    def local(
        cls,
        world_size: int,
        rank: int,
        *,
        ports: Sequence[int],
        host: str = "127.0.0.1",
        metrics_ports: Sequence[int | None] | None = None,
        **options: Any,
    ) -> GossipConfig:
        """A job of ``world_size`` workers all on ``host``, rank r on ``ports[r]``.

        ``metrics_ports[r]`` (None or 0: off) is rank r's metrics port; ``options`` are the
        other :class:`GossipConfig` fields (``transport``, ``timeout``, ...).
        """
        if not _is_int(world_size) or world_size < 1:
            raise ConfigError(f"world_size must be an integer >= 1, got {world_size!r}")
        if len(ports) != world_size:
            raise ConfigError(f"need {world_size} ports, one per rank, got {len(ports)}")
        if metrics_ports is None:
            metrics_ports = [None] * world_size
        elif len(metrics_ports) != world_size:
            raise ConfigError(
                f"need {world_size} metrics ports, one per rank, got {len(metrics_ports)}"
            )
        peers = tuple(
            PeerSpec(rank=r, host=host, port=ports[r], metrics_port=metrics_ports[r] or None)
            for r in range(world_size)
        )
        return cls(rank=rank, peers=peers, **options)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], *, rank: int) -> GossipConfig:
        """Read a TOML peer list (format in the module docstring) as worker ``rank``.

        Errors name the file and the offending key or rank: unknown keys, wrong types, missing
        or duplicate ranks, duplicate addresses and bad ports are all rejected.
        """
        source = os.fspath(path)
        try:
            with open(source, "rb") as f:
                document = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read peer list: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: invalid TOML: {exc}") from None
        try:
            return _config_from_document(document, rank)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> GossipConfig:
        """The config of a worker started by ``gossip-sgp launch`` or ``gossip-sgp run``.

        Reads ``GOSSIP_SGP_CONFIG`` (a TOML peer list) or else ``GOSSIP_SGP_PEERS``
        (``host:port,...`` by rank), the rank from ``GOSSIP_SGP_RANK`` or ``RANK``, and the
        optional overrides ``GOSSIP_SGP_METRICS_PORT``, ``GOSSIP_SGP_TRANSPORT``,
        ``GOSSIP_SGP_TIMEOUT`` and ``GOSSIP_SGP_BIND_HOST``. ``WORLD_SIZE``, when set, must
        match the number of peers.

        Under torchrun (no peer list; ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
        ``MASTER_PORT`` set) every worker picks a free port on the address it reaches
        ``MASTER_ADDR`` from, publishes it in torchrun's TCPStore and reads the others'
        (:func:`_peers_from_store`); with CUDA present it also selects GPU ``LOCAL_RANK``.
        Call it once per worker.
        """
        env = os.environ if environ is None else environ
        rank = _env_rank(env)
        if _env(env, ENV_CONFIG) is not None:
            config = cls.from_toml(env[ENV_CONFIG], rank=rank)
            source = f"{ENV_CONFIG}={env[ENV_CONFIG]}"
        elif _env(env, ENV_PEERS) is not None:
            try:
                pairs = parse_peer_list(env[ENV_PEERS])
                peers = tuple(
                    PeerSpec(rank=r, host=host, port=port) for r, (host, port) in enumerate(pairs)
                )
                config = cls(rank=rank, peers=peers)
            except ConfigError as exc:
                raise ConfigError(f"{ENV_PEERS}: {exc}") from None
            source = ENV_PEERS
        elif all(_env(env, name) for name in _TORCHRUN_VARS):
            config = cls(rank=rank, peers=_peers_from_store(env, rank))
            source = "torchrun's TCPStore"
        else:
            missing = [name for name in _TORCHRUN_VARS if not _env(env, name)]
            hint = (
                f" (torchrun's environment alone is not enough without {', '.join(missing)})"
                if "MASTER_ADDR" in env
                else ""
            )
            raise ConfigError(
                f"no peer list: set {ENV_CONFIG} (a TOML peer list) or {ENV_PEERS} "
                f"(host:port,... one per rank){hint}; {_HOW_TO_START}"
            )
        world = _env_int(env, "WORLD_SIZE")
        if world is not None and world != config.world_size:
            raise ConfigError(
                f"WORLD_SIZE={world} does not match {source}, which lists {config.world_size} "
                "peer(s)"
            )
        return _apply_env_overrides(config, env)


_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_STORE_PREFIX = "gossip-sgp/peers"


def _peers_from_store(env: Mapping[str, str], rank: int) -> tuple[PeerSpec, ...]:
    """Exchange gossip addresses through the TCPStore at ``MASTER_ADDR:MASTER_PORT``.

    The store is torchrun's own (its agent hosts it); this worker connects as a client,
    writes ``host:port`` under its rank and waits up to ``GOSSIP_SGP_TIMEOUT`` (default
    120 s) for every other rank's entry. The keys carry torchrun's run id and restart count,
    so a restarted job never reads a previous attempt's addresses. The port is free when
    chosen; another process may take it before the transport binds it (the usual race of
    launchers that pick ports this way). The torch transport publishes an address too but
    never binds it.
    """
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    world = _env_int(env, "WORLD_SIZE")
    master, port = env["MASTER_ADDR"].strip(), _env_int(env, "MASTER_PORT")
    assert world is not None
    assert port is not None
    if world < 1 or rank >= world:
        raise ConfigError(f"RANK={rank} is out of range for WORLD_SIZE={world}")
    _check_port("MASTER_PORT", port)
    local_rank = _env_int(env, "LOCAL_RANK")
    if local_rank is not None and torch.cuda.is_available():
        if not 0 <= local_rank < torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank}, but this machine has {torch.cuda.device_count()} GPUs"
            )
        torch.cuda.set_device(local_rank)
    timeout = _env(env, ENV_TIMEOUT)
    try:
        seconds = float(timeout) if timeout is not None else GossipConfig.timeout
    except ValueError:
        raise ConfigError(f"{ENV_TIMEOUT} must be a number of seconds, got {timeout!r}") from None
    host = _route_host(master)
    (mine,) = find_free_ports(host, 1)
    run = f"{env.get('TORCHELASTIC_RUN_ID', 'run')}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    keys = [f"{r}" for r in range(world)]
    try:
        client = dist.TCPStore(  # type: ignore[attr-defined]
            master,
            port,
            world,
            is_master=False,
            timeout=timedelta(seconds=seconds),
            wait_for_workers=False,
        )
        store = dist.PrefixStore(f"{_STORE_PREFIX}/{run}", client)  # type: ignore[attr-defined]
        store.set(keys[rank], f"{_bracket(host)}:{mine}")
        store.wait(keys)
        text = ",".join(store.get(key).decode() for key in keys)
    except (RuntimeError, ValueError) as exc:  # torch's DistStoreError is a RuntimeError
        raise ConfigError(
            f"no peer list, and the gossip addresses could not be exchanged through the "
            f"TCPStore at {master}:{port} within {seconds:g} s ({exc}); start the workers "
            f"with torchrun, or {_HOW_TO_START}"
        ) from None
    return tuple(PeerSpec(rank=r, host=h, port=p) for r, (h, p) in enumerate(parse_peer_list(text)))


def _route_host(master: str) -> str:
    """This machine's address on the route to ``master`` (loopback for a local master)."""
    try:
        infos = socket.getaddrinfo(master, 1, type=socket.SOCK_DGRAM)
        family, _, _, _, address = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(address)  # UDP: picks the route, sends nothing
            host: str = probe.getsockname()[0]
    except OSError as exc:
        raise ConfigError(f"MASTER_ADDR {master!r} cannot be reached: {exc}") from None
    return host


def find_free_ports(host: str, count: int, *, exclude: Collection[int] = ()) -> list[int]:
    """``count`` distinct TCP ports that are free on ``host`` now, none of them in ``exclude``.

    Each port comes from binding port 0; the sockets stay open until all are found (so the
    ports differ) and are closed on return. Another process may still take a port before the
    worker binds it: the usual race of every launcher that picks ports this way.
    """
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket(address_family(host), socket.SOCK_STREAM)
            sockets.append(sock)
            try:
                sock.bind((host, 0))
            except OSError as exc:
                raise ConfigError(
                    f"cannot bind a port on host {host!r} ({exc.strerror or exc}); "
                    "the host must be an address of this machine"
                ) from None
            port: int = sock.getsockname()[1]
            if port not in exclude:
                ports.append(port)
    finally:
        for sock in sockets:
            sock.close()
    return ports


def address_family(host: str) -> socket.AddressFamily:
    """The socket family ``host`` resolves to (``ConfigError`` if it does not resolve)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    return infos[0][0]


def _env(env: Mapping[str, str], name: str) -> str | None:
    """The variable's value, or None when it is unset or empty."""
    value = env.get(name, "").strip()
    return value or None


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = _env(env, name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None


def _env_rank(env: Mapping[str, str]) -> int:
    for name in (ENV_RANK, "RANK"):
        rank = _env_int(env, name)
        if rank is not None:
            if rank < 0:
                raise ConfigError(f"{name} must be >= 0, got {rank}")
            return rank
    raise ConfigError(f"no rank: set {ENV_RANK} (or RANK) to this worker's rank; {_HOW_TO_START}")


def _apply_env_overrides(config: GossipConfig, env: Mapping[str, str]) -> GossipConfig:
    changes: dict[str, Any] = {}
    transport = _env(env, ENV_TRANSPORT)
    if transport is not None:
        changes["transport"] = transport
    timeout = _env(env, ENV_TIMEOUT)
    if timeout is not None:
        try:
            changes["timeout"] = float(timeout)
        except ValueError:
            raise ConfigError(
                f"{ENV_TIMEOUT} must be a number of seconds, got {timeout!r}"
            ) from None
    bind_host = _env(env, ENV_BIND_HOST)
    if bind_host is not None:
        changes["bind_host"] = bind_host
    metrics_host = _env(env, ENV_METRICS_HOST)
    if metrics_host is not None:
        changes["metrics_host"] = metrics_host
    metrics_port = _env_int(env, ENV_METRICS_PORT)
    try:
        if changes:
            config = dataclasses.replace(config, **changes)
        if metrics_port is not None:
            if not 0 <= metrics_port <= 65535:
                raise ConfigError(f"must be in 0..65535 (0: off), got {metrics_port}")
            config = config.with_metrics_port(metrics_port)
    except ConfigError as exc:
        names = [ENV_TRANSPORT, ENV_TIMEOUT, ENV_BIND_HOST, ENV_METRICS_HOST, ENV_METRICS_PORT]
        given = ", ".join(name for name in names if _env(env, name) is not None)
        raise ConfigError(f"{given}: {exc}") from None
    return config


def parse_peer_list(text: str) -> list[tuple[str, int]]:
    """Parse ``host:port,host:port,...`` (IPv6 as ``[addr]:port``) into (host, port) pairs."""
    pairs = []
    for index, item in enumerate(text.split(",")):
        entry = item.strip()
        if entry.startswith("["):
            host, sep, rest = entry[1:].partition("]")
            if not sep or not rest.startswith(":"):
                raise ConfigError(f"entry {index} {entry!r} is not [ipv6-address]:port")
            port_text = rest[1:]
        else:
            host, sep, port_text = entry.rpartition(":")
            if not sep or not host:
                raise ConfigError(f"entry {index} {entry!r} is not host:port")
            if ":" in host:
                raise ConfigError(f"entry {index} {entry!r}: write IPv6 addresses as [addr]:port")
        try:
            port = int(port_text)
        except ValueError:
            raise ConfigError(
                f"entry {index} {entry!r}: port {port_text!r} is not a number"
            ) from None
        pairs.append((host, port))
    return pairs


def format_peer_list(pairs: Sequence[tuple[str, int]]) -> str:
    """The ``GOSSIP_SGP_PEERS`` value for (host, port) pairs ordered by rank."""
    return ",".join(f"{_bracket(host)}:{port}" for host, port in pairs)


def _check_keys(table: Mapping[str, Any], allowed: Mapping[str, type], where: str) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown key {key!r} in {where}{hint} (allowed: {', '.join(allowed)})"
            )
    for key, value in table.items():
        expected = allowed[key]
        if expected is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif expected is int:
            ok = _is_int(value)
        else:
            ok = isinstance(value, expected)
        if not ok:
            raise ConfigError(
                f"{where}: {key} must be {_KIND[expected]}, got {value!r} ({_type_name(value)})"
            )


def _config_from_document(document: Mapping[str, Any], rank: int) -> GossipConfig:
    _check_top_level(document)
    job = document.get("job", {})
    _check_keys(job, _JOB_KEYS, "[job]")
    entries = document["peers"]
    by_rank: dict[int, int] = {}
    for index, entry in enumerate(entries, start=1):
        where = f"[[peers]] entry {index}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a table")
        if _is_int(entry.get("rank")):
            where += f" (rank {entry['rank']})"
        _check_keys(entry, _PEER_KEYS, where)
        missing = [key for key in _REQUIRED_PEER_KEYS if key not in entry]
        if missing:
            raise ConfigError(f"{where} is missing {', '.join(missing)}")
        if entry["rank"] < 0:
            raise ConfigError(f"{where}: rank must be >= 0")
        if entry["rank"] in by_rank:
            raise ConfigError(
                f"rank {entry['rank']} is listed twice ([[peers]] entries "
                f"{by_rank[entry['rank']]} and {index})"
            )
        by_rank[entry["rank"]] = index
    absent = sorted(set(range(len(entries))) - set(by_rank))
    if absent:
        raise ConfigError(
            f"{len(entries)} peers must have ranks 0..{len(entries) - 1}; "
            f"missing rank(s) {absent}, found {sorted(by_rank)}"
        )
    peers = tuple(PeerSpec(**entries[by_rank[r] - 1]) for r in range(len(entries)))
    return GossipConfig(
        rank=rank, peers=peers, link=_link_settings(document.get("link", {})), **job
    )


def _link_settings(table: Mapping[str, Any]) -> LinkSettings:
    """The ``[link]`` table as :class:`LinkSettings` (its keys are the field names)."""
    _check_keys(table, _LINK_KEYS, "[link]")
    try:
        return LinkSettings(**table)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[link]: {exc}") from None


def _check_top_level(document: Mapping[str, Any]) -> None:
    allowed = {"job", "link", "peers"}
    for key in document:
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown top-level key {key!r}{hint} (allowed: [job], [link] and [[peers]])"
            )
    for table in ("job", "link"):
        if table in document and not isinstance(document[table], dict):
            raise ConfigError(f"'{table}' must be a table: write [{table}]")
    if "peers" not in document:
        raise ConfigError("no peers: add one [[peers]] table per worker")
    peers = document["peers"]
    if not isinstance(peers, list) or not all(isinstance(p, dict) for p in peers):
        raise ConfigError("'peers' must be an array of tables: write one [[peers]] per worker")
    if not peers:
        raise ConfigError("no peers: add one [[peers]] table per worker")
