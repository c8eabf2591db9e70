"""What ``pip install gossip-sgp`` installs: the three packages, and all their commands need.

The wheel is built from a copy of the source tree (setuptools writes ``build/`` beside the
sources) and installed into a directory of its own; the installed commands then run from a
directory outside the checkout, so nothing can come from the checkout itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {"gossip_sgp", "transports", "topologies"}
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
)


def pip(command: str, *args: str) -> None:
    """``pip COMMAND -q --no-deps ARGS`` with this interpreter's pip."""
    subprocess.run(
        [sys.executable, "-m", "pip", command, "-q", "--no-deps", *args],
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCES)
    pip("wheel", "--no-build-isolation", "-w", str(root), str(source))
    (built,) = root.glob("gossip_sgp-*.whl")
    return built


@pytest.mark.timeout(180)
def test_the_wheel_holds_the_three_packages_and_nothing_else(wheel: Path) -> None:
    """No top-level ``benchmarks`` or ``examples`` in every user's site-packages; what the
    commands run at run time (the demo's trainer, the WAN emulator's relay) is inside."""
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    dist_info = {name for name in top if name.endswith(".dist-info")}
    assert len(dist_info) == 1
    assert top - dist_info == PACKAGES
    for needed in (
        "gossip_sgp/digits.py",  # gossip-sgp demo and bench run it
        "gossip_sgp/wan/relay.py",  # gossip-sgp bench --networks runs it in a namespace
        "gossip_sgp/wan/__main__.py",
        "gossip_sgp/py.typed",
        "transports/py.typed",
        "topologies/py.typed",
    ):
        assert needed in names


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_installed_commands_work_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    """Installed with ``pip install --target``, run from an empty directory: the package
    imported is the installed one, and ``gossip-sgp demo`` trains."""
    target = tmp_path / "site"
    pip("install", "--target", str(target), str(wheel))
    assert {p.name for p in target.iterdir()} - {"bin"} == PACKAGES | {
        p.name for p in target.glob("*.dist-info")
    }
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}

    def run(*args: str, timeout: float = 60) -> str:
        done = subprocess.run(
            [sys.executable, *args],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    where = run("-c", "import gossip_sgp, transports, topologies as t; print(t.__file__)")
    assert where.startswith(str(target))
    run("-m", "gossip_sgp.wan", "--help")
    run("-m", "gossip_sgp.cli", "simulate", "--nodes", "4", "--rounds", "8")
    out = run(
        "-m", "gossip_sgp.cli", "demo", "--nproc", "2", "--epochs", "2", "--json", timeout=180
    )
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["accuracy"] > 0.5
