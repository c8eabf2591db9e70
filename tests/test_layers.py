"""The installed packages' dependencies run one way (docs/design.md, "Layers").

``topologies`` needs nothing of the project; ``transports`` needs only the message, its wire
format and the errors of ``gossip_sgp``; the rest of ``gossip_sgp`` builds on both. The
import graph is read from the source (every ``import`` statement, also those inside
functions and under ``if TYPE_CHECKING:``, which are dependencies all the same), so a cycle
cannot hide behind a lazy or type-only import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gossip_sgp", "transports", "topologies")

WIRE_LAYER = {"gossip_sgp.errors", "gossip_sgp.message", "gossip_sgp.wire"}
"""What of ``gossip_sgp`` the transports may load, directly or through each other."""


def _of(*names: str) -> tuple[str, ...]:
    return tuple(f"gossip_sgp.{name}" for name in names)


LAYERS = (
    ("peer schedules", ("topologies",)),
    ("the wire", tuple(sorted(WIRE_LAYER))),
    ("transports", ("transports",)),
    (
        "push-sum and the link",
        _of("compression", "config", "keys", "link", "liveness", "mailbox", "protocol")
        + _of("outer", "pushsum", "settings", "stats"),
    ),
    ("the worker", ("gossip_sgp", *_of("baselines", "metrics", "node", "sgp", "streaming"))),
    (
        "tools",
        _of("__main__", "bench", "cli", "demo", "digits", "launch", "prefork", "simulate")
        + _of("top", "wan"),
    ),
)
"""docs/design.md's table: a module may import its own layer and those above it here. A
name stands for the module and everything below it (``transports``: every transport)."""


@cache
def modules() -> dict[str, Path]:
    """Every module of the three packages, by dotted name."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _resolve(name: str) -> str | None:
    """The project module an imported name belongs to (None: not the project's)."""
    known = modules()
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


@cache
def imports(module: str) -> frozenset[str]:
    """The project modules ``module`` imports anywhere in its source."""
    path = modules()[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(filter(None, (_resolve(alias.name) for alias in node.names)))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            for alias in node.names:  # `from pkg import submodule` depends on the submodule
                target = f"{base}.{alias.name}"
                found.add(target if target in modules() else _resolve(base) or "")
    found.discard("")
    found.discard(module)
    return frozenset(found)


def closure(start: set[str]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(imports(module))
    return seen


def cycles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in imports(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(modules()):
        if module not in index:
            visit(module)
    return found


def test_the_graph_sees_the_imports_it_is_built_from() -> None:
    assert {"gossip_sgp.metrics", "gossip_sgp.stats"} <= imports("gossip_sgp.node")
    assert "transports.base" in imports("gossip_sgp.node")
    assert "gossip_sgp.wire" in imports("transports.zmq")  # `from gossip_sgp import wire`
    assert "gossip_sgp.sgp" in imports("gossip_sgp")  # under TYPE_CHECKING, lazily at run time
    assert "gossip_sgp.launch" in imports("gossip_sgp.cli")  # inside a function
    assert len(modules()) > 40


def layer(module: str) -> int:
    """The index in ``LAYERS`` of the longest name that covers ``module``."""
    best, level = "", -1
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            covers = module == name or (module.startswith(name + ".") and name != "gossip_sgp")
            if covers and len(name) > len(best):
                best, level = name, index
    assert level >= 0, f"{module} is in no layer of LAYERS (and of docs/design.md)"
    return level


def test_every_import_goes_to_the_same_layer_or_one_below() -> None:
    upward = [
        f"{module} ({LAYERS[layer(module)][0]}) imports {target} ({LAYERS[layer(target)][0]})"
        for module in sorted(modules())
        for target in sorted(imports(module))
        if layer(target) > layer(module)
    ]
    assert upward == []


def test_no_import_cycle_among_the_installed_packages() -> None:
    assert cycles() == []


def test_topologies_need_nothing_else_of_the_project() -> None:
    reached = closure({m for m in modules() if m.split(".")[0] == "topologies"})
    assert {m.split(".")[0] for m in reached} == {"topologies"}


def test_transports_need_only_the_wire_layer_of_gossip_sgp() -> None:
    reached = closure({m for m in modules() if m.split(".")[0] == "transports"})
    above = {m for m in reached if m.split(".")[0] == "gossip_sgp"} - WIRE_LAYER
    assert above == set(), f"transports reach {sorted(above)}"


@pytest.mark.timeout(60)
def test_importing_transports_or_topologies_loads_no_training_code() -> None:
    code = (
        "import sys, transports, transports.faults, transports.inproc, transports.zmq, "
        "transports.torchdist, topologies\n"
        "print(sorted(m for m in sys.modules if m == 'prometheus_client' or m in "
        "('gossip_sgp.sgp', 'gossip_sgp.node', 'gossip_sgp.metrics', 'gossip_sgp.protocol')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=50
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
