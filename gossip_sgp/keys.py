"""CurveZMQ keys: ``gossip-sgp keys generate`` and loading a worker's keys from its config.

A key pair per rank: the public key goes into the peer list (``public_key = "..."`` of that
rank's ``[[peers]]`` table, the same file on every machine), the secret key into a file only
that worker can read (mode 0600), named by the job's ``secret_key_file``. The path may
contain ``{rank}`` so that one peer list serves several workers per machine:
``secret_key_file = "keys/rank{rank}.secret"``.

Key files hold the 40-character Z85 key on one line; lines starting with ``#`` are comments.
"""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import zmq
import zmq.utils.z85

from gossip_sgp.config import GossipConfig
from gossip_sgp.errors import ConfigError

__all__ = ["generate", "load_secret_key", "secret_key_path", "transport_keys"]


def secret_key_path(config: GossipConfig) -> Path:
    """This worker's secret key file: ``config.secret_key_file`` with ``{rank}`` filled in."""
    if config.secret_key_file is None:
        raise ConfigError("security 'curve' needs secret_key_file (this worker's secret key)")
    try:
        return Path(config.secret_key_file.format(rank=config.rank))
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"secret_key_file {config.secret_key_file!r}: only {{rank}} may be filled in ({exc})"
        ) from None


def _read_key(path: Path, what: str) -> bytes:
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the {what} from {path}: {exc}") from None
    lines = [s.strip() for s in text.splitlines() if s.strip() and not s.startswith("#")]
    if len(lines) != 1 or len(lines[0]) != 40:
        raise ConfigError(f"{path} must hold one 40-character Z85 {what}")
    key = lines[0].encode("ascii")
    try:
        zmq.utils.z85.decode(key)
    except (KeyError, ValueError):
        raise ConfigError(f"the {what} in {path} is not valid Z85") from None
    return key


def load_secret_key(path: Path) -> bytes:
    """The Z85 secret key in ``path``; refused when others may read the file (like ssh)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"cannot read the secret key from {path}: {exc}") from None
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"secret key file {path} is accessible by other users (mode "
            f"{stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
        )
    return _read_key(path, "secret key")


def transport_keys(config: GossipConfig) -> tuple[bytes, bytes, tuple[bytes, ...]]:
    """``(public, secret, peer public keys)`` of a ``security = "curve"`` config, checked."""
    secret = load_secret_key(secret_key_path(config))
    public = zmq.curve_public(secret)
    peer_keys = []
    for peer in config.peers:
        if peer.public_key is None:
            raise ConfigError(f"security 'curve' needs a public_key for rank {peer.rank}")
        peer_keys.append(peer.public_key.encode("ascii"))
    if peer_keys[config.rank] != public:
        raise ConfigError(
            f"the secret key in {secret_key_path(config)} does not belong to rank "
            f"{config.rank}'s public_key in the peer list"
        )
    if len(set(peer_keys)) != len(peer_keys):
        raise ConfigError("two ranks in the peer list have the same public_key")
    return public, secret, tuple(peer_keys)


def generate(directory: Path, names: list[str], *, force: bool = False) -> list[tuple[str, str]]:
    """Write ``NAME.key`` (public) and ``NAME.secret`` (mode 0600) per name; return
    ``(name, public key)`` pairs. Existing files are kept unless ``force``."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        if not name or "/" in name or name.startswith("."):
            raise ConfigError(f"bad key name {name!r}")
        public_path, secret_path = directory / f"{name}.key", directory / f"{name}.secret"
        if not force and (public_path.exists() or secret_path.exists()):
            raise ConfigError(f"{secret_path} or {public_path} exists; pass --force to replace")
        public, secret = zmq.curve_keypair()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = os.open(secret_path, flags, 0o600)
        os.fchmod(fd, 0o600)  # also when the file existed with another mode
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(f"# gossip-sgp CurveZMQ secret key of {name}: keep it private\n")
            f.write(secret.decode("ascii") + "\n")
        public_path.write_text(
            f"# gossip-sgp CurveZMQ public key of {name}\n{public.decode('ascii')}\n",
            encoding="ascii",
        )
        out.append((name, public.decode("ascii")))
    return out


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``gossip-sgp keys generate``."""
    p = sub.add_parser(
        "keys",
        help="generate CurveZMQ key pairs for security = 'curve'",
        description="CurveZMQ keys for encrypted, authenticated gossip (security = 'curve').",
    )
    keys_sub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    g = keys_sub.add_parser(
        "generate",
        help="write a key pair per rank",
        description=(
            "Write NAME.key (public) and NAME.secret (mode 0600) for each rank into --out, "
            "and print the public_key lines for the peer list. Copy each secret to its "
            "worker's machine only; the peer list (with the public keys) goes everywhere."
        ),
    )
    g.add_argument("--out", type=Path, required=True, help="directory for the key files")
    g.add_argument("--ranks", type=int, required=True, help="number of workers (ranks)")
    g.add_argument("--force", action="store_true", help="replace existing key files")
    g.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    if not 1 <= args.ranks <= 100_000:
        raise SystemExit(f"gossip-sgp keys generate: --ranks must be 1..100000, got {args.ranks}")
    try:
        pairs = generate(args.out, [f"rank{r}" for r in range(args.ranks)], force=args.force)
    except (ConfigError, OSError) as exc:
        raise SystemExit(f"gossip-sgp keys generate: {exc}") from None
    print(f"# wrote {len(pairs)} key pairs to {args.out}/ (rankN.key public, rankN.secret 0600)")
    print("# peer list: in [job] set")
    print('#   security = "curve"')
    print(f'#   secret_key_file = "{args.out}/rank{{rank}}.secret"')
    print("# and add to each rank's [[peers]] table:")
    for name, public in pairs:
        print(f'public_key = "{public}"  # {name}')
    return 0
