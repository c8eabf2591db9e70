"""Command line of the WAN emulator: ``python -m gossip_sgp.wan check|run|cleanup``.

See ``gossip_sgp/wan/__init__.py`` and ``docs/wan-emulator.md``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from gossip_sgp.wan import (
    INSTALL_HINT,
    MAX_HOSTS,
    PREFIX,
    LinkSpec,
    WanEmulator,
    WanError,
    _alive,
    _delete_namespaces,
    _kill_namespace_processes,
    job_environment,
    list_namespaces,
    missing_requirements,
    parse_link,
)

# ---------------------------------------------------------------------------- check, cleanup


def check() -> int:
    """Print whether this machine can run the emulator; 0 when it can."""
    missing = missing_requirements()
    for line in missing:
        print(f"MISSING  {line}")
    if missing:
        print(f"install the tools ({INSTALL_HINT}) and run as root")
        return 1
    print("ok       root, ip, tc, nft")
    try:
        with WanEmulator(hosts=2, link="1gbit,20ms", prefix=PREFIX + "check") as wan:
            print("ok       2 hosts, 1gbit,20ms: namespaces, veth, htb, nftables redirect, relay")
            rtt = _ping_pong(wan)
            relay_log = wan.relay_log()
    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
        print(f"FAILED   {exc}")
        return 1
    if "no real-time priority" in relay_log:
        print("note     the relay runs without real-time priority: delays grow under CPU load")
    good = 0.035 <= rtt <= 1.0
    print(
        f"{'ok' if good else 'FAILED':8s} TCP round trip between the hosts "
        f"{rtt * 1000:.1f} ms (configured 2 x 20 ms)"
    )
    try:
        import uvloop  # noqa: F401
    except ImportError:
        print("note     uvloop is not installed: the relay runs on plain asyncio (slower)")
    return 0 if good else 1


def _ping_pong(wan: WanEmulator) -> float:
    """Median TCP round trip (seconds) between host 0 and host 1 over one connection."""
    from gossip_sgp.wan.probe import run_client, start_server

    start_server(wan, 1)
    rtts: list[float] = run_client(wan, 0, "pingpong", 1, "--count", "5")["rtts"]
    return sorted(rtts)[len(rtts) // 2]


def cleanup(prefix: str = PREFIX, dry_run: bool = False) -> int:
    """Delete namespaces left by emulators whose process is gone (e.g. after SIGKILL).

    Matches the names ``WanEmulator`` gives (``<prefix>[a-z0-9]*-<pid>-<6 hex>-r`` or
    ``-h<i>``, so also those of the tests and of ``check``) whose ``<pid>`` is dead.
    """
    pattern = re.compile(rf"{re.escape(prefix)}[a-z0-9]*-(\d+)-[0-9a-f]{{6}}-(r|h\d+)")
    stale = []
    for name in list_namespaces(""):
        match = pattern.fullmatch(name)
        if match and not _alive(int(match.group(1))):
            stale.append(name)
    for name in stale:
        print(("would delete " if dry_run else "deleting ") + name)
    if not dry_run:
        _kill_namespace_processes(stale)
        _delete_namespaces(stale)
    if not stale:
        print("nothing to clean up")
    return 0


# ---------------------------------------------------------------------------- run


def _substitute(argv: Sequence[str], values: Mapping[str, str]) -> list[str]:
    out = []
    for arg in argv:
        for key, value in values.items():
            arg = arg.replace("{" + key + "}", value)
        out.append(arg)
    return out


def run(
    hosts: int,
    link: LinkSpec,
    links: Mapping[int, LinkSpec],
    argv: Sequence[str],
    seed: int | None,
    port: int,
) -> int:
    """Run ``argv`` once per host, each in its namespace; the first failure's exit code."""
    with WanEmulator(hosts, link, links, seed=seed) as wan:
        print(
            f"wan: {hosts} hosts {wan.address(0)}..{wan.address(hosts - 1)} "
            f"({wan.router_namespace[:-2]}-*), link {link}"
            + "".join(f"; host {h}: {s}" for h, s in sorted(links.items())),
            file=sys.stderr,
            flush=True,
        )
        base = {k: v for k, v in os.environ.items() if not k.startswith("GOSSIP_SGP_")}
        procs = []
        for i in range(hosts):
            env = job_environment(wan, i, port)
            values = {k.removeprefix("WAN_").lower(): v for k, v in env.items() if "WAN_" in k}
            procs.append(
                wan.popen(
                    i,
                    _substitute(argv, values),
                    env={**base, **env},
                    stdin=None if i == 0 else subprocess.DEVNULL,
                )
            )
        pending = set(range(hosts))
        while pending:
            for i in sorted(pending):
                code = procs[i].poll()
                if code is None:
                    continue
                pending.discard(i)
                if code != 0:
                    print(f"wan: host {i} exited with {code}; stopping the others", file=sys.stderr)
                    return code
            time.sleep(0.05)
    return 0


def _host_link(text: str) -> tuple[int, LinkSpec]:
    host, eq, spec = text.partition("=")
    if not eq or not host.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST=LINK such as 2=10mbit,200ms, got {text!r}")
    try:
        return int(host), parse_link(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _link_arg(text: str) -> LinkSpec:
    try:
        return parse_link(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gossip_sgp.wan",
        description="Emulate WAN links between processes on one Linux machine (needs root).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "check", help="check root, tools and kernel features with a 2-host emulator"
    ).set_defaults(handler=lambda a: check())
    runp = sub.add_parser(
        "run",
        help="run a command once per emulated host",
        description=(
            "Run CMD once per emulated host, each in its own network namespace, and wait\n"
            "for all of them. In every argument {rank}, {hosts}, {address} (this host's\n"
            "IPv4 address) and {addresses} (all of them, comma-separated) are replaced.\n"
            "The environment has them as WAN_RANK, WAN_HOSTS, WAN_ADDRESS, WAN_ADDRESSES,\n"
            "and is set up for torch.distributed (RANK, WORLD_SIZE, LOCAL_RANK=0,\n"
            "MASTER_ADDR=host 0, MASTER_PORT=--port, GLOO_SOCKET_IFNAME=eth0) and for\n"
            "gossip-sgp workers (GOSSIP_SGP_RANK, GOSSIP_SGP_PEERS on --port + 1; other\n"
            "GOSSIP_SGP_* variables are not passed on): `gossip-sgp launch` scripts run\n"
            "unchanged.\n"
            "Rank 0 gets the standard input. When one command fails, the others are\n"
            "stopped. Everything is removed at the end, also on Ctrl-C or SIGTERM."
        ),
        epilog=(
            "examples:\n"
            "  python -m gossip_sgp.wan run --hosts 2 --link 100mbit,50ms -- "
            "sh -c 'echo rank {rank} is {address}'\n"
            "  python -m gossip_sgp.wan run --hosts 4 --link 100mbit,25ms -- "
            "python -m gossip_sgp.digits --epochs 5"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    runp.add_argument("--hosts", type=int, required=True, help="number of hosts (ranks)")
    runp.add_argument(
        "--link",
        type=_link_arg,
        default=LinkSpec(),
        help="every host's link, e.g. 1gbit,50ms or 100mbit,100ms,jitter=5ms (default: 0ms)",
    )
    runp.add_argument(
        "--host-link",
        type=_host_link,
        action="append",
        default=[],
        metavar="HOST=LINK",
        help="another link for one host, e.g. 3=10mbit,200ms (repeatable)",
    )
    runp.add_argument("--seed", type=int, help="seed of the jitter's random draws")
    runp.add_argument(
        "--port",
        type=int,
        default=29500,
        help="MASTER_PORT; gossip-sgp peers listen on PORT + 1 (default 29500)",
    )
    runp.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    runp.set_defaults(
        handler=lambda a: run(
            a.hosts,
            a.link,
            dict(a.host_link),
            a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd,
            a.seed,
            a.port,
        )
    )
    cleanp = sub.add_parser(
        "cleanup", help="delete namespaces left behind by emulators that were killed"
    )
    cleanp.add_argument("--dry-run", action="store_true", help="only list them")
    cleanp.set_defaults(handler=lambda a: cleanup(dry_run=a.dry_run))
    args = parser.parse_args(argv)
    if args.command == "run":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            parser.error("run: give the command after --")
        if not 1 <= args.hosts <= MAX_HOSTS:
            parser.error(f"run: --hosts must be from 1 to {MAX_HOSTS}")
        if not 1 <= args.port <= 65534:
            parser.error("run: --port must be from 1 to 65534")
        for host, _ in args.host_link:
            if host >= args.hosts:
                parser.error(f"run: --host-link {host}: there are only {args.hosts} hosts")
    try:
        code: int = args.handler(args)
    except WanError as exc:
        print(f"wan: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
