"""The peer list: TOML files, environment variables, and every validation error."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gossip_sgp.config import (
    GossipConfig,
    PeerSpec,
    format_peer_list,
    parse_peer_list,
)
from gossip_sgp.errors import ConfigError
from gossip_sgp.node import GossipNode
from gossip_sgp.settings import LinkSettings
from transports import InProcNetwork

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "peers.example.toml"
KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # the CurveZMQ docs' example public key

TWO_PEERS = """
[job]
transport = "zmq"
timeout = 30
security = "none"
metrics_host = "0.0.0.0"
bind_host = "0.0.0.0"
max_message_bytes = 1048576

[[peers]]
rank = 1
host = "192.168.1.11"
port = 29500

[[peers]]
rank = 0
host = "192.168.1.10"
port = 29500
metrics_port = 9100
"""

ONE_PEER = '[[peers]]\nrank = 0\nhost = "127.0.0.1"\nport = 29500\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "peers.toml"
    path.write_text(text)
    return path


def peers_toml(*entries: str, job: str = "") -> str:
    parts = [f"[job]\n{job}\n"] if job else []
    parts += [f"[[peers]]\n{entry}\n" for entry in entries]
    return "\n".join(parts)


def test_toml_happy_path(tmp_path: Path) -> None:
    path = write(tmp_path, TWO_PEERS)
    config = GossipConfig.from_toml(path, rank=1)
    assert config.rank == 1
    assert config.world_size == 2
    assert [p.rank for p in config.peers] == [0, 1]  # sorted by rank, whatever the file order
    assert config.me == PeerSpec(rank=1, host="192.168.1.11", port=29500)
    assert config.addresses == ["tcp://192.168.1.10:29500", "tcp://192.168.1.11:29500"]
    assert config.bind_address == "tcp://0.0.0.0:29500"
    assert config.metrics_port is None
    assert config.peers[0].metrics_port == 9100
    assert config.timeout == 30.0
    assert config.metrics_host == "0.0.0.0"
    assert config.max_message_bytes == 1 << 20
    assert GossipConfig.from_toml(str(path), rank=0).metrics_port == 9100


def test_the_link_table_sets_the_nodes_link_settings(tmp_path: Path) -> None:
    text = ONE_PEER + "[link]\nsuspect_floor_s = 20.0\nsuspect_initial_s = 60\nmax_unacked = 8\n"
    config = GossipConfig.from_toml(write(tmp_path, text), rank=0)
    assert config.link == LinkSettings(suspect_floor_s=20.0, suspect_initial_s=60.0, max_unacked=8)
    node = GossipNode(config, transport=InProcNetwork(1).transport(0))  # never started
    assert node.settings is config.link
    own = LinkSettings(heartbeat_s=0.1)
    assert GossipNode(config, transport=InProcNetwork(1).transport(0), settings=own).settings is own
    assert GossipConfig.from_toml(write(tmp_path, ONE_PEER), rank=0).link == LinkSettings()


def test_toml_defaults(tmp_path: Path) -> None:
    config = GossipConfig.from_toml(write(tmp_path, ONE_PEER), rank=0)
    assert config.transport == "zmq"
    assert config.security == "none"
    assert config.timeout == 120.0
    assert config.bind_host is None
    assert config.bind_address == "tcp://127.0.0.1:29500"


@pytest.mark.parametrize("rank", [0, 1, 2, 3])
def test_example_peer_list_is_valid(rank: int) -> None:
    config = GossipConfig.from_toml(EXAMPLE, rank=rank)
    assert config.world_size == 4
    assert config.rank == rank


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[peers]\nrank = 0", "invalid TOML"),
        (ONE_PEER + "[jobs]\n", "unknown top-level key 'jobs'; did you mean 'job'?"),
        (ONE_PEER + "[links]\n", "unknown top-level key 'links'; did you mean 'link'?"),
        ("link = 3\n" + ONE_PEER, "'link' must be a table: write [link]"),
        (
            ONE_PEER + "[link]\nheartbeat = 1.0\n",
            "unknown key 'heartbeat' in [link]; did you mean 'heartbeat_s'?",
        ),
        (ONE_PEER + '[link]\nheartbeat_s = "1"\n', "[link]: heartbeat_s must be a number"),
        (ONE_PEER + "[link]\nmax_unacked = 2.5\n", "[link]: max_unacked must be an integer"),
        (
            ONE_PEER + "[link]\nsuspect_floor_s = -1.0\n",
            "[link]: LinkSettings.suspect_floor_s must be finite and > 0, got -1.0",
        ),
        (
            ONE_PEER + "[link]\nsuspect_floor_s = 30.0\n",
            "[link]: LinkSettings.suspect_initial_s (15.0) must be at least suspect_floor_s",
        ),
        (peers_toml('rank = 0\nhost = "h"\nport = 1', job="timout = 3"), "did you mean 'timeout'"),
        (
            peers_toml('rank = 0\nhost = "h"\nport = 1\nmetric_port = 9100'),
            "unknown key 'metric_port' in [[peers]] entry 1 (rank 0); did you mean 'metrics_port'",
        ),
        (peers_toml('rank = 0\nhost = "h"\nport = "29500"'), "port must be an integer"),
        (peers_toml('rank = 0\nhost = "h"\nport = 1.5'), "port must be an integer"),
        (peers_toml('rank = 0\nhost = "h"\nport = true'), "port must be an integer"),
        (peers_toml("rank = 0\nhost = 10\nport = 1"), "host must be a string"),
        (peers_toml('rank = "0"\nhost = "h"\nport = 1'), "rank must be an integer"),
        (peers_toml('rank = 0\nhost = "h"\nport = 1', job='timeout = "30"'), "must be a number"),
        (peers_toml('rank = 0\nhost = "h"\nport = 1', job="transport = 1"), "must be a string"),
        (peers_toml('rank = 0\nhost = "h"\nport = 0'), "rank 0: port must be in 1..65535"),
        (peers_toml('rank = 0\nhost = "h"\nport = 70000'), "port must be in 1..65535, got 70000"),
        (
            peers_toml('rank = 0\nhost = "h"\nport = 1\nmetrics_port = 65536'),
            "rank 0: metrics_port must be in 1..65535",
        ),
        (peers_toml('rank = 0\nhost = "h"'), "[[peers]] entry 1 (rank 0) is missing port"),
        (peers_toml('host = "h"\nport = 1'), "[[peers]] entry 1 is missing rank"),
        (
            peers_toml('rank = 0\nhost = "a"\nport = 1', 'rank = 2\nhost = "b"\nport = 1'),
            "missing rank(s) [1]",
        ),
        (
            peers_toml('rank = 0\nhost = "a"\nport = 1', 'rank = 0\nhost = "b"\nport = 1'),
            "rank 0 is listed twice ([[peers]] entries 1 and 2)",
        ),
        (peers_toml('rank = -1\nhost = "a"\nport = 1'), "rank must be >= 0"),
        (
            peers_toml('rank = 0\nhost = "a"\nport = 1', 'rank = 1\nhost = "a"\nport = 1'),
            "a:1 is used twice: as rank 0's gossip port and as rank 1's gossip port",
        ),
        (
            peers_toml(
                'rank = 0\nhost = "a"\nport = 1\nmetrics_port = 9100',
                'rank = 1\nhost = "a"\nport = 2\nmetrics_port = 9100',
            ),
            "a:9100 is used twice: as rank 0's metrics port and as rank 1's metrics port",
        ),
        (
            peers_toml(
                'rank = 0\nhost = "a"\nport = 1', 'rank = 1\nhost = "a"\nport = 2\nmetrics_port = 1'
            ),
            "a:1 is used twice: as rank 0's gossip port and as rank 1's metrics port",
        ),
        (
            peers_toml('rank = 0\nhost = "a"\nport = 1\nmetrics_port = 1'),
            "as rank 0's gossip port and as rank 0's metrics port",
        ),
        (
            peers_toml('rank = 0\nhost = "::1"\nport = 1', 'rank = 1\nhost = "0:0::1"\nport = 1'),
            "[0:0::1]:1 is used twice",
        ),
        (
            peers_toml('rank = 0\nhost = "h"\nport = 1', job='transport = "tcp"'),
            "transport must be",
        ),
        (peers_toml('rank = 0\nhost = "h"\nport = 1', job='security = "tls"'), "security must be"),
        (peers_toml('rank = 0\nhost = "h"\nport = 1', job="timeout = 0"), "timeout must be"),
        (peers_toml('rank = 0\nhost = "h"\nport = 1', job="timeout = -1.0"), "timeout must be"),
        (peers_toml('rank = 0\nhost = "h"\nport = 1', job="timeout = inf"), "timeout must be"),
        (
            peers_toml('rank = 0\nhost = "h"\nport = 1', job="max_message_bytes = 0"),
            "max_message_bytes must be",
        ),
        (
            peers_toml('rank = 0\nhost = "h"\nport = 1', job='security = "curve"'),
            "needs a public_key for every peer; missing for ranks [0]",
        ),
        (
            peers_toml(
                f'rank = 0\nhost = "h"\nport = 1\npublic_key = "{KEY}"', job='security = "curve"'
            ),
            "needs secret_key_file",
        ),
        (
            peers_toml('rank = 0\nhost = "h"\nport = 1', job='secret_key_file = "k"'),
            "secret_key_file is set but security is 'none'",
        ),
        (peers_toml('rank = 0\nhost = "h"\nport = 1\npublic_key = "short"'), "40-character Z85"),
        (
            peers_toml(f'rank = 0\nhost = "h"\nport = 1\npublic_key = "{KEY[:-1]}~"'),
            "invalid characters '~'",
        ),
        (
            peers_toml(f'rank = 0\nhost = "h"\nport = 1\npublic_key = "{"#" * 40}"'),
            "overflows",
        ),
        (peers_toml('rank = 0\nhost = "h:29500"\nport = 1'), "neither a host name nor an IPv6"),
        (peers_toml('rank = 0\nhost = "tcp://h"\nport = 1'), "must be a bare host"),
        (peers_toml('rank = 0\nhost = ""\nport = 1'), "without spaces"),
        (peers_toml('rank = 0\nhost = "0.0.0.0"\nport = 1'), "wildcard address"),
        (peers_toml('rank = 0\nhost = "h"\nport = 1', job='bind_host = "a b"'), "bind_host must"),
        ("[job]\ntimeout = 3\n", "no peers"),
        ("peers = []\n", "no peers"),
        ("peers = [1, 2]\n", "must be an array of tables"),
        ('job = "x"\n' + ONE_PEER, "'job' must be a table"),
    ],
)
def test_toml_errors_name_file_and_problem(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        GossipConfig.from_toml(path, rank=0)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_toml_rank_out_of_range(tmp_path: Path) -> None:
    path = write(tmp_path, TWO_PEERS)
    with pytest.raises(ConfigError, match=r"rank 2 is out of range for 2 peers"):
        GossipConfig.from_toml(path, rank=2)


def test_toml_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read peer list"):
        GossipConfig.from_toml(missing, rank=0)
    with pytest.raises(ConfigError, match=r"cannot read peer list"):
        GossipConfig.from_toml(tmp_path, rank=0)  # a directory


def test_toml_curve_with_keys(tmp_path: Path) -> None:
    text = peers_toml(
        f'rank = 0\nhost = "a"\nport = 1\npublic_key = "{KEY}"',
        f'rank = 1\nhost = "b"\nport = 1\npublic_key = "{KEY}"',
        job='security = "curve"\nsecret_key_file = "/etc/gossip/secret.key"',
    )
    config = GossipConfig.from_toml(write(tmp_path, text), rank=0)
    assert config.security == "curve"
    assert config.me.public_key == KEY


def test_ipv6_hosts() -> None:
    peer = PeerSpec(rank=0, host="fe80::1", port=29500)
    assert peer.address == "tcp://[fe80::1]:29500"
    assert PeerSpec(rank=0, host="[::1]", port=1).host == "::1"  # brackets are tolerated
    config = GossipConfig(rank=0, peers=(peer,), bind_host="::")
    assert config.bind_address == "tcp://[::]:29500"


def test_peer_list_round_trip() -> None:
    pairs = [("127.0.0.1", 29500), ("::1", 29501), ("node-3.example.org", 1)]
    text = format_peer_list(pairs)
    assert text == "127.0.0.1:29500,[::1]:29501,node-3.example.org:1"
    assert parse_peer_list(text) == pairs


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1", "is not host:port"),
        (":29500", "is not host:port"),
        ("h:x", "port 'x' is not a number"),
        ("::1:29500", "write IPv6 addresses as [addr]:port"),
        ("[::1]29500", "is not [ipv6-address]:port"),
        ("a:1,,b:2", "entry 1 '' is not host:port"),
    ],
)
def test_peer_list_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_peer_list(text)
    assert message in str(info.value)


def test_from_env_with_peers() -> None:
    env = {
        "GOSSIP_SGP_PEERS": "127.0.0.1:29500, 127.0.0.1:29501,[::1]:29502",
        "GOSSIP_SGP_RANK": "2",
        "RANK": "0",  # GOSSIP_SGP_RANK takes precedence over torchrun's RANK
        "WORLD_SIZE": "3",
        "GOSSIP_SGP_METRICS_PORT": "9100",
        "GOSSIP_SGP_TRANSPORT": "inproc",
        "GOSSIP_SGP_TIMEOUT": "2.5",
        "GOSSIP_SGP_BIND_HOST": "::",
    }
    config = GossipConfig.from_env(env)
    assert config.rank == 2
    assert config.addresses == [
        "tcp://127.0.0.1:29500",
        "tcp://127.0.0.1:29501",
        "tcp://[::1]:29502",
    ]
    assert config.metrics_port == 9100
    assert config.peers[0].metrics_port is None
    assert config.transport == "inproc"
    assert config.timeout == 2.5
    assert config.bind_address == "tcp://[::]:29502"


def test_from_env_rank_from_torchrun_variable() -> None:
    config = GossipConfig.from_env({"GOSSIP_SGP_PEERS": "h:1,h:2", "RANK": "1"})
    assert config.rank == 1
    assert config.metrics_port is None


def test_from_env_with_config_file(tmp_path: Path) -> None:
    path = write(tmp_path, TWO_PEERS)
    env = {
        "GOSSIP_SGP_CONFIG": str(path),
        "GOSSIP_SGP_RANK": "0",
        "GOSSIP_SGP_PEERS": "ignored:1",  # the peer list file takes precedence
        "GOSSIP_SGP_METRICS_PORT": "0",  # 0 turns the file's metrics port off
    }
    config = GossipConfig.from_env(env)
    assert config.world_size == 2
    assert config.timeout == 30.0
    assert config.metrics_port is None
    env["GOSSIP_SGP_METRICS_PORT"] = "9200"
    assert GossipConfig.from_env(env).metrics_port == 9200


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOSSIP_SGP_PEERS", "127.0.0.1:29500")
    monkeypatch.setenv("GOSSIP_SGP_RANK", "0")
    monkeypatch.delenv("GOSSIP_SGP_CONFIG", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert GossipConfig.from_env().world_size == 1


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GOSSIP_SGP_PEERS": "h:1"}, "no rank: set GOSSIP_SGP_RANK (or RANK)"),
        ({"GOSSIP_SGP_RANK": "0"}, "no peer list: set GOSSIP_SGP_CONFIG"),
        ({"RANK": "0", "MASTER_ADDR": "h"}, "torchrun's environment alone is not enough"),
        ({"GOSSIP_SGP_RANK": "zero", "GOSSIP_SGP_PEERS": "h:1"}, "GOSSIP_SGP_RANK must be an"),
        ({"GOSSIP_SGP_RANK": "-1", "GOSSIP_SGP_PEERS": "h:1"}, "GOSSIP_SGP_RANK must be >= 0"),
        ({"GOSSIP_SGP_RANK": "1", "GOSSIP_SGP_PEERS": "h:1"}, "rank 1 is out of range"),
        ({"RANK": "0", "GOSSIP_SGP_PEERS": "h"}, "GOSSIP_SGP_PEERS: entry 0 'h' is not host:port"),
        ({"RANK": "0", "GOSSIP_SGP_PEERS": "h:1,h:1"}, "GOSSIP_SGP_PEERS: h:1 is used twice"),
        ({"RANK": "0", "GOSSIP_SGP_PEERS": "h:1", "WORLD_SIZE": "2"}, "WORLD_SIZE=2 does not"),
        ({"RANK": "0", "GOSSIP_SGP_PEERS": "h:1", "WORLD_SIZE": "x"}, "WORLD_SIZE must be an"),
        (
            {"RANK": "0", "GOSSIP_SGP_PEERS": "h:1", "GOSSIP_SGP_TIMEOUT": "soon"},
            "GOSSIP_SGP_TIMEOUT must be a number",
        ),
        (
            {"RANK": "0", "GOSSIP_SGP_PEERS": "h:1", "GOSSIP_SGP_TIMEOUT": "0"},
            "GOSSIP_SGP_TIMEOUT: timeout must be",
        ),
        (
            {"RANK": "0", "GOSSIP_SGP_PEERS": "h:1", "GOSSIP_SGP_TRANSPORT": "tcp"},
            "GOSSIP_SGP_TRANSPORT: transport must be",
        ),
        (
            {"RANK": "0", "GOSSIP_SGP_PEERS": "h:1", "GOSSIP_SGP_METRICS_PORT": "70000"},
            "GOSSIP_SGP_METRICS_PORT: must be in 0..65535",
        ),
        (
            {"RANK": "0", "GOSSIP_SGP_PEERS": "h:1", "GOSSIP_SGP_METRICS_PORT": "1"},
            "GOSSIP_SGP_METRICS_PORT: h:1 is used twice",
        ),
        ({"RANK": "0", "GOSSIP_SGP_CONFIG": "/nonexistent/peers.toml"}, "cannot read peer list"),
    ],
)
def test_from_env_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        GossipConfig.from_env(env)
    assert message in str(info.value)


def test_from_env_missing_variables_say_how_to_start() -> None:
    with pytest.raises(ConfigError, match=r"gossip-sgp launch.*gossip-sgp run"):
        GossipConfig.from_env({})


def test_local() -> None:
    config = GossipConfig.local(3, 1, ports=[5000, 5001, 5002], metrics_ports=[9100, 0, None])
    assert config.addresses == [
        "tcp://127.0.0.1:5000",
        "tcp://127.0.0.1:5001",
        "tcp://127.0.0.1:5002",
    ]
    assert [p.metrics_port for p in config.peers] == [9100, None, None]
    assert config.me.rank == 1
    config = GossipConfig.local(2, 0, ports=[1, 2], host="::1", transport="inproc", timeout=1.0)
    assert config.transport == "inproc"
    assert config.timeout == 1.0
    assert config.addresses[1] == "tcp://[::1]:2"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"world_size": 0, "rank": 0, "ports": []}, "world_size must be"),
        ({"world_size": 2, "rank": 0, "ports": [1]}, "need 2 ports"),
        ({"world_size": 2, "rank": 0, "ports": [1, 2], "metrics_ports": [3]}, "need 2 metrics"),
        ({"world_size": 2, "rank": 2, "ports": [1, 2]}, "rank 2 is out of range"),
        ({"world_size": 1, "rank": 0, "ports": [1], "transport": "x"}, "transport must be"),
        ({"world_size": 1, "rank": 0, "ports": [1], "metrics_ports": [1]}, "used twice"),
    ],
)
def test_local_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GossipConfig.local(**kwargs)  # type: ignore[arg-type]


def test_direct_construction_errors() -> None:
    peers = (PeerSpec(rank=0, host="h", port=1), PeerSpec(rank=1, host="h", port=2))
    with pytest.raises(ConfigError, match="position 0 holds rank 1"):
        GossipConfig(rank=0, peers=(peers[1], peers[0]))
    with pytest.raises(ConfigError, match="peer list is empty"):
        GossipConfig(rank=0, peers=())
    with pytest.raises(ConfigError, match="timeout must be a number"):
        GossipConfig(rank=0, peers=peers, timeout="1")  # type: ignore[arg-type]
    config = GossipConfig(rank=0, peers=list(peers))  # type: ignore[arg-type]
    assert isinstance(config.peers, tuple)
    with pytest.raises(ConfigError, match="timeout must be"):
        dataclasses.replace(config, timeout=float("nan"))
    assert issubclass(ConfigError, ValueError)


def test_with_metrics_port() -> None:
    config = GossipConfig.local(2, 1, ports=[1, 2])
    assert config.with_metrics_port(9100).metrics_port == 9100
    assert config.with_metrics_port(9100).with_metrics_port(0).metrics_port is None
    with pytest.raises(ConfigError, match="used twice"):
        config.with_metrics_port(1)
