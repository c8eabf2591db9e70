"""Benchmark scripts of gossip-sgp, run from a checkout (``python -m benchmarks.NAME``).

Not installed: a wheel holds gossip_sgp, transports and topologies only.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def add_names_option(
    parser: argparse.ArgumentParser, flag: str, names: Sequence[str], default: Sequence[str]
) -> None:
    """``flag NAME [NAME ...]``: which of ``names`` to run (default ``default``)."""
    parser.add_argument(
        flag,
        nargs="+",
        choices=list(names),
        default=list(default),
        metavar="NAME",
        help=f"which to run, of {', '.join(repr(n) for n in names)} "
        f"(default: {', '.join(repr(n) for n in default)})",
    )
