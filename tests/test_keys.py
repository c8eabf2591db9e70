"""CurveZMQ keys from the peer list: generation, loading, checks, and training with them."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from gossip_sgp import SGP, GossipConfig, GossipNode
from gossip_sgp.cli import main
from gossip_sgp.errors import ConfigError
from gossip_sgp.keys import generate, load_secret_key, transport_keys
from gossip_sgp.launch import find_free_ports
from gossip_sgp.node import make_transport
from tests.threads import run_threads


def peer_list(tmp_path: Path, n: int, *, curve: bool = True) -> Path:
    """A TOML peer list of n loopback workers; with curve, keys in tmp_path/keys."""
    publics = dict(generate(tmp_path / "keys", [f"rank{r}" for r in range(n)]))
    ports = find_free_ports("127.0.0.1", n)
    lines = ["[job]", "timeout = 20.0"]
    if curve:
        lines += ['security = "curve"', f'secret_key_file = "{tmp_path}/keys/rank{{rank}}.secret"']
    for r in range(n):
        lines += ["[[peers]]", f"rank = {r}", 'host = "127.0.0.1"', f"port = {ports[r]}"]
        if curve:
            lines.append(f'public_key = "{publics[f"rank{r}"]}"')
    path = tmp_path / "peers.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_generate_writes_private_secrets_and_public_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "generate", "--out", str(tmp_path), "--ranks", "3"]) == 0
    out = capsys.readouterr().out
    for r in range(3):
        secret = tmp_path / f"rank{r}.secret"
        assert secret.stat().st_mode & 0o777 == 0o600
        assert (tmp_path / f"rank{r}.key").exists()
        assert load_secret_key(secret)  # loads: valid Z85, private
        public = (tmp_path / f"rank{r}.key").read_text().splitlines()[-1]
        assert f'public_key = "{public}"  # rank{r}' in out
    with pytest.raises(SystemExit, match="exists; pass --force"):
        main(["keys", "generate", "--out", str(tmp_path), "--ranks", "1"])
    assert main(["keys", "generate", "--out", str(tmp_path), "--ranks", "1", "--force"]) == 0


def test_secret_key_checks(tmp_path: Path) -> None:
    path = peer_list(tmp_path, 2)
    config = GossipConfig.from_toml(path, rank=1)
    public, secret, peers = transport_keys(config)
    assert peers[1] == public
    assert peers[0] != public
    assert len(secret) == 40
    secret_file = tmp_path / "keys" / "rank1.secret"
    os.chmod(secret_file, 0o644)
    with pytest.raises(ConfigError, match=r"accessible by other users.*chmod 600"):
        transport_keys(config)
    os.chmod(secret_file, 0o600)
    # rank 1 given rank 0's secret: the key does not match its public_key
    (tmp_path / "keys" / "rank0.secret").replace(secret_file)
    with pytest.raises(ConfigError, match="does not belong to rank 1"):
        transport_keys(config)
    secret_file.write_text("not a key\n")
    with pytest.raises(ConfigError, match="40-character Z85"):
        transport_keys(config)
    secret_file.unlink()
    with pytest.raises(ConfigError, match="cannot read the secret key"):
        transport_keys(config)


def test_plaintext_on_a_public_address_warns(caplog: pytest.LogCaptureFixture) -> None:
    ports = find_free_ports("127.0.0.1", 2)
    open_config = GossipConfig.local(2, 0, ports=ports, bind_host="0.0.0.0")
    with caplog.at_level(logging.WARNING, logger="gossip_sgp.node"):
        make_transport(GossipConfig.local(2, 0, ports=ports))
        assert "NOT encrypted" not in caplog.text
        make_transport(open_config)
    assert "NOT encrypted or authenticated" in caplog.text


@pytest.mark.timeout(60)
def test_sgp_trains_over_curve(tmp_path: Path) -> None:
    n = 3
    path = peer_list(tmp_path, n)

    def worker(rank: int) -> tuple[torch.Tensor, dict[str, int]]:
        with GossipNode(GossipConfig.from_toml(path, rank=rank)) as node:
            x = torch.nn.Parameter(torch.full((4,), float(rank), dtype=torch.float64))
            opt = torch.optim.SGD([x], lr=0.0)
            sgp = SGP([x], opt, node)
            for _ in range(4):
                sgp.step()
            sgp.consensus(tol=1e-12)
            return x.detach().clone(), dict(node.stats.rejected)

    for x, rejected in run_threads(n, worker, join=50):
        torch.testing.assert_close(x, torch.full((4,), 1.0, dtype=torch.float64))
        assert rejected == {}
